//! Benchmarks of the registry against bare primitives (prints figures,
//! asserts nothing about time).
//!
//! 1. Park + unpark round trip of one thread (`offline`, `prepare`,
//!    `online` under one hotplug lock), against a bare condvar hand-off
//!    between two threads (one ping-pong). The controller runs on CPU 0 and
//!    the per-CPU thread on CPU 1 when both are available, in both cases.
//! 2. Register + unregister of one descriptor across 16 simulated CPUs,
//!    against spawning and joining 16 bare threads.
//!
//! `cargo bench -p smpboot`; `SMPBOOT_BENCH_RUNS` and `SMPBOOT_BENCH_ITERS`
//! change the number of runs (median taken) and iterations per run.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use smpboot::{
    current_affinity, pin_current_thread, set_current_affinity, PinnedPlacement, Placement,
    Registry, SimTopology, ThreadDescriptor,
};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Median of `runs` runs of `f`, each timing `iters` operations; per op.
fn median_per_op(runs: usize, iters: usize, mut f: impl FnMut(usize) -> Duration) -> Duration {
    f(iters / 10 + 1); // warm-up
    let mut v: Vec<Duration> = (0..runs).map(|_| f(iters).div_f64(iters as f64)).collect();
    v.sort();
    v[v.len() / 2]
}

/// The reference: one ping-pong between two threads over a mutex and two
/// condition variables.
fn condvar_round_trip(iters: usize, cpus: Option<(u32, u32)>) -> Duration {
    #[derive(PartialEq)]
    enum Turn {
        Main,
        Worker,
        Quit,
    }
    let shared = Arc::new((Mutex::new(Turn::Main), Condvar::new(), Condvar::new()));
    let s = Arc::clone(&shared);
    let worker = std::thread::spawn(move || {
        if let Some((_, w)) = cpus {
            pin_current_thread(w).unwrap();
        }
        let (m, to_worker, to_main) = &*s;
        let mut turn = m.lock().unwrap();
        loop {
            while *turn == Turn::Main {
                turn = to_worker.wait(turn).unwrap();
            }
            if *turn == Turn::Quit {
                return;
            }
            *turn = Turn::Main;
            to_main.notify_one();
        }
    });
    let (m, to_worker, to_main) = &*shared;
    let _pin = ControllerPin::new(cpus);
    let start = Instant::now();
    for _ in 0..iters {
        let mut turn = m.lock().unwrap();
        *turn = Turn::Worker;
        to_worker.notify_one();
        while *turn == Turn::Worker {
            turn = to_main.wait(turn).unwrap();
        }
    }
    let elapsed = start.elapsed();
    *m.lock().unwrap() = Turn::Quit;
    to_worker.notify_one();
    worker.join().unwrap();
    elapsed
}

fn registry_round_trip(iters: usize, cpus: Option<(u32, u32)>) -> Duration {
    let (possible, cpu): (Vec<u32>, u32) = match cpus {
        Some((_, w)) => (vec![w], w),
        None => (vec![1], 1),
    };
    let placement: Arc<dyn Placement> = match cpus {
        Some(_) => Arc::new(PinnedPlacement),
        None => {
            let topo = SimTopology::new(2, [0, 1]);
            Arc::new(topo.placement())
        }
    };
    let registry = Registry::builder()
        .cpus(possible.clone(), possible)
        .placement(placement)
        .build()
        .unwrap();
    let d = ThreadDescriptor::builder("bench/%u", |_| false, |_| {})
        .park(|_| {})
        .unpark(|_| {})
        .build();
    registry.register(&d).unwrap();
    let _pin = ControllerPin::new(cpus);
    let start = Instant::now();
    for _ in 0..iters {
        let mut hp = registry.hotplug().unwrap();
        hp.offline(cpu).unwrap();
        hp.prepare(cpu).unwrap();
        hp.online(cpu).unwrap();
    }
    let elapsed = start.elapsed();
    registry.unregister(&d).unwrap();
    elapsed
}

fn register_unregister(iters: usize) -> Duration {
    let topo = SimTopology::new(16, 0..16);
    let registry = Registry::builder()
        .topology(&topo)
        .unwrap()
        .placement(Arc::new(topo.placement()))
        .build()
        .unwrap();
    let d = ThreadDescriptor::builder("reg/%u", |_| false, |_| {})
        .setup(|_| {})
        .cleanup(|_, _| {})
        .build();
    let start = Instant::now();
    for _ in 0..iters {
        registry.register(&d).unwrap();
        registry.unregister(&d).unwrap();
    }
    start.elapsed()
}

fn spawn_join_16(iters: usize) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        let handles: Vec<_> = (0..16)
            .map(|i| {
                std::thread::Builder::new()
                    .name(format!("bare/{i}"))
                    .spawn(|| {})
                    .unwrap()
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }
    start.elapsed()
}

/// Pins the calling (controller) thread for a pinned run and restores its
/// affinity afterwards.
struct ControllerPin(Option<Vec<u32>>);

impl ControllerPin {
    fn new(cpus: Option<(u32, u32)>) -> Self {
        ControllerPin(cpus.map(|(c, _)| {
            let before = current_affinity().unwrap();
            pin_current_thread(c).unwrap();
            before
        }))
    }
}

impl Drop for ControllerPin {
    fn drop(&mut self) {
        if let Some(before) = &self.0 {
            set_current_affinity(before).unwrap();
        }
    }
}

fn fmt(d: Duration) -> String {
    format!("{:>9.2} us", d.as_secs_f64() * 1e6)
}

fn main() {
    let runs = env_or("SMPBOOT_BENCH_RUNS", 15);
    let iters = env_or("SMPBOOT_BENCH_ITERS", 2000);
    let allowed = current_affinity().unwrap_or_default();
    let cpus = (allowed.contains(&0) && allowed.contains(&1)).then_some((0, 1));
    match cpus {
        Some((c, w)) => println!("controller pinned to CPU {c}, worker to CPU {w}"),
        None => println!("CPUs 0 and 1 not both available: threads unpinned"),
    }
    println!("median of {runs} runs x {iters} iterations\n");

    let reference = median_per_op(runs, iters, |n| condvar_round_trip(n, cpus));
    let registry = median_per_op(runs, iters, |n| registry_round_trip(n, cpus));
    println!(
        "{:<46} {:>12} {:>12} {:>7}",
        "", "registry", "reference", "ratio"
    );
    println!(
        "{:<46} {} {} {:>6.2}x",
        "park+unpark round trip vs condvar ping-pong",
        fmt(registry),
        fmt(reference),
        registry.as_secs_f64() / reference.as_secs_f64()
    );

    if cpus.is_some() {
        let reference = median_per_op(runs, iters, |n| condvar_round_trip(n, None));
        let registry = median_per_op(runs, iters, |n| registry_round_trip(n, None));
        println!(
            "{:<46} {} {} {:>6.2}x",
            "the same, threads left unpinned",
            fmt(registry),
            fmt(reference),
            registry.as_secs_f64() / reference.as_secs_f64()
        );
    }

    let reg_iters = (iters / 40).max(5);
    let reference = median_per_op(runs, reg_iters, spawn_join_16);
    let registry = median_per_op(runs, reg_iters, register_unregister);
    println!(
        "{:<46} {} {} {:>6.2}x",
        "register+unregister, 16 CPUs vs 16 spawn+join",
        fmt(registry),
        fmt(reference),
        registry.as_secs_f64() / reference.as_secs_f64()
    );
}
