//! The agent's state machine: CPU events in, registry transitions and
//! sysfs writes, reports out.
//!
//! [`Agent`] owns the worker registry (the `smpboot` crate) and the
//! workers, and reacts to three inputs: CPU events from the
//! [`SysfsTopology`] ([`Agent::on_uevents`]), lines from the VMM
//! ([`Agent::on_host_line`]) and the passing of time ([`Agent::tick`]).
//! It does no I/O of its own besides sysfs: what it has to say goes to an
//! [`Outbox`] (messages for the VMM, lines for the console) that the event
//! loop ([`crate::event_loop`]) drains. So the whole protocol runs on a
//! host against a fake sysfs tree and a fake uevent source.
//!
//! # vCPU ids and logical numbers
//! Messages name CPUs by vCPU id, sysfs and the registry by Linux's
//! logical number (`cpuN`); they differ as soon as vCPUs are added out of
//! order. The agent's [`IdMap`] translates (`agent_ids.rs`): every `cpuN`
//! met (at start-up, on each `add` uevent before anything else) has its
//! id read from `cpuN/firmware_node/uid`, else from the APIC ID of
//! `/proc/cpuinfo`; a `remove` uevent forgets it. An id the map lacks is
//! looked for again (the firmware node of a hot-added CPU appears just
//! after its `add` uevent) before the agent gives up on it.
//!
//! # CPU transitions
//! | input                               | action                                                      |
//! |-------------------------------------|-------------------------------------------------------------|
//! | `add` uevent, CPU offline           | registry `prepare` (threads created, parked), write 1       |
//! | `online` uevent                     | registry `online` (unpark); report `cpu` online             |
//! | `offline`/`remove`, registry online | registry `forced_offline` (park late); report `requested:false` |
//! | `prepare_remove`                    | registry `offline` (park, synchronous), write 0, answer     |
//! | ... the write fails                 | registry `failed_offline` (unpark), answer `ok:false`       |
//! | `cancel_remove`, CPU offline        | registry `prepare`, write 1, registry `online`, answer      |
//!
//! The hotplug lock is held across each sysfs write, as the kernel holds
//! its own. A CPU is reported to the VMM only when sysfs and the registry
//! agree on it (online means its workers were unparked).
//!
//! # Messages to the VMM
//! `ready` first; `cpu` on every change of the reported online set;
//! `prepared` and `restored` answers (each ahead of the `cpu` report its
//! action queued); `workers` when its structure (threads, statuses,
//! setup/park/unpark counts) changed, at most once per
//! [`WORKERS_DEBOUNCE`], and on request; `heartbeat` after
//! [`HEARTBEAT_MS`] without any other message. After a `silence` fault
//! nothing at all.
//!
//! Console lines (few: each costs ~15 ms nested):
//! - `GUEST-READY nproc=2 online=0-1 present=0-1 possible=0-7 vcpus=0,6 up=1.52 agent=1 mailbox=1 workers=3`
//!   (`online`, `present`, `possible`: logical numbers; `vcpus`: the vCPU
//!   ids of the online CPUs)
//! - `GUEST-CPU online=0-2 vcpus=0,3,6` when the reported set changed
//!   (` forced=N forced_vcpu=I` if cpuN, vCPU I, went down unasked)
//! - `GUEST-ERROR ...` when something failed but the agent goes on
//! - `GUEST-WARN ...` when a vCPU id came from the APIC ID (no firmware
//!   node) or replaced another pairing
//! - `GUEST-TRACE up=12.34 ...` per CPU event with `agent.trace`

use std::collections::BTreeSet;
use std::io;
use std::mem;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_proto::agent::{decode, GuestMessage, HostMessage, Line, HEARTBEAT_MS};
use smpboot::{
    CpuEvent, CpuEventKind, CpuState, Placement, Registry, RegistryError, Topology, TopologyError,
};
use thiserror::Error;

use crate::cmdline::Options;
use crate::hooks::HookEvent;
use crate::ids::IdMap;
use crate::init::MountError;
use crate::sysfs::{CpuList, SysfsError};
use crate::topology::SysfsTopology;
use crate::workers::{self, Workers, WorkersError};

#[path = "agent_ids.rs"]
mod ids;
#[path = "agent_removal.rs"]
mod removal;

/// Least time between two unrequested `workers` messages.
pub const WORKERS_DEBOUNCE: Duration = Duration::from_millis(500);
/// The answer to a `prepare_remove` refused by the `refuse_offline` fault.
pub const REFUSED_BY_FAULT: &str = "refused by test fault";

/// Why the agent stopped working.
#[derive(Debug, Error)]
pub enum AgentError {
    /// PID 1 could not mount the kernel file systems.
    #[error(transparent)]
    Mount(#[from] MountError),
    /// `/proc/cmdline` could not be read.
    #[error("cannot read /proc/cmdline")]
    Cmdline(#[source] io::Error),
    /// The CPU topology could not be read, or its event source failed.
    #[error("CPU topology")]
    Topology(#[from] TopologyError),
    /// The CPU lists could not be read.
    #[error(transparent)]
    Sysfs(#[from] SysfsError),
    /// The worker registry could not be built.
    #[error("worker registry")]
    Registry(#[from] RegistryError),
    /// The workers could not start.
    #[error(transparent)]
    Workers(#[from] WorkersError),
    /// The uevent socket failed.
    #[error("uevent socket")]
    Uevent(#[source] io::Error),
    /// The signalfd failed.
    #[error("signal handling")]
    Signals(#[source] io::Error),
    /// poll(2) failed.
    #[error("poll")]
    Poll(#[source] io::Error),
}

/// Why the agent's loop ended normally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Power off; the text is the reason (`reason=ready`, `signal=SIGTERM`).
    PowerOff(String),
}

/// What the agent has to say, drained by the event loop.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outbox {
    /// Messages for the VMM, in order.
    pub host: Vec<GuestMessage>,
    /// Console lines, in order.
    pub console: Vec<String>,
    /// CPU events for the user's hook ([`crate::hooks`]), in order.
    pub hooks: Vec<HookEvent>,
}

/// How the agent is set up besides its options.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where worker threads are placed
    /// ([`GuestPlacement`](crate::topology::GuestPlacement) in the guest).
    pub placement: Arc<dyn Placement>,
    /// The version sent in `ready`.
    pub version: String,
    /// Whether a VMM channel is open (shown as `agent=1` on the console).
    pub channel: bool,
    /// Whether it runs through the VMM's mailbox (`mailbox=1`).
    pub mailbox: bool,
    /// Console lines to print before the ready line.
    pub preface: Vec<String>,
}

/// The agent's state.
#[derive(Debug)]
pub struct Agent {
    // Dropped first: the load generator stops before the registry.
    workers: Workers,
    registry: Registry,
    topo: Arc<SysfsTopology>,
    opts: Options,
    /// The online set the VMM was told about.
    reported: CpuList,
    /// CPUs this agent wrote 1 to and has not seen online yet.
    onlining: BTreeSet<u32>,
    /// vCPU id <-> logical number of every CPU met.
    ids: IdMap,
    /// vCPU ids whose next `prepare_remove` is refused (test fault).
    refuse: BTreeSet<u32>,
    /// Hold the next hot-added CPU's online report back this long (test
    /// fault).
    delay_next: Option<Duration>,
    /// Reports held back, with when each goes out.
    held: Vec<(Instant, GuestMessage)>,
    silenced: bool,
    out: Outbox,
    last_sent: Instant,
    /// When the `workers` structure was last compared.
    workers_checked: Option<Instant>,
    /// When the last `workers` message was queued.
    workers_sent_at: Option<Instant>,
    /// The agent made a registry transition since the last comparison.
    workers_dirty: bool,
    workers_sent: Option<workers::Structure>,
    dropped_lines: u64,
    /// `workload_ack`s received and not yet taken by the event loop.
    workload_acks: u32,
}

fn uptime() -> Option<String> {
    let text = std::fs::read_to_string("/proc/uptime").ok()?;
    text.split_whitespace().next().map(str::to_owned)
}

/// Seconds since boot (CLOCK_BOOTTIME, the clock behind /proc/uptime) to
/// the microsecond: trace lines time steps of a few milliseconds.
fn boottime() -> Option<f64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec for the call's duration.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (rc == 0).then(|| ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9)
}

/// `GUEST-TRACE up=<seconds since boot, 6 decimals> <what>`.
fn trace_line(what: &str) -> String {
    match boottime() {
        Some(up) => format!("GUEST-TRACE up={up:.6} {what}"),
        None => format!("GUEST-TRACE up={} {what}", uptime().unwrap_or_default()),
    }
}

/// The conventional name of the errnos a CPU's `online` file returns.
fn errno_name(errno: i32) -> Option<&'static str> {
    Some(match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::EROFS => "EROFS",
        libc::ECANCELED => "ECANCELED",
        _ => return None,
    })
}

/// A short reason for a failed sysfs write: `EBUSY: Device or resource
/// busy`, or the error's text when there is no errno.
pub fn reason(e: &TopologyError) -> String {
    if let TopologyError::Io { source, .. } = e {
        if let Some(errno) = source.raw_os_error() {
            let text = io::Error::from_raw_os_error(errno).to_string();
            let text = text.split(" (os error").next().unwrap_or_default();
            return match errno_name(errno) {
                Some(name) => format!("{name}: {text}"),
                None => format!("errno {errno}: {text}"),
            };
        }
    }
    e.to_string()
}

fn errno_of(e: &TopologyError) -> i32 {
    match e {
        TopologyError::Io { source, .. } => source.raw_os_error().unwrap_or(0),
        _ => 0,
    }
}

impl Agent {
    /// Builds the registry from the topology, registers the workers,
    /// brings present but offline CPUs online (unless
    /// `agent.autoonline=0`: they may have been hot-added before the agent
    /// listened), and queues the ready line and message.
    pub fn start(
        topo: Arc<SysfsTopology>,
        opts: Options,
        cfg: AgentConfig,
    ) -> Result<Self, AgentError> {
        let possible = topo.possible_cpus()?;
        let online = topo.online_cpus()?;
        let registry = Registry::builder()
            .cpus(possible.iter().copied(), online.iter().copied())
            .placement(Arc::clone(&cfg.placement))
            .build()?;
        let workers = Workers::start(&registry, cfg.placement, &online, opts.load)?;
        let mut agent = Self {
            workers,
            registry,
            topo,
            opts,
            reported: online.iter().copied().collect(),
            onlining: BTreeSet::new(),
            ids: IdMap::new(),
            refuse: BTreeSet::new(),
            delay_next: None,
            held: Vec::new(),
            silenced: false,
            out: Outbox::default(),
            last_sent: Instant::now(),
            workers_checked: None,
            workers_sent_at: None,
            workers_dirty: false,
            workers_sent: None,
            dropped_lines: 0,
            workload_acks: 0,
        };
        agent.out.console.extend(cfg.preface);
        if !agent.opts.unknown.is_empty() {
            let line = format!(
                "GUEST-ERROR unknown options {}",
                agent.opts.unknown.join(",")
            );
            agent.out.console.push(line);
        }
        agent.learn_present();
        let online_ids = agent.vcpus(&online.iter().copied().collect());
        let unknown: Vec<u32> = online
            .iter()
            .copied()
            .filter(|&c| agent.ids.id(c).is_none())
            .collect();
        for cpu in unknown {
            agent.error(format!("cpu{cpu} is online but its vCPU id is unknown"));
        }
        agent.send(GuestMessage::Ready {
            version: cfg.version,
            online: online_ids.iter().collect(),
            cpus: agent.ids.pairs(),
        });
        if agent.opts.autoonline {
            let present = agent.topo.present_cpus()?;
            let offline = present.difference(&agent.topo.sysfs().online()?);
            for cpu in offline.iter() {
                agent.bring_up(cpu);
            }
        }
        let sysfs = agent.topo.sysfs();
        let (online, present, possible) = (sysfs.online()?, sysfs.present()?, sysfs.possible()?);
        let vcpus = agent.vcpus(&online);
        let mut ready = format!(
            "GUEST-READY nproc={} online={online} present={present} possible={possible} vcpus={vcpus}",
            online.len()
        );
        if let Some(up) = uptime() {
            ready.push_str(&format!(" up={up}"));
        }
        ready.push_str(&format!(
            " agent={} mailbox={} workers={}",
            u8::from(cfg.channel),
            u8::from(cfg.mailbox),
            agent.workers.descriptors().len()
        ));
        agent.out.console.push(ready);
        Ok(agent)
    }

    /// The options in force.
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// The worker registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The workers.
    pub fn workers(&self) -> &Workers {
        &self.workers
    }

    /// The online set last reported to the VMM.
    pub fn reported(&self) -> &CpuList {
        &self.reported
    }

    /// Whether a `silence` fault stopped all messages.
    pub fn is_silenced(&self) -> bool {
        self.silenced
    }

    /// Lines from the VMM that were dropped (malformed, wrong version,
    /// oversized, a fault without its CPU).
    pub fn dropped_lines(&self) -> u64 {
        self.dropped_lines
    }

    /// Workload messages the VMM acknowledged since the last call (the
    /// event loop runs the workload, see [`crate::workload`]).
    pub fn take_workload_acks(&mut self) -> u32 {
        mem::take(&mut self.workload_acks)
    }

    /// Takes what the agent has to say.
    pub fn take_output(&mut self) -> Outbox {
        mem::take(&mut self.out)
    }

    fn send(&mut self, msg: GuestMessage) {
        if self.silenced {
            return;
        }
        self.out.host.push(msg);
        self.last_sent = self.last_sent.max(Instant::now());
    }

    fn error(&mut self, line: String) {
        self.out.console.push(format!("GUEST-ERROR {line}"));
    }

    fn trace(&mut self, what: &str) {
        if self.opts.trace {
            self.out.console.push(trace_line(what));
        }
    }

    /// Handles every CPU event the topology has queued.
    pub fn on_uevents(&mut self) -> Result<(), AgentError> {
        while let Some(event) = self.topo.next_event(Duration::ZERO)? {
            self.on_cpu_event(event);
        }
        Ok(())
    }

    /// Reacts to one CPU event.
    pub fn on_cpu_event(&mut self, event: CpuEvent) {
        self.trace(&format!("{:?} cpu={}", event.kind, event.cpu));
        if event.kind == CpuEventKind::Added {
            // Before anything else: which vCPU this number is now.
            self.ids.forget(event.cpu);
            self.learn(event.cpu);
        }
        // A removal forgets the vCPU id: the hook's is read first.
        let removed = (event.kind == CpuEventKind::Removed)
            .then(|| self.ids.id(event.cpu))
            .flatten();
        match event.kind {
            CpuEventKind::Added if self.opts.autoonline => match self.topo.is_online(event.cpu) {
                Ok(false) => self.bring_up(event.cpu),
                Ok(true) => {}
                Err(e) => self.error(e.to_string()),
            },
            CpuEventKind::Added => {}
            CpuEventKind::Online => self.came_online(event.cpu),
            CpuEventKind::Offline => self.went_offline(event.cpu),
            CpuEventKind::Removed => {
                self.went_offline(event.cpu);
                self.ids.forget(event.cpu);
            }
        }
        // After the event's handling: a hot-added CPU's firmware node (its
        // vCPU id) may appear just after its `add` uevent.
        let vcpu = match event.kind {
            CpuEventKind::Removed => removed,
            _ => self.id_of(event.cpu),
        };
        self.out.hooks.push(HookEvent {
            kind: event.kind.into(),
            cpu: event.cpu,
            vcpu,
        });
    }

    /// Prepares the registry for `cpu` and writes 1 to its `online`, under
    /// the hotplug lock. The workers are unparked on the `online` event.
    fn bring_up(&mut self, cpu: u32) {
        let mut write_us = 0u128;
        let result = (|| -> Result<bool, String> {
            let mut hp = self.registry.hotplug().map_err(|e| e.to_string())?;
            if hp.cpu_state(cpu).map_err(|e| e.to_string())? == CpuState::Online {
                return Ok(false);
            }
            hp.prepare(cpu).map_err(|e| format!("prepare: {e}"))?;
            // Timed for the benchmarks: the guest's own share of a hot-add.
            let t = std::time::Instant::now();
            self.topo
                .set_online(cpu, true)
                .map_err(|e| format!("online errno={}", errno_of(&e)))?;
            write_us = t.elapsed().as_micros();
            Ok(true)
        })();
        match result {
            Ok(true) => {
                self.workers_dirty = true;
                self.onlining.insert(cpu);
                self.trace(&format!("onlined cpu={cpu} write_us={write_us}"));
            }
            Ok(false) => {}
            Err(e) => self.error(format!("cpu={cpu} {e}")),
        }
    }

    /// `cpu` is online in sysfs: unpark (or create) its workers and report.
    fn came_online(&mut self, cpu: u32) {
        match self.topo.is_online(cpu) {
            Ok(true) => {}
            Ok(false) => return, // stale
            Err(e) => return self.error(e.to_string()),
        }
        let requested = self.onlining.remove(&cpu);
        let result = (|| {
            let mut hp = self.registry.hotplug()?;
            match hp.cpu_state(cpu)? {
                CpuState::Online => return Ok(true),
                CpuState::Prepared => {}
                // Up without us (an admin): create the workers late.
                CpuState::Offline => hp.prepare(cpu)?,
            }
            hp.online(cpu)?;
            Ok::<_, RegistryError>(requested)
        })();
        match result {
            Ok(requested) => {
                self.workers_dirty = true;
                self.workers.workload().set_online(cpu, true);
                self.reconcile(cpu, requested, requested);
            }
            Err(RegistryError::UnknownCpu(_)) => {}
            Err(e) => self.error(format!("cpu={cpu} workers: {e}")),
        }
    }

    /// `cpu` is offline in sysfs: if the registry still had it online, it
    /// went down unasked (forced): park its workers late and report it.
    fn went_offline(&mut self, cpu: u32) {
        match self.topo.is_online(cpu) {
            Ok(false) => {}
            Ok(true) => return, // stale
            Err(e) => return self.error(e.to_string()),
        }
        self.onlining.remove(&cpu);
        let report = match self.registry.forced_offline(cpu) {
            Ok(report) => report,
            Err(RegistryError::UnknownCpu(_)) => return,
            Err(e) => return self.error(format!("cpu={cpu} workers: {e}")),
        };
        let forced = report.was_forced();
        self.workers_dirty = true;
        if forced {
            self.workers.workload().set_online(cpu, false);
            self.trace(&format!("forced offline cpu={cpu}"));
        }
        self.reconcile(cpu, !forced, false);
    }

    /// Reports `cpu` if sysfs and the registry agree on a state that
    /// differs from the one last reported. `hot_added`: the online report
    /// of a CPU the agent brought up, which a `delay` fault holds back.
    fn reconcile(&mut self, cpu: u32, requested: bool, hot_added: bool) {
        let online = match self.topo.is_online(cpu) {
            Ok(online) => online,
            Err(e) => return self.error(e.to_string()),
        };
        let registry_online = self.registry.cpu_state(cpu).ok() == Some(CpuState::Online);
        if online != registry_online || self.reported.contains(cpu) == online {
            return;
        }
        let Some(id) = self.id_of(cpu) else {
            let state = if online { "online" } else { "offline" };
            return self.error(format!("cpu{cpu} {state}: vCPU id unknown, not reported"));
        };
        if online {
            self.reported.insert(cpu);
        } else {
            self.reported.remove(cpu);
        }
        let msg = GuestMessage::Cpu {
            cpu: id,
            logical: Some(cpu),
            online,
            requested,
        };
        // A held report of this CPU is stale now.
        self.held
            .retain(|(_, m)| !matches!(m, GuestMessage::Cpu { cpu: c, .. } if *c == id));
        match self.delay_next.filter(|_| online && hot_added) {
            Some(delay) => {
                self.delay_next = None;
                self.trace(&format!("report of cpu={cpu} vcpu={id} held {delay:?}"));
                self.held.push((Instant::now() + delay, msg));
            }
            None => self.send(msg),
        }
        if !self.opts.quiet {
            let vcpus = self.vcpus(&self.reported);
            let mut line = format!("GUEST-CPU online={} vcpus={vcpus}", self.reported);
            if !online && !requested {
                line.push_str(&format!(" forced={cpu} forced_vcpu={id}"));
            }
            self.out.console.push(line);
        }
    }

    /// One line from the VMM; `Some` when the agent should stop.
    pub fn on_host_line(&mut self, line: Line) -> Option<Exit> {
        let bytes = match line {
            Line::Complete(bytes) => bytes,
            Line::Oversized => {
                self.dropped_lines += 1;
                return None;
            }
        };
        match decode::<HostMessage>(&bytes) {
            Ok(msg) => self.on_host(msg),
            Err(e) => {
                self.dropped_lines += 1;
                self.trace(&format!("dropped host line: {e}"));
                None
            }
        }
    }

    /// One message from the VMM; `Some` when the agent should stop.
    pub fn on_host(&mut self, msg: HostMessage) -> Option<Exit> {
        match msg {
            // A silenced agent plays hung: it acts on nothing the VMM asks.
            HostMessage::PrepareRemove { .. }
            | HostMessage::CancelRemove { .. }
            | HostMessage::Snapshot
                if self.silenced => {}
            HostMessage::PrepareRemove { cpu } => self.answer_first(|a| a.prepare_remove(cpu)),
            HostMessage::CancelRemove { cpu } => self.answer_first(|a| a.cancel_remove(cpu)),
            HostMessage::Snapshot => self.send_workers(true, Instant::now()),
            HostMessage::Poweroff => return Some(Exit::PowerOff("reason=host".into())),
            HostMessage::Fault { fault, cpu, ms } => self.on_fault(fault, cpu, ms),
            HostMessage::WorkloadAck { n } => {
                self.workload_acks = self.workload_acks.saturating_add(n);
            }
        }
        None
    }

    /// Runs `act` and sends its answer ahead of the `cpu` report the
    /// action queued: the VMM's next step waits on the answer alone.
    fn answer_first(&mut self, act: impl FnOnce(&mut Self) -> GuestMessage) {
        let queued = self.out.host.len();
        let answer = act(self);
        self.send(answer);
        if let Some(answer) = self.out.host.pop() {
            let at = queued.min(self.out.host.len());
            self.out.host.insert(at, answer);
        }
    }

    /// Queues a `workers` message if `force` or its structure changed.
    fn send_workers(&mut self, force: bool, now: Instant) {
        let Ok(snapshot) = self.registry.snapshot() else {
            return;
        };
        let GuestMessage::Workers { workers, done } = self.workers.message(&snapshot) else {
            return;
        };
        let (workers, done) = self.by_vcpu_id(workers, done);
        let structure = workers::structure(&workers);
        if force || self.workers_sent.as_ref() != Some(&structure) {
            self.workers_sent = Some(structure);
            self.workers_sent_at = Some(now);
            self.send(GuestMessage::Workers { workers, done });
        }
    }

    /// When the `workers` structure is next compared (and sent if it
    /// changed): right after a transition of the agent's own, else every
    /// [`WORKERS_DEBOUNCE`] (threads settle asynchronously: setup and
    /// unpark run after the transition returned), and never sooner than
    /// [`WORKERS_DEBOUNCE`] after the last one sent.
    fn workers_due(&self, now: Instant) -> Instant {
        let check = match self.workers_checked {
            Some(t) if !self.workers_dirty => t + WORKERS_DEBOUNCE,
            _ => now,
        };
        let not_before = self.workers_sent_at.map_or(now, |t| t + WORKERS_DEBOUNCE);
        check.max(not_before)
    }

    /// Time-driven messages: a changed `workers` snapshot (see
    /// [`WORKERS_DEBOUNCE`]) and the heartbeat.
    pub fn tick(&mut self, now: Instant) {
        if self.silenced {
            return;
        }
        let queued = self.out.host.len();
        let (due, later): (Vec<_>, Vec<_>) = mem::take(&mut self.held)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.held = later;
        for (_, msg) in due {
            self.send(msg);
        }
        if now >= self.workers_due(now) {
            self.workers_checked = Some(now);
            self.workers_dirty = false;
            self.send_workers(false, now);
        }
        if now >= self.last_sent + Duration::from_millis(HEARTBEAT_MS)
            && self.out.host.len() == queued
        {
            self.send(GuestMessage::Heartbeat);
        }
        if self.out.host.len() > queued {
            self.last_sent = self.last_sent.max(now);
        }
    }

    /// How long the event loop may sleep before [`tick`](Self::tick) has
    /// something to do; `None`: no timer (silenced).
    pub fn next_timeout(&self, now: Instant) -> Option<Duration> {
        if self.silenced {
            return None;
        }
        let heartbeat = self.last_sent + Duration::from_millis(HEARTBEAT_MS);
        let workers = self.workers_due(now);
        let held = self.held.iter().map(|(at, _)| *at).min();
        let next = heartbeat.min(workers).min(held.unwrap_or(heartbeat));
        Some(next.saturating_duration_since(now))
    }
}

#[cfg(test)]
#[path = "agent_tests.rs"]
mod tests;
