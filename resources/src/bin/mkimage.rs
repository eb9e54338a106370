//! `mkimage`: builds the guest image (kernel, agent initramfs, command
//! line) into the cache and prints where it is.
//!
//! ```text
//! cargo run -p resources --bin mkimage [-- --json] [--uncompressed]
//!     [--flavour cloud|generic] [--kernel-only]
//! ```

use std::time::Instant;

use anyhow::{bail, Context, Result};
use resources::cpio::Compression;
use resources::kernel::KVM_MODULES;
use resources::Flavour;

const USAGE: &str =
    "usage: mkimage [--json] [--uncompressed] [--flavour cloud|generic] [--kernel-only]

Builds the guest image (Debian kernel, vmlinux, guest-agent initramfs)
in the cache ($HOTPLUG_CACHE or <workspace>/.cache) and prints its paths.
  --json          print one JSON object instead of text
  --uncompressed  plain cpio initramfs instead of gzip
  --flavour F     the kernel's configuration: cloud (linux-image-cloud-amd64,
                  the default) or generic (linux-image-amd64); default
                  $GUEST_KERNEL_FLAVOUR, else cloud
  --kernel-only   only fetch and unpack the kernel (no agent build)

The kernel package comes from apt where apt knows Debian's archive, else
straight from the archive with its signed index verified (gpgv and the
debian-archive-keyring package); HOTPLUG_KERNEL_FETCH=apt|direct forces
one path.";

/// Prints the library's progress and warnings to stderr.
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!("mkimage: {}", record.args());
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

fn main() -> Result<()> {
    let _ = log::set_logger(&LOGGER).map(|()| log::set_max_level(log::LevelFilter::Info));
    let mut json = false;
    let mut compression = Compression::Gzip;
    let mut flavour = Flavour::guest_from_env()?;
    let mut kernel_only = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--json" => json = true,
            "--uncompressed" => compression = Compression::None,
            "--kernel-only" => kernel_only = true,
            "--flavour" => {
                let value = args.next().unwrap_or_default();
                flavour = value.parse().map_err(|()| {
                    anyhow::anyhow!("--flavour {value:?}: expected cloud or generic")
                })?;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let start = Instant::now();
    if kernel_only {
        let k = resources::ensure_kernel_flavour(flavour).context("fetching the kernel")?;
        let elapsed = start.elapsed().as_secs_f64();
        if json {
            let value = serde_json::json!({
                "version": k.version,
                "flavour": k.flavour.name(),
                "package": k.package,
                "bzimage": k.bzimage,
                "vmlinux": k.vmlinux,
                "config": k.config(),
                "modules": k.modules,
                "pvh_entry": k.pvh_entry,
                "seconds": elapsed,
            });
            println!("{}", serde_json::to_string_pretty(&value)?);
        } else {
            println!(
                "kernel     {} ({}, {} flavour)",
                k.version, k.package, k.flavour
            );
            println!("vmlinux    {}", k.vmlinux.display());
            println!("config     {}", k.config().display());
            println!("took       {elapsed:.2} s");
        }
        return Ok(());
    }
    let image = resources::guest_image::ensure_guest_image_for(
        &resources::cache_dir(),
        compression,
        flavour,
    )
    .context("building the guest image")?;
    let elapsed = start.elapsed();
    let k = &image.kernel;
    let modules: Vec<(&str, String)> = KVM_MODULES
        .iter()
        .map(|m| {
            (
                *m,
                k.module_path(m)
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            )
        })
        .collect();
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    if json {
        let kvm_modules: serde_json::Map<String, serde_json::Value> = modules
            .iter()
            .map(|(name, path)| ((*name).to_owned(), path.clone().into()))
            .collect();
        let value = serde_json::json!({
            "kernel": {
                "version": k.version,
                "flavour": k.flavour.name(),
                "package": k.package,
                "bzimage": k.bzimage,
                "vmlinux": k.vmlinux,
                "modules": k.modules,
                "pvh_entry": k.pvh_entry,
                "kvm_modules": kvm_modules,
            },
            "initramfs": image.initramfs,
            "initramfs_bytes": size(&image.initramfs),
            "agent": image.agent,
            "cmdline": image.cmdline,
            "cache": resources::cache_dir(),
            "seconds": elapsed.as_secs_f64(),
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!(
            "kernel     {} ({}, {} flavour)",
            k.version, k.package, k.flavour
        );
        println!(
            "bzimage    {} ({} bytes)",
            k.bzimage.display(),
            size(&k.bzimage)
        );
        println!(
            "vmlinux    {} ({} bytes)",
            k.vmlinux.display(),
            size(&k.vmlinux)
        );
        match k.pvh_entry {
            Some(e) => println!("pvh entry  {e:#x}"),
            None => println!("pvh entry  none (the vmlinux has no XEN_ELFNOTE_PHYS32_ENTRY)"),
        }
        println!("modules    {}", k.modules.display());
        for (name, path) in &modules {
            println!("  {name:<10} {path}");
        }
        println!(
            "agent      {} ({} bytes)",
            image.agent.display(),
            size(&image.agent)
        );
        println!(
            "initramfs  {} ({} bytes)",
            image.initramfs.display(),
            size(&image.initramfs)
        );
        println!("cmdline    {}", image.cmdline);
        println!("took       {:.2} s", elapsed.as_secs_f64());
    }
    Ok(())
}
