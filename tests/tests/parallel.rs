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
fn vm_info(vm: &RunningVm) -> e2e::Result<api::VmInfo, String> {
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
    // Both launches at once: neither waits for the other.
    let boots: Vec<_> = socks
        .iter()
        .zip([256, 320])
        .map(|(s, mib)| {
            let spec = spec(s, mib);
            std::thread::spawn(move || e2e::launch(&spec))
        })
        .collect();
    let mut vms = Vec::new();
    for boot in boots {
        match boot.join().expect("launch thread") {
            Ok(vm) => vms.push(vm),
            Err(e) => match e.skip_reason() {
                Some(why) => {
                    e2e::skip(&why);
                    return;
                }
                None => panic!("a launch failed: {}", e2e::chain(&e)),
            },
        }
    }
    println!(
        "E2E-TIME both_launched_ms={} host={}",
        start.elapsed().as_millis(),
        vms[0].host_kind()
    );
    // A third VM on a socket in use is refused before it boots anything.
    let t = Instant::now();
    match e2e::launch(&spec(&socks[0], 256)) {
        Err(Error::InUse(why)) => assert!(why.contains("a.sock"), "{why}"),
        Err(e) => panic!("expected the socket in use, got {}", e2e::chain(&e)),
        Ok(_) => panic!("a second VM got the socket of a running one"),
    }
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());

    // Both answer on their own sockets, each with its own VM's figures,
    // while the other still runs.
    let mut memories = Vec::new();
    for vm in &vms {
        let info = vm_info(vm).unwrap_or_else(|e| panic!("{e}"));
        println!(
            "{}: {info:?} after {} ms",
            vm.api_socket().display(),
            start.elapsed().as_millis()
        );
        memories.push(info.memory_mib);
    }
    assert_eq!(memories, [256, 320]);
    for vm in &mut vms {
        assert!(
            matches!(vm.try_exit(), Ok(None)),
            "a VM ended while the other was asked\n{}",
            vm.console_log()
        );
    }
    println!(
        "E2E-TIME test=two_vms_at_once_on_their_own_sockets ms={}",
        start.elapsed().as_millis()
    );
    drop(vms);
    for s in &socks {
        assert!(!locks::socket_lock_path(s).exists(), "lock file left");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
