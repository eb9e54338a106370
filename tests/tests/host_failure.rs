//! The launcher when the emulated KVM host itself fails under the VM
//! (simulated with the fake QEMU): one plain line and exit status 123
//! (`e2e::launcher::HOST_FAILED`), in plain mode (`e2e::launcher::Plain`,
//! what `launch` runs) and in `--run` mode (`workload::follow` and
//! `workload::cli::conclude`, what `launch --run` runs); the VMM's own
//! statuses and our own errors stay what they are.

mod common;

use api::workload::WorkloadSpec;
use common::{Fake, READY};
use e2e::launcher::{Plain, HOST_FAILED};
use e2e::workload::{self, cli, Config, Sink};
use e2e::VmSpec;

const BLAME: &str = "this is a fault of the nested emulation on this machine, \
                     not of the guest or the VMM; see tests/README.md";

/// The emulated host's kernel overflowing its stack in KVM, as seen in the
/// soak: a guard page hit, then the panic (QEMU ends: `-no-reboot`).
const STACK_OVERFLOW: &str = "kcon: [ 202.9] BUG: TASK stack guard page was hit at 00000000\n\
     kcon: [ 202.9] Kernel panic - not syncing: corrupted stack end detected inside scheduler\n";

/// Plain mode on `fake`: (status, the launcher's lines).
fn plain(fake: &Fake) -> (i32, Vec<String>) {
    let mut lines = Vec::new();
    let mut say = |l: &str| lines.push(l.to_owned());
    let status = Plain {
        say: &mut say,
        interrupted: &|| None,
        timeout: None,
        socket_is_default: false,
    }
    .run(|| fake.launch());
    (status, lines)
}

/// The one host-failure line among `lines`, checked for its form.
fn the_line(lines: &[String], says: &str) -> String {
    let found: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("the emulated KVM host failed ("))
        .collect();
    assert_eq!(found.len(), 1, "{lines:#?}");
    let line = found[0];
    assert!(line.ends_with(BLAME), "{line}");
    assert!(line.contains(says), "{line}");
    assert!(!line.contains('\n'), "{line}");
    line.clone()
}

#[test]
fn plain_mode_a_host_panic_after_ready_is_status_123_and_one_line() {
    let fake = Fake::new(
        "plain-overflow",
        &format!("--- attempt 1\n{READY}\nsleep 300\n{STACK_OVERFLOW}exit 0\n"),
    );
    let (status, lines) = plain(&fake);
    assert_eq!(status, HOST_FAILED, "{lines:#?}");
    the_line(&lines, "TASK stack guard page was hit");
    // It booted and said where its socket is first.
    assert!(
        lines.iter().any(|l| l.starts_with("API socket: ")),
        "{lines:#?}"
    );
}

#[test]
fn plain_mode_a_host_reset_after_ready_is_status_123() {
    let fake = Fake::new("plain-reset", &format!("--- attempt 1\n{READY}\nexit 0\n"));
    let (status, lines) = plain(&fake);
    assert_eq!(status, HOST_FAILED, "{lines:#?}");
    the_line(&lines, "the emulated host reset");
}

#[test]
fn plain_mode_a_host_that_never_boots_is_status_123() {
    // A reset before ready, twice: the one retry spent.
    let fake = Fake::new(
        "plain-noboot",
        "--- attempt 1\nexit 0\n--- attempt 2\nkcon: [ 1.0] Linux version 6.1\nexit 0\n",
    );
    let (status, lines) = plain(&fake);
    assert_eq!(status, HOST_FAILED, "{lines:#?}");
    the_line(&lines, "TESTHOST-READY");
    assert_eq!(fake.starts(), 2);
}

#[test]
fn plain_mode_the_vmms_status_and_our_errors_are_not_the_hosts() {
    let fake = Fake::new(
        "plain-vmm",
        &format!("--- attempt 1\n{READY}\nout: TESTHOST-EXIT status=3 run_ms=5\nexit 0\n"),
    );
    let (status, lines) = plain(&fake);
    assert_eq!(status, 3, "{lines:#?}");
    assert!(
        lines.iter().all(|l| !l.contains("KVM host failed")),
        "{lines:#?}"
    );

    let fake = Fake::new(
        "plain-ours",
        "--- attempt 1\nout: TESTHOST-ERROR stage=modules cannot load kvm-amd.ko\nexit 0\n",
    );
    let (status, lines) = plain(&fake);
    assert_eq!(status, 1, "{lines:#?}");
    assert!(lines.iter().any(|l| l.starts_with("error: ")), "{lines:#?}");
    assert!(
        lines.iter().all(|l| !l.contains("KVM host failed")),
        "{lines:#?}"
    );
}

/// The launcher's lines in `--run` mode.
#[derive(Default)]
struct Notes(Vec<String>);

impl Sink for Notes {
    fn out(&mut self, _: &str) {}
    fn err(&mut self, _: &str) {}
    fn note(&mut self, line: &str) {
        self.0.push(line.to_owned());
    }
    fn console(&mut self, _: &str) {}
}

fn run_mode(fake: &Fake) -> (i32, Vec<String>) {
    let cfg = Config {
        spec: VmSpec::new(1, 2),
        adds: Vec::new(),
        workload: WorkloadSpec::new(vec!["/bin/mytest".into()]),
        churn: None,
        timeout: None,
    };
    let mut notes = Notes::default();
    let result = workload::follow(&cfg, fake.launch(), &mut notes, &|| false);
    let status = cli::conclude(result, &mut notes);
    (status, notes.0)
}

#[test]
fn run_mode_a_host_panic_under_the_workload_is_status_123_and_one_line() {
    let fake = Fake::new(
        "run-overflow",
        &format!(
            "--- attempt 1\n{READY}\nout: VMM-WORKLOAD-START pid=97\nsleep 300\n\
             {STACK_OVERFLOW}exit 0\n"
        ),
    );
    let (status, notes) = run_mode(&fake);
    assert_eq!(status, HOST_FAILED, "{notes:#?}");
    assert!(
        notes.iter().any(|n| n.starts_with("workload started")),
        "{notes:#?}"
    );
    let line = the_line(&notes, "TASK stack guard page was hit");
    // The last thing said.
    assert_eq!(notes.last(), Some(&line), "{notes:#?}");
}

#[test]
fn run_mode_the_workloads_status_stands_when_it_ended_first() {
    let fake = Fake::new(
        "run-ended",
        &format!(
            "--- attempt 1\n{READY}\nout: VMM-WORKLOAD-START pid=97\n\
             out: VMM-WORKLOAD-EXIT status=4\nsleep 300\n{STACK_OVERFLOW}exit 0\n"
        ),
    );
    let (status, notes) = run_mode(&fake);
    assert_eq!(status, 4, "{notes:#?}");
}

#[test]
fn run_mode_a_host_that_never_boots_is_status_123() {
    let fake = Fake::new(
        "run-noboot",
        "--- attempt 1\nexit 0\n--- attempt 2\nexit 0\n",
    );
    let (status, notes) = run_mode(&fake);
    assert_eq!(status, HOST_FAILED, "{notes:#?}");
    the_line(&notes, "the emulated host reset");
}

#[test]
fn plain_mode_a_frozen_host_is_status_123_and_one_line() {
    // Its kernel's heartbeat comes once, then nothing, QEMU still running.
    let fake = Fake::new(
        "plain-frozen",
        &format!("--- attempt 1\n{READY}\nkcon: [ 3.1] TESTHOST-ALIVE up_ms=3100\nsleep 600000\n"),
    );
    let start = std::time::Instant::now();
    let (status, lines) = plain(&fake);
    assert_eq!(status, HOST_FAILED, "{lines:#?}");
    the_line(&lines, "the emulated host froze");
    // Not before the heartbeat has been silent that long (an upper bound
    // would count the wait for the suite lock too; a host that is never
    // found frozen ends as a reset instead, which `the_line` refuses).
    let took = start.elapsed();
    assert!(took >= e2e::emulated::FROZEN_AFTER, "{took:?}");
}
