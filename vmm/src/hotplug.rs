//! Hotplug coordination on the VMM thread: turns API mutations into vCPU
//! manager steps, tracks them as operations, and completes those
//! operations from what the guest does (insert acknowledged, CPU online,
//! vCPU ejected). It also answers the guest's view (the agent's worker
//! snapshot) and, with test hooks on, injects faults.
//!
//! A removal reaches the guest through the agent's prepare step then the
//! ACPI eject, or the ACPI eject alone (`decide::Removal` says where it
//! stands). A repeated `DELETE` of a vCPU still being removed sends the
//! request again (and restarts its [`REMOVE_TIMEOUT`]), unless the agent is
//! still preparing it. The decisions are pure functions in `decide`,
//! tested without KVM.

mod decide;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::agent::{GuestMessage, HostMessage};
use api::{
    ApiError, ErrorCode, FaultInjected, FaultKind, FaultTarget, GuestWorkers, VcpuList, VcpuState,
    VmInfo, VmState,
};

use self::decide::{FaultStep, Removal, Route, Snapshot};
use crate::agent::{AgentLink, AgentSink};
use crate::bus::lock;
use crate::control::{plan, Action, OperationTable, Reply, VmmMetrics};
use crate::cpu_manager::CpuManager;
use crate::devices::serial::SerialDevice;

/// How long the guest has to eject a vCPU before its removal fails (the
/// vCPU then stays present and usable; a later removal may succeed).
pub const REMOVE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the guest has to bring a hot-added vCPU online.
pub const ADD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the agent has to prepare a removal before the VMM falls back
/// to the plain ACPI eject.
pub const AGENT_PREPARE_TIMEOUT: Duration = Duration::from_secs(10);
/// How many removals the agent is asked to prepare at once. It prepares
/// them one after another (Linux offlines one CPU at a time), but with the
/// requests already in the guest no round trip separates two offlines; the
/// bound keeps the requests within the outbox.
pub const PREPARES_IN_FLIGHT: usize = 8;
/// How soon to retry pushing host messages the guest's UART FIFO could not
/// take yet.
pub const AGENT_FLUSH_INTERVAL: Duration = Duration::from_millis(2);
/// `GET /api/v1/guest/workers` asks a connected agent for a fresh snapshot
/// at most this often (each one costs the guest a UART exit per byte).
pub const SNAPSHOT_REQUEST_INTERVAL: Duration = Duration::from_secs(1);

/// Static facts about the VM for `GET /api/v1/vm`.
#[derive(Clone, Copy, Debug)]
pub struct VmFacts {
    /// vCPUs at boot.
    pub boot_vcpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
}

/// The coordinator (see the module docs).
#[derive(Debug)]
pub struct Hotplug {
    cpus: CpuManager,
    ops: OperationTable,
    facts: VmFacts,
    failures: u64,
    /// vCPU -> when its current add or remove started.
    deadlines: Vec<Option<Instant>>,
    /// The guest agent: with one connected, hot-adds complete when it
    /// reports the CPU online, and removals go through its prepare step;
    /// without one, the guest's acknowledgement of the insertion completes
    /// an add and removals use the plain ACPI eject.
    agent: AgentLink,
    agent_uart: Arc<Mutex<SerialDevice<AgentSink>>>,
    /// vCPU -> where its removal stands with the guest (`None`: none).
    removals: Vec<Option<Removal>>,
    /// vCPU -> the `ignore_removal` test hook is armed (one-shot).
    withhold_next_removal: Vec<bool>,
    /// Whether the test hooks (fault injection) are honoured.
    test_hooks: bool,
    /// When the agent's current worker snapshot arrived (`None`: none
    /// since it last started).
    snapshot_at: Option<Instant>,
    /// When a snapshot was last asked for.
    snapshot_asked: Option<Instant>,
    /// When the agent last answered a prepare request: requests sent
    /// together are answered one after another, so each one's
    /// [`AGENT_PREPARE_TIMEOUT`] runs from the later of its sending and the
    /// previous answer.
    last_prepared: Option<Instant>,
    stopping: bool,
}

impl Hotplug {
    /// A coordinator over a started vCPU manager.
    pub fn new(
        cpus: CpuManager,
        facts: VmFacts,
        agent_uart: Arc<Mutex<SerialDevice<AgentSink>>>,
    ) -> Self {
        let n = cpus.states().len();
        Self {
            cpus,
            ops: OperationTable::new(),
            facts,
            failures: 0,
            deadlines: vec![None; n],
            agent: AgentLink::new(),
            agent_uart,
            removals: vec![None; n],
            withhold_next_removal: vec![false; n],
            test_hooks: false,
            snapshot_at: None,
            snapshot_asked: None,
            last_prepared: None,
            stopping: false,
        }
    }

    /// Talks to the agent through `mailbox` once the agent uses it.
    pub fn with_agent_mailbox(mut self, mailbox: Option<Arc<crate::agent::Mailbox>>) -> Self {
        self.agent = std::mem::take(&mut self.agent).with_mailbox(mailbox);
        self
    }

    /// Honour the test hooks (`--test-hooks`); off by default, when
    /// [`Action::InjectFault`] answers `not_found` like an unknown path.
    pub fn with_test_hooks(mut self, on: bool) -> Self {
        self.test_hooks = on;
        self
    }

    /// The agent link.
    pub fn agent(&self) -> &AgentLink {
        &self.agent
    }

    fn send_agent(&mut self, msg: &HostMessage) -> bool {
        let uart = self.agent_uart.clone();
        self.agent.send(msg, |b| lock(&uart).enqueue_input(b))
    }

    /// Pushes queued host messages into the guest's UART FIFO.
    fn flush_agent(&mut self) {
        let uart = self.agent_uart.clone();
        self.agent.flush(|b| lock(&uart).enqueue_input(b));
    }

    /// Hands queued removals to the agent, up to [`PREPARES_IN_FLIGHT`]
    /// at once (highest id first); once none is queued or being prepared,
    /// ejects the prepared ones together. Without an agent the queue is
    /// ejected at once.
    fn pump_prepares(&mut self, now: Instant) {
        let queued = |r: &Option<Removal>| *r == Some(Removal::Queued);
        if !self.agent.connected() {
            let waiting: Vec<u32> = (0..self.removals.len())
                .filter(|&i| queued(&self.removals[i]))
                .filter_map(|i| u32::try_from(i).ok())
                .collect();
            for id in waiting {
                self.ops
                    .vcpu_note(id, "the guest agent went away; used the plain ACPI eject");
                if let Err(e) = self.eject(id) {
                    self.abort_remove(id, &e);
                }
            }
            self.eject_prepared();
            return;
        }
        // Highest id first, as a resize removes them.
        while self.preparing() < PREPARES_IN_FLIGHT {
            let next = (0..self.removals.len())
                .rev()
                .find(|&i| queued(&self.removals[i]))
                .and_then(|i| u32::try_from(i).ok());
            let Some(id) = next else { break };
            if let Err(e) = self.tell_guest(id, Route::Agent, now) {
                self.abort_remove(id, &e);
            }
        }
        if self.preparing() == 0 && !self.removals.iter().any(queued) {
            self.eject_prepared();
        }
    }

    /// How many removals the agent is preparing.
    fn preparing(&self) -> usize {
        self.removals
            .iter()
            .filter(|r| matches!(r, Some(Removal::Preparing(_))))
            .count()
    }

    /// Ejects every vCPU the agent has prepared, together: one scan in the
    /// guest removes them all.
    fn eject_prepared(&mut self) {
        let prepared: Vec<u32> = (0..self.removals.len())
            .filter(|&i| self.removals[i] == Some(Removal::Prepared))
            .filter_map(|i| u32::try_from(i).ok())
            .collect();
        for id in prepared {
            if let Err(e) = self.eject(id) {
                self.abort_remove(id, &e);
            }
        }
    }

    /// Starts removing `id`: through the agent when one is connected (it
    /// parks the CPU's workers and offlines it, then the ACPI eject
    /// follows), else through the ACPI eject alone; or, with the
    /// `ignore_removal` hook armed, only reserves it.
    fn start_remove(&mut self, id: u32, now: Instant) -> Result<(), String> {
        let withhold = self
            .withhold_next_removal
            .get_mut(id as usize)
            .is_some_and(std::mem::take);
        match decide::first_route(self.agent.connected(), withhold) {
            Route::Withhold => {
                self.cpus.reserve_remove(id).map_err(|e| e.to_string())?;
                self.set_removal(id, Some(Removal::Withheld));
                log::warn!("vCPU {id}: removal reserved but not sent (test hook ignore_removal)");
                self.ops.vcpu_note(
                    id,
                    "test hook ignore_removal: the request was not sent to the guest",
                );
                Ok(())
            }
            Route::Agent => {
                self.cpus.reserve_remove(id).map_err(|e| e.to_string())?;
                self.tell_guest(id, Route::Agent, now)
            }
            Route::Acpi => {
                self.ops
                    .vcpu_note(id, "no guest agent connected; used the plain ACPI eject");
                self.cpus.begin_remove(id).map_err(|e| e.to_string())?;
                self.set_removal(id, Some(Removal::Ejecting));
                Ok(())
            }
        }
    }

    /// Asks the guest to remove `id` (already reserved): through the
    /// agent's prepare step for [`Route::Agent`] (the plain eject if the
    /// agent cannot be reached), else the ACPI eject.
    fn tell_guest(&mut self, id: u32, route: Route, now: Instant) -> Result<(), String> {
        // `id` itself is never being prepared here: a repeated request
        // for a vCPU in the agent's hands is not re-sent (`resend_route`).
        if route == Route::Agent && self.preparing() >= PREPARES_IN_FLIGHT {
            self.set_removal(id, Some(Removal::Queued));
            return Ok(());
        }
        if route == Route::Agent {
            if self.send_agent(&HostMessage::PrepareRemove { cpu: id }) {
                log::debug!("vCPU {id}: asked the agent to prepare its removal");
                self.set_removal(id, Some(Removal::Preparing(now)));
                return Ok(());
            }
            self.ops.vcpu_note(
                id,
                "the agent could not be reached; used the plain ACPI eject",
            );
        }
        self.eject(id)
    }

    /// Requests (or re-requests) the ACPI eject of `id`.
    fn eject(&mut self, id: u32) -> Result<(), String> {
        self.cpus.signal_remove(id).map_err(|e| e.to_string())?;
        self.set_removal(id, Some(Removal::Ejecting));
        Ok(())
    }

    /// Asks the guest again for removals in flight that a repeated `DELETE`
    /// waits for (see [`decide::resignal_targets`]); the guest gets a new
    /// [`REMOVE_TIMEOUT`].
    fn resignal(&mut self, plan: &crate::control::Plan, states: &[VcpuState], now: Instant) {
        for id in decide::resignal_targets(plan, states) {
            let phase = self.removals.get(id as usize).copied().flatten();
            let Some(route) = decide::resend_route(phase, self.agent.connected()) else {
                continue;
            };
            let how = match route {
                Route::Agent => "through the guest agent",
                Route::Acpi | Route::Withhold => "with the ACPI eject",
            };
            log::info!("vCPU {id}: removal asked for again; sending it again {how}");
            self.ops
                .vcpu_note(id, &format!("asked again; sent the request again {how}"));
            match self.tell_guest(id, route, now) {
                Ok(()) => self.deadlines[id as usize] = Some(now),
                Err(e) => self.abort_remove(id, &e),
            }
        }
    }

    /// Gives up removing `id` (it stays present) and fails its operations.
    fn abort_remove(&mut self, id: u32, reason: &str) {
        let mut reason = reason.to_owned();
        if self.cpus.states().get(id as usize) == Some(&VcpuState::Removing) {
            if let Err(e) = self.cpus.cancel_remove(id) {
                reason.push_str(&format!(" (and undoing failed: {e})"));
            }
        }
        self.fail(id, &reason);
    }

    fn set_removal(&mut self, id: u32, removal: Option<Removal>) {
        if let Some(slot) = self.removals.get_mut(id as usize) {
            *slot = removal;
        }
    }

    /// A line arrived from the guest agent.
    pub fn on_agent_line(&mut self, line: Option<Vec<u8>>) {
        self.flush_agent();
        let Some(msg) = self.agent.on_line(line) else {
            return;
        };
        match msg {
            GuestMessage::Ready { online, .. } => {
                // A (re)started agent: its old snapshot no longer holds.
                self.snapshot_at = None;
                self.snapshot_asked = None;
                for cpu in online {
                    self.on_guest_cpu(cpu, true);
                }
            }
            GuestMessage::Cpu {
                cpu,
                online,
                requested,
                ..
            } => {
                if !online && !requested {
                    log::warn!(
                        "guest: CPU {cpu} went offline without being asked (forced offline)"
                    );
                }
                self.on_guest_cpu(cpu, online);
            }
            GuestMessage::Prepared { cpu, ok, reason } => self.on_prepared(cpu, ok, reason),
            GuestMessage::Workers { .. } => self.snapshot_at = Some(Instant::now()),
            GuestMessage::Heartbeat => {}
            // Not acted on yet (the removal rework will): logged only.
            GuestMessage::Restored { cpu, ok, reason } => {
                log::info!(
                    "agent: CPU {cpu} restored after a cancelled removal: ok={ok} {reason:?}"
                );
            }
            GuestMessage::Fatal { reason } => {
                log::error!("agent: failed and powers the guest off: {reason:?}");
            }
        }
    }

    fn on_prepared(&mut self, cpu: u32, ok: bool, reason: Option<String>) {
        log::debug!("agent: CPU {cpu} prepared for removal: ok={ok} {reason:?}");
        self.last_prepared = Some(Instant::now());
        let phase = self.removals.get(cpu as usize).copied().flatten();
        if !matches!(phase, Some(Removal::Preparing(_))) {
            log::warn!("agent: unexpected prepared answer for CPU {cpu}");
            return;
        }
        if ok {
            // Ejected once no other prepare is pending (`pump_prepares`).
            self.set_removal(cpu, Some(Removal::Prepared));
        } else {
            let reason = reason.unwrap_or_else(|| "no reason given".into());
            self.abort_remove(
                cpu,
                &format!("the guest agent refused to offline it: {reason}"),
            );
        }
        self.pump_prepares(Instant::now());
    }

    /// The vCPU manager.
    pub fn cpus_mut(&mut self) -> &mut CpuManager {
        &mut self.cpus
    }

    /// Answers one control action.
    pub fn handle(&mut self, action: Action) -> Reply {
        match action {
            Action::GetVm => Reply::Vm(self.vm_info()),
            Action::GetVcpus => Reply::Vcpus(self.vcpu_list()),
            Action::GetOperation(id) => self.ops.reply(id),
            Action::GetMetrics => Reply::Metrics(self.metrics()),
            Action::GetWorkers => Reply::Workers(self.guest_workers()),
            Action::InjectFault { fault, cpu } => self.inject_fault(fault, cpu),
            Action::Resize { .. } | Action::AddVcpu(_) | Action::RemoveVcpu(_) => {
                self.mutate(action)
            }
        }
    }

    fn mutate(&mut self, action: Action) -> Reply {
        if self.stopping {
            return Reply::Error(ApiError::new(
                ErrorCode::Internal,
                "the VM is shutting down",
            ));
        }
        let states = self.cpus.states();
        let plan = match plan(action, &states) {
            Some(Ok(plan)) => plan,
            Some(Err(e)) => return Reply::Error(e),
            None => return Reply::Error(ApiError::new(ErrorCode::Internal, "not a mutation")),
        };
        let mutation = self.ops.track(&plan);
        let now = Instant::now();
        for &id in &plan.add {
            match self.cpus.begin_add(id) {
                Ok(()) => self.deadlines[id as usize] = Some(now),
                Err(e) => self.fail(id, &e.to_string()),
            }
        }
        for &id in &plan.remove {
            match self.start_remove(id, now) {
                Ok(()) => self.deadlines[id as usize] = Some(now),
                Err(e) => self.abort_remove(id, &e),
            }
        }
        self.resignal(&plan, &states, now);
        Reply::Mutation(mutation)
    }

    fn fail(&mut self, id: u32, reason: &str) {
        self.set_removal(id, None);
        log::warn!("vCPU {id}: {reason}");
        self.failures += 1;
        self.ops.vcpu_failed(id, reason);
        if let Some(d) = self.deadlines.get_mut(id as usize) {
            *d = None;
        }
    }

    fn done(&mut self, id: u32) {
        self.set_removal(id, None);
        self.ops.vcpu_done(id);
        if let Some(d) = self.deadlines.get_mut(id as usize) {
            *d = None;
        }
    }

    /// The guest ejected `id`.
    pub fn on_ejected(&mut self, id: u32) {
        match self.cpus.on_ejected(id) {
            Ok(true) => self.done(id),
            Ok(false) => {}
            Err(e) => self.fail(id, &format!("removal failed after the eject: {e}")),
        }
    }

    /// The guest's ACPI scan acknowledged inserting `id`.
    pub fn on_insert_acked(&mut self, id: u32) {
        log::debug!("vCPU {id}: the guest's ACPI scan acknowledged the insert");
        if !self.agent.connected() && self.cpus.confirm_add(id) {
            self.done(id);
        }
    }

    /// The guest reported CPU `id` online or offline.
    pub fn on_guest_cpu(&mut self, id: u32, online: bool) {
        if self.cpus.on_guest_online(id, online) {
            self.done(id);
        }
    }

    /// Fails adds and removals the guest has not completed in time. Returns
    /// how long until the next deadline, if any is pending.
    pub fn check_deadlines(&mut self) -> Option<Duration> {
        let now = Instant::now();
        self.flush_agent();
        let mut next: Option<Duration> = self.agent.silence_deadline();
        if self.agent.has_pending_output() {
            // The guest drains its FIFO within microseconds of the interrupt.
            next = Some(AGENT_FLUSH_INTERVAL);
        }
        // Agent prepare steps that got no answer: fall back to ACPI.
        for i in 0..self.removals.len() {
            let Some(Removal::Preparing(asked)) = self.removals[i] else {
                continue;
            };
            let id = u32::try_from(i).unwrap_or(u32::MAX);
            let since = self.last_prepared.map_or(asked, |t| t.max(asked));
            let waited = now.duration_since(since);
            if waited < AGENT_PREPARE_TIMEOUT && self.agent.connected() {
                let left = AGENT_PREPARE_TIMEOUT - waited;
                next = Some(next.map_or(left, |n| n.min(left)));
                continue;
            }
            self.ops.vcpu_note(
                id,
                "the guest agent did not answer the prepare request; used the plain ACPI eject",
            );
            self.diagnose(id, "the guest agent did not answer its prepare request");
            if let Err(e) = self.eject(id) {
                self.abort_remove(id, &e);
            }
        }
        self.pump_prepares(now);
        let states = self.cpus.states();
        for (i, started) in self.deadlines.clone().into_iter().enumerate() {
            let Some(started) = started else { continue };
            let id = u32::try_from(i).unwrap_or(u32::MAX);
            let limit = match states[i] {
                VcpuState::Adding => ADD_TIMEOUT,
                VcpuState::Removing => REMOVE_TIMEOUT,
                _ => {
                    self.deadlines[i] = None;
                    continue;
                }
            };
            let elapsed = now.duration_since(started);
            if elapsed < limit {
                let left = limit - elapsed;
                next = Some(next.map_or(left, |n| n.min(left)));
                continue;
            }
            let adding = states[i] == VcpuState::Adding;
            let withheld = self.removals[i] == Some(Removal::Withheld);
            let undo = if adding {
                self.cpus.cancel_add(id)
            } else {
                self.cpus.cancel_remove(id)
            };
            self.diagnose(id, "the guest did not answer in time");
            let mut reason = decide::timeout_reason(adding, limit, withheld);
            if let Err(e) = undo {
                reason.push_str(&format!(" (and undoing failed: {e})"));
            }
            self.fail(id, &reason);
        }
        next
    }

    /// Logs what every vCPU thread is doing and asks each for its guest
    /// state, so a guest that stopped answering can be diagnosed from the log.
    fn diagnose(&self, id: u32, what: &str) {
        log::warn!(
            "vCPU {id}: {what}; vCPU threads: {}",
            self.cpus.describe_threads()
        );
        self.cpus.request_dumps();
    }

    /// The VM is going down: every running operation fails.
    pub fn stop(&mut self) {
        self.stopping = true;
        self.ops.fail_all("the VM stopped");
    }

    /// Every vCPU, with its workers from the agent's last snapshot.
    fn vcpu_list(&self) -> VcpuList {
        let mut list = self.cpus.vcpu_list();
        self.agent.attach_guest_cpus(&mut list);
        let workers = self.snapshot_at.map(|_| self.agent.workers().0);
        decide::attach_workers(&mut list, workers);
        list
    }

    /// The guest's view; asks a connected agent for a fresh snapshot (at
    /// most every [`SNAPSHOT_REQUEST_INTERVAL`]) for the next call.
    fn guest_workers(&mut self) -> GuestWorkers {
        let now = Instant::now();
        let connected = self.agent.connected();
        if decide::wants_snapshot(
            connected,
            self.snapshot_asked,
            now,
            SNAPSHOT_REQUEST_INTERVAL,
        ) {
            self.snapshot_asked = Some(now);
            self.send_agent(&HostMessage::Snapshot);
        }
        let (workers, done) = self.agent.workers();
        let snapshot = self.snapshot_at.map(|at| Snapshot {
            workers,
            done,
            age: now.saturating_duration_since(at),
        });
        decide::workers_view(
            self.agent.connection_state(),
            self.agent.version(),
            snapshot,
        )
    }

    /// A test fault (`POST /api/v1/test/faults`).
    fn inject_fault(&mut self, fault: FaultKind, cpu: Option<u32>) -> Reply {
        if !self.test_hooks {
            return Reply::Error(ApiError::new(
                ErrorCode::NotFound,
                format!("no such path: {}", api::routes::TEST_FAULTS),
            ));
        }
        let max = self.removals.len();
        let step = match decide::fault_step(fault, cpu, max, self.agent.connected()) {
            Ok(step) => step,
            Err(e) => return Reply::Error(e),
        };
        let target = match step {
            FaultStep::WithholdRemoval(id) => {
                self.withhold_next_removal[id as usize] = true;
                FaultTarget::Vmm
            }
            FaultStep::Agent(msg) => {
                if !self.send_agent(&msg) {
                    return Reply::Error(ApiError::new(
                        ErrorCode::AgentUnavailable,
                        "the fault could not be queued for the guest agent (not reading ttyS1?)",
                    ));
                }
                FaultTarget::Agent
            }
        };
        log::warn!("test hook: fault {fault} (vCPU {cpu:?}) for the {target:?}");
        Reply::FaultInjected(FaultInjected { fault, cpu, target })
    }

    fn vm_info(&self) -> VmInfo {
        VmInfo {
            state: if self.stopping {
                VmState::Stopping
            } else {
                VmState::Running
            },
            boot_vcpus: self.facts.boot_vcpus,
            max_vcpus: u32::try_from(self.cpus.states().len()).unwrap_or(u32::MAX),
            present_vcpus: self.cpus.present_count(),
            memory_mib: self.facts.memory_mib,
            agent_connected: self.agent.connection_state(),
            agent_version: self.agent.version().map(str::to_owned),
        }
    }

    fn metrics(&self) -> VmmMetrics {
        let c = self.cpus.counters();
        VmmMetrics {
            hot_adds: c.hot_adds,
            hot_removes: c.hot_removes,
            hotplug_failures: self.failures,
            ignored_register_accesses: self.cpus.ignored_register_accesses(),
            vcpu_fds_created: c.vcpu_fds_created,
            vcpu_fds_reused: c.vcpu_fds_reused,
            agent_lines_dropped: self.agent.counters().dropped,
            agent_mailbox_corrupt: self.agent.mailbox_corrupt(),
        }
    }
}
