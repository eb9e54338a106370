//! Statements 19 to 25 of smpboot-spec.md: stopping, unregistering, and
//! what a userspace registry owes beyond the kernel.

mod common;

use std::error::Error;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use smpboot::{
    CpuState, CreateError, FaultInjector, Placement, PlacementError, Registry, RegistryError,
    RegistryEvent, SimPlacement, SpawnError, ThreadDescriptor, ThreadStatus,
};

#[test]
fn s19_stop_calls_cleanup_itself_if_setup_ran_with_the_online_flag() {
    let sim = Sim::new(3, &[0, 1]);
    // One work counter per probe: a kick must be served by that probe.
    let (log, work, work_ns) = (Log::new(), Work::new(3), Work::new(3));
    let d = probe("a", &log, &work, Callbacks::ALL);
    let no_setup = probe(
        "ns",
        &log,
        &work_ns,
        Callbacks {
            setup: false,
            ..Callbacks::ALL
        },
    );
    let h = sim.registry.register(&d).unwrap();
    let hn = sim.registry.register(&no_setup).unwrap();
    kick(&work, &h, 0);
    kick(&work, &h, 1);
    kick(&work_ns, &hn, 0);
    kick(&work_ns, &hn, 1);
    sim.registry.offline(1).unwrap();
    sim.registry.unregister(&d).unwrap();
    assert_eq!(log.count("a", 0, Cb::Cleanup { online: true }), 1);
    assert_eq!(log.count("a", 1, Cb::Cleanup { online: false }), 1);
    assert!(log.of("a", 2).is_empty());
    // cleanup ran on the thread that ran setup, not in the caller.
    let e = log.entries();
    for cpu in [0, 1] {
        let setup = e
            .iter()
            .find(|x| x.label == "a" && x.cpu == cpu && x.cb == Cb::Setup)
            .unwrap();
        let cleanup = e
            .iter()
            .find(|x| x.label == "a" && x.cpu == cpu && matches!(x.cb, Cb::Cleanup { .. }))
            .unwrap();
        assert_eq!(setup.thread, cleanup.thread);
        assert_ne!(cleanup.thread, std::thread::current().id());
    }
    // Without a setup callback the thread still went through the setup
    // transition, so cleanup runs (today's kernel: status != NONE).
    sim.registry.unregister(&no_setup).unwrap();
    assert_eq!(log.count("ns", 0, Cb::Cleanup { online: true }), 1);
    assert_eq!(log.count("ns", 1, Cb::Cleanup { online: false }), 1);
}

#[test]
fn s20_thread_stopped_before_it_ran_gets_neither_setup_nor_cleanup() {
    let sim = Sim::new(4, &[0]);
    let (log, work) = (Log::new(), Work::new(4));
    let d = probe("a", &log, &work, Callbacks::ALL);
    let id = sim.registry.register(&d).unwrap().descriptor();
    sim.registry.prepare(2).unwrap();
    sim.registry.prepare(3).unwrap();
    sim.registry.unregister(&d).unwrap();
    for cpu in [2, 3] {
        assert_eq!(log.of("a", cpu), vec![Cb::Create]);
        assert!(sim.events().contains(&RegistryEvent::Stopped {
            descriptor: id,
            cpu
        }));
    }
}

/// Sim placement that lets a callback ask where the simulation runs it.
fn where_am_i(p: &SimPlacement, cpu: u32) -> u32 {
    p.current_cpu(cpu)
}

#[test]
fn s21_unregister_removes_first_then_stops_ascending_without_park() {
    let sim = Sim::new(5, &[0, 1, 2, 3]);
    let placement = sim.topo.placement();
    let ran_on = Arc::new(Mutex::new(Vec::new()));
    let log = Log::new();
    let r = Arc::clone(&ran_on);
    let l = Arc::clone(&log);
    let d = ThreadDescriptor::builder("u/%u", |_| false, |_| {})
        .setup(|_| {})
        .park({
            let l = Arc::clone(&log);
            move |cpu| l.push("u", cpu, Cb::Park)
        })
        .cleanup(move |cpu, online| {
            r.lock()
                .unwrap()
                .push((cpu, online, where_am_i(&placement, cpu)));
            l.push("u", cpu, Cb::Cleanup { online });
        })
        .build();
    let id = sim.registry.register(&d).unwrap().descriptor();
    sim.wait_snap("setup everywhere", |s| {
        [0, 1, 2, 3]
            .iter()
            .all(|&c| s.thread(id, c).unwrap().status == ThreadStatus::Active)
    });
    // CPU 2 really goes down (topology and registry).
    let driver = smpboot::CpuHotplug::new(&sim.registry, &sim.topo);
    driver.take_down(2).unwrap();
    let parks_before = log.count("u", 2, Cb::Park);
    sim.clear_events();
    sim.registry.unregister(&d).unwrap();
    let ev = sim.events();
    assert_eq!(ev[0], RegistryEvent::Unregistered { descriptor: id });
    let stops: Vec<u32> = ev
        .iter()
        .filter_map(|e| match e {
            RegistryEvent::StopRequested { cpu, .. } => Some(*cpu),
            _ => None,
        })
        .collect();
    assert_eq!(stops, vec![0, 1, 2, 3]);
    assert!(!ev
        .iter()
        .any(|e| matches!(e, RegistryEvent::ParkRequested { .. })));
    assert_eq!(log.count("u", 2, Cb::Park), parks_before);
    let ran_on = ran_on.lock().unwrap();
    assert_eq!(
        ran_on.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    let (_, online, on) = ran_on[2];
    assert!(!online);
    assert_ne!(on, 2, "cleanup of an offline CPU runs on some other CPU");
    assert!(ran_on.iter().filter(|r| r.0 != 2).all(|r| r.1));
}

#[test]
fn s22_no_callback_after_unregister_and_the_descriptor_registers_again() {
    let sim = Sim::new(3, &[0, 1, 2]);
    let (log, work) = (Log::new(), Work::new(3));
    let d = probe("a", &log, &work, Callbacks::ALL);
    let h = sim.registry.register(&d).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let wakers: Vec<_> = (0..2)
        .map(|_| {
            let (h, work, stop) = (h.clone(), Arc::clone(&work), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    for cpu in 0..3 {
                        work.add(cpu, 1);
                        h.wake(cpu);
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(20));
    sim.registry.unregister(&d).unwrap();
    work.forbidden.store(true, Ordering::SeqCst);
    let n = log.entries().len();
    std::thread::sleep(Duration::from_millis(30));
    stop.store(true, Ordering::SeqCst);
    for w in wakers {
        w.join().unwrap();
    }
    assert_eq!(log.entries().len(), n, "a callback ran after unregister");
    assert_eq!(work.violations(), 0);
    // The same descriptor registers again, with fresh threads.
    work.forbidden.store(false, Ordering::SeqCst);
    let h2 = sim.registry.register(&d).unwrap();
    assert_ne!(h2.descriptor(), h.descriptor());
    for cpu in 0..3 {
        wait_until("second setup", || log.count("a", cpu, Cb::Setup) == 2);
    }
    assert!(matches!(
        sim.registry.register(&d),
        Err(RegistryError::AlreadyRegistered)
    ));
}

#[test]
fn s23_snapshot_shows_status_last_cpu_and_counts() {
    let sim = Sim::new(3, &[0, 1]);
    let (log, work) = (Log::new(), Work::new(3));
    let d = probe("snap", &log, &work, Callbacks::ALL);
    let h = sim.registry.register(&d).unwrap();
    let id = h.descriptor();
    for _ in 0..3 {
        kick(&work, &h, 0);
    }
    kick(&work, &h, 1);
    sim.registry.offline(1).unwrap();
    let s = sim.snap();
    let states: Vec<_> = s.cpus.iter().map(|c| (c.cpu, c.state)).collect();
    assert_eq!(
        states,
        vec![
            (0, CpuState::Online),
            (1, CpuState::Offline),
            (2, CpuState::Offline)
        ]
    );
    let desc = s.descriptor(id).unwrap();
    assert_eq!(desc.name_pattern, "snap/%u");
    let t0 = &desc.threads[0];
    assert_eq!(
        (t0.status, t0.parked, t0.last_cpu),
        (ThreadStatus::Active, false, Some(0))
    );
    assert_eq!(t0.name, "snap/0");
    assert_eq!(
        (
            t0.calls.create,
            t0.calls.setup,
            t0.calls.thread_fn,
            t0.calls.park,
            t0.calls.unpark
        ),
        (1, 1, 3, 0, 0)
    );
    let t1 = &desc.threads[1];
    assert_eq!(
        (t1.status, t1.parked, t1.last_cpu),
        (ThreadStatus::Parked, true, Some(1))
    );
    assert_eq!(
        (t1.calls.setup, t1.calls.thread_fn, t1.calls.park),
        (1, 1, 1)
    );
    assert_eq!(desc.threads[2].status, ThreadStatus::Absent);
    assert_eq!(desc.threads[2].serial, None);
    assert!(t0.failure.is_none());
    assert_eq!(s.forced_offlines, 0);
    // Plain data: clone and compare.
    assert_eq!(s.clone(), s);
}

#[derive(Debug)]
struct RefuseCpu(SimPlacement, u32);

impl Placement for RefuseCpu {
    fn bind(&self, cpu: u32) -> Result<(), PlacementError> {
        if cpu == self.1 {
            return Err(PlacementError::Unknown(cpu));
        }
        self.0.bind(cpu)
    }
    fn current_cpu(&self, cpu: u32) -> u32 {
        self.0.current_cpu(cpu)
    }
}

#[test]
fn s24_thread_creation_failure_is_typed_and_leaks_nothing() {
    let inj = Arc::new(FaultInjector::new());
    let sim = Sim::with_spawner(8, &[0, 1, 2, 3], Some(inj.clone()));
    let (log, work) = (Log::new(), Work::new(8));
    let d = probe("a", &log, &work, Callbacks::ALL);
    inj.fail_nth(3);
    let err = sim.registry.register(&d).unwrap_err();
    assert_eq!(err.to_string(), "cannot create the thread for CPU 2");
    let source = err.source().unwrap();
    assert_eq!(source.to_string(), "cannot spawn the thread");
    assert_eq!(
        source.source().unwrap().to_string(),
        "injected thread-creation failure"
    );
    assert_eq!(inj.live_threads(), 0);

    let h = sim.registry.register(&d).unwrap();
    assert_eq!(inj.live_threads(), 4);
    inj.fail_on_cpu(6);
    assert!(matches!(
        sim.registry.prepare(6),
        Err(RegistryError::ThreadCreation {
            cpu: 6,
            source: CreateError::Spawn(SpawnError::Injected)
        })
    ));
    assert_eq!(inj.live_threads(), 4);
    assert_eq!(sim.registry.cpu_state(6).unwrap(), CpuState::Offline);
    inj.clear();
    kick(&work, &h, 0);
    sim.registry.unregister(&d).unwrap();
    assert_eq!(inj.live_threads(), 0);

    // A thread that cannot be placed is a typed error too.
    let topo = smpboot::SimTopology::new(4, [0, 1, 2]);
    let inj = Arc::new(FaultInjector::new());
    let r = Registry::builder()
        .topology(&topo)
        .unwrap()
        .placement(Arc::new(RefuseCpu(topo.placement(), 1)))
        .spawner(inj.clone())
        .build()
        .unwrap();
    let err = r.register(&d).unwrap_err();
    assert!(matches!(
        err,
        RegistryError::ThreadCreation {
            cpu: 1,
            source: CreateError::Bind(PlacementError::Unknown(1))
        }
    ));
    assert_eq!(inj.live_threads(), 0);
}

#[test]
fn s25_panicking_callback_is_contained_and_reported() {
    let sim = Sim::new(3, &[0, 1, 2]);
    let (log, work) = (Log::new(), Work::new(3));
    let healthy = probe("ok", &log, &work, Callbacks::ALL);
    let calls = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&calls);
    let faulty_work = Work::new(3);
    let w = Arc::clone(&faulty_work);
    let faulty = ThreadDescriptor::builder(
        "bad/%u",
        move |cpu| w.pending(cpu) > 0,
        move |ctx| {
            c.fetch_add(1, Ordering::SeqCst);
            if ctx.cpu() == 1 {
                panic!("boom on CPU 1");
            }
        },
    )
    .setup(|cpu| {
        if cpu == 2 {
            panic!("setup refused CPU 2");
        }
    })
    .cleanup(|_, _| {})
    .build();
    let hh = sim.registry.register(&healthy).unwrap();
    let hf = sim.registry.register(&faulty).unwrap();
    let id = hf.descriptor();
    faulty_work.add(1, 1);
    hf.wake(1);
    sim.wait_snap("failed thread", |s| {
        s.thread(id, 1).unwrap().status == ThreadStatus::Failed
    });
    sim.wait_snap("failed setup", |s| {
        s.thread(id, 2).unwrap().status == ThreadStatus::Failed
    });
    let s = sim.snap();
    assert_eq!(
        s.thread(id, 1).unwrap().failure.as_deref(),
        Some("thread_fn panicked: boom on CPU 1")
    );
    assert_eq!(
        s.thread(id, 2).unwrap().failure.as_deref(),
        Some("setup panicked: setup refused CPU 2")
    );
    assert_eq!(s.thread(id, 0).unwrap().status, ThreadStatus::Active);
    // The failed thread runs nothing more; the others keep running.
    let before = calls.load(Ordering::SeqCst);
    hf.wake(1);
    kick(&work, &hh, 1);
    kick(&work, &hh, 2);
    assert_eq!(calls.load(Ordering::SeqCst), before);
    // The registry stays usable: transitions and unregister complete.
    for cpu in [1, 2] {
        sim.registry.offline(cpu).unwrap();
        sim.registry.prepare(cpu).unwrap();
        sim.registry.online(cpu).unwrap();
    }
    kick(&work, &hh, 1);
    sim.registry.unregister(&faulty).unwrap();
    sim.registry.unregister(&healthy).unwrap();
    assert!(sim.snap().descriptors.is_empty());
}
