//! More than one VM per machine: two VMs boot at the same time, each with
//! its own API socket, and both answer `GET /api/v1/vm` while the other
//! runs; a third on a socket already taken is refused at once.
//!
//! The test runs its two VMs itself, so it takes the suite's lock once for
//! the pair (`E2E_SUITE_LOCK=0` leaves it off) and launches them without it.

use std::path::{Path, PathBuf};
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

/// Launches both at once; `None` after a skip line.
fn launch_both(socks: &[PathBuf]) -> Result<Option<Vec<RunningVm>>, Failed> {
    let boots: Vec<_> = socks
        .iter()
        .zip([256, 320])
        .map(|(s, mib)| {
            let spec = spec(s, mib);
            std::thread::spawn(move || e2e::launch(&spec))
        })
        .collect();
    let mut vms = Vec::new();
    let mut failed = None;
    for boot in boots {
        match boot.join().expect("launch thread") {
            Ok(vm) => vms.push(vm),
            Err(e) => match e.skip_reason() {
                Some(why) => {
                    e2e::skip(&why);
                    return Ok(None);
                }
                None if e.is_host_failure() => failed = Some(Failed::Host(e.to_string())),
                None => failed = Some(Failed::Other(e2e::chain(&e))),
            },
        }
    }
    match failed {
        Some(f) => Err(f),
        None => Ok(Some(vms)),
    }
}

/// One attempt; `Ok(false)` after a skip line.
fn attempt(socks: &[PathBuf], start: Instant) -> Result<bool, Failed> {
    let Some(mut vms) = launch_both(socks)? else {
        return Ok(false);
    };
    println!(
        "E2E-TIME both_launched_ms={} host={}",
        start.elapsed().as_millis(),
        vms[0].host_kind()
    );
    let result = check(socks, &mut vms);
    if result.is_err() {
        for vm in &vms {
            eprintln!(
                "--- console of the VM on {} ---\n{}--- end ---",
                vm.api_socket().display(),
                vm.console_log()
            );
        }
    }
    result.map(|()| true)
}

/// Both answer on their own sockets while the other runs; a third VM on a
/// socket in use is refused at once.
fn check(socks: &[PathBuf], vms: &mut [RunningVm]) -> Result<(), Failed> {
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
    let mut memories = Vec::new();
    for vm in vms.iter() {
        let info = vm_info(vm).map_err(|e| {
            match vm.host_failure().or_else(|| vm.nested_guest_failure()) {
                Some(f) => Failed::Host(f),
                None => Failed::Other(e),
            }
        })?;
        println!("{}: {info:?}", vm.api_socket().display());
        memories.push(info.memory_mib);
    }
    if memories != [256, 320] {
        return Err(Failed::Other(format!(
            "memories {memories:?}, not [256, 320]"
        )));
    }
    for vm in vms.iter_mut() {
        if !matches!(vm.try_exit(), Ok(None)) {
            return Err(match vm.host_failure() {
                Some(f) => Failed::Host(f),
                None => Failed::Other("a VM ended while the other was asked".into()),
            });
        }
    }
    Ok(())
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
