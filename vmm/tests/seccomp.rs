//! The `vmm` binary's seccomp filters and privilege handling, end to end,
//! with tiny PVH test kernels (a few bytes of 32-bit code, as in
//! `exit_status.rs`, so they run on any /dev/kvm, PVM included):
//!
//! - a forbidden system call on each thread class (the test hook
//!   `VMM_TEST_FORBIDDEN_SYSCALL`) ends the VMM with status 7 and one
//!   line naming the thread and the call; `--seccomp log` and `off` let
//!   it through;
//! - every thread runs filtered with no_new_privs, and hot-add, re-add of
//!   a parked vCPU, a removal, register dumps and the exit all work under
//!   the enforced filters;
//! - `--user` (as root): every thread runs with the new ids and hot-add
//!   still works.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use api::client::{BlockingClient, MutationOutcome};
use api::OperationStatus;

const VMM: &str = env!("CARGO_BIN_EXE_vmm");
const ENTRY: u32 = 0x10_0000;
const BOUND: Duration = Duration::from_secs(30);

/// A scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-seccomp-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// 32-bit code: spin forever.
const SPIN: &[u8] = &[0xeb, 0xfe];
/// 32-bit code: ACPI S5 to the sleep control port, then halt.
const POWER_OFF: &[u8] = &[0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee, 0xf4, 0xeb, 0xfd];

/// An ELF64 vmlinux stand-in: one PT_LOAD of `code` at 1 MiB and a PVH
/// entry note pointing at it (the same image as `exit_status.rs` builds).
fn pvh_elf(code: &[u8]) -> Vec<u8> {
    const EHSIZE: u16 = 64;
    const PHSIZE: u16 = 56;
    const CODE_OFF: u64 = 0x1000;
    let mut note = Vec::new();
    for v in [4u32, 4, 18] {
        note.extend(v.to_le_bytes());
    }
    note.extend(b"Xen\0");
    note.extend(ENTRY.to_le_bytes());
    let note_off = u64::from(EHSIZE + 2 * PHSIZE);
    let mut f = Vec::new();
    f.extend(b"\x7fELF");
    f.extend([2, 1, 1, 0]);
    f.extend([0; 8]);
    f.extend(2u16.to_le_bytes()); // ET_EXEC
    f.extend(0x3eu16.to_le_bytes()); // x86-64
    f.extend(1u32.to_le_bytes());
    f.extend(u64::from(ENTRY).to_le_bytes());
    f.extend(u64::from(EHSIZE).to_le_bytes()); // phoff
    f.extend(0u64.to_le_bytes()); // shoff
    f.extend(0u32.to_le_bytes()); // flags
    for v in [EHSIZE, PHSIZE, 2, 64, 0, 0] {
        f.extend(v.to_le_bytes());
    }
    let mut phdr = |kind: u32, flags: u32, off: u64, addr: u64, size: u64, align: u64| {
        f.extend(kind.to_le_bytes());
        f.extend(flags.to_le_bytes());
        for v in [off, addr, addr, size, size, align] {
            f.extend(v.to_le_bytes());
        }
    };
    let len = code.len() as u64;
    phdr(1, 5, CODE_OFF, u64::from(ENTRY), len, 0x1000); // PT_LOAD r-x
    phdr(4, 4, note_off, 0, note.len() as u64, 4); // PT_NOTE
    f.extend(&note);
    f.resize(usize::try_from(CODE_OFF).unwrap(), 0);
    f.extend(code);
    f
}

fn kernel(dir: &Path, name: &str, code: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pvh_elf(code)).unwrap();
    path
}

/// Whether the VMM can create VMs here; says why not.
fn kvm_usable() -> bool {
    match kvm_ioctls::Kvm::new() {
        Ok(_) => true,
        Err(e) => {
            println!("E2E-SKIP: /dev/kvm unusable here ({e}); nothing booted");
            false
        }
    }
}

/// `vmm` booting `kernel` with `cpus` (stderr to a file).
fn vmm(kernel: &Path, dir: &Path, cpus: &str) -> Command {
    let mut cmd = Command::new(VMM);
    cmd.arg("--kernel")
        .arg(kernel)
        .args(["--allow-pvm", "--memory", "64M", "--cpus", cpus])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(dir.join("stderr")).unwrap())
        .env_remove("RUST_BACKTRACE")
        .env_remove("VMM_TEST_FORBIDDEN_SYSCALL");
    cmd
}

fn stderr_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("stderr")).unwrap_or_default()
}

/// Waits for `child` at most `bound`; kills it and fails if it runs on.
fn wait_bounded(child: &mut Child, bound: Duration, what: &str) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > bound {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: the VMM did not exit within {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until `path` exists (the API socket is bound).
fn wait_for_file(path: &Path, dir: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(start.elapsed() < BOUND, "no socket: {}", stderr_of(dir));
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGTERM to the VMM, which must exit 4 within 10 s.
fn terminate(child: &mut Child, dir: &Path) {
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child, which has not been reaped yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = wait_bounded(child, Duration::from_secs(10), "SIGTERM");
    assert_eq!(status.code(), Some(4), "{}", stderr_of(dir));
}

/// The `Name: value` fields of `/proc/PID/task/*/status`, per thread.
fn thread_status(pid: u32) -> Vec<(String, Vec<(String, String)>)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(status) = std::fs::read_to_string(task.unwrap().path().join("status")) else {
            continue; // ended meanwhile
        };
        let fields: Vec<(String, String)> = status
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
            .collect();
        let name = fields
            .iter()
            .find(|(k, _)| k == "Name")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        threads.push((name, fields));
    }
    threads
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> &'a str {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map_or("", |(_, v)| v.as_str())
}

#[test]
fn a_forbidden_system_call_exits_7_naming_the_thread_and_the_call() {
    if !kvm_usable() {
        return;
    }
    let dir = scratch("forbidden");
    let spin = kernel(&dir, "spin", SPIN);
    for (class, thread) in [
        ("vcpu", "vcpu0"),
        ("api", "api"),
        ("console", "console"),
        ("vmm", "vmm"),
    ] {
        let socket = dir.join(format!("{class}.sock"));
        let mut child = vmm(&spin, &dir, "1")
            .arg("--api-socket")
            .arg(&socket)
            .args(["--test-hooks", "--log-level", "error"])
            .env("VMM_TEST_FORBIDDEN_SYSCALL", class)
            .spawn()
            .unwrap();
        let status = wait_bounded(&mut child, BOUND, class);
        let stderr = stderr_of(&dir);
        assert_eq!(status.code(), Some(7), "{class}: {stderr}");
        assert_eq!(
            stderr,
            format!(
                "vmm: seccomp: thread {thread} made a forbidden system call 41 (socket); \
                 exiting with status 7\n"
            ),
            "{class}"
        );
    }
    // Without --test-hooks the variable does nothing.
    let mut child = vmm(&kernel(&dir, "off", POWER_OFF), &dir, "1")
        .env("VMM_TEST_FORBIDDEN_SYSCALL", "vcpu")
        .spawn()
        .unwrap();
    let status = wait_bounded(&mut child, BOUND, "no hooks");
    assert_eq!(status.code(), Some(0), "{}", stderr_of(&dir));
}

#[test]
fn log_and_off_let_a_forbidden_system_call_through() {
    if !kvm_usable() {
        return;
    }
    let dir = scratch("log");
    let off = kernel(&dir, "off", POWER_OFF);
    for mode in ["log", "off"] {
        let mut child = vmm(&off, &dir, "1")
            .args(["--test-hooks", "--seccomp", mode])
            .env("VMM_TEST_FORBIDDEN_SYSCALL", "vcpu")
            .spawn()
            .unwrap();
        let status = wait_bounded(&mut child, BOUND, mode);
        let stderr = stderr_of(&dir);
        assert_eq!(status.code(), Some(0), "{mode}: {stderr}");
        assert!(
            stderr.contains(&format!("seccomp filters: {mode}")),
            "{stderr}"
        );
        assert!(!stderr.contains("vmm: seccomp:"), "{stderr}");
    }
    // An unknown mode is a configuration error.
    let out = Command::new(VMM)
        .args(["--seccomp", "strict", "--kernel", "/nonexistent"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("enforce, log or off"));
}

/// Hot-adds vCPU 2 twice (created, then reused from its parked fd) and
/// removes vCPU 1, through the API; the tiny guest never answers, so each
/// step fails by its timeout, with register dumps and thread stops.
fn exercise_hotplug(socket: &Path) {
    let client = BlockingClient::new(socket).unwrap();
    let wait = Some(Duration::from_secs(5));
    let failed = |outcome: MutationOutcome| {
        assert_eq!(
            outcome.operation().status,
            OperationStatus::Failed,
            "{outcome:?}"
        );
    };
    failed(client.add_vcpu(2, wait).unwrap());
    failed(client.add_vcpu(2, wait).unwrap());
    failed(client.remove_vcpu(1, wait).unwrap());
    let metrics = client.metrics().unwrap();
    assert!(
        metrics.contains("vmm_vcpu_fds_created_total 3"),
        "{metrics}"
    );
    assert!(metrics.contains("vmm_vcpu_fds_reused_total 1"), "{metrics}");
    assert_eq!(client.vm().unwrap().present_vcpus, 2);
}

#[test]
fn every_thread_is_filtered_and_hot_add_works_under_the_filters() {
    if !kvm_usable() {
        return;
    }
    let dir = scratch("hotplug");
    let socket = dir.join("api.sock");
    let mut child = vmm(&kernel(&dir, "spin", SPIN), &dir, "boot=2,max=3")
        .arg("--api-socket")
        .arg(&socket)
        .args([
            "--hotplug-timeouts",
            "add=0.3,prepare=0.3,eject=0.3,restore=0.3",
        ])
        .spawn()
        .unwrap();
    wait_for_file(&socket, &dir);
    exercise_hotplug(&socket);
    let threads = thread_status(child.id());
    let names: Vec<&str> = threads.iter().map(|(n, _)| n.as_str()).collect();
    for expected in ["vcpu0", "console", "vmm_api"] {
        assert!(names.contains(&expected), "{names:?}");
    }
    for (name, fields) in &threads {
        assert_eq!(field(fields, "NoNewPrivs"), "1", "{name}");
        assert_eq!(field(fields, "Seccomp"), "2", "{name}: not filtered");
    }
    terminate(&mut child, &dir);
    let stderr = stderr_of(&dir);
    assert!(!stderr.contains("seccomp:"), "{stderr}");
    assert!(!socket.exists(), "the API socket was left behind");
}

/// Whether this process runs as root (needed to drop to another user).
fn root() -> bool {
    // SAFETY: geteuid takes nothing and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn user_drops_every_thread_to_the_given_ids_and_hot_add_still_works() {
    if !kvm_usable() {
        return;
    }
    if !root() {
        println!("E2E-SKIP: not root; --user not exercised");
        return;
    }
    let dir = scratch("user");
    // The kernel is opened before the drop; the directory must let the
    // user remove the socket at exit.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o1777)).unwrap();
    let socket = dir.join("api.sock");
    let mut child = vmm(&kernel(&dir, "spin", SPIN), &dir, "boot=2,max=3")
        .arg("--api-socket")
        .arg(&socket)
        .args(["--user", "65534:65534"])
        .args([
            "--hotplug-timeouts",
            "add=0.3,prepare=0.3,eject=0.3,restore=0.3",
        ])
        .spawn()
        .unwrap();
    wait_for_file(&socket, &dir);
    exercise_hotplug(&socket);
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&socket).unwrap());
    assert_eq!(owner, 65534, "the API socket was not handed to the user");
    for (name, fields) in thread_status(child.id()) {
        for id in ["Uid", "Gid"] {
            let ids: Vec<&str> = field(&fields, id).split_whitespace().collect();
            assert_eq!(ids, ["65534"; 4], "{name}: {id}");
        }
        assert_eq!(field(&fields, "Groups"), "", "{name}");
        assert_eq!(field(&fields, "CapEff"), "0000000000000000", "{name}");
        assert_eq!(field(&fields, "Seccomp"), "2", "{name}");
    }
    terminate(&mut child, &dir);
    assert!(stderr_of(&dir).contains("privileges dropped to uid 65534 gid 65534"));
    assert!(!socket.exists(), "the API socket was left behind");

    // A bad --user is a configuration error.
    let out = Command::new(VMM)
        .args(["--user", "nobody", "--kernel", "/nonexistent"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("UID:GID"));
}
