//! The `vmmctl` binary itself: exit statuses and where text goes. Its output
//! against a live server is tested in vmm's `api_http` tests.

use std::process::Command;

fn vmmctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vmmctl"))
        .args(args)
        .output()
        .expect("run vmmctl")
}

#[test]
fn help_and_usage() {
    let out = vmmctl(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for command in [
        "status",
        "vcpus",
        "resize",
        "add",
        "remove",
        "operation",
        "metrics",
        "workers",
        "fault",
    ] {
        assert!(help.contains(command), "{command} missing from\n{help}");
    }
    let out = vmmctl(&["vcpus"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--socket"));
}

#[test]
fn unreachable_socket_is_a_clear_error() {
    let out = vmmctl(&["--socket", "/nonexistent/api.sock", "status"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("vmmctl: cannot connect to /nonexistent/api.sock: "),
        "{err}"
    );
}
