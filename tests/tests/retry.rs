//! The flakiness policy, with a fake QEMU: a failure of the emulated host
//! itself (a reset before ready, a soft lockup of its kernel) is retried
//! once, loudly; failures of `testhost-init`, the VMM or the guest never.

mod common;

use std::time::Duration;

use common::{Fake, READY};
use e2e::Error;

#[test]
fn reset_before_ready_is_retried_once() {
    let fake = Fake::new(
        "reset",
        &format!(
            "--- attempt 1\nkcon: [ 0.1] Linux version 6.1\nexit 0\n\
             --- attempt 2\n{READY}\nout: TESTHOST-EXIT status=0\nexit 0\n"
        ),
    );
    let mut vm = fake.launch().expect("second attempt boots");
    assert_eq!(fake.starts(), 2);
    let note = vm.retried().expect("retry noted");
    assert!(
        note.starts_with("E2E-RETRY:") && note.contains("reset"),
        "{note}"
    );
    assert!(vm.console_log().contains("harness: E2E-RETRY"));
    assert_eq!(vm.wait_exit(Duration::from_secs(10)).unwrap(), 0);
}

#[test]
fn a_second_reset_is_not_retried_again() {
    let fake = Fake::new(
        "reset2",
        "--- attempt 1\nexit 0\n--- attempt 2\nexit 0\n--- attempt 3\nexit 0\n",
    );
    let err = fake.launch().unwrap_err();
    assert!(err.is_host_failure(), "{err}");
    assert_eq!(fake.starts(), 2);
}

#[test]
fn testhost_init_errors_are_not_retried() {
    let fake = Fake::new(
        "error",
        "--- attempt 1\nout: TESTHOST-ERROR stage=modules cannot load kvm-amd.ko\nexit 0\n",
    );
    let sock = fake.dir.join("api.sock");
    match fake.launch_with(Some(sock.clone())) {
        Err(Error::Testhost(line)) => assert!(line.contains("kvm-amd"), "{line}"),
        other => panic!("expected a testhost error, got {other:?}"),
    }
    assert_eq!(fake.starts(), 1);
    assert!(!sock.exists(), "a failed boot left the API socket behind");
}

#[test]
fn host_panic_is_ours_not_retried() {
    let fake = Fake::new(
        "panic",
        "--- attempt 1\nkcon: [ 2.0] Kernel panic - not syncing: Attempted to kill init!\nexit 0\n",
    );
    assert!(matches!(fake.launch(), Err(Error::Testhost(_))));
    assert_eq!(fake.starts(), 1);
}

#[test]
fn soft_lockup_of_the_host_is_a_host_failure() {
    // The kernel console and testhost-init's are separate streams: the
    // pause keeps the lockup after the ready marker.
    let fake = Fake::new(
        "lockup",
        &format!("--- attempt 1\n{READY}\nsleep 300\nkcon: [ 9.0] watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [vmm:90]\nexit 0\n"),
    );
    let mut vm = fake.launch().unwrap();
    let err = vm.wait_exit(Duration::from_secs(10)).unwrap_err();
    assert!(err.is_host_failure(), "{err}");
    assert!(vm.host_failure().is_some());
}

#[test]
fn guest_lockups_and_panics_are_the_vms_result() {
    let fake = Fake::new(
        "guest",
        &format!(
            "--- attempt 1\n{READY}\n\
             out: [ 9.0] watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [swapper/1:0]\n\
             out: [ 9.5] Kernel panic - not syncing: softlockup: hung tasks\n\
             out: TESTHOST-EXIT status=3 run_ms=10\nexit 0\n"
        ),
    );
    let mut vm = fake.launch().unwrap();
    assert_eq!(vm.wait_exit(Duration::from_secs(10)).unwrap(), 3);
    assert!(vm.host_failure().is_none());
}

#[test]
fn vmm_failure_after_ready_is_its_status_not_a_retry() {
    // The job exits 1 after ready: the VMM's failure, reported as is.
    let fake = Fake::new(
        "scenario",
        &format!("--- attempt 1\n{READY}\nout: TESTHOST-EXIT status=1\nexit 0\n--- attempt 2\n{READY}\nexit 0\n"),
    );
    let mut vm = fake.launch().unwrap();
    assert_eq!(vm.wait_exit(Duration::from_secs(10)).unwrap(), 1);
    assert!(vm.host_failure().is_none());
    assert_eq!(fake.starts(), 1);
}

#[test]
fn a_host_that_hangs_after_reporting_the_exit_gives_that_status() {
    // Seen: the emulated host's kernel stalled (RCU) during power-off after
    // `TESTHOST-EXIT status=0`, and QEMU never ended.
    let fake = Fake::new(
        "hang-after-exit",
        &format!(
            "--- attempt 1\n{READY}\nout: TESTHOST-EXIT status=0 run_ms=5\n\
             kcon: [ 25.6] rcu: INFO: rcu_preempt self-detected stall on CPU\nsleep 120000\n"
        ),
    );
    let mut vm = fake.launch().unwrap();
    let start = std::time::Instant::now();
    assert_eq!(vm.wait_exit(Duration::from_secs(60)).unwrap(), 0);
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "stopped after the grace, not at the deadline: {:?}",
        start.elapsed()
    );
    // The grace runs from the exit report (console times; the report may
    // come before `launch` returns).
    let lines = vm.console().lines();
    let at = |what: &str| {
        lines
            .iter()
            .find(|l| l.text.contains(what))
            .map(|l| l.at)
            .unwrap_or_else(|| panic!("no {what:?} line"))
    };
    let waited = at("did not power off") - at("TESTHOST-EXIT");
    assert!(
        waited >= e2e::emulated::POWEROFF_GRACE,
        "stopped {waited:?} after the report"
    );
    assert_eq!(fake.starts(), 1);
}
