//! Statements 7 to 11 of smpboot-spec.md: CPU transitions.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use smpboot::{
    CpuHotplug, CpuState, EventOutcome, FaultInjector, HotplugError, RegistryError, RegistryEvent,
    ThreadDescriptor, ThreadStatus,
};

fn three(sim: &Sim, log: &Arc<Log>, work: &Arc<Work>) -> Vec<smpboot::WakeHandle> {
    ["a", "b", "c"]
        .iter()
        .map(|l| {
            sim.registry
                .register(&probe(l, log, work, Callbacks::ALL))
                .unwrap()
        })
        .collect()
}

#[test]
fn s07_prepare_creates_newest_first() {
    let inj = Arc::new(FaultInjector::new());
    let sim = Sim::with_spawner(4, &[0], Some(inj.clone()));
    let (log, work) = (Log::new(), Work::new(4));
    let hs = three(&sim, &log, &work);
    log.clear();
    sim.registry.prepare(2).unwrap();
    assert_eq!(log.calls(Cb::Create), vec![("c", 2), ("b", 2), ("a", 2)]);

    // Failure at the second creation: stop, report, keep what was made.
    log.clear();
    inj.fail_nth(2);
    let err = sim.registry.prepare(3).unwrap_err();
    assert!(
        matches!(err, RegistryError::ThreadCreation { cpu: 3, .. }),
        "{err:?}"
    );
    assert_eq!(sim.registry.cpu_state(3).unwrap(), CpuState::Offline);
    assert_eq!(log.calls(Cb::Create), vec![("c", 3)]);
    let s = sim.snap();
    let c = s.thread(hs[2].descriptor(), 3).unwrap();
    assert!(c.parked && c.status == ThreadStatus::Created);
    let serial = c.serial;
    assert_eq!(
        s.thread(hs[1].descriptor(), 3).unwrap().status,
        ThreadStatus::Absent
    );
    assert_eq!(
        s.thread(hs[0].descriptor(), 3).unwrap().status,
        ThreadStatus::Absent
    );

    // Next time the parked thread is reused and the rest are created.
    log.clear();
    sim.registry.prepare(3).unwrap();
    assert_eq!(log.calls(Cb::Create), vec![("b", 3), ("a", 3)]);
    assert_eq!(sim.thread(hs[2].descriptor(), 3).serial, serial);
    sim.registry.online(3).unwrap();
    for l in ["a", "b", "c"] {
        wait_until("setup", || log.count(l, 3, Cb::Setup) == 1);
    }
    assert_eq!(inj.live_threads(), 3 + 3 + 3);
}

#[test]
fn s08_online_unparks_newest_first_without_waiting() {
    let sim = Sim::new(4, &[0]);
    let (log, work) = (Log::new(), Work::new(4));
    let gate = Gate::new();
    let g = Arc::clone(&gate);
    let blocking = ThreadDescriptor::builder("blk/%u", |_| false, |_| {})
        .setup(move |cpu| {
            if cpu == 2 {
                g.wait();
            }
        })
        .build();
    let blk = sim.registry.register(&blocking).unwrap().descriptor();
    let hs = three(&sim, &log, &work);
    sim.registry.prepare(2).unwrap();
    sim.clear_events();
    // The oldest descriptor's setup blocks; online returns regardless.
    sim.registry.online(2).unwrap();
    let unparks: Vec<_> = sim
        .events()
        .iter()
        .filter_map(|e| match e {
            RegistryEvent::UnparkRequested { descriptor, cpu: 2 } => Some(*descriptor),
            _ => None,
        })
        .collect();
    let ids: Vec<_> = hs
        .iter()
        .rev()
        .map(|h| h.descriptor())
        .chain([blk])
        .collect();
    assert_eq!(unparks, ids);
    wait_until("blocking setup entered", || gate.entered() == 1);
    assert_eq!(sim.thread(blk, 2).calls.setup, 0, "online waited for setup");
    gate.open();
    sim.wait_snap("setup done", |s| {
        s.thread(blk, 2).unwrap().status == ThreadStatus::Active
    });
}

#[test]
fn s09_offline_parks_oldest_first_synchronously() {
    let sim = Sim::new(2, &[0, 1]);
    let log = Log::new();
    let mut ids = Vec::new();
    for label in ["a", "b", "c"] {
        let l = Arc::clone(&log);
        let d = ThreadDescriptor::builder(format!("{label}/%u"), |_| false, |_| {})
            .park(move |cpu| {
                std::thread::sleep(Duration::from_millis(10));
                l.push(label, cpu, Cb::Park);
            })
            .build();
        ids.push(sim.registry.register(&d).unwrap().descriptor());
    }
    for &id in &ids {
        sim.wait_snap("active", |s| {
            s.thread(id, 1).unwrap().status == ThreadStatus::Active
        });
    }
    sim.registry.offline(1).unwrap();
    // Synchronous: every park callback finished before offline returned.
    assert_eq!(log.calls(Cb::Park), vec![("a", 1), ("b", 1), ("c", 1)]);
    let s = sim.snap();
    for &id in &ids {
        let t = s.thread(id, 1).unwrap();
        assert!(t.parked && t.status == ThreadStatus::Parked && t.calls.park == 1);
        assert_eq!(s.thread(id, 0).unwrap().calls.park, 0);
    }
}

#[test]
fn s10_failed_offline_unparks_the_same_threads_again() {
    let sim = Sim::new(2, &[0, 1]);
    let (log, work) = (Log::new(), Work::new(2));
    let hs = three(&sim, &log, &work);
    for h in &hs {
        sim.wait_snap("active", |s| {
            s.thread(h.descriptor(), 1).unwrap().status == ThreadStatus::Active
        });
    }
    let serials: Vec<_> = hs
        .iter()
        .map(|h| sim.thread(h.descriptor(), 1).serial)
        .collect();
    sim.registry.offline(1).unwrap();
    sim.clear_events();
    sim.registry.failed_offline(1).unwrap();
    assert_eq!(sim.registry.cpu_state(1).unwrap(), CpuState::Online);
    let unparks: Vec<_> = sim
        .events()
        .iter()
        .filter_map(|e| match e {
            RegistryEvent::UnparkRequested { descriptor, .. } => Some(*descriptor),
            _ => None,
        })
        .collect();
    assert_eq!(
        unparks,
        hs.iter().rev().map(|h| h.descriptor()).collect::<Vec<_>>()
    );
    for (h, serial) in hs.iter().zip(serials) {
        sim.wait_snap("unparked", |s| {
            s.thread(h.descriptor(), 1).unwrap().calls.unpark == 1
        });
        assert_eq!(sim.thread(h.descriptor(), 1).serial, serial);
        kick(&work, h, 1);
    }
    // The same through a topology that refuses the offlining.
    sim.topo.refuse_next(1, false);
    let driver = CpuHotplug::new(&sim.registry, &sim.topo);
    assert!(matches!(
        driver.take_down(1),
        Err(HotplugError::TakeDown { cpu: 1, .. })
    ));
    assert_eq!(sim.registry.cpu_state(1).unwrap(), CpuState::Online);
    sim.wait_snap("unparked twice", |s| {
        s.thread(hs[0].descriptor(), 1).unwrap().calls.unpark == 2
    });
}

#[test]
fn s11_forced_offline_parks_when_learned_and_is_reported() {
    let sim = Sim::new(4, &[0, 1, 2]);
    let (log, work) = (Log::new(), Work::new(4));
    let h = sim
        .registry
        .register(&probe("a", &log, &work, Callbacks::ALL))
        .unwrap();
    let id = h.descriptor();
    sim.wait_snap("active", |s| {
        s.thread(id, 2).unwrap().status == ThreadStatus::Active
    });
    // The CPU goes down on its own; the thread runs elsewhere meanwhile.
    sim.topo.force_offline(2).unwrap();
    kick(&work, &h, 2);
    assert_ne!(
        sim.thread(id, 2).last_cpu,
        Some(2),
        "affinity should look broken"
    );
    assert_eq!(log.count("a", 2, Cb::Park), 0);
    // The registry learns of it from the topology's event.
    let driver = CpuHotplug::new(&sim.registry, &sim.topo);
    let outcomes = driver.drain().unwrap();
    let [EventOutcome::ForcedOffline(report)] = outcomes.as_slice() else {
        panic!("expected one forced offline, got {outcomes:?}");
    };
    assert_eq!((report.cpu, report.previous), (2, CpuState::Online));
    assert_eq!(report.parked, vec![id]);
    assert!(sim
        .events()
        .contains(&RegistryEvent::ForcedOffline { cpu: 2, parked: 1 }));
    let s = sim.snap();
    assert_eq!(s.forced_offlines, 1);
    assert_eq!(s.cpu(2).unwrap().forced_offlines, 1);
    assert_eq!(s.cpu(2).unwrap().state, CpuState::Offline);
    assert!(s.thread(id, 2).unwrap().parked);
    assert_eq!(log.count("a", 2, Cb::Park), 1);
    // Parked now: work for CPU 2 waits for it to come back.
    work.add(2, 1);
    h.wake(2);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(work.pending(2), 1);
    driver.bring_up(2).unwrap();
    wait_until("work after bring-up", || work.pending(2) == 0);
    assert_eq!(sim.thread(id, 2).last_cpu, Some(2));
}
