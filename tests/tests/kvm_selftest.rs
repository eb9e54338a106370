//! The KVM self-test `testhost-init` runs inside the emulated host, run on
//! this machine's `/dev/kvm` (PVM runs such small real-mode code fine).

#[test]
fn selftest_runs_on_this_machines_kvm() {
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("E2E-SKIP: no /dev/kvm on this machine");
        return;
    }
    match e2e::inside::selftest::run() {
        Ok(report) => assert!(report.starts_with("kvm selftest ok"), "{report}"),
        Err(e) => panic!(
            "kvm selftest failed: {e} ({:?})",
            std::error::Error::source(&e)
        ),
    }
}
