//! What `testhost-init` runs inside the emulated host, and the console
//! lines it answers with. Shared by the harness and `testhost-init`.

use serde::{Deserialize, Serialize};

/// Where the job description lives in the host initramfs.
pub const JOB_PATH: &str = "/job.json";
/// The serial port carrying the API forward inside the emulated host.
pub const FORWARD_TTY: &str = "/dev/ttyS1";

/// Printed once the modules are loaded and `/dev/kvm` works.
pub const READY: &str = "TESTHOST-READY";
/// Printed with the job's exit status, just before power-off.
pub const EXIT: &str = "TESTHOST-EXIT";
/// Printed on any failure of `testhost-init` itself.
pub const ERROR: &str = "TESTHOST-ERROR";
/// Written into the emulated host's kernel log every [`ALIVE_EVERY`] once
/// it is ready, so that it reaches the harness on the kernel console
/// (ttyS0, whole messages): a host whose kernel stopped printing it has
/// frozen (see [`crate::emulated::FROZEN_AFTER`]).
pub const ALIVE: &str = "TESTHOST-ALIVE";
/// How often [`ALIVE`] is written.
pub const ALIVE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// After this long without a line from the job, `testhost-init` writes
/// its threads' state into the kernel log (a `TESTHOST-DIAG` report), and
/// again every [`SILENCE_REPEAT`] while the silence lasts: what a test
/// that then times out waiting for the VMM or the guest was stuck on.
pub const SILENCE_REPORT: std::time::Duration = std::time::Duration::from_secs(20);
/// See [`SILENCE_REPORT`].
pub const SILENCE_REPEAT: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether a silence report is due: the job has printed nothing for
/// `quiet`, and the last report of this silence was `since_report` ago
/// (`None`: none yet).
pub fn silence_report_due(
    quiet: std::time::Duration,
    since_report: Option<std::time::Duration>,
) -> bool {
    match since_report {
        Some(ago) => ago >= SILENCE_REPEAT,
        None => quiet >= SILENCE_REPORT,
    }
}

/// A kernel module to load, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Module {
    /// Path of the `.ko` file inside the emulated host.
    pub path: String,
    /// Module parameters, e.g. `nested=1`.
    pub params: String,
}

/// The job description, `/job.json` in the host initramfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Modules to load with `finit_module`, in order.
    pub modules: Vec<Module>,
    /// The program to run and its arguments (`argv[0]` is a path).
    pub argv: Vec<String>,
    /// Unix socket inside the emulated host that forwarded API channels
    /// connect to; `None` disables the forward.
    pub api_socket: Option<String>,
    /// Kill the program after this many seconds.
    pub timeout_secs: u64,
}

/// Exit status encoding of a program killed by a signal (shell convention).
pub fn signal_status(signal: i32) -> i32 {
    128 + signal
}

/// The status in a `TESTHOST-EXIT status=N ...` line.
pub fn parse_exit(line: &str) -> Option<i32> {
    let rest = line.trim().strip_prefix(EXIT)?;
    rest.split_whitespace()
        .find_map(|kv| kv.strip_prefix("status="))
        .and_then(|v| v.parse().ok())
}

/// The value of `key=` in a marker line such as `TESTHOST-READY boot_ms=2100`.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
}

/// The harness prefixes the emulated host's kernel console (its ttyS0)
/// with this; `testhost-init`, the VMM and the guest print on ttyS2 and
/// reach the console without prefix. So a guest's soft lockup is never
/// mistaken for the emulated host's.
pub const HOST_PREFIX: &str = "host: ";
/// Where `testhost-init` and the job print (the outer QEMU's stdio).
pub const CONSOLE_TTY: &str = "/dev/ttyS2";

/// Kernel messages that mean the emulated host itself failed (not our VMM).
/// The last two are the emulated host's own KVM overflowing its kernel
/// stack in a vCPU thread of the VMM, which then panics the host: seen
/// under sustained hotplug churn, right after the nested guest's vCPU
/// state was found holding the host's own kernel RIP and RSP (a world
/// switch the emulated SVM got wrong; see tests/README.md).
const HOST_FAILURES: &[&str] = &[
    "BUG: soft lockup",
    "Watchdog detected hard LOCKUP",
    "rcu_sched self-detected stall",
    "rcu_preempt self-detected stall",
    "TASK stack guard page was hit",
    "corrupted stack end detected inside scheduler",
];

/// If `line` is the emulated host's kernel reporting a failure of its own,
/// which one.
pub fn host_failure(line: &str) -> Option<&'static str> {
    let msg = line.strip_prefix(HOST_PREFIX)?;
    HOST_FAILURES.iter().copied().find(|p| msg.contains(p))
}

/// What the nested guest's kernel does when the emulated host's nested
/// virtualization (SVM emulated by QEMU's TCG) mishandles it under vCPU
/// hotplug churn: a triple fault (reset) or a CPU that stops answering.
/// QEMU as the VMM in the same emulated host shows the same resets on the
/// same resize 8 -> 1 steps (`bench --parts resize --vmms qemu`, see
/// tests/README.md), so in the emulated host only they are treated like
/// the host's own failures: retried once, announced. Never on real KVM.
const NESTED_GUEST_FAILURES: &[&str] = &[
    "triple fault, the guest resets",
    "rcu: INFO: rcu_preempt detected stalls",
];

/// If `line` (the VMM's log or the guest's console, not the emulated
/// host's kernel) shows the nested guest failing as described at
/// `NESTED_GUEST_FAILURES`, which failure.
pub fn nested_guest_failure(line: &str) -> Option<&'static str> {
    if line.starts_with(HOST_PREFIX) {
        return None;
    }
    NESTED_GUEST_FAILURES
        .iter()
        .copied()
        .find(|p| line.contains(p))
}

/// The emulated host's kernel panicked for a reason of ours (e.g.
/// `testhost-init` died); a panic that [`host_failure`] classifies as the
/// emulation's is not one.
pub fn host_panic(line: &str) -> bool {
    line.strip_prefix(HOST_PREFIX)
        .is_some_and(|m| m.contains("Kernel panic"))
        && host_failure(line).is_none()
}

/// How a run of the emulated host ended, read from its console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Still running: nothing decisive yet.
    Running,
    /// `TESTHOST-READY` (during boot) or `TESTHOST-EXIT status=N`.
    Done(Option<i32>),
    /// `testhost-init` reported an error, or the host kernel panicked:
    /// our fault, never retried.
    Error(String),
    /// The emulated host's own failure: retried once.
    HostFailed(String),
}

/// Classifies console lines. `until_ready` looks for `TESTHOST-READY`,
/// otherwise for `TESTHOST-EXIT`; `ended` says QEMU has exited, so that
/// a missing marker means the emulated host reset.
pub fn outcome<'a>(
    lines: impl IntoIterator<Item = &'a str>,
    until_ready: bool,
    ended: bool,
) -> Outcome {
    let mut failure = None;
    for line in lines {
        if until_ready && line.starts_with(READY) {
            return Outcome::Done(None);
        }
        if !until_ready {
            if let Some(status) = parse_exit(line) {
                return Outcome::Done(Some(status));
            }
        }
        // Before it has its own port, testhost-init prints on ttyS0.
        let bare = line.strip_prefix(HOST_PREFIX).unwrap_or(line);
        if bare.starts_with(ERROR) || host_panic(line) {
            return Outcome::Error(line.to_string());
        }
        if failure.is_none() && host_failure(line).is_some() {
            failure = Some(line.to_string());
        }
    }
    match (failure, ended) {
        (Some(f), _) => Outcome::HostFailed(f),
        (None, true) => Outcome::HostFailed(format!(
            "QEMU exited before {}: the emulated host reset",
            if until_ready { READY } else { EXIT }
        )),
        (None, false) => Outcome::Running,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_markers() {
        assert_eq!(parse_exit("TESTHOST-EXIT status=0"), Some(0));
        assert_eq!(parse_exit("TESTHOST-EXIT status=137 signal=9"), Some(137));
        assert_eq!(parse_exit("GUEST TESTHOST-EXIT status=1"), None);
        assert_eq!(
            field("TESTHOST-READY init_ms=2100 modules_ms=600", "modules_ms"),
            Some("600")
        );
    }

    #[test]
    fn silence_is_reported_once_then_every_minute() {
        use std::time::Duration as D;
        assert!(!silence_report_due(D::from_secs(19), None));
        assert!(silence_report_due(D::from_secs(20), None));
        assert!(!silence_report_due(
            D::from_secs(50),
            Some(D::from_secs(30))
        ));
        assert!(silence_report_due(D::from_secs(80), Some(D::from_secs(60))));
    }

    #[test]
    fn nested_guest_failures_are_the_guests_lines_only() {
        assert_eq!(
            nested_guest_failure("[vmm 1.0s INFO ] vCPU 3: triple fault, the guest resets; rip=0"),
            Some("triple fault, the guest resets")
        );
        assert!(nested_guest_failure(
            "[ 27.7] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:"
        )
        .is_some());
        assert_eq!(
            nested_guest_failure("host: [ 1.0] rcu: INFO: rcu_preempt detected stalls"),
            None
        );
        assert_eq!(nested_guest_failure("GUEST-CPU online=0-3"), None);
    }

    #[test]
    fn only_the_hosts_own_lockups_count() {
        let host = "host: [ 52.1] watchdog: BUG: soft lockup - CPU#1 stuck for 22s!";
        let guest = "[ 52.1] watchdog: BUG: soft lockup - CPU#1 stuck for 22s!";
        assert!(host_failure(host).is_some());
        assert!(host_failure(guest).is_none());
        assert!(host_panic(
            "host: [ 3.0] Kernel panic - not syncing: Attempted to kill init!"
        ));
        assert!(!host_panic("[ 3.0] Kernel panic - not syncing: VFS"));
        let overflow = "host: [ 202.9] Kernel panic - not syncing: \
                        corrupted stack end detected inside scheduler";
        assert!(!host_panic(overflow) && host_failure(overflow).is_some());
        assert!(host_failure("host: [ 202.9] BUG: TASK stack guard page was hit at 0").is_some());
    }

    #[test]
    fn classifies_outcomes() {
        let boot = ["host: [0.0] Linux version", "TESTHOST-READY init_ms=1"];
        assert_eq!(outcome(boot, true, false), Outcome::Done(None));
        assert_eq!(outcome(["host: x"], true, false), Outcome::Running);
        // A reset: QEMU gone without the marker.
        assert!(matches!(
            outcome(["host: x"], true, true),
            Outcome::HostFailed(_)
        ));
        assert!(matches!(
            outcome(["TESTHOST-READY", "guest line"], false, true),
            Outcome::HostFailed(_)
        ));
        // Our failures are never the host's.
        assert!(matches!(
            outcome(["TESTHOST-ERROR stage=modules cannot load"], true, true),
            Outcome::Error(_)
        ));
        assert!(matches!(
            outcome(
                ["host: Kernel panic - not syncing: Attempted to kill init!"],
                true,
                true
            ),
            Outcome::Error(_)
        ));
        // A guest panic followed by a clean exit is the VMM's status.
        let run = [
            "TESTHOST-READY",
            "[1.0] Kernel panic - not syncing: guest",
            "TESTHOST-EXIT status=1",
        ];
        assert_eq!(outcome(run, false, true), Outcome::Done(Some(1)));
        let lockup = ["TESTHOST-READY", "host: watchdog: BUG: soft lockup - CPU#0"];
        assert!(matches!(
            outcome(lockup, false, false),
            Outcome::HostFailed(_)
        ));
    }
}
