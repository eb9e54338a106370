//! More than one VM per machine: two VMs boot at the same time, each with
//! its own API socket, and both answer `GET /api/v1/vm` while the other
//! runs; a third on a socket already taken is refused at once.
//!
//! The test runs its two VMs itself, so it takes the suite's lock once for
//! the pair (`E2E_SUITE_LOCK=0` leaves it off) and launches them without it.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use e2e::locks::{self, SuiteLock};
use e2e::{Error, RunningVm, VmSpec};

/// How long a VM's API has to answer after launch (emulated: the VMM
/// starts after the host is ready; both share 2 cores).
const API_TIMEOUT: Duration = Duration::from_secs(180);

fn spec(socket: &Path, memory_mib: u32) -> VmSpec {
    let mut spec = VmSpec::new(1, 2).timeout(Duration::from_secs(600));
    spec.api_socket = Some(socket.to_path_buf());
    spec.memory_mib = memory_mib;
    spec.suite_lock = false;
    spec
}

/// `GET /api/v1/vm` on `vm`'s socket until it answers.
fn vm_info(vm: &RunningVm) -> Result<api::VmInfo, String> {
    let deadline = Instant::now() + API_TIMEOUT;
    loop {
        let last = match api::client::BlockingClient::new(vm.api_socket()).and_then(|c| c.vm()) {
            Ok(info) => return Ok(info),
            Err(e) => e.to_string(),
        };
        if let Some(f) = vm.host_failure() {
            return Err(format!("the emulated host failed: {f}"));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no answer on {} within {API_TIMEOUT:?}: {last}\n{}",
                vm.api_socket().display(),
                vm.console_log()
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Why an attempt failed: the emulated host's own failure (retried once,
/// as everywhere in the suite) or anything else.
enum Failed {
    Host(String),
    Other(String),
}

/// What a VM's thread reports.
enum Report {
    /// Launched (or skipped: `None`), or failed to.
    Launched(Result<Option<String>, Failed>),
    /// Its `GET /api/v1/vm`.
    Answered(Result<api::VmInfo, Failed>),
    /// Still running when released.
    Released(Result<(), Failed>),
}

fn host_or(vm: &RunningVm, other: String) -> Failed {
    match vm.host_failure().or_else(|| vm.nested_guest_failure()) {
        Some(f) => Failed::Host(f),
        None => Failed::Other(other),
    }
}

/// One VM on its own thread, which lives as long as the VM does (the
/// harness's children die with the thread that started them): launch,
/// ask, wait for the release, check it still runs.
fn vm_thread(
    spec: VmSpec,
    tx: mpsc::Sender<(usize, Report)>,
    release: mpsc::Receiver<()>,
    i: usize,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut vm = match e2e::launch(&spec) {
            Ok(vm) => vm,
            Err(e) => {
                let r = match e.skip_reason() {
                    Some(why) => {
                        e2e::skip(&why);
                        Ok(None)
                    }
                    None if e.is_host_failure() => Err(Failed::Host(e.to_string())),
                    None => Err(Failed::Other(e2e::chain(&e))),
                };
                let _ = tx.send((i, Report::Launched(r)));
                return;
            }
        };
        let kind = vm.host_kind().to_string();
        let _ = tx.send((i, Report::Launched(Ok(Some(kind)))));
        let answer = vm_info(&vm).map_err(|e| host_or(&vm, e));
        let ok = answer.is_ok();
        let _ = tx.send((i, Report::Answered(answer)));
        if ok {
            // Until the test has heard from both (or gives up).
            let _ = release.recv_timeout(API_TIMEOUT * 2);
        }
        let alive = match vm.try_exit() {
            Ok(None) => Ok(()),
            _ => Err(host_or(&vm, "the VM ended before it was released".into())),
        };
        if alive.is_err() || !ok {
            eprintln!(
                "--- console of the VM on {} ---\n{}--- end ---",
                vm.api_socket().display(),
                vm.console_log()
            );
        }
        let _ = tx.send((i, Report::Released(alive)));
    })
}

/// One attempt; `Ok(false)` after a skip line.
fn attempt(socks: &[PathBuf], start: Instant) -> Result<bool, Failed> {
    let (tx, rx) = mpsc::channel();
    let mut releases = Vec::new();
    let mut threads = Vec::new();
    // Both launches at once: neither waits for the other.
    for (i, (sock, mib)) in socks.iter().zip([256, 320]).enumerate() {
        let (release_tx, release_rx) = mpsc::channel();
        releases.push(release_tx);
        threads.push(vm_thread(spec(sock, mib), tx.clone(), release_rx, i));
    }
    drop(tx);
    let result = drive(socks, &rx, start);
    // Release both and hear whether they still ran.
    drop(releases);
    let mut released = Ok(());
    for (_, report) in rx.iter() {
        if let Report::Released(Err(f)) = report {
            if released.is_ok() {
                released = Err(f);
            }
        }
    }
    for t in threads {
        t.join().expect("VM thread");
    }
    match result {
        Ok(true) => released.map(|()| true),
        other => other,
    }
}

/// Waits for both launches and both answers.
fn drive(
    socks: &[PathBuf],
    rx: &mpsc::Receiver<(usize, Report)>,
    start: Instant,
) -> Result<bool, Failed> {
    let mut launched = 0;
    // An answer may come before the other VM's launch.
    let mut answers = Vec::new();
    while launched < 2 {
        let (_, report) = rx
            .recv()
            .map_err(|_| Failed::Other("a VM thread ended".into()))?;
        match report {
            Report::Launched(Ok(Some(kind))) => {
                launched += 1;
                if launched == 2 {
                    println!(
                        "E2E-TIME both_launched_ms={} host={kind}",
                        start.elapsed().as_millis()
                    );
                }
            }
            Report::Launched(Ok(None)) => return Ok(false),
            Report::Launched(Err(f)) => return Err(f),
            Report::Answered(a) => answers.push(a),
            Report::Released(_) => {}
        }
    }
    // Both run: a third VM on a socket in use is refused before it boots.
    let t = Instant::now();
    match e2e::launch(&spec(&socks[0], 256)) {
        Err(Error::InUse(why)) if why.contains("a.sock") => {}
        Err(e) => {
            return Err(Failed::Other(format!(
                "expected the socket in use, got {}",
                e2e::chain(&e)
            )))
        }
        Ok(_) => {
            return Err(Failed::Other(
                "a second VM got the socket of a running one".into(),
            ))
        }
    }
    if t.elapsed() > Duration::from_secs(30) {
        return Err(Failed::Other(format!("the refusal took {:?}", t.elapsed())));
    }
    // Both answer on their own sockets with their own figures, while the
    // other still runs (neither is released before both answered).
    while answers.len() < 2 {
        match rx.recv() {
            Ok((_, Report::Answered(a))) => answers.push(a),
            Ok(_) => return Err(Failed::Other("a VM thread reported out of turn".into())),
            Err(_) => return Err(Failed::Other("a VM thread ended".into())),
        }
    }
    let mut memories = Vec::new();
    for answer in answers {
        let info = answer?;
        println!("{info:?} after {} ms", start.elapsed().as_millis());
        memories.push(info.memory_mib);
    }
    memories.sort_unstable();
    if memories != [256, 320] {
        return Err(Failed::Other(format!(
            "memories {memories:?}, not [256, 320]"
        )));
    }
    Ok(true)
}

#[test]
fn two_vms_at_once_on_their_own_sockets() {
    if let Err(e) = e2e::host::select() {
        e2e::skip(&e2e::chain(&e));
        return;
    }
    let _suite =
        locks::suite_lock_from_env(true).then(|| SuiteLock::acquire().expect("the suite lock"));
    let dir = std::env::temp_dir().join(format!("e2e-parallel-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socks: Vec<PathBuf> = ["a.sock", "b.sock"].iter().map(|n| dir.join(n)).collect();
    let start = Instant::now();
    let mut retried = false;
    loop {
        match attempt(&socks, start) {
            Ok(false) => return,
            Ok(true) => break,
            Err(Failed::Host(why)) if !retried => {
                println!("E2E-RETRY: the emulated host failed: {why}; both VMs once more");
                retried = true;
            }
            Err(Failed::Host(why)) => panic!("the emulated host failed twice: {why}"),
            Err(Failed::Other(why)) => panic!("{why}"),
        }
    }
    println!(
        "E2E-TIME test=two_vms_at_once_on_their_own_sockets ms={}",
        start.elapsed().as_millis()
    );
    for s in &socks {
        assert!(!locks::socket_lock_path(s).exists(), "lock file left");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
