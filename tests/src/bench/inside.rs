//! The scenarios, run inside the emulated host by `testhost-init bench`:
//! our VMM and QEMU side by side, same kernel, initramfs and command line.
//! Every figure is printed as a [`Sample`] line on stdout.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::client::{http, Lines, Qmp, Stamped};
use super::{BenchError, Result, Sample};

/// Our VMM inside the emulated host.
pub const VMM: &str = "/bin/vmm";
/// QEMU inside the emulated host.
pub const QEMU: &str = "/usr/bin/qemu-system-x86_64";
/// Guest kernel images and initramfs inside the emulated host.
pub const VMLINUX: &str = "/guest/vmlinux";
/// The bzImage (what QEMU boots, as in performance.md).
pub const BZIMAGE: &str = "/guest/bzimage";
/// The guest initramfs.
pub const INITRAMFS: &str = "/guest/initramfs";
const API: &str = "/run/bench-vmm.sock";
const QMP: &str = "/run/bench-qmp.sock";
const MAX: u32 = 8;
const STEP: Duration = Duration::from_secs(30);

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Boots per VMM (boot time and memory).
    pub boots: u32,
    /// Hot-add/hot-remove repetitions.
    pub reps: u32,
    /// Resize 1->8->1 repetitions.
    pub resize_reps: u32,
    /// Parts: boot, hotplug, resize, capacity.
    pub parts: Vec<String>,
    /// VMMs, in order: ours, qemu.
    pub vmms: Vec<Kind>,
    /// Guest command line (both VMMs).
    pub cmdline: String,
    /// `agent.load` for the capacity part.
    pub load: u32,
    /// Seconds per throughput window.
    pub window_secs: u32,
}

impl Config {
    /// Parses `--boots N --reps N --resize-reps N --parts a,b --load N
    /// --window N --cmdline STR`.
    pub fn parse(args: &[String]) -> Result<Config> {
        let mut c = Config {
            boots: 3,
            reps: 10,
            resize_reps: 3,
            parts: vec![
                "boot".into(),
                "hotplug".into(),
                "resize".into(),
                "capacity".into(),
            ],
            vmms: vec![Kind::Ours, Kind::Qemu],
            cmdline: "console=ttyS0 quiet".into(),
            load: 100_000,
            window_secs: 4,
        };
        let mut it = args.iter();
        while let Some(k) = it.next() {
            let v = it
                .next()
                .ok_or_else(|| BenchError::Protocol(format!("{k} needs a value")))?;
            let num = || {
                v.parse::<u32>()
                    .map_err(|_| BenchError::Protocol(format!("{k}: bad number {v}")))
            };
            match k.as_str() {
                "--boots" => c.boots = num()?.max(1),
                "--reps" => c.reps = num()?,
                "--resize-reps" => c.resize_reps = num()?,
                "--load" => c.load = num()?,
                "--window" => c.window_secs = num()?.max(1),
                "--parts" => c.parts = v.split(',').map(str::to_string).collect(),
                "--vmms" => {
                    c.vmms = v
                        .split(',')
                        .map(|name| match name {
                            "ours" => Ok(Kind::Ours),
                            "qemu" => Ok(Kind::Qemu),
                            other => Err(BenchError::Protocol(format!("unknown VMM {other}"))),
                        })
                        .collect::<Result<_>>()?;
                }
                "--cmdline" => c.cmdline = v.clone(),
                _ => return Err(BenchError::Protocol(format!("unknown option {k}"))),
            }
        }
        Ok(c)
    }

    fn part(&self, p: &str) -> bool {
        self.parts.iter().any(|x| x == p)
    }
}

fn emit(name: &str, vmm: Kind, value: f64) {
    let s = Sample {
        name: name.to_string(),
        vmm: vmm.name().to_string(),
        value,
    };
    println!("{}", s.line());
}

fn note(msg: &str) {
    println!("BENCH-NOTE {msg}");
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Which VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Ours.
    Ours,
    /// QEMU.
    Qemu,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Ours => "ours",
            Kind::Qemu => "qemu",
        }
    }
}

/// A VMM running a guest.
struct Vm {
    kind: Kind,
    child: Child,
    console: Lines,
    qmp: Option<Qmp>,
    started: Instant,
    /// Next QEMU cpu id to plug, by socket.
    plugged: Vec<u32>,
}

impl Drop for Vm {
    /// Kills the VMM; waits at most 20 s for it (a KVM teardown can hang
    /// in the emulated host's kernel), then leaves it behind with a note.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        note(&format!(
            "vmm={} pid={} did not exit within 20 s of SIGKILL",
            self.kind.name(),
            self.child.id()
        ));
    }
}

fn spawn(mut cmd: Command, what: &str) -> Result<(Child, Lines, Instant)> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0);
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|e| BenchError::io(what, e))?;
    let out = child
        .stdout
        .take()
        .ok_or_else(|| BenchError::Protocol(format!("{what}: no stdout")))?;
    Ok((child, Lines::spawn(out), started))
}

fn start(kind: Kind, cmdline: &str) -> Result<Vm> {
    let (child, console, started) = match kind {
        Kind::Ours => {
            let _ = std::fs::remove_file(API);
            let mut cmd = Command::new(VMM);
            cmd.args(["--kernel", VMLINUX, "--initramfs", INITRAMFS, "--cmdline"])
                .arg(cmdline)
                .args(["--cpus", &format!("boot=1,max={MAX}"), "--memory", "256M"])
                .args([
                    "--api-socket",
                    API,
                    "--serial",
                    "stdout",
                    "--log-level",
                    "warn",
                ]);
            spawn(cmd, VMM)?
        }
        Kind::Qemu => {
            let _ = std::fs::remove_file(QMP);
            let mut cmd = Command::new(QEMU);
            // -no-reboot: a guest that resets (it happens under nested
            // hotplug churn) ends QEMU, and the part fails at once.
            cmd.args(["-enable-kvm", "-no-reboot", "-cpu", "host", "-smp"])
                .arg(format!("1,maxcpus={MAX}"))
                .args(["-m", "256", "-nodefaults", "-no-user-config"])
                .args(["-display", "none", "-serial", "stdio"])
                .args(["-kernel", BZIMAGE, "-initrd", INITRAMFS, "-append"])
                .arg(cmdline)
                .arg("-qmp")
                .arg(format!("unix:{QMP},server=on,wait=off"));
            spawn(cmd, QEMU)?
        }
    };
    let mut vm = Vm {
        kind,
        child,
        console,
        qmp: None,
        started,
        plugged: Vec::new(),
    };
    if kind == Kind::Qemu {
        vm.qmp = Some(Qmp::connect(Path::new(QMP), STEP)?);
    }
    Ok(vm)
}

/// (total RSS, RSS minus the largest mapping's: the guest RAM) in MiB.
/// (total RSS, RSS outside guest RAM) in MiB. Guest RAM is the biggest
/// mapping together with the mappings contiguous with it: our VMM maps the
/// kernel's file pages over parts of its RAM mapping (`boot::elf_map`),
/// which splits it into several adjacent ones.
fn rss(pid: u32) -> Result<(f64, f64)> {
    let path = format!("/proc/{pid}/smaps");
    let text = std::fs::read_to_string(&path).map_err(|e| BenchError::io(path, e))?;
    // (start, end, rss KiB) per mapping.
    let mut maps: Vec<(u64, u64, u64)> = Vec::new();
    for line in text.lines() {
        let kb = |l: &str| -> u64 {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let range = line
            .split_whitespace()
            .next()
            .and_then(|r| r.split_once('-'))
            .and_then(|(a, b)| {
                Some((
                    u64::from_str_radix(a, 16).ok()?,
                    u64::from_str_radix(b, 16).ok()?,
                ))
            });
        if let Some((a, b)) = range.filter(|_| !line.ends_with(':') && line.contains(' ')) {
            maps.push((a, b, 0));
        } else if line.starts_with("Rss:") {
            if let Some(m) = maps.last_mut() {
                m.2 = kb(line);
            }
        }
    }
    maps.sort_by_key(|m| m.0);
    let total: u64 = maps.iter().map(|m| m.2).sum();
    let Some(big) = (0..maps.len()).max_by_key(|&i| maps[i].1 - maps[i].0) else {
        return Ok((0.0, 0.0));
    };
    // Neighbours join only while the run stays within the guest RAM size
    // (a thread stack may sit right beside it).
    const GUEST_RAM: u64 = 256 << 20;
    let (mut lo, mut hi) = (big, big);
    let fits = |lo: usize, hi: usize| maps[hi].1 - maps[lo].0 <= GUEST_RAM;
    while lo > 0 && maps[lo - 1].1 == maps[lo].0 && fits(lo - 1, hi) {
        lo -= 1;
    }
    while hi + 1 < maps.len() && maps[hi + 1].0 == maps[hi].1 && fits(lo, hi + 1) {
        hi += 1;
    }
    let guest: u64 = maps[lo..=hi].iter().map(|m| m.2).sum();
    Ok((total as f64 / 1024.0, (total - guest) as f64 / 1024.0))
}

fn boot(kind: Kind, cfg: &Config, cmdline: &str, measure: bool) -> Result<Vm> {
    let mut vm = start(kind, cmdline)?;
    let ready = vm
        .console
        .wait("GUEST-READY", Duration::from_secs(120), |l| {
            l.contains("GUEST-READY")
        })?;
    if measure {
        emit("boot_ms", kind, ms(ready.at - vm.started));
        // The guest's own uptime at ready: the rest of boot_ms is the
        // VMM's start-up and the guest's earliest boot.
        match crate::job::field(&ready.line, "up").and_then(|u| u.parse::<f64>().ok()) {
            Some(up) => emit("boot_guest_uptime_ms", kind, up * 1000.0),
            None => note(&format!("no guest uptime in {:?}", ready.line)),
        }
        std::thread::sleep(Duration::from_millis(500));
        let (total, own) = rss(vm.child.id())?;
        emit("rss_total_mib", kind, total);
        emit("rss_own_mib", kind, own);
    }
    let _ = cfg;
    Ok(vm)
}

fn online_line(n: u32) -> String {
    if n == 1 {
        "GUEST-CPU online=0".to_string()
    } else {
        format!("GUEST-CPU online=0-{}", n - 1)
    }
}

/// The agent's `write_us=` of the first `onlined` trace at or after `t0`.
fn guest_write_ms(vm: &mut Vm, t0: Instant) -> Option<f64> {
    let find = |l: &Stamped| {
        (l.at >= t0 && l.line.contains("onlined cpu="))
            .then(|| super::super::job::field(&l.line, "write_us"))
            .flatten()
            .and_then(|v| v.parse::<f64>().ok())
    };
    if let Some(v) = vm.console.seen.iter().find_map(find) {
        return Some(v / 1000.0);
    }
    vm.console
        .wait("the agent's onlined trace", Duration::from_secs(5), |l| {
            l.contains("onlined cpu=")
        })
        .ok()
        .and_then(|l| find(&l))
        .map(|v| v / 1000.0)
}

fn ours_resize(desired: u32) -> Result<()> {
    let (status, body) = http(
        Path::new(API),
        "PUT",
        "/api/v1/vcpus?wait=60",
        Some(&format!("{{\"desired\":{desired}}}")),
    )?;
    if status != 200 || !body.contains("succeeded") {
        return Err(BenchError::Protocol(format!(
            "resize to {desired}: {status} {body}"
        )));
    }
    // A succeeded operation with a reason (e.g. a fallback) is worth seeing.
    if let Ok(v) = serde_json::from_str::<Value>(&body) {
        if let Some(reason) = v["reason"].as_str() {
            note(&format!(
                "resize to {desired}: duration_ms={} reason={reason}",
                v["duration_ms"]
            ));
        }
    }
    Ok(())
}

fn qemu_add(vm: &mut Vm, count: u32) -> Result<()> {
    let qmp = vm
        .qmp
        .as_mut()
        .ok_or_else(|| BenchError::Protocol("no QMP".into()))?;
    let mut ids = Vec::new();
    for _ in 0..count {
        let socket = (1..MAX)
            .find(|s| !vm.plugged.contains(s) && !ids.contains(s))
            .ok_or_else(|| BenchError::Protocol("no free socket".into()))?;
        qmp.send(&format!(
            r#"{{"execute":"device_add","arguments":{{"driver":"host-x86_64-cpu","id":"cpu{socket}","socket-id":0,"core-id":{socket},"thread-id":0}}}}"#
        ))?;
        ids.push(socket);
    }
    for _ in &ids {
        qmp.reply()?;
    }
    vm.plugged.extend(ids);
    Ok(())
}

fn qemu_del(vm: &mut Vm, count: u32) -> Result<()> {
    let qmp = vm
        .qmp
        .as_mut()
        .ok_or_else(|| BenchError::Protocol("no QMP".into()))?;
    let n = (count as usize).min(vm.plugged.len());
    let ids: Vec<u32> = vm.plugged.split_off(vm.plugged.len() - n);
    for id in &ids {
        qmp.send(&format!(
            r#"{{"execute":"device_del","arguments":{{"id":"cpu{id}"}}}}"#
        ))?;
    }
    for _ in &ids {
        qmp.reply()?;
    }
    // One bound for all of them (not STEP each: 7 x 30 s on a dead guest).
    let deadline = Instant::now() + STEP;
    for id in &ids {
        let left = deadline.saturating_duration_since(Instant::now());
        qmp.event("DEVICE_DELETED", &format!("\"device\":\"cpu{id}\""), left)?;
    }
    Ok(())
}

/// Request to all `n` online, for the current VMM; returns the time.
fn grow(vm: &mut Vm, from: u32, to: u32) -> Result<Duration> {
    vm.console.drain();
    let t0 = Instant::now();
    match vm.kind {
        Kind::Ours => {
            ours_resize(to)?;
            Ok(t0.elapsed())
        }
        Kind::Qemu => {
            qemu_add(vm, to - from)?;
            let want = online_line(to);
            let l = vm.console.wait(&want, STEP, |l| {
                l.trim() == want || l.starts_with(&format!("{want} "))
            })?;
            Ok(l.at - t0)
        }
    }
}

/// Request to the vCPU threads gone.
fn shrink(vm: &mut Vm, from: u32, to: u32) -> Result<Duration> {
    vm.console.drain();
    if let Some(q) = vm.qmp.as_mut() {
        q.drain();
    }
    let t0 = Instant::now();
    match vm.kind {
        Kind::Ours => ours_resize(to)?,
        Kind::Qemu => qemu_del(vm, from - to)?,
    }
    Ok(t0.elapsed())
}

fn settle() {
    std::thread::sleep(Duration::from_millis(300));
}

fn hotplug(vm: &mut Vm, cfg: &Config) -> Result<()> {
    let kind = vm.kind;
    for _ in 0..cfg.reps {
        let t0 = Instant::now();
        let total = grow(vm, 1, 2)?;
        emit("hotadd_total_ms", kind, ms(total));
        if let Some(g) = guest_write_ms(vm, t0) {
            emit("hotadd_guest_online_ms", kind, g);
            emit("hotadd_vmm_share_ms", kind, ms(total) - g);
        }
        settle();
        emit("hotremove_ms", kind, ms(shrink(vm, 2, 1)?));
        settle();
    }
    Ok(())
}

fn resize(vm: &mut Vm, cfg: &Config) -> Result<()> {
    let kind = vm.kind;
    for _ in 0..cfg.resize_reps {
        emit("resize_1_8_ms", kind, ms(grow(vm, 1, MAX)?));
        settle();
        emit("resize_8_1_ms", kind, ms(shrink(vm, MAX, 1)?));
        settle();
    }
    Ok(())
}

/// (cpu, items_done) pairs.
type Work = Vec<(u64, u64)>;

/// items_done per CPU from `GET /api/v1/guest/workers`, with the
/// snapshot's age.
fn work() -> Result<(Work, Option<u64>)> {
    let (status, body) = http(Path::new(API), "GET", "/api/v1/guest/workers", None)?;
    if status != 200 {
        return Err(BenchError::Protocol(format!("workers: {status} {body}")));
    }
    let v: Value = serde_json::from_str(&body)
        .map_err(|e| BenchError::Protocol(format!("workers: {e}: {body}")))?;
    let items = v["work"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|w| Some((w["cpu"].as_u64()?, w["items_done"].as_u64()?)))
                .collect()
        })
        .unwrap_or_default();
    Ok((items, v["snapshot_age_ms"].as_u64()))
}

fn items_total(w: &[(u64, u64)]) -> u64 {
    w.iter().map(|(_, n)| n).sum()
}

fn items_on(w: &[(u64, u64)], cpu: u64) -> u64 {
    w.iter().find(|(c, _)| *c == cpu).map_or(0, |(_, n)| *n)
}

fn throughput(cfg: &Config) -> Result<f64> {
    std::thread::sleep(Duration::from_millis(1200));
    let (a, age_a) = work()?;
    let ta = Instant::now();
    std::thread::sleep(Duration::from_secs(cfg.window_secs.into()));
    let (b, age_b) = work()?;
    // Correct the window by the snapshots' ages.
    let secs = ta.elapsed().as_secs_f64()
        + (age_a.unwrap_or(0) as f64 - age_b.unwrap_or(0) as f64) / 1000.0;
    Ok((items_total(&b).saturating_sub(items_total(&a))) as f64 / secs.max(0.1))
}

fn capacity(cfg: &Config) -> Result<()> {
    let cmdline = format!("{} agent.load={}", cfg.cmdline, cfg.load);
    let vm = boot(Kind::Ours, cfg, &cmdline, false)?;
    let kind = vm.kind;
    let t1 = throughput(cfg)?;
    emit("throughput_1", kind, t1);
    for _ in 0..cfg.reps.clamp(1, 5) {
        let before = items_on(&work()?.0, 1);
        let t0 = Instant::now();
        ours_resize(2)?;
        let added = t0.elapsed();
        let deadline = t0 + STEP;
        loop {
            let (w, age) = work()?;
            if items_on(&w, 1) > before {
                // The snapshot was taken `age` ago: the item was done by then.
                let at = t0
                    .elapsed()
                    .saturating_sub(Duration::from_millis(age.unwrap_or(0)));
                emit("capacity_ms", kind, ms(at.max(added)));
                emit("capacity_hotadd_ms", kind, ms(added));
                break;
            }
            if Instant::now() >= deadline {
                return Err(BenchError::Timeout {
                    what: "a work item on the new CPU".into(),
                    secs: STEP.as_secs_f64(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        settle();
        ours_resize(1)?;
        settle();
    }
    ours_resize(2)?;
    let t2 = throughput(cfg)?;
    emit("throughput_2", kind, t2);
    ours_resize(4)?;
    let t4 = throughput(cfg)?;
    emit("throughput_4", kind, t4);
    if t1 > 0.0 {
        emit("scaling_2", kind, t2 / t1);
        emit("scaling_4", kind, t4 / t1);
    }
    Ok(())
}

/// Runs the selected parts; each part's failure is reported and the next
/// part still runs. Returns the exit status.
pub fn main(args: &[String]) -> i32 {
    let cfg = match Config::parse(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bench: {e}");
            return 2;
        }
    };
    let mut failed = 0;
    let mut report = |what: &str, r: Result<()>| {
        if let Err(e) = r {
            failed += 1;
            note(&format!("failed part={what}: {e}"));
        }
    };
    let trace = format!("{} agent.trace", cfg.cmdline);
    for kind in cfg.vmms.clone() {
        note(&format!("vmm={} start", kind.name()));
        let extra = if cfg.part("boot") { cfg.boots } else { 1 };
        let mut last = None;
        for i in 0..extra {
            drop(last.take());
            match boot(kind, &cfg, &trace, cfg.part("boot")) {
                Ok(vm) => last = Some(vm),
                Err(e) => report(&format!("boot {} #{i}", kind.name()), Err(e)),
            }
        }
        if let Some(mut vm) = last {
            if cfg.part("hotplug") {
                let r = hotplug(&mut vm, &cfg);
                report(&format!("hotplug {}", kind.name()), r);
            }
            if cfg.part("resize") {
                let r = resize(&mut vm, &cfg);
                report(&format!("resize {}", kind.name()), r);
            }
        }
    }
    if cfg.part("capacity") && cfg.vmms.contains(&Kind::Ours) {
        report("capacity ours", capacity(&cfg));
    }
    note(&format!("done failed_parts={failed}"));
    i32::from(failed > 0)
}

/// Paths of the files the job needs inside the emulated host.
pub fn inside_paths() -> [PathBuf; 5] {
    [VMM, QEMU, VMLINUX, BZIMAGE, INITRAMFS].map(PathBuf::from)
}
