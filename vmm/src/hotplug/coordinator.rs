//! The coordinator: mutations, operations, the record table, and what the
//! guest reports. Removals are in `removal.rs`, deadlines in `timeouts.rs`.

use std::collections::BTreeSet;
use std::time::Instant;

use api::agent::GuestMessage;
use api::{ApiError, ErrorCode, FaultInjected, FaultKind, FaultTarget};

use super::decide::{self, FaultStep};
use super::machine::Machine;
use super::record::{Lifecycle, Records};
use super::session::AgentSession;
use super::workload::WorkloadTracker;
use super::Timeouts;
use crate::control::{plan, respond, Change, Mutation, OperationTable, Query, Request};
use crate::VcpuId;

/// Static facts about the VM for `GET /api/v1/vm`.
#[derive(Clone, Copy, Debug)]
pub struct VmFacts {
    /// vCPUs at boot.
    pub boot_vcpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
}

/// What the guest did, as the VMM thread learns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestEvent {
    /// The guest's ACPI scan acknowledged inserting this vCPU.
    InsertAcked(VcpuId),
    /// The guest ejected this vCPU (`_EJ0`), as the register block allowed.
    Ejected(VcpuId),
    /// The guest tried to eject this vCPU, and the register block refused
    /// (no removal pending).
    EjectRefused(VcpuId),
    /// A line from the guest agent (`None`: an oversized line was dropped).
    AgentLine(Option<Vec<u8>>),
}

/// Counters the coordinator keeps.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Counters {
    pub hot_adds: u64,
    pub hot_removes: u64,
    pub failures: u64,
    pub repeated: u64,
}

/// The coordinator (see the module docs of `hotplug`).
#[derive(Debug)]
pub struct Coordinator<M: Machine> {
    pub(super) machine: M,
    pub(super) records: Records,
    pub(super) ops: OperationTable,
    pub(super) session: AgentSession,
    pub(super) facts: VmFacts,
    pub(super) timeouts: Timeouts,
    pub(super) counters: Counters,
    pub(super) test_hooks: bool,
    /// vCPUs whose next removal the `ignore_removal` hook withholds.
    pub(super) withhold: BTreeSet<VcpuId>,
    /// vCPUs whose next eject request the `ignore_eject` hook withholds.
    pub(super) withhold_eject: BTreeSet<VcpuId>,
    /// vCPUs whose eject request was withdrawn after the guest had seen
    /// it: a late eject of one means the guest removed it after all.
    pub(super) late_eject_ok: BTreeSet<VcpuId>,
    /// The agent said it failed (before powering the guest off).
    pub(super) agent_failure: Option<String>,
    /// Guest events the event queue dropped (set by the event loop).
    pub(super) events_dropped: u64,
    /// Guest RAM, to tell the VMM's own memory from the guest's.
    pub(super) guest_ram: Option<crate::memory::GuestRam>,
    /// The process's own figures for the metrics.
    pub(super) probe: crate::procstat::ProcessProbe,
    pub(super) stopping: bool,
    /// The user's workload, if the agent runs one.
    pub(super) workload: WorkloadTracker,
}

impl<M: Machine> Coordinator<M> {
    /// A coordinator over `machine`, whose first `facts.boot_vcpus` vCPUs
    /// are running.
    pub fn new(machine: M, max_vcpus: u32, facts: VmFacts, session: AgentSession) -> Self {
        let mut records = Records::new(max_vcpus);
        for id in VcpuId::all(facts.boot_vcpus.min(max_vcpus)) {
            if let Some(r) = records.get_mut(id) {
                r.life = Lifecycle::Present;
            }
        }
        Self {
            machine,
            records,
            ops: OperationTable::new(),
            session,
            facts,
            timeouts: Timeouts::default(),
            counters: Counters::default(),
            test_hooks: false,
            withhold: BTreeSet::new(),
            withhold_eject: BTreeSet::new(),
            late_eject_ok: BTreeSet::new(),
            agent_failure: None,
            events_dropped: 0,
            guest_ram: None,
            probe: crate::procstat::ProcessProbe::open(),
            stopping: false,
            workload: WorkloadTracker::default(),
        }
    }

    /// Uses `timeouts` instead of the defaults.
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// Reports the guest's share of the process's memory from `ram`.
    pub fn with_guest_ram(mut self, ram: crate::memory::GuestRam) -> Self {
        self.guest_ram = Some(ram);
        self
    }

    /// Honours the test hooks (`--test-hooks`); off by default, when
    /// [`Request::InjectFault`] answers `not_found` like an unknown path.
    pub fn with_test_hooks(mut self, on: bool) -> Self {
        self.test_hooks = on;
        self
    }

    /// The machinery (for shutdown).
    pub fn machine_mut(&mut self) -> &mut M {
        &mut self.machine
    }

    /// The records (tests, diagnostics).
    pub fn records(&self) -> &Records {
        &self.records
    }

    /// Why the agent said it failed, if it did.
    pub fn agent_failure(&self) -> Option<&str> {
        self.agent_failure.as_deref()
    }

    /// The user's workload (its output's writer, flushed at exit).
    pub fn workload_mut(&mut self) -> &mut WorkloadTracker {
        &mut self.workload
    }

    /// Guest events dropped so far by the event queue (for the metrics).
    pub fn set_events_dropped(&mut self, n: u64) {
        self.events_dropped = n;
    }

    /// Answers one control request.
    pub fn handle(&mut self, request: Request, now: Instant) {
        match request {
            Request::Query(q) => self.answer(q, now),
            Request::Mutate { change, reply } => respond(reply, self.mutate(change, now)),
            Request::InjectFault { fault, cpu, reply } => {
                respond(reply, self.inject_fault(fault, cpu, now));
            }
        }
    }

    fn answer(&mut self, query: Query, now: Instant) {
        match query {
            Query::Vm(reply) => respond(reply, self.vm_info(now)),
            Query::Vcpus(reply) => respond(reply, self.vcpu_list()),
            Query::Operation { id, reply } => respond(reply, self.ops.get(id)),
            Query::Metrics(reply) => respond(reply, self.metrics()),
            Query::Workers(reply) => {
                self.session.maybe_ask_snapshot(now);
                respond(reply, self.guest_workers(now));
            }
        }
    }

    /// Plans `change`, records its operation and starts it.
    pub fn mutate(&mut self, change: Change, now: Instant) -> Result<Mutation, ApiError> {
        if self.stopping {
            return Err(ApiError::new(
                ErrorCode::Internal,
                "the VM is shutting down",
            ));
        }
        self.retry_stuck(now);
        let states = self.records.states();
        let plan = plan(change, &states)?;
        let mutation = self.ops.track(&plan, now);
        let repeated: Vec<u32> = plan
            .wait_for
            .iter()
            .copied()
            .filter(|id| !plan.add.contains(id) && !plan.remove.contains(id))
            .collect();
        if !repeated.is_empty() {
            self.counters.repeated += 1;
        }
        for id in repeated.into_iter().map(VcpuId::new) {
            if let Some(r) = self.records.get_mut(id) {
                r.repeats = r.repeats.saturating_add(1);
            }
            if matches!(change, Change::Remove(_)) {
                self.repeat_removal(id, now);
            }
        }
        for id in plan.add.iter().copied().map(VcpuId::new) {
            self.start_add(id, now);
        }
        for id in plan.remove.iter().copied().map(VcpuId::new) {
            self.start_remove(id, now);
        }
        self.pump_prepares(now);
        Ok(mutation)
    }

    fn start_add(&mut self, id: VcpuId, now: Instant) {
        self.late_eject_ok.remove(&id);
        match self.machine.begin_add(id) {
            Ok(()) => {
                if let Some(r) = self.records.get_mut(id) {
                    r.life = Lifecycle::Adding {
                        since: now,
                        acked: false,
                    };
                    r.forget_guest();
                    r.repeats = 0;
                }
                log::info!("vCPU {id}: hot-add started");
            }
            Err(e) => self.fail(id, &e.to_string()),
        }
    }

    /// Retries the join of every stuck vCPU; one that stops is absent again.
    fn retry_stuck(&mut self, now: Instant) {
        let stuck: Vec<VcpuId> = self
            .records
            .iter()
            .filter(|r| matches!(r.life, Lifecycle::Stuck { .. }))
            .map(|r| r.id)
            .collect();
        for id in stuck {
            match self.machine.stop(id) {
                Ok(()) => {
                    log::info!("vCPU {id}: its thread stopped on retry; absent again");
                    self.set_absent(id);
                }
                Err(e) => log::warn!("vCPU {id}: still stuck at {now:?}: {e}"),
            }
        }
    }

    /// Stops `id`'s thread for good (after an eject, or undoing an add):
    /// absent, or stuck if the thread does not stop. Returns whether it
    /// stopped.
    pub(super) fn retire(&mut self, id: VcpuId, now: Instant) -> bool {
        match self.machine.stop(id) {
            Ok(()) => {
                self.set_absent(id);
                true
            }
            Err(e) => {
                if let Some(r) = self.records.get_mut(id) {
                    r.life = Lifecycle::Stuck { since: now };
                }
                self.machine.diagnose(id, "its thread did not stop");
                self.fail(
                    id,
                    &format!("its thread did not stop ({e}); it is stuck until a later request"),
                );
                false
            }
        }
    }

    fn set_absent(&mut self, id: VcpuId) {
        if let Some(r) = self.records.get_mut(id) {
            r.life = Lifecycle::Absent;
            r.forget_guest();
            r.repeats = 0;
        }
    }

    /// Every operation waiting for `id` fails with `reason`.
    pub(super) fn fail(&mut self, id: VcpuId, reason: &str) {
        log::warn!("vCPU {id}: {reason}");
        if self.ops.waits_for(id.get()) {
            self.counters.failures += 1;
        }
        self.ops.vcpu_failed(id.get(), reason);
    }

    /// Every operation waiting for `id` advances.
    pub(super) fn done(&mut self, id: VcpuId) {
        self.ops.vcpu_done(id.get());
    }

    /// Something the guest did.
    pub fn on_event(&mut self, event: GuestEvent, now: Instant) {
        match event {
            GuestEvent::InsertAcked(id) => self.on_insert_acked(id, now),
            GuestEvent::Ejected(id) => self.on_ejected(id, now),
            GuestEvent::EjectRefused(id) => self.on_eject_refused(id, now),
            GuestEvent::AgentLine(line) => {
                if let Some(msg) = self.session.on_line(line, now) {
                    self.on_agent_message(msg, now);
                }
            }
        }
    }

    fn on_insert_acked(&mut self, id: VcpuId, now: Instant) {
        log::debug!("vCPU {id}: the guest's ACPI scan acknowledged the insert");
        let agent = self.session.connected(now);
        let Some(r) = self.records.get_mut(id) else {
            return;
        };
        if let Lifecycle::Adding { since, .. } = r.life {
            if agent {
                r.life = Lifecycle::Adding { since, acked: true };
            } else {
                r.life = Lifecycle::Present;
                self.counters.hot_adds += 1;
                log::info!("vCPU {id}: added (insertion acknowledged; no agent to confirm online)");
                self.ops.vcpu_note(
                    id.get(),
                    "no guest agent connected: completed on the guest's insert acknowledgement",
                );
                self.done(id);
            }
        }
    }

    fn on_agent_message(&mut self, msg: GuestMessage, now: Instant) {
        match msg {
            GuestMessage::Ready { online, cpus, .. } => {
                for (vcpu, logical) in cpus {
                    if let Some(r) = self.records.get_mut(VcpuId::new(vcpu)) {
                        r.guest_cpu = Some(logical);
                    }
                }
                for vcpu in online {
                    self.on_guest_cpu(VcpuId::new(vcpu), None, true, now);
                }
            }
            GuestMessage::Cpu {
                cpu,
                logical,
                online,
                requested,
            } => {
                if !online && !requested {
                    log::warn!("guest: vCPU {cpu} went offline without being asked");
                }
                self.on_guest_cpu(VcpuId::new(cpu), logical, online, now);
            }
            GuestMessage::Prepared { cpu, ok, reason } => {
                self.on_prepared(VcpuId::new(cpu), ok, reason);
            }
            GuestMessage::Restored { cpu, ok, reason } => {
                self.on_restored(VcpuId::new(cpu), ok, reason);
            }
            GuestMessage::Fatal { reason } => {
                log::error!("guest agent failed: {}", reason.escape_debug());
                self.agent_failure = Some(reason);
            }
            GuestMessage::Stopping { reason } => {
                // The session counts it gone; what waits on it now ends by
                // its own deadline, and new requests take the no-agent path.
                log::info!("guest agent stopping: {}", reason.escape_debug());
            }
            GuestMessage::Workers { .. } | GuestMessage::Heartbeat => {}
            workload @ (GuestMessage::WorkloadStarted { .. }
            | GuestMessage::WorkloadOutput { .. }
            | GuestMessage::WorkloadExit { .. }
            | GuestMessage::WorkloadFailed { .. }) => {
                self.workload.on_message(workload, &mut self.session);
            }
        }
        self.pump_prepares(now);
    }

    /// The guest reported `id` online or offline.
    fn on_guest_cpu(&mut self, id: VcpuId, logical: Option<u32>, online: bool, _now: Instant) {
        if let Some(l) = logical {
            // Linux gives a number to one CPU at a time: whoever had it is gone.
            if let Some(other) = self.records.by_guest_cpu(l).filter(|&o| o != id) {
                if let Some(r) = self.records.get_mut(other) {
                    r.guest_cpu = None;
                }
            }
        }
        let Some(r) = self.records.get_mut(id) else {
            log::warn!("guest: report for vCPU {id}, which does not exist");
            return;
        };
        if logical.is_some() {
            r.guest_cpu = logical;
        }
        r.guest_online = Some(online);
        if online && matches!(r.life, Lifecycle::Adding { .. }) {
            r.life = Lifecycle::Present;
            self.counters.hot_adds += 1;
            log::info!("vCPU {id}: added (guest online)");
            self.done(id);
        }
    }

    /// The VM is going down: every running operation fails.
    pub fn stop(&mut self) {
        self.stopping = true;
        self.ops.fail_all("the VM stopped");
    }

    fn inject_fault(
        &mut self,
        fault: FaultKind,
        cpu: Option<u32>,
        now: Instant,
    ) -> Result<FaultInjected, ApiError> {
        if !self.test_hooks {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("no such path: {}", api::routes::TEST_FAULTS),
            ));
        }
        let max = self.records.max() as usize;
        let connected = self.session.connected(now);
        let add_timeout = self.timeouts.add;
        let target = match decide::fault_step(fault, cpu, max, connected, add_timeout)? {
            FaultStep::WithholdRemoval(id) => {
                self.withhold.insert(VcpuId::new(id));
                FaultTarget::Vmm
            }
            FaultStep::WithholdEject(id) => {
                self.withhold_eject.insert(VcpuId::new(id));
                FaultTarget::Vmm
            }
            FaultStep::Agent(msg) => {
                if !self.session.send(&msg) {
                    return Err(ApiError::new(
                        ErrorCode::AgentUnavailable,
                        "the fault could not be queued for the guest agent (not reading ttyS1?)",
                    ));
                }
                FaultTarget::Agent
            }
        };
        log::warn!("test hook: fault {fault} (vCPU {cpu:?}) for the {target:?}");
        Ok(FaultInjected { fault, cpu, target })
    }
}
