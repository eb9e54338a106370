//! `bench`: our VMM beside QEMU inside one emulated KVM host.
//!
//! Builds the host initramfs with both VMMs (QEMU with its shared
//! libraries and firmware), runs `testhost-init bench` there, collects its
//! `BENCH` lines and prints medians, ratios (ours/QEMU) and the targets of
//! `performance.md`. Never asserts on time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use e2e::bench::{inside, Collected, Sample};
use e2e::emulated::FileIn;

/// Command line.
#[derive(Debug, Parser)]
#[command(about = "Our VMM beside QEMU in one emulated KVM host: medians and ratios")]
struct Args {
    /// Boots per VMM (boot time, memory).
    #[arg(long, default_value_t = 3)]
    boots: u32,
    /// Hot-add / hot-remove repetitions per VMM.
    #[arg(long, default_value_t = 10)]
    reps: u32,
    /// Resize 1->8->1 repetitions per VMM.
    #[arg(long, default_value_t = 3)]
    resize_reps: u32,
    /// Parts, comma separated: boot,hotplug,resize,capacity.
    #[arg(long, default_value = "boot,hotplug,resize,capacity")]
    parts: String,
    /// VMMs to measure, comma separated: ours,qemu.
    #[arg(long, default_value = "ours,qemu")]
    vmms: String,
    /// The guest agent's load (work items per second) for the capacity part.
    #[arg(long, default_value_t = 100_000)]
    load: u32,
    /// Seconds per throughput window.
    #[arg(long, default_value_t = 4)]
    window: u32,
    /// Bound on the whole run inside the emulated host, seconds.
    #[arg(long, default_value_t = 1500)]
    timeout: u64,
    /// Print every console line of the run.
    #[arg(long)]
    verbose: bool,
}

fn file(inside: &str, host: &Path, mode: u32) -> FileIn {
    FileIn {
        inside: inside.to_string(),
        host: host.to_path_buf(),
        mode,
    }
}

/// QEMU, its shared libraries (at the paths `ldd` names) and firmware.
fn qemu_files() -> Result<Vec<FileIn>> {
    let qemu = e2e::host::HostFacts::probe()
        .qemu
        .context("qemu-system-x86_64 is not installed")?;
    let mut files = vec![file(inside::QEMU, &qemu, 0o755)];
    let out = Command::new("ldd")
        .arg(&qemu)
        .output()
        .context("cannot run ldd")?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            let host = std::fs::canonicalize(p).with_context(|| format!("library {p}"))?;
            files.push(file(p, &host, 0o755));
        }
    }
    for dir in ["/usr/share/seabios", "/usr/share/qemu"] {
        for name in [
            "bios-256k.bin",
            "bios.bin",
            "linuxboot_dma.bin",
            "linuxboot.bin",
            "kvmvapic.bin",
            "multiboot_dma.bin",
            "pvh.bin",
        ] {
            let p = PathBuf::from(dir).join(name);
            if let Ok(host) = std::fs::canonicalize(&p) {
                files.push(file(&p.to_string_lossy(), &host, 0o644));
            }
        }
    }
    Ok(files)
}

fn files() -> Result<Vec<FileIn>> {
    let guest = e2e::artifacts::guest_image().context("the guest image")?;
    let vmm = e2e::artifacts::vmm_binary().context("the static vmm")?;
    let mut files = vec![
        file(inside::VMM, &vmm, 0o755),
        file(inside::VMLINUX, &guest.vmlinux, 0o644),
        file(inside::BZIMAGE, &guest.bzimage, 0o644),
        file(inside::INITRAMFS, &guest.initramfs, 0o644),
    ];
    files.extend(qemu_files()?);
    Ok(files)
}

/// (label, figure, unit, target) rows of the table.
const ROWS: &[(&str, &str, &str, &str)] = &[
    ("start to guest ready", "boot_ms", "ms", "<= 0.4x QEMU"),
    (
        "RSS total after boot",
        "rss_total_mib",
        "MiB",
        "<= 42 MiB (0.5x CH 84)",
    ),
    (
        "RSS own (minus guest RAM)",
        "rss_own_mib",
        "MiB",
        "<= 8 MiB",
    ),
    (
        "hot-add: request to online",
        "hotadd_total_ms",
        "ms",
        "<= 1.1x guest online",
    ),
    (
        "  guest's own online write",
        "hotadd_guest_online_ms",
        "ms",
        "(floor)",
    ),
    (
        "  VMM share (total - guest)",
        "hotadd_vmm_share_ms",
        "ms",
        "<= 10 ms",
    ),
    (
        "hot-remove: request to joined",
        "hotremove_ms",
        "ms",
        "<= 0.8x QEMU",
    ),
    (
        "resize 1 -> 8: all online",
        "resize_1_8_ms",
        "ms",
        "<= 0.8x QEMU",
    ),
    (
        "resize 8 -> 1: all joined",
        "resize_8_1_ms",
        "ms",
        "<= 0.8x QEMU",
    ),
    (
        "capacity: request to 1st item",
        "capacity_ms",
        "ms",
        "<= 1.2x hot-add",
    ),
    ("  its hot-add (?wait)", "capacity_hotadd_ms", "ms", ""),
    ("throughput at 1 vCPU", "throughput_1", "items/s", ""),
    ("throughput at 2 vCPUs", "throughput_2", "items/s", ""),
    ("throughput at 4 vCPUs", "throughput_4", "items/s", ""),
    ("scaling 2/1", "scaling_2", "x", ""),
    ("scaling 4/1", "scaling_4", "x", ""),
];

fn cell(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"))
}

fn table(c: &Collected) {
    println!();
    println!(
        "{:<32} {:>8} {:>10} {:>10} {:>7} {:>4}  target",
        "figure (medians)", "unit", "ours", "QEMU", "ratio", "n"
    );
    for (label, name, unit, target) in ROWS {
        let ours = c.median(name, "ours");
        let qemu = c.median(name, "qemu");
        let ratio = match (ours, qemu) {
            (Some(o), Some(q)) if q > 0.0 => format!("{:.2}", o / q),
            _ => "-".into(),
        };
        let n = c
            .values(name, "ours")
            .len()
            .max(c.values(name, "qemu").len());
        println!(
            "{label:<32} {unit:>8} {:>10} {:>10} {ratio:>7} {n:>4}  {target}",
            cell(ours),
            cell(qemu)
        );
    }
    let (Some(total), Some(guest)) = (
        c.median("hotadd_total_ms", "ours"),
        c.median("hotadd_guest_online_ms", "ours"),
    ) else {
        return;
    };
    println!(
        "ours: hot-add total / guest's own online = {:.2}x (target <= 1.1x)",
        total / guest
    );
    if let (Some(cap), Some(add)) = (
        c.median("capacity_ms", "ours"),
        c.median("hotadd_total_ms", "ours"),
    ) {
        println!(
            "ours: capacity / hot-add total = {:.2}x (target <= 1.2x)",
            cap / add
        );
    }
    if let Some(qt) = c.median("hotadd_total_ms", "qemu") {
        println!(
            "QEMU: hot-add total / its guest online = {:.2}x",
            qt / c
                .median("hotadd_guest_online_ms", "qemu")
                .unwrap_or(f64::NAN)
        );
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let files = files()?;
    let argv: Vec<String> = [
        "/init",
        "bench",
        "--boots",
        &args.boots.to_string(),
        "--reps",
        &args.reps.to_string(),
        "--resize-reps",
        &args.resize_reps.to_string(),
        "--parts",
        &args.parts,
        "--vmms",
        &args.vmms,
        "--load",
        &args.load.to_string(),
        "--window",
        &args.window.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    eprintln!("bench: booting the emulated host ({} files)", files.len());
    let timeout = Duration::from_secs(args.timeout);
    let mut vm = e2e::vm::launch_emulated_payload(files, argv, timeout)
        .context("cannot boot the emulated host")?;
    let mut collected = Collected::default();
    let mut shown = 0;
    let deadline = Instant::now() + timeout + Duration::from_secs(120);
    let status = loop {
        let done = vm.try_exit();
        // Stream what arrived since the last look.
        let log = vm.console_log();
        for line in log.lines().skip(shown) {
            shown += 1;
            let bare = line.split_once("BENCH").map(|(_, r)| format!("BENCH{r}"));
            match bare.as_deref().map(|b| (b, Sample::parse(b))) {
                Some((_, Some(s))) => {
                    println!("{}", s.line());
                    collected.add(s);
                }
                Some((b, None)) if b.starts_with("BENCH-NOTE") => println!("{b}"),
                _ if args.verbose => println!("{line}"),
                _ => {}
            }
        }
        match done {
            Ok(Some(s)) => break Ok(s),
            Err(e) => break Err(e),
            Ok(None) if Instant::now() >= deadline => {
                vm.kill();
                bail!("the emulated host did not finish within {timeout:?}");
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(500)),
        }
    };
    let log = vm.console_log();
    table(&collected);
    match status {
        Ok(0) => Ok(()),
        Ok(s) => {
            eprintln!("--- console tail ---\n{}", tail(&log, 40));
            bail!("the bench job exited with status {s} (some parts failed; figures above are from the parts that ran)")
        }
        Err(e) => {
            eprintln!("--- console tail ---\n{}", tail(&log, 40));
            Err(e).context("the emulated host run")
        }
    }
}

fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
