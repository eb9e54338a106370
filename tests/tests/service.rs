//! The agent as a service of a guest with its own init, end to end.
//!
//! PID 1 is Debian's static busybox (`busybox-static`, fetched like the
//! kernel: `resources::busybox`) running its `init` with an
//! `/etc/inittab`: the `sysinit` script mounts proc, sysfs and devtmpfs,
//! then init starts (and respawns) `guest-agent --service --hook
//! /bin/cpu-hook`. The hook is a shell script printing `CPU-HOOK
//! event=... cpu=... vcpu=...` for every CPU event. One hot-add and one
//! hot-remove through the API: the API's view and the guest's agree, the
//! operations complete on the agent's reports (not on the bare ACPI
//! events), and the hook ran for add, online, offline and remove, in that
//! order. Then the hook stops the agent (SIGTERM): the VMM hears it is
//! `stopping`, init respawns it, and a second add completes through the new
//! agent.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api::client::{BlockingClient, ClientError, MutationOutcome};
use api::VcpuState;
use e2e::guest_view::wait_guest_online;
use e2e::RunningVm;
use resources::cpio::Compression;

type TestResult<T = ()> = Result<T, e2e::BoxError>;

const WAIT: Duration = Duration::from_secs(90);
/// The vCPU hot-added (Linux numbers it cpu1: the second CPU it meets).
const ADDED: u32 = 2;

/// busybox init's table: mount, then the agent as a respawned service.
const INITTAB: &str = "\
::sysinit:/etc/init.d/rcS
::respawn:/bin/guest-agent --service --hook /bin/cpu-hook
::shutdown:/bin/busybox echo SERVICE-INIT shutdown
";

/// What the distribution's early boot does before services start.
const RCS: &str = "#!/bin/sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs -o mode=0755 devtmpfs /dev
echo \"SERVICE-INIT up: pid1=$(/bin/busybox cat /proc/1/comm)\"
";

/// The user's hook: one recognisable line per CPU event. On the first
/// `remove` it also stops the agent (SIGTERM, as `systemctl stop` would),
/// which init then respawns.
const HOOK: &str = "#!/bin/sh
echo \"CPU-HOOK event=$VMM_CPU_EVENT cpu=$VMM_CPU vcpu=${VMM_VCPU_ID:-?}\"
if [ \"$VMM_CPU_EVENT\" = remove ] && [ ! -e /tmp/agent-stopped ]; then
  : > /tmp/agent-stopped
  /bin/busybox kill -TERM $(/bin/busybox pidof guest-agent)
fi
";

/// A scratch directory removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The initramfs: busybox as `/init` (its `init` applet), the agent as
/// `/bin/guest-agent`, the hook, the inittab and the rcS script.
fn build_initramfs(busybox: &Path, agent: &Path, dir: &Path) -> std::io::Result<PathBuf> {
    let mut archive = resources::guest_image::base_archive();
    archive
        .dir("bin", 0o755)
        .dir("sbin", 0o755)
        .dir("etc", 0o755)
        .dir("etc/init.d", 0o755);
    archive.file_from_host("bin/busybox", busybox, 0o755)?;
    archive.file_from_host("bin/guest-agent", agent, 0o755)?;
    archive
        .symlink("init", "/bin/busybox")
        .symlink("sbin/init", "/bin/busybox")
        .symlink("bin/sh", "busybox")
        .bytes("etc/inittab", INITTAB.as_bytes().to_vec(), 0o644)
        .bytes("etc/init.d/rcS", RCS.as_bytes().to_vec(), 0o755)
        .bytes("bin/cpu-hook", HOOK.as_bytes().to_vec(), 0o755);
    let path = dir.join("initramfs.cpio");
    archive.write_to(std::fs::File::create(&path)?, Compression::None)?;
    Ok(path)
}

/// [`e2e::ops::succeeded`], completed on the agent's report (not on the
/// bare ACPI event).
fn finished(what: &str, r: Result<MutationOutcome, ClientError>) -> TestResult<api::Operation> {
    let op = e2e::ops::succeeded(what, r)?;
    if format!("{:?}", op.reason).contains("no guest agent") {
        return Err(format!("{what} completed without the agent: {op:?}").into());
    }
    Ok(op)
}

fn set(ids: impl IntoIterator<Item = u32>) -> BTreeSet<u32> {
    ids.into_iter().collect()
}

/// The hook's lines on the console so far, in order.
fn hook_lines(vm: &RunningVm) -> Vec<String> {
    vm.console()
        .lines()
        .iter()
        .filter_map(|l| {
            l.text
                .split_once("CPU-HOOK ")
                .map(|(_, rest)| rest.trim().to_owned())
        })
        .collect()
}

fn wait_hook(vm: &RunningVm, line: &str) -> TestResult {
    let want = format!("CPU-HOOK {line}");
    vm.wait_for_console(want.as_str(), WAIT).map_err(|e| {
        format!(
            "no {want:?} on the console: {e}; hook lines {:?}",
            hook_lines(vm)
        )
    })?;
    Ok(())
}

fn scenario(vm: &mut RunningVm) -> TestResult {
    let init = vm.wait_for_console("SERVICE-INIT up", Duration::from_secs(240))?;
    println!("{init}");
    if !init.contains("pid1=init") {
        return Err(format!("PID 1 is not busybox's init: {init}").into());
    }
    let ready = vm.wait_for_console("GUEST-READY", Duration::from_secs(120))?;
    println!("service agent: {ready}");
    for want in ["agent=1", "mailbox=1", "vcpus=0 "] {
        if !ready.contains(want) {
            return Err(format!("ready line lacks {want:?}: {ready}").into());
        }
    }
    vm.wait_for_console("GUEST-HOOK \"/bin/cpu-hook\"", WAIT)?;
    let client = BlockingClient::new(vm.api_socket())?;
    let deadline = Instant::now() + WAIT;
    while client.vm()?.agent_connected != Some(true) {
        if Instant::now() > deadline {
            return Err(format!("agent not connected: {:?}", client.vm()?).into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_guest_online(vm, &set([0]), WAIT)?;

    // Hot-add: the service agent onlines it and reports it; the hook runs
    // for the add and the online.
    finished("add", client.add_vcpu(ADDED, Some(WAIT)))?;
    let numbers = wait_guest_online(vm, &set([0, ADDED]), WAIT)?;
    let cpu = numbers
        .get(&ADDED)
        .copied()
        .ok_or("no guest CPU number for the added vCPU")?;
    wait_hook(vm, &format!("event=add cpu={cpu} vcpu={ADDED}"))?;
    wait_hook(vm, &format!("event=online cpu={cpu} vcpu={ADDED}"))?;
    let v = client.vcpus()?.vcpus[ADDED as usize].clone();
    if v.state != VcpuState::Present || v.guest_cpu != Some(cpu) || v.guest_online != Some(true) {
        return Err(format!("vCPU {ADDED} after its add: {v:?}").into());
    }

    // Hot-remove: the agent offlines it on the VMM's request, the guest
    // ejects it; the hook runs for the offline and the remove.
    // (The agent's restart below happens from here on.)
    let mark = vm.console_mark();
    finished("remove", client.remove_vcpu(ADDED, Some(WAIT)))?;
    wait_guest_online(vm, &set([0]), WAIT)?;
    wait_hook(vm, &format!("event=offline cpu={cpu} vcpu={ADDED}"))?;
    wait_hook(vm, &format!("event=remove cpu={cpu} vcpu={ADDED}"))?;
    let v = client.vcpus()?.vcpus[ADDED as usize].clone();
    if v.state != VcpuState::Absent {
        return Err(format!("vCPU {ADDED} after its removal: {v:?}").into());
    }
    let events: Vec<String> = hook_lines(vm)
        .iter()
        .filter(|l| l.ends_with(&format!("cpu={cpu} vcpu={ADDED}")))
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_owned())
        .collect();
    let want = ["event=add", "event=online", "event=offline", "event=remove"];
    if events != want {
        return Err(format!("hook events {events:?}, expected {want:?}").into());
    }

    // The hook stopped the agent on that remove (SIGTERM): it told the VMM
    // it was stopping, init respawned it, and the new agent took the
    // conversation (and the mailbox) up again: a second add completes on
    // its report.
    vm.wait_for_console("guest agent stopping: signal=SIGTERM", WAIT)?;
    vm.wait_for_console("GUEST-AGENT-EXIT signal=SIGTERM", WAIT)?;
    let (_, again) = vm.wait_for_console_after(mark, "GUEST-READY", WAIT)?;
    println!("respawned agent: {again}");
    let deadline = Instant::now() + WAIT;
    while client.vm()?.agent_connected != Some(true) {
        if Instant::now() > deadline {
            return Err(format!("respawned agent not connected: {:?}", client.vm()?).into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    finished("add after the respawn", client.add_vcpu(ADDED, Some(WAIT)))?;
    wait_guest_online(vm, &set([0, ADDED]), WAIT)?;

    let log = vm.console_log();
    for bad in [
        "BUG:",
        "Oops",
        "Call Trace",
        "GUEST-FATAL",
        "GUEST-POWEROFF",
        "GUEST-WARN hook",
        "GUEST-ERROR",
    ] {
        if log.contains(bad) {
            return Err(format!("{bad:?} on the console").into());
        }
    }
    Ok(())
}

#[test]
fn agent_as_a_service_under_busybox_init_with_a_hook() {
    let busybox = match resources::ensure_busybox() {
        Ok(b) => b,
        Err(e) if e.is_unavailable() => {
            e2e::skip(&format!("cannot get busybox: {}", e2e::chain(&e)));
            return;
        }
        Err(e) => panic!("busybox: {}", e2e::chain(&e)),
    };
    println!("busybox: {} via {}", busybox.package, busybox.via);
    let guest = match e2e::artifacts::guest_image() {
        Ok(g) => g,
        Err(e) => {
            if let Some(why) = e.skip_reason() {
                e2e::skip(&why);
                return;
            }
            panic!("the guest image: {}", e2e::chain(&e));
        }
    };
    let dir = Scratch(std::env::temp_dir().join(format!("e2e-service-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).expect("scratch directory");
    let initramfs = build_initramfs(&busybox.path, &guest.agent, &dir.0).expect("the initramfs");
    let mut spec = e2e::VmSpec::new(1, 4).timeout(Duration::from_secs(600));
    spec.initramfs = Some(initramfs);
    e2e::run_test(
        "agent_as_a_service_under_busybox_init_with_a_hook",
        &spec,
        scenario,
    );
}
