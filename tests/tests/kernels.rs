//! A second guest kernel end to end: Debian's generic `linux-image-amd64`
//! (a different configuration from the cloud flavour the other tests
//! boot: most drivers as modules, an xz-compressed bzImage). It boots
//! with the same initramfs and command line and no module loaded: what a
//! guest needs (ACPI CPU hotplug and the GED, the 8250 UARTs, `/dev/mem`
//! for the agent's mailbox, the PVH entry) is built in, as in the cloud
//! kernel (docs/guest.md). One hot-add and one hot-remove through the
//! API; the agent's workers follow.
//!
//! `GUEST_KERNEL_FLAVOUR=generic` is set for this process, which the
//! guest image builder reads; every test of this file boots the generic
//! kernel.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use api::client::BlockingClient;
use api::{GuestWorkers, VcpuState};
use e2e::guest_view::wait_guest_online;
use e2e::ops::succeeded as finished;
use e2e::RunningVm;
use resources::Flavour;

type TestResult<T = ()> = Result<T, e2e::BoxError>;

const DESCRIPTORS: [&str; 3] = ["ksoftirqd", "rcuc", "watchdog"];
const WAIT: Duration = Duration::from_secs(90);

/// Polls the workers view until `check` accepts it.
fn eventually(
    client: &BlockingClient,
    what: &str,
    check: impl Fn(&GuestWorkers) -> bool,
) -> TestResult<GuestWorkers> {
    let deadline = Instant::now() + WAIT;
    loop {
        let w = client.guest_workers()?;
        if check(&w) {
            return Ok(w);
        }
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}; last view: {w:#?}").into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every descriptor has a worker on `cpu` in `status` (and, when active,
/// last seen on it).
fn all_on(w: &GuestWorkers, cpu: u32, status: &str) -> bool {
    DESCRIPTORS.iter().all(|d| {
        w.workers.iter().any(|t| {
            t.cpu == cpu
                && t.descriptor == *d
                && t.status == status
                && (status != "active" || t.last_cpu == Some(cpu))
        })
    })
}

fn done_on(w: &GuestWorkers, cpu: u32) -> u64 {
    w.work
        .iter()
        .find(|c| c.cpu == cpu)
        .map_or(0, |c| c.items_done)
}

fn set(ids: impl IntoIterator<Item = u32>) -> BTreeSet<u32> {
    ids.into_iter().collect()
}

fn scenario(vm: &mut RunningVm) -> TestResult {
    let ready = vm.wait_for_console("GUEST-READY", Duration::from_secs(240))?;
    println!("generic kernel: {ready}");
    // The agent found both rings in the mailbox region it maps from
    // /dev/mem (STRICT_DEVMEM lets it: the region is not RAM).
    if !ready.contains("mailbox=1") {
        return Err(format!("the agent does not use the mailbox: {ready}").into());
    }
    let client = BlockingClient::new(vm.api_socket())?;
    eventually(&client, "workers active on CPUs 0 and 1", |w| {
        all_on(w, 0, "active") && all_on(w, 1, "active")
    })?;
    let info = client.vm()?;
    if info.agent_connected != Some(true) {
        return Err(format!("agent not connected: {info:?}").into());
    }
    wait_guest_online(vm, &set([0, 1]), WAIT)?;

    // Hot-add vCPU 2: the GED interrupt, the ACPI CPU scan, the agent
    // onlines it and starts its workers there.
    finished("add 2", client.add_vcpu(2, Some(WAIT)))?;
    wait_guest_online(vm, &set([0, 1, 2]), WAIT)?;
    eventually(&client, "workers on CPU 2 doing work", |w| {
        all_on(w, 2, "active") && done_on(w, 2) > 0
    })?;

    // Hot-remove it: the agent parks its workers and offlines it, the
    // guest ejects it through _EJ0.
    finished("remove 2", client.remove_vcpu(2, Some(WAIT)))?;
    wait_guest_online(vm, &set([0, 1]), WAIT)?;
    eventually(&client, "CPU 2 workers parked", |w| all_on(w, 2, "parked"))?;
    let v2 = client.vcpus()?.vcpus[2].clone();
    if v2.state != VcpuState::Absent {
        return Err(format!("vCPU 2 after its removal: {v2:?}").into());
    }

    // The generic kernel said nothing alarming on the way (with `quiet`
    // only warnings and worse reach the console).
    let log = vm.console_log();
    for bad in ["BUG:", "Oops", "Call Trace", "GUEST-FATAL"] {
        if log.contains(bad) {
            return Err(format!("{bad:?} on the console").into());
        }
    }
    Ok(())
}

#[test]
fn generic_kernel_hotplug_and_agent() {
    std::env::set_var(Flavour::GUEST_ENV, Flavour::Generic.name());
    // Which kernel the guest will boot (the harness prints it too).
    let kernel = match resources::ensure_guest_kernel() {
        Ok(k) => k,
        Err(e) if e.is_apt_unavailable() => {
            e2e::skip(&format!(
                "cannot get the generic kernel: {}",
                e2e::chain(&e)
            ));
            return;
        }
        Err(e) => panic!("the generic kernel: {}", e2e::chain(&e)),
    };
    assert_eq!(kernel.flavour, Flavour::Generic);
    assert!(kernel.has_pvh(), "the generic kernel has CONFIG_PVH");
    println!("booting {} ({})", kernel.version, kernel.package);
    if let Ok(files) = e2e::artifacts::guest_image() {
        assert_eq!(files.vmlinux, kernel.vmlinux, "the guest image's kernel");
    }
    let spec = e2e::VmSpec::new(2, 8).timeout(Duration::from_secs(600));
    e2e::run_test("generic_kernel_hotplug_and_agent", &spec, scenario);
}
