//! The guest agent end to end: per-CPU workers following the vCPU
//! topology, seen from the host through the API, including the removal
//! protocol's rollback, a forced offline, a silent agent, and a guest that
//! never ejects. One guest boot (2 of max 8) for the lot, test hooks on.

use std::time::{Duration, Instant};

use api::client::{BlockingClient, ClientError};
use api::{FaultKind, GuestWorker, GuestWorkers, OperationStatus, VcpuState};
use e2e::ops::logged as finished;
use e2e::RunningVm;

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

fn on_cpu(w: &GuestWorkers, cpu: u32) -> Vec<&GuestWorker> {
    w.workers.iter().filter(|t| t.cpu == cpu).collect()
}

fn worker<'a>(w: &'a GuestWorkers, name: &str, cpu: u32) -> Option<&'a GuestWorker> {
    w.workers
        .iter()
        .find(|t| t.cpu == cpu && t.descriptor == name)
}

/// Every descriptor has an active worker on `cpu`, last seen on it.
fn all_active_on(w: &GuestWorkers, cpu: u32) -> bool {
    DESCRIPTORS
        .iter()
        .all(|d| worker(w, d, cpu).is_some_and(|t| t.status == "active" && t.last_cpu == Some(cpu)))
}

fn done_on(w: &GuestWorkers, cpu: u32) -> u64 {
    w.work
        .iter()
        .find(|c| c.cpu == cpu)
        .map_or(0, |c| c.items_done)
}

fn scenario(vm: &mut RunningVm) -> TestResult {
    vm.wait_for_console("GUEST-READY", Duration::from_secs(180))?;
    let client = BlockingClient::new(vm.api_socket())?;

    // Boot with 2 of 8: every descriptor active on CPUs 0 and 1, on its CPU.
    let w = eventually(&client, "workers active on CPUs 0 and 1", |w| {
        all_active_on(w, 0) && all_active_on(w, 1)
    })?;
    let info = client.vm()?;
    if info.agent_connected != Some(true) || info.agent_version.is_none() {
        return Err(format!("agent not reported connected: {info:?}").into());
    }
    assert!(on_cpu(&w, 2).is_empty(), "no workers on an absent CPU yet");

    // Hot-add CPU 2: workers created, set up once, running on CPU 2, work done there.
    let t = Instant::now();
    let op = finished("add 2", client.add_vcpu(2, Some(WAIT)))?;
    assert_eq!(op.status, OperationStatus::Succeeded);
    let w = eventually(&client, "workers on CPU 2 doing work", |w| {
        all_active_on(w, 2) && done_on(w, 2) > 0
    })?;
    println!(
        "E2E-TIME capacity_ms={} (add request to first item done on CPU 2)",
        t.elapsed().as_millis()
    );
    for d in DESCRIPTORS {
        let t = worker(&w, d, 2).ok_or("worker vanished")?;
        if d != "ksoftirqd" && t.setup_calls != 1 {
            return Err(format!("{d}/2 set up {} times", t.setup_calls).into());
        }
    }
    let serials_before: Vec<_> = on_cpu(&w, 2)
        .iter()
        .map(|t| (t.descriptor.clone(), t.setup_calls))
        .collect();

    // Hot-remove CPU 2: parked (park callback ran), not destroyed; others keep working.
    let before = (done_on(&w, 0), done_on(&w, 1));
    let op = finished("remove 2", client.remove_vcpu(2, Some(WAIT)))?;
    assert_eq!(op.status, OperationStatus::Succeeded);
    let w = eventually(&client, "CPU 2 workers parked, others working", |w| {
        on_cpu(w, 2).len() == DESCRIPTORS.len()
            && on_cpu(w, 2).iter().all(|t| t.status == "parked")
            && done_on(w, 0) + done_on(w, 1) > before.0 + before.1
    })?;
    let wd = worker(&w, "watchdog", 2).ok_or("watchdog/2 destroyed")?;
    assert!(
        wd.park_calls >= 1,
        "watchdog/2 park callback did not run: {wd:?}"
    );

    // Re-add CPU 2: the same threads unparked, not re-created.
    let op = finished("re-add 2", client.add_vcpu(2, Some(WAIT)))?;
    assert_eq!(op.status, OperationStatus::Succeeded);
    // The snapshot is taken as the registry changes: wait until it shows
    // the unpark callback too, not just the status.
    let w = eventually(&client, "CPU 2 workers unparked", |w| {
        all_active_on(w, 2) && worker(w, "watchdog", 2).is_some_and(|t| t.unpark_calls >= 1)
    })?;
    let wd = worker(&w, "watchdog", 2).ok_or("watchdog/2 missing")?;
    if (wd.setup_calls, wd.unpark_calls) != (1, 1) {
        return Err(format!("watchdog/2 after re-add: {wd:?} (want setup 1, unpark 1)").into());
    }
    let serials_after: Vec<_> = on_cpu(&w, 2)
        .iter()
        .map(|t| (t.descriptor.clone(), t.setup_calls))
        .collect();
    assert_eq!(serials_before, serials_after, "threads were re-created");

    // A refused offline rolls back: the operation fails with the reason,
    // the vCPU stays present and online, its workers active again.
    client.inject_fault(FaultKind::AgentRefuseOffline, Some(2))?;
    let op = finished("refused remove 2", client.remove_vcpu(2, Some(WAIT)))?;
    if op.status != OperationStatus::Failed
        || !op.reason.as_deref().unwrap_or("").contains("refused")
    {
        return Err(format!("refused offline: {op:?}").into());
    }
    let v = client.vcpus()?;
    let v2 = &v.vcpus[2];
    if v2.state != VcpuState::Present || v2.guest_online != Some(true) {
        return Err(format!("vCPU 2 after the refusal: {v2:?}").into());
    }
    eventually(&client, "CPU 2 workers unparked after the rollback", |w| {
        all_active_on(w, 2)
    })?;

    // A guest that never ejects: ?wait times out (504) with the operation
    // still running; the vCPU stays usable; a later removal succeeds.
    client.inject_fault(FaultKind::IgnoreRemoval, Some(2))?;
    match client.remove_vcpu(2, Some(Duration::from_secs(5))) {
        Err(ClientError::WaitTimedOut(op)) => {
            assert_eq!(op.status, OperationStatus::Running);
            println!("never-ejecting guest: 504 with operation {} running", op.id);
        }
        other => return Err(format!("expected 504, got {other:?}").into()),
    }
    let v2 = client.vcpus()?.vcpus[2].clone();
    if v2.guest_online != Some(true) {
        return Err(format!("vCPU 2 should still be usable: {v2:?}").into());
    }
    let op = finished("remove 2 again", client.remove_vcpu(2, Some(WAIT)))?;
    assert_eq!(op.status, OperationStatus::Succeeded, "{op:?}");
    finished("add 2 back", client.add_vcpu(2, Some(WAIT)))?;

    // A forced offline (the guest offlines CPU 2 on its own) is reported
    // and its workers parked.
    client.inject_fault(FaultKind::AgentForceOffline, Some(2))?;
    eventually(&client, "forced offline seen and workers parked", |w| {
        on_cpu(w, 2).iter().all(|t| t.status == "parked")
    })?;
    let deadline = Instant::now() + WAIT;
    while client.vcpus()?.vcpus[2].guest_online != Some(false) {
        if Instant::now() > deadline {
            return Err("forced offline of CPU 2 not reported".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    // A silent agent: reported disconnected; removal still works (ACPI fallback).
    finished("add 3", client.add_vcpu(3, Some(WAIT)))?;
    client.inject_fault(FaultKind::AgentSilence, None)?;
    let deadline = Instant::now() + WAIT;
    while client.vm()?.agent_connected != Some(false) {
        if Instant::now() > deadline {
            return Err("silent agent still reported connected".into());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let op = finished("remove 3 without agent", client.remove_vcpu(3, Some(WAIT)))?;
    if op.status != OperationStatus::Succeeded
        || !op.reason.as_deref().unwrap_or("").contains("ACPI")
    {
        return Err(format!("fallback removal: {op:?}").into());
    }
    Ok(())
}

#[test]
fn agent_workers_follow_the_topology() {
    let spec = e2e::VmSpec::new(2, 8)
        .timeout(Duration::from_secs(900))
        .vmm_arg("--test-hooks");
    e2e::run_test("agent_workers_follow_the_topology", &spec, scenario);
}

/// Timeouts that leave the VMM and the guest agreeing, end to end (short
/// hotplug timeouts so the test waits seconds, not half minutes).
fn timeouts_scenario(vm: &mut RunningVm) -> TestResult {
    vm.wait_for_console("GUEST-READY", Duration::from_secs(180))?;
    let client = BlockingClient::new(vm.api_socket())?;
    eventually(&client, "workers active on CPUs 0 and 1", |w| {
        all_active_on(w, 0) && all_active_on(w, 1)
    })?;

    // The agent onlines vCPU 2 at once but reports it only after the add
    // timeout: the guest started it, so it stays present (the operation
    // fails, saying so), and the late report agrees.
    client.inject_fault(FaultKind::AgentDelayReport, None)?;
    let op = finished("add 2, reported late", client.add_vcpu(2, Some(WAIT)))?;
    if op.status != OperationStatus::Failed
        || !op.reason.as_deref().unwrap_or("").contains("stays present")
    {
        return Err(format!("late report: {op:?}").into());
    }
    let v2 = client.vcpus()?.vcpus[2].clone();
    if v2.state != VcpuState::Present {
        return Err(format!("vCPU 2 after the late report's timeout: {v2:?}").into());
    }
    let deadline = Instant::now() + WAIT;
    while client.vcpus()?.vcpus[2].guest_online != Some(true) {
        if Instant::now() > deadline {
            return Err("the late online report of vCPU 2 never arrived".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eventually(
        &client,
        "workers active on CPU 2 after the late report",
        |w| all_active_on(w, 2),
    )?;

    // The agent prepares vCPU 2's removal (workers parked, CPU offline)
    // but the eject is never raised: at the eject timeout the VMM asks
    // the agent to bring it back, and reports it present once it is.
    client.inject_fault(FaultKind::IgnoreEject, Some(2))?;
    let op = finished(
        "remove 2, eject withheld",
        client.remove_vcpu(2, Some(WAIT)),
    )?;
    if op.status != OperationStatus::Failed
        || !op.reason.as_deref().unwrap_or("").contains("back online")
    {
        return Err(format!("cancelled removal: {op:?}").into());
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let v2 = client.vcpus()?.vcpus[2].clone();
        if v2.state == VcpuState::Present && v2.guest_online == Some(true) {
            break;
        }
        if v2.state == VcpuState::Present && v2.guest_online != Some(true) {
            return Err(format!("vCPU 2 present but not back online: {v2:?}").into());
        }
        if Instant::now() > deadline {
            return Err(format!("vCPU 2 never came back: {v2:?}").into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eventually(&client, "CPU 2 workers unparked after the cancel", |w| {
        all_active_on(w, 2) && done_on(w, 2) > 0
    })?;

    // Both ends still agree: a plain removal and re-add succeed.
    let op = finished("remove 2", client.remove_vcpu(2, Some(WAIT)))?;
    assert_eq!(op.status, OperationStatus::Succeeded, "{op:?}");
    let op = finished("re-add 2", client.add_vcpu(2, Some(WAIT)))?;
    assert_eq!(op.status, OperationStatus::Succeeded, "{op:?}");
    Ok(())
}

#[test]
fn agent_timeouts_leave_vmm_and_guest_agreeing() {
    let spec = e2e::VmSpec::new(2, 8)
        .timeout(Duration::from_secs(900))
        .vmm_arg("--test-hooks")
        .vmm_arg("--hotplug-timeouts=add=6,eject=6,restore=20");
    e2e::run_test(
        "agent_timeouts_leave_vmm_and_guest_agreeing",
        &spec,
        timeouts_scenario,
    );
}
