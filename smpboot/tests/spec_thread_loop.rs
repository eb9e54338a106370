//! Statements 12 to 18 of smpboot-spec.md: the thread loop.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use smpboot::{
    current_affinity, current_cpu, PinnedPlacement, Placement, PlacementError, Registry,
    RegistryEvent, SimPlacement, ThreadDescriptor, ThreadStatus,
};

#[test]
fn s12_loop_checks_stop_then_park_then_transition_then_work() {
    let sim = Sim::new(4, &[0, 1]);
    let (log, work) = (Log::new(), Work::new(4));
    let d = probe("a", &log, &work, Callbacks::ALL);
    let h = sim.registry.register(&d).unwrap();
    // Setup (the transition) comes before any thread_should_run: the probe
    // counts a violation otherwise.
    kick(&work, &h, 0);
    kick(&work, &h, 1);
    // Park comes before the setup transition: a prepared (parked) thread
    // does not run setup.
    sim.registry.prepare(2).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(log.of("a", 2), vec![Cb::Create]);
    // Stop comes before the unpark transition: a thread parked through
    // its park callback is stopped without unpark.
    sim.registry.offline(1).unwrap();
    sim.registry.unregister(&d).unwrap();
    assert_eq!(
        log.of("a", 1),
        vec![
            Cb::Create,
            Cb::Setup,
            Cb::ThreadFn,
            Cb::Park,
            Cb::Cleanup { online: false }
        ]
    );
    assert_eq!(log.of("a", 2), vec![Cb::Create]);
    assert_eq!(
        log.of("a", 0),
        vec![
            Cb::Create,
            Cb::Setup,
            Cb::ThreadFn,
            Cb::Cleanup { online: true }
        ]
    );
    assert_eq!(work.violations(), 0);
}

/// A descriptor whose setup and unpark on `cpu` block on gates, and whose
/// thread_fn would always run (up to a limit).
struct Gated {
    desc: Arc<ThreadDescriptor>,
    setup_gate: Arc<Gate>,
    unpark_gate: Arc<Gate>,
    runs: Arc<AtomicU64>,
}

fn gated(cpu: u32) -> Gated {
    let (setup_gate, unpark_gate) = (Gate::new(), Gate::new());
    let runs = Arc::new(AtomicU64::new(0));
    let (sg, ug, r1, r2) = (
        Arc::clone(&setup_gate),
        Arc::clone(&unpark_gate),
        Arc::clone(&runs),
        Arc::clone(&runs),
    );
    let desc = ThreadDescriptor::builder(
        "gated/%u",
        move |c| c != cpu || r1.load(Ordering::SeqCst) < 50,
        move |ctx| {
            if ctx.cpu() == cpu {
                r2.fetch_add(1, Ordering::SeqCst);
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        },
    )
    .setup(move |c| {
        if c == cpu {
            sg.wait();
        }
    })
    .park(|_| {})
    .unpark(move |c| {
        if c == cpu {
            ug.wait();
        }
    })
    .build();
    Gated {
        desc,
        setup_gate,
        unpark_gate,
        runs,
    }
}

fn count_park_requests(sim: &Sim, cpu: u32) -> usize {
    sim.events()
        .iter()
        .filter(|e| matches!(e, RegistryEvent::ParkRequested { cpu: c, .. } if *c == cpu))
        .count()
}

#[test]
fn s13_setup_once_before_work_and_park_rechecked_after_setup_and_unpark() {
    let sim = Arc::new(Sim::new(4, &[0]));
    let g = gated(2);
    let id = sim.registry.register(&g.desc).unwrap().descriptor();
    sim.registry.prepare(2).unwrap();
    sim.registry.online(2).unwrap();
    wait_until("setup entered", || g.setup_gate.entered() == 1);
    // A park request arrives while setup runs.
    let offlining = {
        let sim = Arc::clone(&sim);
        std::thread::spawn(move || sim.registry.offline(2).unwrap())
    };
    wait_until("park requested", || count_park_requests(&sim, 2) == 1);
    g.setup_gate.open();
    offlining.join().unwrap();
    // After setup the loop saw the park request: no work ran.
    assert_eq!(g.runs.load(Ordering::SeqCst), 0);
    let t = sim.thread(id, 2);
    assert_eq!((t.calls.setup, t.calls.park, t.calls.thread_fn), (1, 1, 0));
    assert_eq!(t.status, ThreadStatus::Parked);

    // The same after unpark.
    sim.registry.prepare(2).unwrap();
    sim.registry.online(2).unwrap();
    wait_until("unpark entered", || g.unpark_gate.entered() == 1);
    let offlining = {
        let sim = Arc::clone(&sim);
        std::thread::spawn(move || sim.registry.offline(2).unwrap())
    };
    wait_until("park requested", || count_park_requests(&sim, 2) == 2);
    g.unpark_gate.open();
    offlining.join().unwrap();
    assert_eq!(g.runs.load(Ordering::SeqCst), 0);
    let t = sim.thread(id, 2);
    assert_eq!((t.calls.setup, t.calls.unpark, t.calls.park), (1, 1, 2));

    // Running again: work runs, setup does not run a second time.
    sim.topo.force_online(2).unwrap();
    sim.registry.prepare(2).unwrap();
    sim.registry.online(2).unwrap();
    wait_until("work", || g.runs.load(Ordering::SeqCst) == 50);
    let t = sim.thread(id, 2);
    assert_eq!((t.calls.setup, t.last_cpu), (1, Some(2)));
    sim.registry.unregister(&g.desc).unwrap();
}

/// Sim placement whose second bind of `cpu` (the one after the first
/// unpark) blocks until the gate opens.
#[derive(Debug)]
struct GatedBind {
    inner: SimPlacement,
    cpu: u32,
    binds: AtomicU64,
    gate: Arc<Gate>,
}

impl Placement for GatedBind {
    fn bind(&self, cpu: u32) -> Result<(), PlacementError> {
        if cpu == self.cpu && self.binds.fetch_add(1, Ordering::SeqCst) == 1 {
            self.gate.wait();
        }
        self.inner.bind(cpu)
    }

    fn current_cpu(&self, cpu: u32) -> u32 {
        self.inner.current_cpu(cpu)
    }
}

#[test]
fn s14_park_callback_only_for_active_threads_and_only_once() {
    let topo = smpboot::SimTopology::new(4, [0]);
    let gate = Gate::new();
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = Arc::clone(&events);
    let registry = Arc::new(
        Registry::builder()
            .topology(&topo)
            .unwrap()
            .placement(Arc::new(GatedBind {
                inner: topo.placement(),
                cpu: 2,
                binds: AtomicU64::new(0),
                gate: Arc::clone(&gate),
            }))
            .observer(move |e| ev.lock().unwrap().push(e.clone()))
            .build()
            .unwrap(),
    );
    let (log, work) = (Log::new(), Work::new(4));
    let d = probe("a", &log, &work, Callbacks::ALL);
    let id = registry.register(&d).unwrap().descriptor();
    registry.prepare(2).unwrap();
    // Unparked, the thread is held before its loop sees anything...
    registry.online(2).unwrap();
    wait_until("bind held", || gate.entered() == 1);
    // ...and meanwhile asked to park again: it never ran setup, so no park.
    let offlining = {
        let r = Arc::clone(&registry);
        std::thread::spawn(move || r.offline(2).unwrap())
    };
    wait_until("park requested", || {
        events
            .lock()
            .unwrap()
            .contains(&RegistryEvent::ParkRequested {
                descriptor: id,
                cpu: 2,
            })
    });
    gate.open();
    offlining.join().unwrap();
    assert_eq!(log.of("a", 2), vec![Cb::Create]);
    let t = registry.snapshot().unwrap().thread(id, 2).unwrap().clone();
    assert_eq!(
        (t.status, t.parked, t.calls.park),
        (ThreadStatus::Created, true, 0)
    );

    // Active now: one park; a second request (the forced-offline echo of
    // an offline CPU) gets no second call.
    registry.prepare(2).unwrap();
    registry.online(2).unwrap();
    wait_until("setup", || log.count("a", 2, Cb::Setup) == 1);
    registry.offline(2).unwrap();
    let report = registry.forced_offline(2).unwrap();
    assert!(!report.was_forced() && report.parked.is_empty());
    assert_eq!(log.count("a", 2, Cb::Park), 1);

    // Without a park callback, parking calls nothing and the status stays.
    let (log2, work2) = (Log::new(), Work::new(4));
    let no_park = probe(
        "np",
        &log2,
        &work2,
        Callbacks {
            park: false,
            ..Callbacks::ALL
        },
    );
    let np = registry.register(&no_park).unwrap().descriptor();
    wait_until("setup", || log2.count("np", 0, Cb::Setup) == 1);
    registry.offline(0).unwrap();
    let t = registry.snapshot().unwrap().thread(np, 0).unwrap().clone();
    assert_eq!(
        (t.status, t.parked, t.calls.park),
        (ThreadStatus::Active, true, 0)
    );
}

#[test]
fn s15_unpark_without_park_is_never_called() {
    let sim = Sim::new(2, &[0, 1]);
    // One work counter per probe: a kick must be served by that probe.
    let (log, work, work_pu) = (Log::new(), Work::new(2), Work::new(2));
    let only_unpark = probe(
        "u",
        &log,
        &work,
        Callbacks {
            park: false,
            ..Callbacks::ALL
        },
    );
    let both = probe("pu", &log, &work_pu, Callbacks::ALL);
    let u = sim.registry.register(&only_unpark).unwrap();
    let pu = sim.registry.register(&both).unwrap();
    // Both threads ran setup before the first park.
    kick(&work, &u, 1);
    kick(&work_pu, &pu, 1);
    for _ in 0..3 {
        sim.registry.offline(1).unwrap();
        sim.registry.prepare(1).unwrap();
        sim.registry.online(1).unwrap();
        // Let both threads pass their unpark transition before the next
        // park (a park that comes first keeps the thread parked silently).
        kick(&work, &u, 1);
        kick(&work_pu, &pu, 1);
    }
    sim.registry.offline(1).unwrap();
    sim.registry.failed_offline(1).unwrap();
    kick(&work, &u, 1);
    kick(&work_pu, &pu, 1);
    sim.wait_snap("unparks", |s| {
        s.thread(pu.descriptor(), 1).unwrap().calls.unpark == 4
    });
    assert_eq!(log.count("u", 1, Cb::Unpark), 0);
    assert_eq!(sim.thread(u.descriptor(), 1).calls.unpark, 0);
    assert_eq!(log.count("pu", 1, Cb::Unpark), 4);
}

#[test]
fn s16_no_lost_wakeup_under_stress() {
    const ROUNDS: u64 = 20_000;
    let sim = Sim::new(2, &[0, 1]);
    let work = Work::new(2);
    // No logging in thread_fn for this one: count only.
    let (w1, w2) = (Arc::clone(&work), Arc::clone(&work));
    let d = ThreadDescriptor::builder(
        "stress/%u",
        move |cpu| w1.pending(cpu) > 0,
        move |ctx| {
            let i = ctx.cpu() as usize;
            w2.pending[i].fetch_sub(1, Ordering::SeqCst);
            w2.done[i].fetch_add(1, Ordering::SeqCst);
        },
    )
    .build();
    let h = sim.registry.register(&d).unwrap();
    let start = Instant::now();
    let producers: Vec<_> = [0u32, 1]
        .into_iter()
        .map(|cpu| {
            let (h, work) = (h.clone(), Arc::clone(&work));
            std::thread::spawn(move || {
                for round in 0..ROUNDS {
                    work.add(cpu, 1);
                    h.wake(cpu);
                    // One at a time: every round needs a fresh wake-up.
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while work.pending(cpu) != 0 {
                        assert!(
                            Instant::now() < deadline,
                            "lost wake-up on CPU {cpu} at round {round}"
                        );
                        std::thread::yield_now();
                    }
                }
            })
        })
        .collect();
    for p in producers {
        p.join().unwrap();
    }
    // Bursts from several wakers at once.
    let wakers: Vec<_> = (0..4)
        .map(|i| {
            let (h, work) = (h.clone(), Arc::clone(&work));
            std::thread::spawn(move || {
                for _ in 0..2_000 {
                    let cpu = i % 2;
                    work.add(cpu, 1);
                    h.wake(cpu);
                }
            })
        })
        .collect();
    for w in wakers {
        w.join().unwrap();
    }
    wait_until("bursts drained", || {
        work.pending(0) == 0 && work.pending(1) == 0
    });
    assert_eq!(work.done(0) + work.done(1), 2 * ROUNDS + 8_000);
    eprintln!(
        "s16: {} wake round trips in {:?}",
        2 * ROUNDS,
        start.elapsed()
    );
}

#[test]
fn s17_thread_fn_not_concurrent_not_before_setup_not_after_park_seen() {
    let sim = Arc::new(Sim::new(2, &[0, 1]));
    let (log, work) = (Log::new(), Work::new(2));
    let d = probe("a", &log, &work, Callbacks::ALL);
    let h = sim.registry.register(&d).unwrap();
    // Several wakers at once: thread_fn never overlaps itself (the probe
    // counts overlaps and work before setup as violations).
    let stop = Arc::new(AtomicBool::new(false));
    let wakers: Vec<_> = (0..3)
        .map(|_| {
            let (h, work, stop) = (h.clone(), Arc::clone(&work), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    work.add(1, 1);
                    h.wake(1);
                    std::thread::sleep(Duration::from_micros(50));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(30));
    sim.registry.offline(1).unwrap();
    let done = work.done(1);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(work.done(1), done, "thread_fn ran after the park was seen");
    stop.store(true, Ordering::SeqCst);
    for w in wakers {
        w.join().unwrap();
    }
    assert!(work.pending(1) > 0);
    assert_eq!(work.violations(), 0);
    sim.registry.prepare(1).unwrap();
    sim.registry.online(1).unwrap();
    wait_until("drained", || work.pending(1) == 0);

    // A long thread_fn polls should_yield and returns early on park.
    let saw = Arc::new(Mutex::new(None));
    let s2 = Arc::clone(&saw);
    let running = Arc::new(AtomicBool::new(false));
    let r2 = Arc::clone(&running);
    let long = ThreadDescriptor::builder(
        "long/%u",
        |_| true,
        move |ctx| {
            if ctx.cpu() == 1 {
                r2.store(true, Ordering::SeqCst);
            }
            while !ctx.should_yield() {
                std::thread::sleep(Duration::from_millis(1));
            }
            *s2.lock().unwrap() = Some((ctx.cpu(), ctx.should_park(), ctx.should_stop()));
        },
    )
    .build();
    sim.registry.register(&long).unwrap();
    wait_until("long thread_fn", || running.load(Ordering::SeqCst));
    sim.registry.offline(1).unwrap();
    assert_eq!(*saw.lock().unwrap(), Some((1, true, false)));
    sim.registry.unregister(&long).unwrap();
}

#[test]
fn s18_callbacks_run_on_the_threads_cpu() {
    let allowed = current_affinity().unwrap();
    if !(allowed.contains(&0) && allowed.contains(&1)) {
        eprintln!(
            "SKIPPED s18: this process may not run on both CPU 0 and CPU 1 (allowed: {allowed:?})"
        );
        return;
    }
    // (callback, serving CPU, sched_getcpu, affinity, OS thread name)
    type Seen = Vec<(&'static str, u32, Option<u32>, Vec<u32>, String)>;
    let seen: Arc<Mutex<Seen>> = Arc::new(Mutex::new(Vec::new()));
    let record = |what: &'static str| {
        let seen = Arc::clone(&seen);
        move |cpu: u32| {
            let comm = std::fs::read_to_string("/proc/thread-self/comm").unwrap_or_default();
            seen.lock().unwrap().push((
                what,
                cpu,
                current_cpu(),
                current_affinity().unwrap(),
                comm.trim().to_owned(),
            ));
        }
    };
    let work = Work::new(2);
    let (w1, w2) = (Arc::clone(&work), Arc::clone(&work));
    let on_fn = record("thread_fn");
    let d = ThreadDescriptor::builder(
        "pin/%u",
        move |cpu| w1.pending(cpu) > 0,
        move |ctx| {
            w2.pending[ctx.cpu() as usize].fetch_sub(1, Ordering::SeqCst);
            w2.done[ctx.cpu() as usize].fetch_add(1, Ordering::SeqCst);
            on_fn(ctx.cpu());
        },
    )
    .setup(record("setup"))
    .park(record("park"))
    .unpark(record("unpark"))
    .build();
    let registry = Registry::builder()
        .cpus([0, 1], [0, 1])
        .placement(Arc::new(PinnedPlacement))
        .build()
        .unwrap();
    let h = registry.register(&d).unwrap();
    for cpu in [0, 1] {
        kick(&work, &h, cpu);
    }
    for cpu in [0, 1] {
        registry.offline(cpu).unwrap();
        registry.prepare(cpu).unwrap();
        registry.online(cpu).unwrap();
        kick(&work, &h, cpu);
    }
    let s = registry.snapshot().unwrap();
    for cpu in [0, 1] {
        assert_eq!(s.thread(h.descriptor(), cpu).unwrap().last_cpu, Some(cpu));
    }
    registry.unregister(&d).unwrap();
    let seen = seen.lock().unwrap();
    for what in ["setup", "park", "unpark", "thread_fn"] {
        for cpu in [0, 1] {
            assert!(
                seen.iter().any(|s| s.0 == what && s.1 == cpu),
                "no {what} on CPU {cpu}"
            );
        }
    }
    for (what, cpu, ran_on, affinity, comm) in seen.iter() {
        assert_eq!(
            *ran_on,
            Some(*cpu),
            "{what} for CPU {cpu} ran on {ran_on:?}"
        );
        assert_eq!(
            affinity,
            &vec![*cpu],
            "{what} for CPU {cpu} had affinity {affinity:?}"
        );
        assert_eq!(comm, &format!("pin/{cpu}"));
    }
}
