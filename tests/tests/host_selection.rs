//! Host selection: PVM detection on a fake sysfs root, and the choice
//! between direct, emulated and skip.

use std::path::PathBuf;

use e2e::host::{choose, parse_forced, HostFacts, SelectError};
use e2e::HostKind;

fn fake_root(name: &str, pvm: bool, fake_kvm: bool) -> PathBuf {
    let root = std::env::temp_dir().join(format!("e2e-fakeroot-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("sys/module/kvm")).unwrap();
    std::fs::create_dir_all(root.join("dev")).unwrap();
    if pvm {
        std::fs::create_dir_all(root.join("sys/module/kvm_pvm")).unwrap();
    }
    if fake_kvm {
        // A regular file: opens, but KVM_GET_API_VERSION fails.
        std::fs::write(root.join("dev/kvm"), b"").unwrap();
    }
    root
}

fn facts(kvm: bool, pvm: bool, qemu: bool) -> HostFacts {
    HostFacts {
        kvm: if kvm { Ok(()) } else { Err("no".into()) },
        pvm,
        qemu: qemu.then(|| PathBuf::from("/usr/bin/qemu-system-x86_64")),
    }
}

#[test]
fn detects_pvm_from_sysfs() {
    let root = fake_root("pvm", true, false);
    let f = HostFacts::probe_at(&root, None);
    assert!(f.pvm);
    assert!(f.kvm.is_err(), "no /dev/kvm in the fake root");
    let root2 = fake_root("nopvm", false, true);
    let f = HostFacts::probe_at(&root2, None);
    assert!(!f.pvm);
    assert!(f.kvm.is_err(), "a regular file is not a usable /dev/kvm");
    let _ = std::fs::remove_dir_all(root);
    let _ = std::fs::remove_dir_all(root2);
}

#[test]
fn chooses_direct_only_on_real_kvm() {
    assert_eq!(
        choose(&facts(true, false, true), None),
        Ok(HostKind::Direct)
    );
    assert_eq!(
        choose(&facts(true, false, false), None),
        Ok(HostKind::Direct)
    );
    assert_eq!(
        choose(&facts(true, true, true), None),
        Ok(HostKind::Emulated)
    );
    assert_eq!(
        choose(&facts(false, false, true), None),
        Ok(HostKind::Emulated)
    );
}

#[test]
fn skips_when_nothing_can_run() {
    let err = choose(&facts(true, true, false), None).unwrap_err();
    match err {
        SelectError::Unavailable(why) => {
            assert!(why.contains("PVM"), "{why}");
            assert!(why.contains("qemu-system-x86_64"), "{why}");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn forced_kind_is_honoured_or_refused() {
    assert_eq!(
        choose(&facts(true, false, true), Some(HostKind::Emulated)),
        Ok(HostKind::Emulated)
    );
    assert!(matches!(
        choose(&facts(true, true, true), Some(HostKind::Direct)),
        Err(SelectError::ForcedUnavailable {
            forced: HostKind::Direct,
            ..
        })
    ));
    assert!(matches!(
        choose(&facts(true, false, false), Some(HostKind::Emulated)),
        Err(SelectError::ForcedUnavailable {
            forced: HostKind::Emulated,
            ..
        })
    ));
}

#[test]
fn parses_the_environment_value() {
    assert_eq!(parse_forced(None), Ok(None));
    assert_eq!(parse_forced(Some("auto")), Ok(None));
    assert_eq!(parse_forced(Some("direct")), Ok(Some(HostKind::Direct)));
    assert_eq!(
        parse_forced(Some(" emulated ")),
        Ok(Some(HostKind::Emulated))
    );
    assert!(matches!(
        parse_forced(Some("qemu")),
        Err(SelectError::BadEnv(_))
    ));
}

#[test]
fn this_machine_is_classified() {
    // On the project's machines /dev/kvm is PVM and QEMU is installed: the
    // emulated host must be chosen. Elsewhere just print the choice.
    let f = HostFacts::probe();
    let choice = choose(&f, None);
    println!("host facts: {f:?} -> {choice:?}");
    if f.pvm && f.qemu.is_some() {
        assert_eq!(choice, Ok(HostKind::Emulated));
    }
}
