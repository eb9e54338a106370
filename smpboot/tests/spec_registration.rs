//! Statements 1 to 6 of smpboot-spec.md: registration.

mod common;

use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::*;
use smpboot::{
    CpuState, CreateError, FaultInjector, RegistryError, RegistryEvent, SpawnError,
    ThreadDescriptor, ThreadStatus,
};

#[test]
fn s01_register_creates_ascending_and_unparks_each_before_next() {
    let sim = Sim::new(6, &[0, 1, 3, 5]);
    let (log, work) = (Log::new(), Work::new(6));
    let d = probe("a", &log, &work, Callbacks::ALL);
    let h = sim.registry.register(&d).unwrap();
    let id = h.descriptor();
    let mut expected = Vec::new();
    for cpu in [0, 1, 3, 5] {
        expected.push(RegistryEvent::ThreadCreated {
            descriptor: id,
            cpu,
        });
        expected.push(RegistryEvent::UnparkRequested {
            descriptor: id,
            cpu,
        });
    }
    expected.push(RegistryEvent::Registered { descriptor: id });
    assert_eq!(sim.events(), expected);
    assert_eq!(
        log.calls(Cb::Create),
        vec![("a", 0), ("a", 1), ("a", 3), ("a", 5)]
    );
    for cpu in [0, 1, 3, 5] {
        wait_until("setup", || log.count("a", cpu, Cb::Setup) == 1);
    }
}

#[test]
fn s02_offline_cpu_gets_a_parked_thread_at_prepare_and_runs_at_online() {
    let sim = Sim::new(4, &[0]);
    let (log, work) = (Log::new(), Work::new(4));
    let d = probe("a", &log, &work, Callbacks::ALL);
    let id = sim.registry.register(&d).unwrap().descriptor();
    for cpu in 1..4 {
        assert_eq!(sim.thread(id, cpu).status, ThreadStatus::Absent);
    }
    sim.registry.prepare(2).unwrap();
    let t = sim.thread(id, 2);
    assert_eq!(t.status, ThreadStatus::Created);
    assert!(t.parked);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        log.count("a", 2, Cb::Setup),
        0,
        "a parked thread must not run setup"
    );
    sim.registry.online(2).unwrap();
    sim.wait_snap("setup on CPU 2", |s| {
        s.thread(id, 2).unwrap().status == ThreadStatus::Active
    });
    assert_eq!(log.of("a", 2), vec![Cb::Create, Cb::Setup]);
    assert_eq!(sim.thread(id, 3).status, ThreadStatus::Absent);
}

#[test]
fn s03_one_thread_per_cpu_survives_offline_online_cycles() {
    let sim = Sim::new(3, &[0, 1]);
    let (log, work) = (Log::new(), Work::new(3));
    let d = probe("a", &log, &work, Callbacks::ALL);
    let h = sim.registry.register(&d).unwrap();
    let id = h.descriptor();
    sim.wait_snap("active", |s| {
        s.thread(id, 1).unwrap().status == ThreadStatus::Active
    });
    let serial = sim.thread(id, 1).serial;
    for _ in 0..5 {
        sim.registry.offline(1).unwrap();
        sim.registry.prepare(1).unwrap();
        sim.registry.online(1).unwrap();
        kick(&work, &h, 1);
    }
    let t = sim.thread(id, 1);
    assert_eq!(t.serial, serial, "the thread was re-created");
    assert_eq!((t.calls.create, t.calls.setup, t.calls.park), (1, 1, 5));
    sim.wait_snap("last unpark", |s| {
        s.thread(id, 1).unwrap().calls.unpark == 5
    });
    let created = sim
        .events()
        .iter()
        .filter(|e| matches!(e, RegistryEvent::ThreadCreated { cpu: 1, .. }))
        .count();
    assert_eq!(created, 1);
    // Every callback of CPU 1 ran on one and the same OS thread.
    let threads: std::collections::HashSet<_> = log
        .entries()
        .iter()
        .filter(|e| e.cpu == 1 && e.cb != Cb::Create)
        .map(|e| e.thread)
        .collect();
    assert_eq!(threads.len(), 1);
}

#[test]
fn s04_creation_failure_at_cpu_k_rolls_everything_back() {
    let inj = Arc::new(FaultInjector::new());
    let sim = Sim::with_spawner(6, &[0, 1, 2, 3, 4, 5], Some(inj.clone()));
    let (log, work) = (Log::new(), Work::new(6));
    let d = probe("a", &log, &work, Callbacks::ALL);
    inj.fail_on_cpu(3);
    let err = sim.registry.register(&d).unwrap_err();
    assert!(
        matches!(
            err,
            RegistryError::ThreadCreation {
                cpu: 3,
                source: CreateError::Spawn(SpawnError::Injected)
            }
        ),
        "{err:?}"
    );
    assert_eq!(inj.live_threads(), 0, "a thread leaked");
    assert_eq!(inj.spawned(), 3);
    assert!(!sim.registry.is_registered(&d).unwrap());
    assert!(sim.snap().descriptors.is_empty());
    for cpu in 0..3 {
        // Threads that got to run setup were cleaned up; none was parked.
        assert_eq!(
            log.count("a", cpu, Cb::Setup),
            log.count("a", cpu, Cb::Cleanup { online: true })
        );
        assert_eq!(log.count("a", cpu, Cb::Park), 0);
    }
    let stopped: Vec<u32> = sim
        .events()
        .iter()
        .filter_map(|e| match e {
            RegistryEvent::Stopped { cpu, .. } => Some(*cpu),
            _ => None,
        })
        .collect();
    assert_eq!(stopped, vec![0, 1, 2]);
    inj.clear();
    sim.registry.register(&d).unwrap();
    assert!(sim.registry.is_registered(&d).unwrap());
}

#[test]
fn s05_descriptor_joins_only_after_every_online_cpu_succeeded() {
    let inj = Arc::new(FaultInjector::new());
    let sim = Sim::with_spawner(8, &[0, 1, 2, 3], Some(inj.clone()));
    let (log, work) = (Log::new(), Work::new(8));
    let d = probe("a", &log, &work, Callbacks::ALL);
    inj.fail_on_cpu(2);
    sim.registry.register(&d).unwrap_err();
    assert!(!sim
        .events()
        .iter()
        .any(|e| matches!(e, RegistryEvent::Registered { .. })));
    // A later bring-up does not see the failed descriptor.
    sim.registry.prepare(6).unwrap();
    sim.registry.online(6).unwrap();
    assert!(log.entries().iter().all(|e| e.cpu != 6));
    assert!(matches!(
        sim.registry.unregister(&d),
        Err(RegistryError::NotRegistered)
    ));
    // On success, Registered comes after every thread was created.
    inj.clear();
    sim.clear_events();
    let id = sim.registry.register(&d).unwrap().descriptor();
    let ev = sim.events();
    let registered = ev
        .iter()
        .position(|e| *e == RegistryEvent::Registered { descriptor: id })
        .unwrap();
    assert_eq!(registered, ev.len() - 1);
    assert_eq!(
        ev.iter()
            .filter(|e| matches!(e, RegistryEvent::ThreadCreated { .. }))
            .count(),
        5
    );
}

#[test]
fn s06_register_and_transitions_exclude_each_other() {
    let sim = Arc::new(Sim::new(4, &[0, 1, 2, 3]));
    let log = Log::new();
    let (started_tx, started_rx) = mpsc::channel();
    let started_tx = std::sync::Mutex::new(started_tx);
    let l = Arc::clone(&log);
    let slow = ThreadDescriptor::builder("slow/%u", |_| false, |_| {})
        .create(move |cpu| {
            let _ = started_tx.lock().unwrap().send(());
            l.push("slow", cpu, Cb::Create);
            std::thread::sleep(Duration::from_millis(15));
        })
        .park({
            let l = Arc::clone(&log);
            move |cpu| l.push("slow", cpu, Cb::Park)
        })
        .build();
    // Register in the background; try a transition while it runs.
    let registering = {
        let (sim, slow) = (Arc::clone(&sim), Arc::clone(&slow));
        std::thread::spawn(move || {
            sim.registry.register(&slow).unwrap();
        })
    };
    started_rx.recv().unwrap();
    sim.registry.offline(3).unwrap();
    registering.join().unwrap();
    // The offline came entirely after the registration: every create,
    // then Registered, then the park request.
    let order: Vec<Cb> = log.entries().iter().map(|e| e.cb).take(4).collect();
    assert_eq!(order, vec![Cb::Create; 4]);
    let ev = sim.events();
    let registered = ev
        .iter()
        .position(|e| matches!(e, RegistryEvent::Registered { .. }))
        .unwrap();
    let park = ev
        .iter()
        .position(|e| matches!(e, RegistryEvent::ParkRequested { cpu: 3, .. }))
        .unwrap();
    let last_create = ev
        .iter()
        .rposition(|e| matches!(e, RegistryEvent::ThreadCreated { .. }))
        .unwrap();
    assert!(last_create < registered && registered < park, "{ev:?}");

    // The other way: a slow park holds off a registration.
    let gate_log = Log::new();
    let (park_tx, park_rx) = mpsc::channel();
    let park_tx = std::sync::Mutex::new(park_tx);
    let gl = Arc::clone(&gate_log);
    let slow_park = ThreadDescriptor::builder("sp/%u", |_| false, |_| {})
        .park(move |cpu| {
            let _ = park_tx.lock().unwrap().send(());
            std::thread::sleep(Duration::from_millis(30));
            gl.push("sp", cpu, Cb::Park);
        })
        .build();
    sim.registry.register(&slow_park).unwrap();
    let id = sim.snap().descriptors[1].id;
    sim.wait_snap("active", |s| {
        s.thread(id, 2).unwrap().status == ThreadStatus::Active
    });
    let offlining = {
        let sim = Arc::clone(&sim);
        std::thread::spawn(move || sim.registry.offline(2).unwrap())
    };
    park_rx.recv().unwrap();
    let gl = Arc::clone(&gate_log);
    let late = ThreadDescriptor::builder("late/%u", |_| false, |_| {})
        .create(move |cpu| gl.push("late", cpu, Cb::Create))
        .build();
    sim.registry.register(&late).unwrap();
    offlining.join().unwrap();
    let entries = gate_log.entries();
    assert_eq!(entries[0].label, "sp");
    assert_eq!(entries[0].cb, Cb::Park);
    assert!(entries[1..].iter().all(|e| e.label == "late"));
    assert_eq!(sim.registry.cpu_state(2).unwrap(), CpuState::Offline);
}
