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
    assert!(help.contains("VMM_SOCKET"), "{help}");
    let out = vmmctl(&["vcpus", "many"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn socket_from_the_environment() {
    // No --socket: $VMM_SOCKET names it.
    let out = Command::new(env!("CARGO_BIN_EXE_vmmctl"))
        .arg("status")
        .env("VMM_SOCKET", "/nonexistent/env.sock")
        .output()
        .expect("run vmmctl");
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("vmmctl: cannot connect to /nonexistent/env.sock: "),
        "{err}"
    );
    // --socket wins.
    let out = Command::new(env!("CARGO_BIN_EXE_vmmctl"))
        .args(["--socket", "/nonexistent/flag.sock", "status"])
        .env("VMM_SOCKET", "/nonexistent/env.sock")
        .output()
        .expect("run vmmctl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/flag.sock"), "{err}");
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
