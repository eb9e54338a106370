//! `cpu-follower`: an example of a real program living through vCPU
//! hot-add and hot-remove, to run as a workload (`launch --run`).
//!
//! It keeps one worker thread per online CPU with the [`smpboot`]
//! registry, following the guest's real topology: the guest agent's
//! `SysfsTopology` (sysfs + kernel uevents) and `GuestPlacement`
//! (`sched_setaffinity`), reused from the `guest` crate, driven by
//! [`CpuHotplug`]. The agent brings CPUs up and down; to this program
//! every change is one it learns of afterwards (a CPU that came up
//! without notice, one that went down under its workers), which is what
//! the registry's late transitions are for.
//!
//! After every burst of changes it checks its invariants
//! ([`Follower::check`]):
//! - the registry agrees with the kernel on every CPU's state;
//! - a worker exists, unparked and not failed, on every online CPU, and
//!   none runs (all parked or absent) on an offline one;
//! - every online CPU's worker, woken, runs on that CPU.
//!
//! A check may fail while the topology is moving (a CPU went down between
//! reading `online` and waking its worker); it is retried, and only a
//! failure that lasts [`Options::settle`] without any CPU event is a broken
//! invariant.
//!
//! Output, one line each (stdout):
//! ```text
//! cpu-follower: start online=0 workers=1
//! cpu-follower: change=1 cpu=1 online count=2 online=0-1
//! cpu-follower: change=2 cpu=1 offline count=1 online=0
//! cpu-follower: check=2 ok count=1 online=0 ran_on=0 ms=3
//! cpu-follower: done changes=2 checks=2
//! cpu-follower: BROKEN <why>
//! ```

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smpboot::{
    CpuHotplug, CpuState, EventOutcome, Placement, Registry, ThreadDescriptor, ThreadStatus,
    Topology, WakeHandle,
};

/// The worker's name pattern.
pub const WORKER: &str = "follower/%u";
/// How long a check waits for the woken workers to run.
pub const PING_WAIT: Duration = Duration::from_secs(3);
/// How long the event loop waits for the next CPU event before checking.
const POLL: Duration = Duration::from_millis(100);

/// Exit statuses.
pub mod status {
    /// An invariant broke.
    pub const BROKEN: i32 = 1;
    /// Bad command line.
    pub const USAGE: i32 = 2;
    /// The topology or the registry failed.
    pub const ERROR: i32 = 3;
    /// `--timeout` passed before `--changes` were seen.
    pub const TIMEOUT: i32 = 4;
}

/// The command line.
pub const USAGE: &str = "usage: cpu-follower [--changes N] [--duration SECS] [--timeout SECS]
                    [--settle SECS] [--exit-code N] [--lines N]

Keeps one worker per online CPU (smpboot registry over sysfs + uevents),
prints a line per CPU change and per check of its invariants.
  --changes N      exit after N CPU changes (and a passing check)
  --duration SECS  exit after SECS seconds (and a passing check)
  --timeout SECS   fail (status 4) if the run lasts longer
  --settle SECS    how long a failing check may last without CPU events
                   before it counts as a broken invariant (default 10)
  --exit-code N    exit with N instead of 0 after a good run (tests)
  --lines N        print N numbered lines first (a workload's output volume)
Without --changes or --duration it runs until killed.
Exit: 0 done, 1 broken invariant, 2 usage, 3 topology error, 4 timeout.";

/// Options (see [`USAGE`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Stop after this many CPU changes.
    pub changes: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Fail after this long.
    pub timeout: Option<Duration>,
    /// How long a failing check may last without CPU events.
    pub settle: Duration,
    /// The status of a good run.
    pub exit_code: i32,
    /// Numbered lines to print first.
    pub lines: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            changes: None,
            duration: None,
            timeout: None,
            settle: Duration::from_secs(10),
            exit_code: 0,
            lines: 0,
        }
    }
}

fn seconds(v: &str) -> Result<Duration, String> {
    v.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("not a number of seconds: {v:?}"))
}

impl Options {
    /// Parses the arguments after the program name.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Self, String> {
        let mut opts = Self::default();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--changes" => {
                    let v = value()?;
                    let n = v.parse().map_err(|_| format!("--changes {v:?}"))?;
                    opts.changes = Some(n);
                }
                "--duration" => opts.duration = Some(seconds(&value()?)?),
                "--timeout" => opts.timeout = Some(seconds(&value()?)?),
                "--settle" => opts.settle = seconds(&value()?)?,
                "--lines" => {
                    let v = value()?;
                    opts.lines = v.parse().map_err(|_| format!("--lines {v:?}"))?;
                }
                "--exit-code" => {
                    let v = value()?;
                    opts.exit_code = v
                        .parse()
                        .ok()
                        .filter(|c| (0..=255).contains(c))
                        .ok_or_else(|| format!("--exit-code {v:?}: 0 to 255"))?;
                }
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        Ok(opts)
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The changes or the duration asked for were seen, the last check passed.
    Done {
        /// CPU changes seen.
        changes: u64,
        /// Checks passed.
        checks: u64,
    },
    /// An invariant broke.
    Broken(String),
    /// `--timeout` passed first.
    TimedOut {
        /// CPU changes seen.
        changes: u64,
    },
    /// The topology or the registry failed.
    Failed(String),
}

impl Outcome {
    /// The process's exit status.
    pub fn exit_code(&self, opts: &Options) -> i32 {
        match self {
            Outcome::Done { .. } => opts.exit_code,
            Outcome::Broken(_) => status::BROKEN,
            Outcome::TimedOut { .. } => status::TIMEOUT,
            Outcome::Failed(_) => status::ERROR,
        }
    }
}

/// Per-CPU ping generations: the checker asks, the worker answers with
/// where it ran.
#[derive(Debug)]
struct Pings {
    asked: Vec<AtomicU64>,
    answered: Vec<AtomicU64>,
    ran_on: Vec<AtomicU32>,
}

impl Pings {
    fn new(cpus: usize) -> Self {
        Self {
            asked: (0..cpus).map(|_| AtomicU64::new(0)).collect(),
            answered: (0..cpus).map(|_| AtomicU64::new(0)).collect(),
            ran_on: (0..cpus).map(|_| AtomicU32::new(u32::MAX)).collect(),
        }
    }

    fn slot(cpu: u32) -> usize {
        usize::try_from(cpu).unwrap_or(usize::MAX)
    }

    fn pending(&self, cpu: u32) -> bool {
        let i = Self::slot(cpu);
        match (self.asked.get(i), self.answered.get(i)) {
            (Some(a), Some(b)) => a.load(Ordering::Acquire) != b.load(Ordering::Acquire),
            _ => false,
        }
    }

    fn answer(&self, cpu: u32, ran_on: u32) {
        let i = Self::slot(cpu);
        if let (Some(a), Some(b), Some(r)) =
            (self.asked.get(i), self.answered.get(i), self.ran_on.get(i))
        {
            let generation = a.load(Ordering::Acquire);
            r.store(ran_on, Ordering::Release);
            b.store(generation, Ordering::Release);
        }
    }

    fn ask(&self, cpu: u32) -> u64 {
        self.asked
            .get(Self::slot(cpu))
            .map_or(0, |a| a.fetch_add(1, Ordering::AcqRel) + 1)
    }

    /// `Some(cpu it ran on)` once the worker answered `generation`.
    fn answer_to(&self, cpu: u32, generation: u64) -> Option<u32> {
        let i = Self::slot(cpu);
        let b = self.answered.get(i)?;
        (b.load(Ordering::Acquire) >= generation)
            .then(|| self.ran_on.get(i).map(|r| r.load(Ordering::Acquire)))
            .flatten()
    }
}

/// `0-2,5`.
pub fn cpu_list(cpus: impl IntoIterator<Item = u32>) -> String {
    let mut list = guest::sysfs::CpuList::new();
    for cpu in cpus {
        list.insert(cpu);
    }
    list.to_string()
}

/// The registry with its one worker kind, over a topology.
#[derive(Debug)]
pub struct Follower<'a> {
    topo: &'a dyn Topology,
    registry: Registry,
    waker: WakeHandle,
    pings: Arc<Pings>,
}

impl<'a> Follower<'a> {
    /// Builds the registry over `topo` and registers the workers (on the
    /// CPUs online now).
    pub fn new(topo: &'a dyn Topology, placement: Arc<dyn Placement>) -> Result<Self, String> {
        let registry = Registry::builder()
            .topology(topo)
            .map_err(|e| format!("registry: {e}"))?
            .placement(Arc::clone(&placement))
            .build()
            .map_err(|e| format!("registry: {e}"))?;
        let possible = registry.possible_cpus().map_err(|e| e.to_string())?;
        let slots = possible.iter().max().map_or(0, |&m| Pings::slot(m) + 1);
        let pings = Arc::new(Pings::new(slots));
        let (should, work) = (Arc::clone(&pings), Arc::clone(&pings));
        let desc = ThreadDescriptor::builder(
            WORKER,
            move |cpu| should.pending(cpu),
            move |ctx| {
                let cpu = ctx.cpu();
                work.answer(cpu, placement.current_cpu(cpu));
            },
        )
        .build();
        let waker = registry
            .register(&desc)
            .map_err(|e| format!("register: {e}"))?;
        Ok(Self {
            topo,
            registry,
            waker,
            pings,
        })
    }

    /// (CPUs the registry has online, workers unparked).
    fn counts(&self) -> Result<(Vec<u32>, usize), String> {
        let snap = self.registry.snapshot().map_err(|e| e.to_string())?;
        let online = snap
            .cpus
            .iter()
            .filter(|c| c.state == CpuState::Online)
            .map(|c| c.cpu)
            .collect();
        let workers = snap
            .descriptors
            .iter()
            .flat_map(|d| &d.threads)
            .filter(|t| t.status != ThreadStatus::Absent && !t.parked)
            .count();
        Ok((online, workers))
    }

    /// One check of the invariants (see the crate docs): a summary, or
    /// what is wrong.
    pub fn check(&self, wait: Duration) -> Result<String, String> {
        let start = Instant::now();
        let online: BTreeSet<u32> = self
            .topo
            .online_cpus()
            .map_err(|e| format!("online CPUs: {e}"))?
            .into_iter()
            .collect();
        let snap = self.registry.snapshot().map_err(|e| e.to_string())?;
        let threads = &snap
            .descriptors
            .first()
            .ok_or("the workers are not registered")?
            .threads;
        for c in &snap.cpus {
            let up = online.contains(&c.cpu);
            if up != (c.state == CpuState::Online) {
                return Err(format!(
                    "cpu {}: the kernel has it {}, the registry {}",
                    c.cpu,
                    if up { "online" } else { "offline" },
                    c.state
                ));
            }
            let worker = threads.iter().find(|t| t.cpu == c.cpu);
            let running = worker.is_some_and(|t| t.status != ThreadStatus::Absent && !t.parked);
            if let Some(f) = worker.and_then(|t| t.failure.as_deref()) {
                return Err(format!("the worker of cpu {} failed: {f}", c.cpu));
            }
            if up && !running {
                return Err(format!("online cpu {} has no running worker", c.cpu));
            }
            if !up && running {
                return Err(format!("offline cpu {} has a running worker", c.cpu));
            }
        }
        let asked: Vec<(u32, u64)> = online.iter().map(|&c| (c, self.pings.ask(c))).collect();
        for &(cpu, _) in &asked {
            self.waker.wake(cpu);
        }
        let deadline = Instant::now() + wait;
        let mut ran_on = Vec::new();
        for &(cpu, generation) in &asked {
            let ran = loop {
                if let Some(ran) = self.pings.answer_to(cpu, generation) {
                    break ran;
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "the worker of cpu {cpu} did not run within {wait:?}"
                    ));
                }
                std::thread::sleep(Duration::from_millis(1));
            };
            if ran != cpu {
                return Err(format!("the worker of cpu {cpu} ran on cpu {ran}"));
            }
            ran_on.push(ran);
        }
        Ok(format!(
            "count={} online={} ran_on={} ms={}",
            online.len(),
            cpu_list(online.iter().copied()),
            cpu_list(ran_on),
            start.elapsed().as_millis()
        ))
    }

    /// Follows the topology until `opts` says stop; every line goes to `out`.
    pub fn run(&self, opts: &Options, out: &mut dyn FnMut(&str)) -> Outcome {
        for i in 1..=opts.lines {
            out(&format!("cpu-follower: line {i} of {}", opts.lines));
        }
        let start = Instant::now();
        let hotplug = CpuHotplug::new(&self.registry, self.topo);
        let (mut changes, mut checks) = (0u64, 0u64);
        let mut unchecked = true;
        let mut failing: Option<Instant> = None;
        match self.counts() {
            Ok((online, workers)) => out(&format!(
                "cpu-follower: start online={} workers={workers}",
                cpu_list(online)
            )),
            Err(e) => return Outcome::Failed(e),
        }
        loop {
            let now = Instant::now();
            let elapsed = now.saturating_duration_since(start);
            let enough = opts.changes.is_some_and(|n| changes >= n)
                || opts.duration.is_some_and(|d| elapsed >= d);
            if enough && !unchecked {
                return Outcome::Done { changes, checks };
            }
            if opts.timeout.is_some_and(|t| elapsed >= t) {
                return Outcome::TimedOut { changes };
            }
            let (cpu, what) = match hotplug.poll(POLL) {
                Err(e) => return Outcome::Failed(format!("CPU events: {e}")),
                Ok(Some(EventOutcome::CameOnline(cpu))) => (cpu, "online"),
                Ok(Some(EventOutcome::ForcedOffline(r))) if r.was_forced() => (r.cpu, "offline"),
                Ok(_) => {
                    if unchecked {
                        match self.check(PING_WAIT) {
                            Ok(summary) => {
                                checks += 1;
                                unchecked = false;
                                failing = None;
                                out(&format!("cpu-follower: check={checks} ok {summary}"));
                            }
                            Err(why) => {
                                let since = *failing.get_or_insert(now);
                                if now.saturating_duration_since(since) >= opts.settle {
                                    return Outcome::Broken(why);
                                }
                            }
                        }
                    }
                    continue;
                }
            };
            changes += 1;
            unchecked = true;
            failing = None;
            match self.counts() {
                Ok((online, _)) => out(&format!(
                    "cpu-follower: change={changes} cpu={cpu} {what} count={} online={}",
                    online.len(),
                    cpu_list(online)
                )),
                Err(e) => return Outcome::Failed(e),
            }
        }
    }
}

#[cfg(test)]
mod tests;
