//! The agent with Linux's numbering apart from the vCPU ids: a guest
//! booted with vCPU 0 that gets vCPU 6 as cpu1, then vCPU 3 as cpu2.
//! Every message must name vCPU ids, every sysfs write logical numbers.

use super::*;

/// The report of vCPU `id`, Linux's `cpu{logical}`.
fn report(id: u32, logical: u32, online: bool, requested: bool) -> GuestMessage {
    GuestMessage::Cpu {
        cpu: id,
        logical: Some(logical),
        online,
        requested,
    }
}

fn restored(cpu: u32, ok: bool, reason: Option<&str>) -> GuestMessage {
    GuestMessage::Restored {
        cpu,
        ok,
        reason: reason.map(str::to_owned),
    }
}

/// Booted with vCPU 0 only (of 8), then vCPU 6 added (cpu1), then vCPU 3
/// (cpu2), both online with their workers set up.
fn renumbered(tag: &str) -> Rig {
    let mut r = rig(tag, "0-7", "0", "0", "");
    let out = r.agent.take_output();
    assert!(
        matches!(&out.host[..], [GuestMessage::Ready { online, cpus, .. }]
            if online == &[0] && cpus == &[(0, 0)]),
        "{out:?}"
    );
    r.hot_add_as(1, 6);
    assert!(r.handle().host.is_empty());
    assert_eq!(r.fake.get("cpu1/online"), "1", "the write goes to cpu1");
    r.kernel_online(1);
    let out = r.handle();
    assert_eq!(out.host, [report(6, 1, true, true)]);
    assert_eq!(out.console, ["GUEST-CPU online=0-1 vcpus=0,6"]);
    r.hot_add_as(2, 3);
    r.handle();
    r.kernel_online(2);
    let out = r.handle();
    assert_eq!(out.host, [report(3, 2, true, true)]);
    assert_eq!(out.console, ["GUEST-CPU online=0-2 vcpus=0,3,6"]);
    assert_eq!(r.agent.ids().pairs(), [(0, 0), (3, 2), (6, 1)]);
    r.wait_setup(1);
    r.wait_setup(2);
    r
}

/// The `workers` snapshot the agent sends when asked.
fn snapshot(r: &mut Rig) -> (Vec<WorkerInfo>, Vec<(u32, u64)>) {
    match &r.host(HostMessage::Snapshot).host[..] {
        [GuestMessage::Workers { workers, done }] => (workers.clone(), done.clone()),
        other => panic!("{other:?}"),
    }
}

fn on(workers: &[WorkerInfo], id: u32) -> Vec<&WorkerInfo> {
    workers.iter().filter(|w| w.cpu == id).collect()
}

#[test]
fn reports_and_snapshots_name_vcpu_ids() {
    let mut r = renumbered("ids-report");
    let work = Arc::clone(r.agent.workers().workload());
    work.queue(1, 5);
    eventually("items on cpu1", || work.done(1) == 5);
    let (workers, done) = snapshot(&mut r);
    for id in [0, 3, 6] {
        assert_eq!(on(&workers, id).len(), 3, "vCPU {id}: {workers:?}");
    }
    assert!(on(&workers, 1).is_empty() && on(&workers, 2).is_empty());
    // The placement reports where a thread ran by logical number: cpu1.
    assert!(on(&workers, 6)
        .iter()
        .all(|w| w.last_cpu.is_none() || w.last_cpu == Some(6)));
    assert!(on(&workers, 6).iter().any(|w| w.last_cpu == Some(6)));
    assert_eq!(done, [(0, 0), (3, 0), (6, 5)]);
}

#[test]
fn prepare_remove_takes_the_vcpu_id_and_writes_the_logical_cpu() {
    let mut r = renumbered("ids-prepare");
    // vCPU 1 does not exist, though cpu1 does: nothing is touched.
    let out = r.host(HostMessage::PrepareRemove { cpu: 1 });
    let none = "no CPU is vCPU 1 in the guest";
    assert_eq!(out.host, [prepared(1, false, Some(none))]);
    assert_eq!(r.fake.get("cpu1/online"), "1");
    let out = r.host(HostMessage::PrepareRemove { cpu: 6 });
    assert_eq!(
        out.host,
        [prepared(6, true, None), report(6, 1, false, true)]
    );
    assert_eq!(out.console, ["GUEST-CPU online=0,2 vcpus=0,3"]);
    assert_eq!(r.fake.get("cpu1/online"), "0");
    assert_eq!(r.fake.get("cpu2/online"), "1");
    assert_eq!(r.state(1), CpuState::Offline);
    assert_eq!(r.state(2), CpuState::Online);
    // Faults take ids too.
    assert!(r.host(fault(Fault::RefuseOffline, Some(3))).host.is_empty());
    let out = r.host(HostMessage::PrepareRemove { cpu: 3 });
    assert_eq!(out.host, [prepared(3, false, Some(REFUSED_BY_FAULT))]);
    assert_eq!(r.fake.get("cpu2/online"), "1");
    r.host(fault(Fault::ForceOffline, Some(3)));
    assert_eq!(r.fake.get("cpu2/online"), "0", "written to cpu2");
    r.kernel_offline(2);
    assert_eq!(r.handle().host, [report(3, 2, false, false)]);
}

#[test]
fn cancel_remove_brings_a_prepared_cpu_back() {
    let mut r = renumbered("ids-cancel");
    r.host(HostMessage::PrepareRemove { cpu: 6 });
    r.kernel_offline(1);
    assert!(r.handle().host.is_empty(), "the echo of its own offline");
    assert!(r.infos_on(1).iter().all(|i| i.status == "parked"));
    let out = r.host(HostMessage::CancelRemove { cpu: 6 });
    // The answer first, then the report the onlining made.
    assert_eq!(
        out.host,
        [restored(6, true, None), report(6, 1, true, true)]
    );
    assert_eq!(out.console, ["GUEST-CPU online=0-2 vcpus=0,3,6"]);
    assert_eq!(r.fake.get("cpu1/online"), "1");
    assert_eq!(r.state(1), CpuState::Online);
    assert!(r.infos_on(1).iter().all(|i| i.status == "active"));
    eventually("watchdog unparked", || {
        r.thread(WATCHDOG, 1).calls.unpark == 1
    });
    // The kernel's `online` echo changes nothing.
    r.kernel_online(1);
    let out = r.handle();
    assert!(out.host.is_empty() && out.console.is_empty(), "{out:?}");
    // A CPU never taken down is just confirmed.
    let out = r.host(HostMessage::CancelRemove { cpu: 3 });
    assert_eq!(out.host, [restored(3, true, None)]);
    assert!(out.console.is_empty());
    // After a refused offline (rolled back) too.
    r.host(fault(Fault::RefuseOffline, Some(6)));
    r.host(HostMessage::PrepareRemove { cpu: 6 });
    let out = r.host(HostMessage::CancelRemove { cpu: 6 });
    assert_eq!(out.host, [restored(6, true, None)]);
    assert_eq!(r.state(1), CpuState::Online);
}

#[test]
fn cancel_remove_of_an_ejected_cpu_fails() {
    let mut r = renumbered("ids-ejected");
    r.host(HostMessage::PrepareRemove { cpu: 6 });
    r.kernel_offline(1);
    // Ejected, the `remove` uevent not handled yet.
    std::fs::remove_dir_all(r.fake.0.join("cpu1")).unwrap();
    r.edit_list("present", 1, false);
    let out = r.host(HostMessage::CancelRemove { cpu: 6 });
    let gone = "cpu1 (vCPU 6) no longer exists";
    assert_eq!(out.host, [restored(6, false, Some(gone))]);
    // ... and handled: vCPU 6 is forgotten.
    r.events.event("remove", 1);
    r.handle();
    let out = r.host(HostMessage::CancelRemove { cpu: 6 });
    let none = "no CPU is vCPU 6 in the guest (ejected?)";
    assert_eq!(out.host, [restored(6, false, Some(none))]);
    let out = r.host(HostMessage::CancelRemove { cpu: 5 });
    let none = "no CPU is vCPU 5 in the guest (ejected?)";
    assert_eq!(out.host, [restored(5, false, Some(none))]);
}

#[test]
fn a_removed_vcpu_may_come_back_under_another_number() {
    let mut r = renumbered("ids-readd");
    r.host(HostMessage::PrepareRemove { cpu: 6 });
    r.kernel_offline(1);
    r.kernel_remove(1);
    r.handle();
    assert_eq!(r.agent.ids().pairs(), [(0, 0), (3, 2)]);
    // Its parked threads are still shown, under the id they served.
    let (workers, _) = snapshot(&mut r);
    let six = on(&workers, 6);
    assert_eq!(six.len(), 3);
    assert!(six.iter().all(|w| w.status == "parked"), "{six:?}");
    // vCPU 6 again, now as cpu3 (a kernel that renumbers).
    r.hot_add_as(3, 6);
    r.handle();
    assert_eq!(r.fake.get("cpu3/online"), "1");
    r.kernel_online(3);
    let out = r.handle();
    assert_eq!(out.host, [report(6, 3, true, true)]);
    assert_eq!(out.console, ["GUEST-CPU online=0,2-3 vcpus=0,3,6"]);
    assert_eq!(r.agent.ids().pairs(), [(0, 0), (3, 2), (6, 3)]);
    r.wait_setup(3);
    // cpu1's threads are nobody's now; vCPU 6's are cpu3's.
    let (workers, _) = snapshot(&mut r);
    let six = on(&workers, 6);
    assert_eq!(six.len(), 3);
    assert!(six.iter().all(|w| w.status == "active"), "{six:?}");
    assert_eq!(workers.len(), 9, "cpu1's parked threads left out");
    // And cpu1 reused by vCPU 5.
    r.hot_add_as(1, 5);
    r.handle();
    r.kernel_online(1);
    assert_eq!(r.handle().host, [report(5, 1, true, true)]);
    let out = r.host(HostMessage::PrepareRemove { cpu: 6 });
    assert_eq!(
        out.host,
        [prepared(6, true, None), report(6, 3, false, true)]
    );
    assert_eq!(r.fake.get("cpu3/online"), "0");
    assert_eq!(r.fake.get("cpu1/online"), "1");
}

#[test]
fn start_maps_every_present_cpu() {
    // vCPUs 0 and 5 online as cpu0 and cpu1, vCPU 2 present offline as
    // cpu2 (autoonline off).
    let mut r = rig_with(
        "ids-start",
        "0-7",
        "0-2",
        "0-1",
        "agent.autoonline=0",
        |f| {
            f.add_cpu(1, 5);
            f.add_cpu(2, 2);
        },
    );
    let out = r.agent.take_output();
    assert_eq!(
        out.host,
        [GuestMessage::Ready {
            version: "9.9.9".into(),
            online: vec![0, 5],
            cpus: vec![(0, 0), (2, 2), (5, 1)],
        }]
    );
    let ready = out.console.last().unwrap();
    assert!(
        ready.contains(" online=0-1 present=0-2 possible=0-7 vcpus=0,5 "),
        "{ready}"
    );
}

#[test]
fn the_id_is_read_late_when_the_firmware_node_comes_after_the_add() {
    let mut r = rig("ids-late", "0-7", "0", "0", "");
    r.agent.take_output();
    // cpu1 appears without its firmware node (acpi_bind_one runs after
    // the `add` uevent): brought up all the same.
    std::fs::create_dir_all(r.fake.0.join("cpu1")).unwrap();
    r.fake.set("cpu1/online", "0\n");
    r.edit_list("present", 1, true);
    r.events.event("add", 1);
    assert!(r.handle().host.is_empty());
    assert_eq!(r.fake.get("cpu1/online"), "1");
    assert_eq!(r.agent.ids().id(1), None);
    r.fake.add_cpu(1, 4);
    r.kernel_online(1);
    assert_eq!(r.handle().host, [report(4, 1, true, true)]);
}

#[test]
fn without_a_firmware_node_the_apic_id_is_used_and_said() {
    let mut r = rig("ids-apic", "0-7", "0", "0", "");
    r.agent.take_output();
    std::fs::create_dir_all(r.fake.0.join("cpu1")).unwrap();
    r.fake.set("cpu1/online", "0\n");
    r.edit_list("present", 1, true);
    r.events.event("add", 1);
    r.handle();
    r.fake.set(
        "cpuinfo",
        "processor\t: 0\napicid\t\t: 0\n\nprocessor\t: 1\napicid\t\t: 7\n",
    );
    r.kernel_online(1);
    let out = r.handle();
    assert_eq!(out.host, [report(7, 1, true, true)]);
    assert_eq!(
        out.console,
        [
            "GUEST-WARN cpu1 is vCPU 7 (apicid in /proc/cpuinfo: no firmware node)",
            "GUEST-CPU online=0-1 vcpus=0,7",
        ]
    );
    // Neither source: the CPU is brought up but not reported.
    std::fs::create_dir_all(r.fake.0.join("cpu2")).unwrap();
    r.fake.set("cpu2/online", "0\n");
    r.edit_list("present", 2, true);
    r.events.event("add", 2);
    r.handle();
    r.kernel_online(2);
    let out = r.handle();
    assert!(out.host.is_empty(), "{out:?}");
    assert_eq!(
        out.console,
        ["GUEST-ERROR cpu2 online: vCPU id unknown, not reported"]
    );
}

#[test]
fn delay_fault_holds_back_only_the_next_online_report() {
    let mut r = renumbered("ids-delay");
    let delay = HostMessage::Fault {
        fault: Fault::DelayReport,
        cpu: None,
        ms: Some(200),
    };
    assert!(r.host(delay).host.is_empty());
    let t0 = Instant::now();
    r.hot_add_as(3, 1);
    r.handle();
    assert_eq!(r.fake.get("cpu3/online"), "1", "onlined at once");
    r.kernel_online(3);
    let out = r.handle();
    assert!(out.host.is_empty(), "held: {out:?}");
    assert_eq!(out.console, ["GUEST-CPU online=0-3 vcpus=0-1,3,6"]);
    // Nothing else is held: answers and snapshots go out.
    let out = r.host(HostMessage::CancelRemove { cpu: 3 });
    assert_eq!(out.host, [restored(3, true, None)]);
    assert!(r.agent.next_timeout(t0).unwrap() <= Duration::from_millis(200));
    r.agent.tick(t0 + Duration::from_millis(100));
    let out = r.agent.take_output();
    assert!(
        !out.host
            .iter()
            .any(|m| matches!(m, GuestMessage::Cpu { .. })),
        "{out:?}"
    );
    r.agent.tick(Instant::now() + Duration::from_millis(250));
    let out = r.agent.take_output();
    assert!(out.host.contains(&report(1, 3, true, true)), "{out:?}");
    // One-shot.
    r.hot_add_as(4, 2);
    r.handle();
    r.kernel_online(4);
    assert_eq!(r.handle().host, [report(2, 4, true, true)]);
    // Without its `ms` it is dropped.
    let dropped = r.agent.dropped_lines();
    r.host(fault(Fault::DelayReport, None));
    assert_eq!(r.agent.dropped_lines(), dropped + 1);
}

#[test]
fn a_held_report_gives_way_to_a_newer_one() {
    let mut r = renumbered("ids-stale");
    r.host(HostMessage::Fault {
        fault: Fault::DelayReport,
        cpu: None,
        ms: Some(60_000),
    });
    r.hot_add_as(3, 1);
    r.handle();
    r.kernel_online(3);
    assert!(r.handle().host.is_empty());
    let out = r.host(HostMessage::PrepareRemove { cpu: 1 });
    assert_eq!(
        out.host,
        [prepared(1, true, None), report(1, 3, false, true)]
    );
    r.agent.tick(Instant::now() + Duration::from_secs(61));
    let out = r.agent.take_output();
    assert!(
        !out.host
            .iter()
            .any(|m| matches!(m, GuestMessage::Cpu { .. })),
        "the stale online report is gone: {out:?}"
    );
}
