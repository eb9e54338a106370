//! The agent's per-CPU workers, modelled on the kernel's own users of
//! smpboot threads, and the load that keeps them busy.
//!
//! | descriptor    | kernel model          | callbacks                          | work                          |
//! |---------------|-----------------------|------------------------------------|-------------------------------|
//! | `ksoftirqd/N` | `kernel/softirq.c`    | none                               | the CPU's queue of work items |
//! | `rcuc/N`      | `kernel/rcu/tree.c`   | setup, park                        | "RCU callbacks" raised by items |
//! | `watchdog/N`  | `kernel/watchdog.c`   | setup, cleanup, park, unpark       | a heartbeat per timer tick    |
//!
//! - **ksoftirqd**: `thread_should_run` is "the CPU's queue is not empty";
//!   `thread_fn` does up to [`ITEMS_PER_RUN`] items, returning early when
//!   asked to park or stop, counts each in the CPU's `done` counter (and
//!   in `misplaced` if it ran on another CPU), and every
//!   [`RCU_EVERY`]th item raises RCU work on its CPU and wakes `rcuc`.
//! - **rcuc**: `setup` and `park` set the per-CPU kthread status the way
//!   `rcu_cpu_kthread_setup`/`_park` do; `thread_fn` invokes the pending
//!   callbacks.
//! - **watchdog**: `setup`/`unpark` enable the CPU's "hrtimer",
//!   `park`/`cleanup` disable it; the timer (ticked by the load
//!   generator) bumps an interrupt count and wakes the thread, whose
//!   `thread_fn` beats the CPU's heartbeat. A CPU whose timer ticks but
//!   whose heartbeat does not is [stalled](Workload::stalled_cpus).
//!
//! The load generator is one ordinary thread: every [`TICK`] it spreads
//! `agent.load` items per second round-robin over the CPUs the agent
//! marked online ([`Workload::set_online`]) and wakes their ksoftirqd,
//! and every [`WATCHDOG_TICKS`] ticks it fires the watchdog timers.
//! Wakes never take the registry's lock.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use agent_proto::agent::{GuestMessage, WorkerInfo};
use smpboot::{
    Placement, Registry, RegistryError, Snapshot, ThreadContext, ThreadDescriptor, ThreadSnapshot,
    ThreadStatus, WakeHandle,
};

/// The ksoftirqd-style worker's name.
pub const KSOFTIRQD: &str = "ksoftirqd";
/// The rcuc-style worker's name.
pub const RCUC: &str = "rcuc";
/// The watchdog-style worker's name.
pub const WATCHDOG: &str = "watchdog";
/// Work items one `thread_fn` call does at most (like softirq's restart
/// limit) before it lets the loop check for park and stop again.
pub const ITEMS_PER_RUN: u64 = 16;
/// Every this many items, one RCU callback is raised.
pub const RCU_EVERY: u64 = 8;
/// The load generator's period.
pub const TICK: Duration = Duration::from_millis(100);
/// Watchdog timer period, in generator ticks.
pub const WATCHDOG_TICKS: u64 = 5;

/// `rcu_cpu_kthread_status` values, as in the kernel.
pub mod rcu_status {
    /// No thread (or never set up).
    pub const STOPPED: u8 = 0;
    /// Invoking callbacks.
    pub const RUNNING: u8 = 1;
    /// Set up, waiting for work.
    pub const WAITING: u8 = 2;
    /// Parked: its CPU is going down.
    pub const OFFCPU: u8 = 3;
}

/// Per-CPU state shared by the workers and the load generator.
#[derive(Debug, Default)]
pub struct CpuWork {
    online: AtomicBool,
    queue: AtomicU64,
    done: AtomicU64,
    misplaced: AtomicU64,
    rcu_pending: AtomicU64,
    rcu_invoked: AtomicU64,
    rcu_status: AtomicU8,
    wd_enabled: AtomicBool,
    wd_interrupts: AtomicU64,
    wd_seen: AtomicU64,
    wd_beats: AtomicU64,
}

/// Everything the workers share, indexed by CPU.
#[derive(Debug)]
pub struct Workload {
    cpus: Box<[CpuWork]>,
    placement: Arc<dyn Placement>,
    ksoftirqd: OnceLock<WakeHandle>,
    rcuc: OnceLock<WakeHandle>,
    watchdog: OnceLock<WakeHandle>,
    cursor: AtomicUsize,
}

impl Workload {
    /// State for CPUs `0..ncpus`; `placement` tells where a worker runs.
    pub fn new(ncpus: usize, placement: Arc<dyn Placement>) -> Self {
        Self {
            cpus: (0..ncpus).map(|_| CpuWork::default()).collect(),
            placement,
            ksoftirqd: OnceLock::new(),
            rcuc: OnceLock::new(),
            watchdog: OnceLock::new(),
            cursor: AtomicUsize::new(0),
        }
    }

    fn cpu(&self, cpu: u32) -> Option<&CpuWork> {
        self.cpus.get(usize::try_from(cpu).ok()?)
    }

    fn cpu_numbers(&self) -> impl Iterator<Item = (u32, &CpuWork)> {
        self.cpus
            .iter()
            .enumerate()
            .filter_map(|(i, w)| Some((u32::try_from(i).ok()?, w)))
    }

    /// Marks `cpu` as one the load may go to (its workers run) or not.
    pub fn set_online(&self, cpu: u32, online: bool) {
        if let Some(w) = self.cpu(cpu) {
            w.online.store(online, Ordering::Release);
        }
    }

    /// Queues `n` items on `cpu` and wakes its ksoftirqd.
    pub fn queue(&self, cpu: u32, n: u64) {
        if let Some(w) = self.cpu(cpu) {
            w.queue.fetch_add(n, Ordering::AcqRel);
            if let Some(h) = self.ksoftirqd.get() {
                h.wake(cpu);
            }
        }
    }

    /// Spreads `n` items round-robin over the online CPUs.
    pub fn spread(&self, n: u64) {
        let online: Vec<u32> = self
            .cpu_numbers()
            .filter(|(_, w)| w.online.load(Ordering::Acquire))
            .map(|(c, _)| c)
            .collect();
        if online.is_empty() || n == 0 {
            return;
        }
        let mut per_cpu = vec![0u64; online.len()];
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            let slot = (start + usize::try_from(i).unwrap_or(0)) % online.len();
            per_cpu[slot] += 1;
        }
        for (cpu, count) in online.into_iter().zip(per_cpu) {
            if count > 0 {
                self.queue(cpu, count);
            }
        }
    }

    /// Fires the watchdog timer of every CPU whose watchdog is enabled.
    pub fn watchdog_tick(&self) {
        for (cpu, w) in self.cpu_numbers() {
            if w.wd_enabled.load(Ordering::Acquire) {
                w.wd_interrupts.fetch_add(1, Ordering::AcqRel);
                if let Some(h) = self.watchdog.get() {
                    h.wake(cpu);
                }
            }
        }
    }

    /// Items done by `cpu`'s ksoftirqd.
    pub fn done(&self, cpu: u32) -> u64 {
        self.cpu(cpu).map_or(0, |w| w.done.load(Ordering::Acquire))
    }

    /// Items of `cpu` done while running on another CPU (should stay 0).
    pub fn misplaced(&self, cpu: u32) -> u64 {
        self.cpu(cpu)
            .map_or(0, |w| w.misplaced.load(Ordering::Acquire))
    }

    /// Items queued on `cpu` and not done yet.
    pub fn queued(&self, cpu: u32) -> u64 {
        self.cpu(cpu).map_or(0, |w| w.queue.load(Ordering::Acquire))
    }

    /// RCU callbacks invoked on `cpu`.
    pub fn rcu_invoked(&self, cpu: u32) -> u64 {
        self.cpu(cpu)
            .map_or(0, |w| w.rcu_invoked.load(Ordering::Acquire))
    }

    /// `cpu`'s rcuc status (see [`rcu_status`]).
    pub fn rcu_status(&self, cpu: u32) -> u8 {
        self.cpu(cpu).map_or(rcu_status::STOPPED, |w| {
            w.rcu_status.load(Ordering::Acquire)
        })
    }

    /// Heartbeats of `cpu`'s watchdog.
    pub fn heartbeats(&self, cpu: u32) -> u64 {
        self.cpu(cpu)
            .map_or(0, |w| w.wd_beats.load(Ordering::Acquire))
    }

    /// Whether `cpu`'s watchdog timer is enabled.
    pub fn watchdog_enabled(&self, cpu: u32) -> bool {
        self.cpu(cpu)
            .is_some_and(|w| w.wd_enabled.load(Ordering::Acquire))
    }

    /// CPUs whose watchdog timer fired `ticks` times or more without a
    /// heartbeat (a soft lockup, in the kernel's words).
    pub fn stalled_cpus(&self, ticks: u64) -> Vec<u32> {
        self.cpu_numbers()
            .filter(|(_, w)| {
                w.wd_enabled.load(Ordering::Acquire)
                    && w.wd_interrupts.load(Ordering::Acquire)
                        >= w.wd_seen.load(Ordering::Acquire) + ticks
            })
            .map(|(c, _)| c)
            .collect()
    }

    /// (CPU, items done) for every CPU that did any or is online.
    pub fn done_list(&self) -> Vec<(u32, u64)> {
        self.cpu_numbers()
            .map(|(c, w)| (c, w.done.load(Ordering::Acquire), w))
            .filter(|(_, d, w)| *d > 0 || w.online.load(Ordering::Acquire))
            .map(|(c, d, _)| (c, d))
            .collect()
    }

    // ----- the workers' callbacks -----

    fn softirq_pending(&self, cpu: u32) -> bool {
        self.queued(cpu) > 0
    }

    fn run_softirqs(&self, ctx: &ThreadContext<'_>) {
        let cpu = ctx.cpu();
        let Some(w) = self.cpu(cpu) else { return };
        for _ in 0..ITEMS_PER_RUN {
            if ctx.should_yield() {
                return;
            }
            let took = w
                .queue
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| q.checked_sub(1));
            if took.is_err() {
                return;
            }
            do_item(cpu);
            if self.placement.current_cpu(cpu) != cpu {
                w.misplaced.fetch_add(1, Ordering::AcqRel);
            }
            let done = w.done.fetch_add(1, Ordering::AcqRel) + 1;
            if done.is_multiple_of(RCU_EVERY) {
                w.rcu_pending.fetch_add(1, Ordering::AcqRel);
                if let Some(h) = self.rcuc.get() {
                    h.wake(cpu);
                }
            }
        }
    }

    fn rcu_has_work(&self, cpu: u32) -> bool {
        self.cpu(cpu)
            .is_some_and(|w| w.rcu_pending.load(Ordering::Acquire) > 0)
    }

    fn rcu_invoke(&self, cpu: u32) {
        if let Some(w) = self.cpu(cpu) {
            w.rcu_status.store(rcu_status::RUNNING, Ordering::Release);
            let n = w.rcu_pending.swap(0, Ordering::AcqRel);
            w.rcu_invoked.fetch_add(n, Ordering::AcqRel);
            w.rcu_status.store(rcu_status::WAITING, Ordering::Release);
        }
    }

    fn set_rcu_status(&self, cpu: u32, status: u8) {
        if let Some(w) = self.cpu(cpu) {
            w.rcu_status.store(status, Ordering::Release);
        }
    }

    fn watchdog_enable(&self, cpu: u32, enable: bool) {
        if let Some(w) = self.cpu(cpu) {
            if enable {
                // Like watchdog_enable: start counting from now.
                w.wd_seen
                    .store(w.wd_interrupts.load(Ordering::Acquire), Ordering::Release);
            }
            w.wd_enabled.store(enable, Ordering::Release);
        }
    }

    fn watchdog_should_run(&self, cpu: u32) -> bool {
        self.cpu(cpu).is_some_and(|w| {
            w.wd_interrupts.load(Ordering::Acquire) != w.wd_seen.load(Ordering::Acquire)
        })
    }

    fn watchdog_beat(&self, cpu: u32) {
        if let Some(w) = self.cpu(cpu) {
            w.wd_seen
                .store(w.wd_interrupts.load(Ordering::Acquire), Ordering::Release);
            w.wd_beats.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// One work item: a little arithmetic the optimiser cannot drop.
fn do_item(cpu: u32) {
    let mut x = u64::from(cpu) ^ 0x9e37_79b9_7f4a_7c15;
    for _ in 0..2000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    black_box(x);
}

fn ksoftirqd(work: &Arc<Workload>) -> Arc<ThreadDescriptor> {
    let (w1, w2) = (Arc::clone(work), Arc::clone(work));
    ThreadDescriptor::builder(
        format!("{KSOFTIRQD}/%u"),
        move |cpu| w1.softirq_pending(cpu),
        move |ctx| w2.run_softirqs(ctx),
    )
    .build()
}

fn rcuc(work: &Arc<Workload>) -> Arc<ThreadDescriptor> {
    let [w1, w2, w3, w4] = [0; 4].map(|_| Arc::clone(work));
    ThreadDescriptor::builder(
        format!("{RCUC}/%u"),
        move |cpu| w1.rcu_has_work(cpu),
        move |ctx| w2.rcu_invoke(ctx.cpu()),
    )
    .setup(move |cpu| w3.set_rcu_status(cpu, rcu_status::WAITING))
    .park(move |cpu| w4.set_rcu_status(cpu, rcu_status::OFFCPU))
    .build()
}

fn watchdog(work: &Arc<Workload>) -> Arc<ThreadDescriptor> {
    let [w1, w2, w3, w4, w5, w6] = [0; 6].map(|_| Arc::clone(work));
    ThreadDescriptor::builder(
        format!("{WATCHDOG}/%u"),
        move |cpu| w1.watchdog_should_run(cpu),
        move |ctx| w2.watchdog_beat(ctx.cpu()),
    )
    .setup(move |cpu| w3.watchdog_enable(cpu, true))
    .cleanup(move |cpu, _online| w4.watchdog_enable(cpu, false))
    .park(move |cpu| w5.watchdog_enable(cpu, false))
    .unpark(move |cpu| w6.watchdog_enable(cpu, true))
    .build()
}

/// The load generator thread.
#[derive(Debug)]
struct Generator {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Generator {
    fn start(work: Arc<Workload>, per_sec: u64) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("loadgen".into())
            .stack_size(64 * 1024)
            .spawn(move || generate(&work, per_sec, &flag))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

fn generate(work: &Workload, per_sec: u64, stop: &AtomicBool) {
    let start = Instant::now();
    let mut tick: u64 = 0;
    while !stop.load(Ordering::Acquire) {
        let next = TICK * u32::try_from(tick + 1).unwrap_or(u32::MAX);
        let left = next.saturating_sub(start.elapsed());
        if !left.is_zero() {
            std::thread::park_timeout(left);
            continue;
        }
        tick += 1;
        if tick.is_multiple_of(WATCHDOG_TICKS) {
            work.watchdog_tick();
        }
        // Items due by this tick minus items due by the previous one.
        let due = |t: u64| per_sec * t / 10;
        work.spread(due(tick) - due(tick - 1));
    }
}

/// The three descriptors, registered, and the load generator.
#[derive(Debug)]
pub struct Workers {
    work: Arc<Workload>,
    descriptors: Vec<Arc<ThreadDescriptor>>,
    _generator: Option<Generator>,
}

/// Why the workers could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkersError {
    /// Registering a descriptor failed.
    #[error("cannot register {name}")]
    Register {
        /// The descriptor.
        name: &'static str,
        /// The registry's error.
        #[source]
        source: RegistryError,
    },
    /// The load generator thread did not start.
    #[error("cannot start the load generator")]
    Generator(#[source] std::io::Error),
}

impl Workers {
    /// Registers the three descriptors with `registry` (threads start on
    /// every online CPU) and starts the load generator with `load` items
    /// per second (0: none; the watchdog timer then does not tick either).
    pub fn start(
        registry: &Registry,
        placement: Arc<dyn Placement>,
        online: &[u32],
        load: u64,
    ) -> Result<Self, WorkersError> {
        let ncpus = registry
            .possible_cpus()
            .ok()
            .and_then(|p| p.last().copied())
            .map_or(1, |max| max as usize + 1);
        let work = Arc::new(Workload::new(ncpus, placement));
        for &cpu in online {
            work.set_online(cpu, true);
        }
        let kinds = [
            (KSOFTIRQD, ksoftirqd(&work), &work.ksoftirqd),
            (RCUC, rcuc(&work), &work.rcuc),
            (WATCHDOG, watchdog(&work), &work.watchdog),
        ];
        let mut descriptors = Vec::new();
        for (name, desc, slot) in kinds {
            let handle = registry
                .register(&desc)
                .map_err(|source| WorkersError::Register { name, source })?;
            let _ = slot.set(handle);
            descriptors.push(desc);
        }
        let generator = if load > 0 {
            Some(Generator::start(Arc::clone(&work), load).map_err(WorkersError::Generator)?)
        } else {
            None
        };
        Ok(Self {
            work,
            descriptors,
            _generator: generator,
        })
    }

    /// The shared per-CPU state.
    pub fn workload(&self) -> &Arc<Workload> {
        &self.work
    }

    /// The registered descriptors, in registration order.
    pub fn descriptors(&self) -> &[Arc<ThreadDescriptor>] {
        &self.descriptors
    }

    /// The `workers` message for `snapshot`: every thread that exists
    /// (absent ones are left out to keep the line short) and the per-CPU
    /// items done.
    pub fn message(&self, snapshot: &Snapshot) -> GuestMessage {
        GuestMessage::Workers {
            workers: worker_infos(snapshot),
            done: self.work.done_list(),
        }
    }
}

/// The descriptor name of a pattern (`ksoftirqd/%u` -> `ksoftirqd`).
pub fn descriptor_name(pattern: &str) -> &str {
    pattern.strip_suffix("/%u").unwrap_or(pattern)
}

/// The protocol's status of a thread: "active", "parked", "failed", "none".
pub fn status_text(t: &ThreadSnapshot) -> &'static str {
    match t.status {
        ThreadStatus::Absent | ThreadStatus::Exited => "none",
        ThreadStatus::Failed => "failed",
        _ if t.parked => "parked",
        _ => "active",
    }
}

/// Every existing thread of `snapshot` as a [`WorkerInfo`].
pub fn worker_infos(snapshot: &Snapshot) -> Vec<WorkerInfo> {
    let mut out = Vec::new();
    for d in &snapshot.descriptors {
        let name = descriptor_name(&d.name_pattern);
        for t in &d.threads {
            let status = status_text(t);
            if status == "none" {
                continue;
            }
            out.push(WorkerInfo {
                descriptor: name.to_owned(),
                cpu: t.cpu,
                status: status.to_owned(),
                last_cpu: t.last_cpu,
                counts: [
                    t.calls.setup,
                    t.calls.park,
                    t.calls.unpark,
                    t.calls.thread_fn,
                ],
            });
        }
    }
    out
}

/// One thread in a [`Structure`]: descriptor, CPU, status and its
/// setup/park/unpark counts.
pub type ThreadShape = (String, u32, String, [u64; 3]);
/// What makes a `workers` message worth sending unasked.
pub type Structure = Vec<ThreadShape>;

/// What makes a `workers` message worth sending unasked: which threads
/// exist, their status and their setup/park/unpark counts (not the work
/// counters, which change all the time).
pub fn structure(infos: &[WorkerInfo]) -> Structure {
    infos
        .iter()
        .map(|w| {
            (
                w.descriptor.clone(),
                w.cpu,
                w.status.clone(),
                [w.counts[0], w.counts[1], w.counts[2]],
            )
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use smpboot::PlacementError;

    /// Places logical CPU n on real CPU `real[n % len]` and reports the
    /// logical CPU as where it runs: simulated CPUs on this machine.
    #[derive(Debug)]
    pub(crate) struct FoldPlacement(Vec<u32>);

    impl FoldPlacement {
        pub(crate) fn shared() -> Arc<dyn Placement> {
            let mut real = smpboot::current_affinity().unwrap_or_else(|_| vec![0]);
            real.truncate(2);
            Arc::new(Self(real))
        }
    }

    impl Placement for FoldPlacement {
        fn bind(&self, cpu: u32) -> Result<(), PlacementError> {
            let real = self.0[cpu as usize % self.0.len()];
            smpboot::pin_current_thread(real)
        }

        fn current_cpu(&self, cpu: u32) -> u32 {
            cpu
        }
    }

    /// Polls `cond` for up to 10 s.
    pub(crate) fn eventually(what: &str, cond: impl Fn() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "timed out: {what}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn registry(possible: u32, online: &[u32]) -> Registry {
        Registry::builder()
            .cpus(0..possible, online.iter().copied())
            .placement(FoldPlacement::shared())
            .build()
            .unwrap()
    }

    #[test]
    fn queued_items_are_done_on_their_cpu_and_raise_rcu_work() {
        let reg = registry(4, &[0, 1]);
        let w = Workers::start(&reg, FoldPlacement::shared(), &[0, 1], 0).unwrap();
        let work = Arc::clone(w.workload());
        work.queue(1, 40);
        eventually("40 items on cpu1", || work.done(1) == 40);
        assert_eq!(work.queued(1), 0);
        assert_eq!(work.done(0), 0);
        assert_eq!(work.misplaced(1), 0);
        eventually("rcu callbacks", || work.rcu_invoked(1) == 40 / RCU_EVERY);
        assert_eq!(work.rcu_status(1), rcu_status::WAITING);
        assert_eq!(work.done_list(), vec![(0, 0), (1, 40)]);
    }

    #[test]
    fn spread_covers_only_online_cpus() {
        let work = Workload::new(4, FoldPlacement::shared());
        work.spread(10);
        assert!((0..4).all(|c| work.queued(c) == 0), "nothing online");
        work.set_online(0, true);
        work.set_online(2, true);
        work.spread(9);
        assert_eq!(work.queued(0) + work.queued(2), 9);
        assert!(work.queued(0).abs_diff(work.queued(2)) <= 1);
        assert_eq!(work.queued(1) + work.queued(3), 0);
        work.queue(99, 1); // out of range: ignored
    }

    #[test]
    fn watchdog_beats_while_enabled_and_stalls_are_seen() {
        let work = Arc::new(Workload::new(2, FoldPlacement::shared()));
        work.watchdog_enable(1, true);
        work.watchdog_tick();
        work.watchdog_tick();
        assert!(work.watchdog_should_run(1));
        assert_eq!(work.stalled_cpus(2), vec![1]);
        work.watchdog_beat(1);
        assert!(!work.watchdog_should_run(1));
        assert_eq!(work.heartbeats(1), 1);
        assert!(work.stalled_cpus(1).is_empty());
        work.watchdog_enable(1, false);
        work.watchdog_tick();
        assert!(!work.watchdog_should_run(1), "disabled timer does not fire");
    }

    #[test]
    fn park_and_unpark_drive_the_callbacks() {
        let reg = registry(4, &[0, 1]);
        let w = Workers::start(&reg, FoldPlacement::shared(), &[0, 1], 0).unwrap();
        let work = Arc::clone(w.workload());
        eventually("watchdog set up", || work.watchdog_enabled(1));
        eventually("rcuc set up", || work.rcu_status(1) == rcu_status::WAITING);
        reg.offline(1).unwrap();
        assert!(!work.watchdog_enabled(1), "park is synchronous");
        assert_eq!(work.rcu_status(1), rcu_status::OFFCPU);
        reg.failed_offline(1).unwrap();
        eventually("watchdog unparked", || work.watchdog_enabled(1));
        work.watchdog_tick();
        eventually("heartbeat", || work.heartbeats(1) == 1);
        let snap = reg.snapshot().unwrap();
        let infos = worker_infos(&snap);
        assert_eq!(infos.len(), 6, "{infos:?}");
        let wd1 = infos
            .iter()
            .find(|i| i.descriptor == WATCHDOG && i.cpu == 1)
            .unwrap();
        assert_eq!(wd1.status, "active");
        assert_eq!(&wd1.counts[..3], &[1, 1, 1]);
        for d in w.descriptors() {
            reg.unregister(d).unwrap();
        }
        assert!(!work.watchdog_enabled(1), "cleanup disables");
    }

    #[test]
    fn generator_feeds_the_workers() {
        let reg = registry(2, &[0, 1]);
        let w = Workers::start(&reg, FoldPlacement::shared(), &[0, 1], 100).unwrap();
        let work = Arc::clone(w.workload());
        eventually("items on both CPUs", || {
            work.done(0) > 0 && work.done(1) > 0
        });
        eventually("heartbeats", || work.heartbeats(0) > 0);
        drop(w);
    }

    #[test]
    fn names_and_statuses() {
        assert_eq!(descriptor_name("rcuc/%u"), "rcuc");
        assert_eq!(descriptor_name("plain"), "plain");
        let reg = registry(3, &[0]);
        let _w = Workers::start(&reg, FoldPlacement::shared(), &[0], 0).unwrap();
        reg.prepare(2).unwrap();
        let snap = reg.snapshot().unwrap();
        let infos = worker_infos(&snap);
        let on2: Vec<_> = infos.iter().filter(|i| i.cpu == 2).collect();
        assert_eq!(on2.len(), 3);
        assert!(on2.iter().all(|i| i.status == "parked"));
        assert!(infos.iter().all(|i| i.cpu != 1), "absent threads left out");
        let s = structure(&infos);
        assert_eq!(s.len(), infos.len());
    }
}
