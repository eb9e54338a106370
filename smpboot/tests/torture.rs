//! A torture test in the style of rcutorture's on/off task: thousands of
//! random registry and CPU steps on a simulated topology, checking the
//! invariants after each one.
//!
//! Seeded and reproducible: the seed is printed (shown on failure) and
//! can be given with `SMPBOOT_TORTURE_SEED`; `SMPBOOT_TORTURE_STEPS`
//! overrides the number of steps (3000 by default).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use smpboot::{
    CpuHotplug, CpuState, DescriptorId, EventOutcome, FaultInjector, HotplugError, Registry,
    SimTopology, Snapshot, SpawnError, ThreadBody, ThreadDescriptor, ThreadSpawner, ThreadStatus,
    Topology, WakeHandle,
};

const CPUS: u32 = 20;
const SLOTS: usize = 5;

/// Counts live OS threads per thread name (unique per registration and
/// CPU) to prove there is never more than one.
#[derive(Debug)]
struct Tracking {
    inner: Arc<FaultInjector>,
    live: Arc<Mutex<HashMap<String, usize>>>,
    duplicates: Arc<AtomicU64>,
}

struct Leave(Arc<Mutex<HashMap<String, usize>>>, String);

impl Drop for Leave {
    fn drop(&mut self) {
        let mut live = self.0.lock().unwrap();
        let n = live.get_mut(&self.1).unwrap();
        *n -= 1;
        if *n == 0 {
            live.remove(&self.1);
        }
    }
}

impl ThreadSpawner for Tracking {
    fn spawn(
        &self,
        name: String,
        cpu: u32,
        body: ThreadBody,
    ) -> Result<std::thread::JoinHandle<()>, SpawnError> {
        {
            let mut live = self.live.lock().unwrap();
            let n = live.entry(name.clone()).or_default();
            *n += 1;
            if *n > 1 {
                self.duplicates.fetch_add(1, Ordering::SeqCst);
            }
        }
        let leave = Leave(Arc::clone(&self.live), name.clone());
        self.inner.spawn(
            name,
            cpu,
            Box::new(move || {
                let _leave = leave;
                body();
            }),
        )
    }
}

/// What a descriptor's callbacks did, per CPU, counted by the callbacks.
#[derive(Debug)]
struct Tally {
    create: Vec<AtomicU64>,
    setup: Vec<AtomicU64>,
    park: Vec<AtomicU64>,
    unpark: Vec<AtomicU64>,
    thread_fn: Vec<AtomicU64>,
    cleanup: Vec<AtomicU64>,
    pending: Vec<AtomicU64>,
    /// Set when unregister returned: any callback after is a violation.
    retired: AtomicBool,
    late_calls: AtomicU64,
}

fn counters() -> Vec<AtomicU64> {
    (0..CPUS).map(|_| AtomicU64::new(0)).collect()
}

impl Tally {
    fn new() -> Arc<Self> {
        Arc::new(Tally {
            create: counters(),
            setup: counters(),
            park: counters(),
            unpark: counters(),
            thread_fn: counters(),
            cleanup: counters(),
            pending: counters(),
            retired: AtomicBool::new(false),
            late_calls: AtomicU64::new(0),
        })
    }

    fn hit(&self, v: &[AtomicU64], cpu: u32) {
        if self.retired.load(Ordering::SeqCst) {
            self.late_calls.fetch_add(1, Ordering::SeqCst);
        }
        v[cpu as usize].fetch_add(1, Ordering::SeqCst);
    }

    fn get(v: &[AtomicU64], cpu: u32) -> u64 {
        v[cpu as usize].load(Ordering::SeqCst)
    }
}

struct Slot {
    desc: Arc<ThreadDescriptor>,
    waker: WakeHandle,
    tally: Arc<Tally>,
    name_prefix: String,
    has_park: bool,
    has_setup: bool,
    has_cleanup: bool,
    has_unpark: bool,
}

/// A random descriptor and which of setup, cleanup, park, unpark it has.
fn descriptor(
    rng: &mut StdRng,
    name: &str,
    tally: &Arc<Tally>,
) -> (Arc<ThreadDescriptor>, [bool; 4]) {
    let (t1, t2) = (Arc::clone(tally), Arc::clone(tally));
    let mut b = ThreadDescriptor::builder(
        format!("{name}/%u"),
        move |cpu| {
            if t1.retired.load(Ordering::SeqCst) {
                t1.late_calls.fetch_add(1, Ordering::SeqCst);
            }
            Tally::get(&t1.pending, cpu) > 0
        },
        move |ctx| {
            let cpu = ctx.cpu();
            t2.pending[cpu as usize].fetch_sub(1, Ordering::SeqCst);
            t2.hit(&t2.thread_fn, cpu);
        },
    );
    let (has_setup, has_cleanup, has_park) =
        (rng.gen_bool(0.8), rng.gen_bool(0.8), rng.gen_bool(0.7));
    if has_setup {
        let t = Arc::clone(tally);
        b = b.setup(move |cpu| t.hit(&t.setup, cpu));
    }
    if has_cleanup {
        let t = Arc::clone(tally);
        b = b.cleanup(move |cpu, _| t.hit(&t.cleanup, cpu));
    }
    if has_park {
        let t = Arc::clone(tally);
        b = b.park(move |cpu| t.hit(&t.park, cpu));
    }
    let has_unpark = rng.gen_bool(0.8);
    if has_unpark {
        let t = Arc::clone(tally);
        b = b.unpark(move |cpu| t.hit(&t.unpark, cpu));
    }
    let t = Arc::clone(tally);
    b = b.create(move |cpu| t.hit(&t.create, cpu));
    (b.build(), [has_setup, has_cleanup, has_park, has_unpark])
}

struct Torture {
    seed: u64,
    rng: StdRng,
    topo: SimTopology,
    registry: Registry,
    inj: Arc<FaultInjector>,
    live: Arc<Mutex<HashMap<String, usize>>>,
    duplicates: Arc<AtomicU64>,
    slots: Vec<Option<Slot>>,
    retired: Vec<Arc<Tally>>,
    generation: u64,
    forced_seen: u64,
    stats: HashMap<&'static str, (u64, u64)>,
}

impl Torture {
    fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let online: Vec<u32> = (0..CPUS).filter(|&c| c == 0 || rng.gen_bool(0.6)).collect();
        let topo = SimTopology::new(CPUS, online);
        let inj = Arc::new(FaultInjector::new());
        let live = Arc::new(Mutex::new(HashMap::new()));
        let duplicates = Arc::new(AtomicU64::new(0));
        let registry = Registry::builder()
            .topology(&topo)
            .unwrap()
            .placement(Arc::new(topo.placement()))
            .spawner(Arc::new(Tracking {
                inner: Arc::clone(&inj),
                live: Arc::clone(&live),
                duplicates: Arc::clone(&duplicates),
            }))
            .build()
            .unwrap();
        Torture {
            seed,
            rng,
            topo,
            registry,
            inj,
            live,
            duplicates,
            slots: (0..SLOTS).map(|_| None).collect(),
            retired: Vec::new(),
            generation: 0,
            forced_seen: 0,
            stats: HashMap::new(),
        }
    }

    fn record(&mut self, what: &'static str, ok: bool) {
        let e = self.stats.entry(what).or_default();
        e.0 += 1;
        if ok {
            e.1 += 1;
        }
    }

    fn cpus_in(&self, states: &[CpuState]) -> Vec<u32> {
        (0..CPUS)
            .filter(|&c| states.contains(&self.registry.cpu_state(c).unwrap()))
            .collect()
    }

    fn pick(&mut self, v: &[u32]) -> Option<u32> {
        (!v.is_empty()).then(|| v[self.rng.gen_range(0..v.len())])
    }

    fn maybe_arm_failure(&mut self, spawns: usize) {
        if spawns > 0 && self.rng.gen_bool(0.15) {
            self.inj.fail_nth(self.rng.gen_range(1..=spawns as u64));
        }
    }

    fn step(&mut self) -> &'static str {
        let roll = self.rng.gen_range(0..100);
        let what = match roll {
            0..=29 => {
                // Wake: add work for a random (descriptor, CPU).
                let full: Vec<usize> = (0..SLOTS).filter(|&i| self.slots[i].is_some()).collect();
                if let Some(&i) = full.get(self.rng.gen_range(0..full.len().max(1))) {
                    let cpu = self.rng.gen_range(0..CPUS);
                    let n = self.rng.gen_range(1..4);
                    let slot = self.slots[i].as_ref().unwrap();
                    slot.tally.pending[cpu as usize].fetch_add(n, Ordering::SeqCst);
                    slot.waker.wake(cpu);
                }
                "wake"
            }
            30..=44 => {
                let cands = self.cpus_in(&[CpuState::Offline, CpuState::Prepared]);
                if let Some(cpu) = self.pick(&cands) {
                    let regs = self.slots.iter().flatten().count();
                    self.maybe_arm_failure(regs);
                    if self.rng.gen_bool(0.1) {
                        self.topo.refuse_next(cpu, true);
                    }
                    let r = CpuHotplug::new(&self.registry, &self.topo).bring_up(cpu);
                    let ok = r.is_ok();
                    match r {
                        Ok(()) => {}
                        Err(HotplugError::BringUp { .. }) => {
                            assert_eq!(self.registry.cpu_state(cpu).unwrap(), CpuState::Prepared)
                        }
                        Err(HotplugError::Registry(_)) => {}
                        Err(e) => panic!("seed {}: bring_up: {e:?}", self.seed),
                    }
                    self.record("bring_up", ok);
                }
                "bring_up"
            }
            45..=66 => {
                let cands: Vec<u32> = self
                    .cpus_in(&[CpuState::Online])
                    .into_iter()
                    .filter(|&c| c != 0)
                    .collect();
                if let Some(cpu) = self.pick(&cands) {
                    let refuse = roll >= 60;
                    if refuse {
                        self.topo.refuse_next(cpu, false);
                    }
                    let r = CpuHotplug::new(&self.registry, &self.topo).take_down(cpu);
                    // A refused offlining succeeds when it was rolled back.
                    let ok = r.is_ok() != refuse;
                    match r {
                        Ok(()) => {
                            assert_eq!(self.registry.cpu_state(cpu).unwrap(), CpuState::Offline)
                        }
                        Err(HotplugError::TakeDown { .. }) if refuse => {
                            assert_eq!(self.registry.cpu_state(cpu).unwrap(), CpuState::Online)
                        }
                        Err(e) => panic!("seed {}: take_down: {e:?}", self.seed),
                    }
                    self.record(
                        if refuse {
                            "failed_offline"
                        } else {
                            "take_down"
                        },
                        ok,
                    );
                }
                if roll >= 60 {
                    "failed_offline"
                } else {
                    "take_down"
                }
            }
            67..=73 => {
                // The CPU goes down (or, rarely, up) on its own.
                let on = self.topo.online_cpus().unwrap();
                let on: Vec<u32> = on.into_iter().filter(|&c| c != 0).collect();
                if self.rng.gen_bool(0.8) {
                    if let Some(cpu) = self.pick(&on) {
                        self.topo.force_offline(cpu).unwrap();
                    }
                    "forced_offline"
                } else {
                    let off: Vec<u32> = (1..CPUS).filter(|c| !on.contains(c)).collect();
                    if let Some(cpu) = self.pick(&off) {
                        self.topo.force_online(cpu).unwrap();
                    }
                    "came_online"
                }
            }
            74..=83 => {
                let outcomes = CpuHotplug::new(&self.registry, &self.topo)
                    .drain()
                    .unwrap_or_else(|e| panic!("seed {}: drain: {e:?}", self.seed));
                for o in outcomes {
                    match o {
                        EventOutcome::ForcedOffline(r) => {
                            assert!(r.was_forced());
                            self.forced_seen += 1;
                        }
                        EventOutcome::CameOnline(cpu) => {
                            assert_eq!(self.registry.cpu_state(cpu).unwrap(), CpuState::Online)
                        }
                        EventOutcome::Ignored => unreachable!(),
                    }
                }
                "drain"
            }
            84..=93 => {
                let empty: Vec<usize> = (0..SLOTS).filter(|&i| self.slots[i].is_none()).collect();
                if let Some(&i) = empty.get(self.rng.gen_range(0..empty.len().max(1))) {
                    self.register(i);
                }
                "register"
            }
            _ => {
                let full: Vec<usize> = (0..SLOTS).filter(|&i| self.slots[i].is_some()).collect();
                if let Some(&i) = full.get(self.rng.gen_range(0..full.len().max(1))) {
                    self.unregister(i);
                }
                "unregister"
            }
        };
        self.inj.clear();
        what
    }

    fn register(&mut self, i: usize) {
        self.generation += 1;
        let name = format!("t{i}.{}", self.generation);
        let tally = Tally::new();
        let (desc, [has_setup, has_cleanup, has_park, has_unpark]) =
            descriptor(&mut self.rng, &name, &tally);
        let spawns = self.cpus_in(&[CpuState::Online, CpuState::Prepared]).len();
        self.maybe_arm_failure(spawns);
        match self.registry.register(&desc) {
            Ok(waker) => {
                self.slots[i] = Some(Slot {
                    desc,
                    waker,
                    tally,
                    name_prefix: format!("{name}/"),
                    has_park,
                    has_setup,
                    has_cleanup,
                    has_unpark,
                });
                self.record("register", true);
            }
            Err(e) => {
                assert!(
                    matches!(e, smpboot::RegistryError::ThreadCreation { .. }),
                    "seed {}: {e:?}",
                    self.seed
                );
                // Nothing of it remains.
                tally.retired.store(true, Ordering::SeqCst);
                assert_eq!(
                    self.live_with(&format!("{name}/")),
                    0,
                    "seed {}: leaked thread",
                    self.seed
                );
                assert!(!self.registry.is_registered(&desc).unwrap());
                self.retired.push(tally);
                self.record("register", false);
            }
        }
    }

    fn unregister(&mut self, i: usize) {
        // Settle first so the cleanup count can be compared with setup.
        self.settle();
        let slot = self.slots[i].take().unwrap();
        self.registry.unregister(&slot.desc).unwrap();
        slot.tally.retired.store(true, Ordering::SeqCst);
        assert_eq!(
            self.live_with(&slot.name_prefix),
            0,
            "seed {}: thread survived",
            self.seed
        );
        if slot.has_setup && slot.has_cleanup {
            for cpu in 0..CPUS {
                assert_eq!(
                    Tally::get(&slot.tally.cleanup, cpu),
                    Tally::get(&slot.tally.setup, cpu),
                    "seed {}: cleanup does not mirror setup on CPU {cpu}",
                    self.seed
                );
            }
        }
        self.retired.push(slot.tally);
        self.record("unregister", true);
    }

    fn live_with(&self, prefix: &str) -> usize {
        self.live
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, n)| *n)
            .sum()
    }

    /// Waits until every thread reached what its CPU state implies and
    /// every count matches; panics with the details otherwise.
    fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let snap = self.registry.snapshot().unwrap();
            match self.check(&snap) {
                Ok(()) => return,
                Err(why) if Instant::now() > deadline => {
                    panic!("seed {}: invariant broken: {why}", self.seed)
                }
                Err(_) => std::thread::sleep(Duration::from_micros(100)),
            }
        }
    }

    fn check(&self, snap: &Snapshot) -> Result<(), String> {
        let ids: Vec<DescriptorId> = self
            .slots
            .iter()
            .flatten()
            .map(|s| s.waker.descriptor())
            .collect();
        let mut seen: Vec<DescriptorId> = snap.descriptors.iter().map(|d| d.id).collect();
        seen.sort();
        let mut want = ids.clone();
        want.sort();
        if seen != want {
            return Err(format!("registered {seen:?}, expected {want:?}"));
        }
        let live = self.live.lock().unwrap().clone();
        for slot in self.slots.iter().flatten() {
            let d = snap.descriptor(slot.waker.descriptor()).unwrap();
            let t = &slot.tally;
            for th in &d.threads {
                let cpu = th.cpu;
                let state = snap.cpu(cpu).unwrap().state;
                let exists = th.status != ThreadStatus::Absent;
                let live_n = live.get(&th.name).copied().unwrap_or(0);
                if live_n != usize::from(exists) {
                    return Err(format!(
                        "{}: {live_n} live threads, snapshot {:?}",
                        th.name, th.status
                    ));
                }
                match state {
                    CpuState::Online => {
                        if !exists || th.parked || th.status != ThreadStatus::Active {
                            return Err(format!(
                                "{} on online CPU: {:?} parked={}",
                                th.name, th.status, th.parked
                            ));
                        }
                        if Tally::get(&t.pending, cpu) != 0 {
                            return Err(format!("{}: work pending on an online CPU", th.name));
                        }
                    }
                    CpuState::Prepared => {
                        if !exists || !th.parked {
                            return Err(format!("{} on prepared CPU: {:?}", th.name, th.status));
                        }
                    }
                    CpuState::Offline => {
                        if exists && !th.parked {
                            return Err(format!("{} on offline CPU is not parked", th.name));
                        }
                    }
                }
                let c = &th.calls;
                let tallied = [
                    (c.create, Tally::get(&t.create, cpu)),
                    (c.setup, Tally::get(&t.setup, cpu)),
                    (c.park, Tally::get(&t.park, cpu)),
                    (c.unpark, Tally::get(&t.unpark, cpu)),
                    (c.thread_fn, Tally::get(&t.thread_fn, cpu)),
                    (c.cleanup, Tally::get(&t.cleanup, cpu)),
                ];
                if tallied.iter().any(|(a, b)| a != b) {
                    return Err(format!(
                        "{}: snapshot {c:?} vs callbacks {tallied:?}",
                        th.name
                    ));
                }
                if exists && c.create != 1 || c.setup > 1 || c.cleanup != 0 {
                    return Err(format!("{}: impossible counts {c:?}", th.name));
                }
                // park and unpark alternate, when both exist.
                let both = slot.has_park && slot.has_unpark;
                let parks_ok = match th.status {
                    ThreadStatus::Parked => !both || c.park == c.unpark + 1,
                    ThreadStatus::Active => !both || c.park == c.unpark,
                    ThreadStatus::Created => {
                        c.park == 0 && c.unpark == 0 && c.setup == 0 && c.thread_fn == 0
                    }
                    ThreadStatus::Absent => true,
                    ThreadStatus::Failed | ThreadStatus::Exited => false,
                };
                if !parks_ok || (!slot.has_park && c.park + c.unpark != 0) {
                    return Err(format!("{}: {:?} with {c:?}", th.name, th.status));
                }
            }
        }
        if self.duplicates.load(Ordering::SeqCst) != 0 {
            return Err("two threads for one (descriptor, CPU)".into());
        }
        let late: u64 = self
            .retired
            .iter()
            .map(|t| t.late_calls.load(Ordering::SeqCst))
            .sum();
        if late != 0 {
            return Err(format!("{late} callbacks after unregister"));
        }
        if snap.forced_offlines != self.forced_seen {
            return Err(format!(
                "snapshot counts {} forced offlines, driver reported {}",
                snap.forced_offlines, self.forced_seen
            ));
        }
        if self.topo.pending_events() == 0 {
            for c in &snap.cpus {
                let up = self.topo.is_online(c.cpu).unwrap();
                if up != (c.state == CpuState::Online) {
                    return Err(format!(
                        "CPU {} is {} but the topology says up={up}",
                        c.cpu, c.state
                    ));
                }
            }
        }
        Ok(())
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

#[test]
fn torture_random_hotplug_and_registration() {
    let seed = env_u64("SMPBOOT_TORTURE_SEED").unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        t.as_secs() ^ u64::from(t.subsec_nanos())
    });
    let steps = env_u64("SMPBOOT_TORTURE_STEPS").unwrap_or(3000);
    println!(
        "smpboot torture: seed {seed} ({steps} steps); replay with SMPBOOT_TORTURE_SEED={seed}"
    );
    let start = Instant::now();
    let mut t = Torture::new(seed);
    for _ in 0..steps {
        let what = t.step();
        if !matches!(
            what,
            "bring_up" | "take_down" | "failed_offline" | "register" | "unregister"
        ) {
            t.record(what, true);
        }
        t.settle();
    }
    // Drain what is left, then tear down.
    let driver = CpuHotplug::new(&t.registry, &t.topo);
    for o in driver.drain().unwrap() {
        if let EventOutcome::ForcedOffline(_) = o {
            t.forced_seen += 1;
        }
    }
    t.settle();
    for i in 0..SLOTS {
        if t.slots[i].is_some() {
            t.unregister(i);
        }
    }
    t.settle();
    assert_eq!(t.inj.live_threads(), 0, "seed {seed}: threads left");
    let mut stats: Vec<_> = t.stats.iter().collect();
    stats.sort();
    println!(
        "smpboot torture: {steps} steps in {:?}; (attempts, successes): {stats:?}; {} forced offlines, {} injected failures",
        start.elapsed(),
        t.forced_seen,
        t.inj.injected()
    );
}
