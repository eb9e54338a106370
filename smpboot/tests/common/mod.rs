//! Shared helpers of the integration tests: probe descriptors that log
//! every callback, simulated registries with an event log, and polling.

#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use smpboot::{
    DescriptorId, Registry, RegistryEvent, SimTopology, Snapshot, ThreadDescriptor, ThreadSnapshot,
    ThreadSpawner, WakeHandle,
};

/// One callback invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cb {
    Create,
    Setup,
    ThreadFn,
    Park,
    Unpark,
    Cleanup { online: bool },
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub label: &'static str,
    pub cpu: u32,
    pub cb: Cb,
    pub thread: ThreadId,
    pub thread_name: Option<String>,
    pub at: Instant,
}

/// A log shared by several probes, so the order across descriptors shows.
#[derive(Debug, Default)]
pub struct Log {
    entries: Mutex<Vec<Entry>>,
}

impl Log {
    pub fn new() -> Arc<Self> {
        Arc::new(Log::default())
    }

    pub fn push(&self, label: &'static str, cpu: u32, cb: Cb) {
        let t = std::thread::current();
        self.entries.lock().unwrap().push(Entry {
            label,
            cpu,
            cb,
            thread: t.id(),
            thread_name: t.name().map(str::to_owned),
            at: Instant::now(),
        });
    }

    pub fn entries(&self) -> Vec<Entry> {
        self.entries.lock().unwrap().clone()
    }

    /// (label, cpu) of every entry matching `cb`.
    pub fn calls(&self, cb: Cb) -> Vec<(&'static str, u32)> {
        self.entries()
            .iter()
            .filter(|e| e.cb == cb)
            .map(|e| (e.label, e.cpu))
            .collect()
    }

    /// Entries of one probe on one CPU, callbacks only.
    pub fn of(&self, label: &str, cpu: u32) -> Vec<Cb> {
        self.entries()
            .iter()
            .filter(|e| e.label == label && e.cpu == cpu)
            .map(|e| e.cb)
            .collect()
    }

    pub fn count(&self, label: &str, cpu: u32, cb: Cb) -> usize {
        self.of(label, cpu).iter().filter(|&&c| c == cb).count()
    }

    pub fn clear(&self) {
        self.entries.lock().unwrap().clear();
    }
}

/// Which optional callbacks a probe has.
#[derive(Debug, Clone, Copy)]
pub struct Callbacks {
    pub setup: bool,
    pub cleanup: bool,
    pub park: bool,
    pub unpark: bool,
    pub create: bool,
}

impl Callbacks {
    pub const ALL: Callbacks = Callbacks {
        setup: true,
        cleanup: true,
        park: true,
        unpark: true,
        create: true,
    };
}

/// Per-CPU work counters a probe's `thread_fn` consumes.
#[derive(Debug)]
pub struct Work {
    pub pending: Vec<AtomicU64>,
    pub done: Vec<AtomicU64>,
    /// Set by `setup`, checked by `thread_should_run` and `thread_fn`.
    pub set_up: Vec<AtomicBool>,
    /// A callback ran when it must not have (see `violation`).
    pub violations: AtomicU64,
    /// `thread_fn` currently running, per CPU.
    pub inside: Vec<AtomicU64>,
    /// Callbacks are forbidden (set after unregister).
    pub forbidden: AtomicBool,
}

impl Work {
    pub fn new(cpus: u32) -> Arc<Self> {
        let n = cpus as usize;
        Arc::new(Work {
            pending: (0..n).map(|_| AtomicU64::new(0)).collect(),
            done: (0..n).map(|_| AtomicU64::new(0)).collect(),
            set_up: (0..n).map(|_| AtomicBool::new(false)).collect(),
            violations: AtomicU64::new(0),
            inside: (0..n).map(|_| AtomicU64::new(0)).collect(),
            forbidden: AtomicBool::new(false),
        })
    }

    pub fn add(&self, cpu: u32, n: u64) {
        self.pending[cpu as usize].fetch_add(n, Ordering::SeqCst);
    }

    pub fn pending(&self, cpu: u32) -> u64 {
        self.pending[cpu as usize].load(Ordering::SeqCst)
    }

    pub fn done(&self, cpu: u32) -> u64 {
        self.done[cpu as usize].load(Ordering::SeqCst)
    }

    pub fn violations(&self) -> u64 {
        self.violations.load(Ordering::SeqCst)
    }

    fn check_allowed(&self) {
        if self.forbidden.load(Ordering::SeqCst) {
            self.violations.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// A descriptor named `label/%u` that logs every callback and does one
/// unit of `work` per `thread_fn`.
pub fn probe(
    label: &'static str,
    log: &Arc<Log>,
    work: &Arc<Work>,
    cbs: Callbacks,
) -> Arc<ThreadDescriptor> {
    let (w1, w2) = (Arc::clone(work), Arc::clone(work));
    let l2 = Arc::clone(log);
    let mut b = ThreadDescriptor::builder(
        format!("{label}/%u"),
        move |cpu| {
            w1.check_allowed();
            if !w1.set_up[cpu as usize].load(Ordering::SeqCst) && cbs.setup {
                w1.violations.fetch_add(1, Ordering::SeqCst);
            }
            w1.pending[cpu as usize].load(Ordering::SeqCst) > 0
        },
        move |ctx| {
            let cpu = ctx.cpu();
            let i = cpu as usize;
            w2.check_allowed();
            if w2.inside[i].fetch_add(1, Ordering::SeqCst) != 0 {
                w2.violations.fetch_add(1, Ordering::SeqCst);
            }
            if cbs.setup && !w2.set_up[i].load(Ordering::SeqCst) {
                w2.violations.fetch_add(1, Ordering::SeqCst);
            }
            let _ = w2.pending[i]
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |p| p.checked_sub(1));
            w2.done[i].fetch_add(1, Ordering::SeqCst);
            l2.push(label, cpu, Cb::ThreadFn);
            w2.inside[i].fetch_sub(1, Ordering::SeqCst);
        },
    );
    if cbs.setup {
        let (l, w) = (Arc::clone(log), Arc::clone(work));
        b = b.setup(move |cpu| {
            w.check_allowed();
            w.set_up[cpu as usize].store(true, Ordering::SeqCst);
            l.push(label, cpu, Cb::Setup);
        });
    }
    if cbs.cleanup {
        let (l, w) = (Arc::clone(log), Arc::clone(work));
        b = b.cleanup(move |cpu, online| {
            w.check_allowed();
            w.set_up[cpu as usize].store(false, Ordering::SeqCst);
            l.push(label, cpu, Cb::Cleanup { online });
        });
    }
    if cbs.park {
        let (l, w) = (Arc::clone(log), Arc::clone(work));
        b = b.park(move |cpu| {
            w.check_allowed();
            l.push(label, cpu, Cb::Park);
        });
    }
    if cbs.unpark {
        let (l, w) = (Arc::clone(log), Arc::clone(work));
        b = b.unpark(move |cpu| {
            w.check_allowed();
            l.push(label, cpu, Cb::Unpark);
        });
    }
    if cbs.create {
        let (l, w) = (Arc::clone(log), Arc::clone(work));
        b = b.create(move |cpu| {
            w.check_allowed();
            l.push(label, cpu, Cb::Create);
        });
    }
    b.build()
}

/// A simulated registry whose observer records every event.
pub struct Sim {
    pub topo: SimTopology,
    pub registry: Registry,
    pub events: Arc<Mutex<Vec<RegistryEvent>>>,
}

impl Sim {
    pub fn new(possible: u32, online: &[u32]) -> Sim {
        Sim::with_spawner(possible, online, None)
    }

    pub fn with_spawner(
        possible: u32,
        online: &[u32],
        spawner: Option<Arc<dyn ThreadSpawner>>,
    ) -> Sim {
        let topo = SimTopology::new(possible, online.iter().copied());
        let events = Arc::new(Mutex::new(Vec::new()));
        let ev = Arc::clone(&events);
        let mut b = Registry::builder()
            .topology(&topo)
            .unwrap()
            .placement(Arc::new(topo.placement()))
            .observer(move |e| ev.lock().unwrap().push(e.clone()));
        if let Some(s) = spawner {
            b = b.spawner(s);
        }
        Sim {
            registry: b.build().unwrap(),
            topo,
            events,
        }
    }

    pub fn events(&self) -> Vec<RegistryEvent> {
        self.events.lock().unwrap().clone()
    }

    pub fn clear_events(&self) {
        self.events.lock().unwrap().clear();
    }

    pub fn snap(&self) -> Snapshot {
        self.registry.snapshot().unwrap()
    }

    pub fn thread(&self, id: DescriptorId, cpu: u32) -> ThreadSnapshot {
        self.snap().thread(id, cpu).unwrap().clone()
    }

    /// Waits until `cond` holds on a fresh snapshot.
    pub fn wait_snap(&self, what: &str, cond: impl Fn(&Snapshot) -> bool) {
        wait_until(what, || cond(&self.snap()));
    }
}

/// Polls `cond` for up to ten seconds; panics with `what` on timeout.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Adds one unit of work for `cpu`, wakes it, and waits until it is done.
pub fn kick(work: &Work, waker: &WakeHandle, cpu: u32) {
    let before = work.done(cpu);
    work.add(cpu, 1);
    assert!(waker.wake(cpu));
    wait_until("thread_fn to run", || work.done(cpu) > before);
}

/// A gate a callback can block on until the test opens it.
#[derive(Debug, Default)]
pub struct Gate {
    open: Mutex<bool>,
    cv: std::sync::Condvar,
    entered: AtomicU64,
}

impl Gate {
    pub fn new() -> Arc<Self> {
        Arc::new(Gate::default())
    }

    pub fn wait(&self) {
        self.entered.fetch_add(1, Ordering::SeqCst);
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.cv.wait(open).unwrap();
        }
    }

    pub fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }

    pub fn entered(&self) -> u64 {
        self.entered.load(Ordering::SeqCst)
    }
}

/// Waits until the observer saw `event`.
pub fn wait_event(sim: &Sim, event: &RegistryEvent) {
    wait_until(&format!("{event:?}"), || sim.events().contains(event));
}
