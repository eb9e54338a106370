//! `vmm`: boot a Linux guest whose vCPUs can be added and removed at run time.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use vmm::boot::KernelSpec;
use vmm::config::{parse_size, CpusConfig, SerialOutput, VmConfig};
use vmm::event_loop::Vmm;
use vmm::kvm_check::{self, KvmFlavor};

/// A VMM specialised in vCPU hot-add and hot-remove.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Guest kernel: an ELF vmlinux with a PVH note, or a bzImage.
    /// Without it, the default guest image is built (or reused) and booted.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs (cpio, optionally compressed).
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Kernel command line (the default image's when omitted with --kernel).
    #[arg(long)]
    cmdline: Option<String>,
    /// Append to the kernel command line.
    #[arg(long)]
    append: Option<String>,
    /// vCPUs: boot=N,max=M (or just N).
    #[arg(long, default_value = "boot=1,max=8")]
    cpus: CpusConfig,
    /// Guest memory, e.g. 256M or 1G.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    memory: u64,
    /// Serve the HTTP API on this Unix socket.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Console output: stdout, off, or file:PATH.
    #[arg(long, default_value = "stdout")]
    serial: SerialOutput,
    /// Serve the test-only API routes (/api/v1/test/..., fault injection)
    /// for end-to-end tests. Never in production.
    #[arg(long)]
    test_hooks: bool,
    /// How long the guest has for each hotplug step, in seconds:
    /// add=30,prepare=10,eject=30,restore=10 (keys left out keep these).
    #[arg(long, value_parser = vmm::config::parse_timeouts, default_value = "")]
    hotplug_timeouts: vmm::hotplug::Timeouts,
    /// Boot even though /dev/kvm is PVM (stock kernels will not boot).
    #[arg(long)]
    allow_pvm: bool,
    /// Log level: error, warn, info, debug, trace.
    #[arg(long, default_value = "info", value_parser = parse_level)]
    log_level: log::LevelFilter,
}

fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("unknown log level {s:?}: use error, warn, info, debug or trace"))
}

struct StderrLogger {
    start: Instant,
}

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            let t = self.start.elapsed().as_secs_f64();
            // One write per line: stderr is unbuffered, and the guest
            // console may share the terminal.
            let line = format!("[vmm {t:9.3}s {:5}] {}\n", r.level(), r.args());
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
        }
    }
    fn flush(&self) {}
}

fn init_logging(level: log::LevelFilter) {
    let logger = Box::leak(Box::new(StderrLogger {
        start: Instant::now(),
    }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

fn kernel_spec(cli: &Cli) -> anyhow::Result<KernelSpec> {
    let mut spec = match &cli.kernel {
        Some(kernel) => KernelSpec {
            kernel: kernel.clone(),
            initramfs: cli.initramfs.clone(),
            cmdline: cli
                .cmdline
                .clone()
                .unwrap_or_else(|| "console=ttyS0 reboot=acpi panic=-1".into()),
        },
        None => {
            let image =
                resources::ensure_guest_image().context("cannot build the default guest image")?;
            KernelSpec {
                kernel: image.kernel.bzimage.clone(),
                initramfs: Some(cli.initramfs.clone().unwrap_or(image.initramfs)),
                cmdline: cli.cmdline.clone().unwrap_or(image.cmdline),
            }
        }
    };
    if let Some(extra) = &cli.append {
        spec.cmdline = format!("{} {extra}", spec.cmdline);
    }
    Ok(spec)
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    kvm_check::check_device(std::path::Path::new("/dev/kvm"))?;
    if kvm_check::flavor(std::path::Path::new("/sys")) == KvmFlavor::Pvm && !cli.allow_pvm {
        bail!("{}", kvm_check::PVM_MESSAGE);
    }
    let cfg = VmConfig {
        kernel: kernel_spec(&cli)?,
        cpus: cli.cpus,
        memory: cli.memory,
        api_socket: cli.api_socket.clone(),
        serial: cli.serial.clone(),
        test_hooks: cli.test_hooks,
        timeouts: cli.hotplug_timeouts,
    };
    if cfg.test_hooks {
        log::warn!("test hooks enabled: the API serves /api/v1/test/ (fault injection)");
    }
    let vmm = Vmm::start(&cfg)?;
    let reason = vmm.run()?;
    log::debug!("exiting with status {}", reason.exit_code());
    Ok(reason.exit_code())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_level);
    match run(cli) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("vmm: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
