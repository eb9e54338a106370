//! The `vmm` binary's exit statuses, end to end: an invalid configuration
//! (1), and with tiny PVH test kernels generated here (a few bytes of
//! 32-bit code, so they run on any /dev/kvm, PVM included): power off (0),
//! reset (2), SIGTERM while running and during start-up (4), a VMM panic
//! (6), and a console flood into a stdout nobody reads (the vCPU must not
//! block on it). The kernels' builder is shared (`common::tiny_kernel`).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::tiny_kernel::{kernel, out};

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

/// A scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-exit-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// 32-bit code: `out` of `byte` to COM1.
fn com1(byte: u8) -> Vec<u8> {
    out(vmm::layout::COM1_PORT, byte)
}

/// 32-bit code: ACPI S5 (SLP_TYP 5 | SLP_EN) to the sleep control port, then halt.
fn power_off() -> Vec<u8> {
    vec![0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee, 0xf4, 0xeb, 0xfd]
}

/// 32-bit code: the i8042 reset command, then halt.
fn reset() -> Vec<u8> {
    vec![0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd]
}

/// 32-bit code: spin forever.
fn spin() -> Vec<u8> {
    vec![0xeb, 0xfe]
}

/// 32-bit code: write `n` bytes ('x') to COM1 (`n` = 0: forever).
fn flood(n: u32) -> Vec<u8> {
    let mut code = Vec::new();
    if n == 0 {
        code.extend(com1(b'x'));
        code.extend([0xeb, 0xf7]); // jmp back over the 7 bytes and itself
        return code;
    }
    code.push(0xb9); // mov ecx, n
    code.extend(n.to_le_bytes());
    code.extend(com1(b'x'));
    code.extend([0x49, 0x75, 0xf6]); // dec ecx; jnz back 10 bytes
    code
}

/// Whether the VMM can create VMs here; says why not.
fn kvm_usable() -> bool {
    match kvm_ioctls::Kvm::new() {
        Ok(_) => true,
        Err(e) => {
            println!("E2E-SKIP: /dev/kvm unusable here ({e}); only the configuration checks ran");
            false
        }
    }
}

/// `vmm` booting `kernel` (stdout discarded, stderr to a file).
fn vmm(kernel: &Path, dir: &Path) -> Command {
    let mut cmd = Command::new(VMM);
    cmd.arg("--kernel")
        .arg(kernel)
        .args(["--allow-pvm", "--cpus", "1", "--memory", "64M"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(dir.join("stderr")).unwrap());
    cmd
}

fn stderr_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("stderr")).unwrap_or_default()
}

/// Waits for `child` at most `bound`; kills it and fails if it runs on.
fn wait_bounded(child: &mut Child, bound: Duration, what: &str) -> (ExitStatus, Duration) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, start.elapsed());
        }
        if start.elapsed() > bound {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: the VMM did not exit within {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn run_bounded(cmd: &mut Command, bound: Duration, what: &str) -> ExitStatus {
    let mut child = cmd.spawn().unwrap();
    wait_bounded(&mut child, bound, what).0
}

/// Sends `sig` to process `pid`.
fn send_signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).unwrap();
    // SAFETY: kill(2) on our own child, which has not been reaped yet.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0);
}

/// Whether process `pid` catches `sig` (its handler is installed).
fn catches(pid: u32, sig: libc::c_int) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (sig - 1)) != 0)
}

const BOUND: Duration = Duration::from_secs(30);

#[test]
fn an_invalid_configuration_exits_1() {
    let dir = scratch("config");
    for (args, says) in [
        (
            &["--cpus", "boot=9,max=2", "--kernel", "/nonexistent"][..],
            "--cpus",
        ),
        (
            &["--memory", "lots", "--kernel", "/nonexistent"][..],
            "--memory",
        ),
        (&["--no-such-option"][..], "--no-such-option"),
        (&["--cpus", "2"][..], "scripts/run-vm"),
    ] {
        let out = Command::new(VMM)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    // --help is not an error.
    let out = Command::new(VMM).arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    if !kvm_usable() {
        return;
    }
    // A kernel that does not exist: the VM cannot be built.
    let status = run_bounded(
        &mut vmm(Path::new("/nonexistent/vmlinux"), &dir),
        BOUND,
        "missing kernel",
    );
    assert_eq!(status.code(), Some(1), "{}", stderr_of(&dir));
}

#[test]
fn guest_power_off_exits_0_and_reset_exits_2() {
    if !kvm_usable() {
        return;
    }
    let dir = scratch("lifecycle");
    let mut code = com1(b'o');
    code.extend(com1(b'k'));
    code.extend(com1(b'\n'));
    code.extend(power_off());
    let off = kernel(&dir, "off", &code);
    let mut child = vmm(&off, &dir).stdout(Stdio::piped()).spawn().unwrap();
    let mut console = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut console)
        .unwrap();
    let (status, _) = wait_bounded(&mut child, BOUND, "power off");
    assert_eq!(status.code(), Some(0), "{}", stderr_of(&dir));
    assert_eq!(console, "ok\n");

    let status = run_bounded(
        &mut vmm(&kernel(&dir, "reset", &reset()), &dir),
        BOUND,
        "reset",
    );
    assert_eq!(status.code(), Some(2), "{}", stderr_of(&dir));
}

#[test]
fn sigterm_while_running_exits_4() {
    if !kvm_usable() {
        return;
    }
    let dir = scratch("sigterm");
    let mut child = vmm(&kernel(&dir, "spin", &spin()), &dir).spawn().unwrap();
    let start = Instant::now();
    while !stderr_of(&dir).contains("VM started") {
        assert!(start.elapsed() < BOUND, "no start: {}", stderr_of(&dir));
        std::thread::sleep(Duration::from_millis(10));
    }
    send_signal(child.id(), libc::SIGTERM);
    let (status, took) = wait_bounded(&mut child, Duration::from_secs(10), "SIGTERM");
    assert_eq!(status.code(), Some(4), "{}", stderr_of(&dir));
    println!("exited {took:?} after SIGTERM");
}

#[test]
fn sigterm_during_start_up_exits_4_quickly() {
    if !kvm_usable() {
        return;
    }
    let dir = scratch("sigterm-start");
    let spin = kernel(&dir, "spin", &spin());
    for round in 0..5 {
        let mut child = vmm(&spin, &dir).spawn().unwrap();
        // The handler is the first thing main installs: signal the moment
        // it is in place, while the VM is being built.
        let start = Instant::now();
        while !catches(child.id(), libc::SIGTERM) {
            assert!(start.elapsed() < BOUND, "the handler never appeared");
            std::thread::yield_now();
        }
        send_signal(child.id(), libc::SIGTERM);
        let (status, took) = wait_bounded(&mut child, Duration::from_secs(10), "early SIGTERM");
        assert_eq!(status.code(), Some(4), "round {round}: {}", stderr_of(&dir));
        println!("round {round}: exited {took:?} after an early SIGTERM");
    }
}

#[test]
fn a_console_nobody_reads_does_not_stop_the_guest_or_the_exit() {
    if !kvm_usable() {
        return;
    }
    let dir = scratch("console");
    // Far more than the pipe (64 KiB) and the console buffer (64 KiB).
    let mut code = flood(200_000);
    code.extend(power_off());
    let mut child = vmm(&kernel(&dir, "flood", &code), &dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Held open, never read.
    let _stdout = child.stdout.take();
    let (status, took) = wait_bounded(&mut child, Duration::from_secs(120), "console flood");
    assert_eq!(status.code(), Some(0), "{}", stderr_of(&dir));
    println!("flood then power off: exited after {took:?}");

    // The same, stopped by SIGTERM while the guest floods for ever.
    let mut child = vmm(&kernel(&dir, "flood-forever", &flood(0)), &dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let _stdout = child.stdout.take();
    let start = Instant::now();
    while !stderr_of(&dir).contains("VM started") {
        assert!(start.elapsed() < BOUND, "no start: {}", stderr_of(&dir));
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(500));
    send_signal(child.id(), libc::SIGTERM);
    let (status, took) = wait_bounded(&mut child, Duration::from_secs(10), "flood + SIGTERM");
    assert_eq!(status.code(), Some(4), "{}", stderr_of(&dir));
    println!("flood + SIGTERM: exited after {took:?}");
}

#[test]
fn a_vmm_panic_stops_the_vcpus_removes_the_socket_and_exits_6() {
    if !kvm_usable() {
        return;
    }
    let dir = scratch("panic");
    let socket = dir.join("api.sock");
    let status = run_bounded(
        vmm(&kernel(&dir, "spin", &spin()), &dir)
            .arg("--api-socket")
            .arg(&socket)
            .args(["--test-hooks", "--log-level", "error"])
            .env("VMM_TEST_PANIC", "1")
            .env_remove("RUST_BACKTRACE"),
        Duration::from_secs(20),
        "panic",
    );
    let stderr = stderr_of(&dir);
    assert_eq!(status.code(), Some(6), "{stderr}");
    assert!(!socket.exists(), "the API socket was left behind");
    let lines: Vec<_> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("panic in thread 'main'")
            && lines[0].contains("VMM_TEST_PANIC")
            && lines[0].contains("vCPU threads stopped")
            && lines[0].contains("status 6"),
        "{stderr}"
    );
}
