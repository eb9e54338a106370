//! The setup scripts work on a stock Debian 12 machine: the Python part of
//! `scripts/deps` runs with the system `/usr/bin/python3` (which refuses a
//! bare `pip install`, PEP 668) and PATH reduced to the system's, as on a
//! fresh machine without an interpreter manager.

use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn deps_python_part_works_with_the_system_python() {
    if !Path::new("/usr/bin/python3").exists() {
        println!("E2E-SKIP: no /usr/bin/python3 on this machine");
        return;
    }
    let dir = std::env::temp_dir().join(format!("deps-venv-{}", std::process::id()));
    let venv = dir.join("venv");
    let out = Command::new("/usr/bin/env")
        .arg("-i")
        .arg("PATH=/usr/sbin:/usr/bin:/sbin:/bin")
        .arg("HOME=/root")
        .arg(format!("DEPS_VENV={}", venv.display()))
        .arg("bash")
        .arg(root().join("scripts/deps"))
        .arg("python")
        .output()
        .expect("run scripts/deps python");
    let cfg = std::fs::read_to_string(venv.join("pyvenv.cfg")).unwrap_or_default();
    let version = Command::new(venv.join("bin/schemathesis"))
        .arg("--version")
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "scripts/deps python failed with the system python: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        cfg.lines().any(|l| l.trim() == "home = /usr/bin"),
        "the virtual environment is not the system python's: {cfg}"
    );
    let version = version.expect("run the venv's schemathesis");
    assert!(version.status.success(), "schemathesis --version failed");
}

#[test]
fn no_script_installs_python_packages_outside_a_virtual_environment() {
    for script in ["scripts/deps", "scripts/test", "scripts/run-vm", ".ci/run"] {
        let text = std::fs::read_to_string(root().join(script)).unwrap();
        for line in text.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
            let bare =
                line.contains("pip install") && !line.contains("\"$venv/bin/python\" -m pip");
            assert!(!bare, "{script}: a pip install outside the venv: {line}");
        }
    }
}
