//! Hotplug coordination on the VMM thread: turns API mutations into vCPU
//! manager steps, tracks them as operations, and completes those
//! operations from what the guest does (insert acknowledged, CPU online,
//! vCPU ejected).

use std::time::{Duration, Instant};

use std::sync::{Arc, Mutex};

use api::agent::{GuestMessage, HostMessage};
use api::{ApiError, ErrorCode, VmInfo, VmState};

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
pub const AGENT_PREPARE_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// vCPU -> when the agent was asked to prepare its removal.
    preparing: Vec<Option<Instant>>,
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
            preparing: vec![None; n],
            stopping: false,
        }
    }

    /// The agent link.
    pub fn agent(&self) -> &AgentLink {
        &self.agent
    }

    fn send_agent(&mut self, msg: &HostMessage) -> bool {
        let uart = self.agent_uart.clone();
        self.agent.send(msg, |b| lock(&uart).enqueue_input(b))
    }

    /// Starts removing `id`: through the agent when one is connected (it
    /// parks the CPU's workers and offlines it, then the ACPI eject
    /// follows), else through the ACPI eject alone.
    fn start_remove(&mut self, id: u32, now: Instant) -> Result<(), String> {
        if self.agent.connected() {
            self.cpus.reserve_remove(id).map_err(|e| e.to_string())?;
            if self.send_agent(&HostMessage::PrepareRemove { cpu: id }) {
                self.preparing[id as usize] = Some(now);
                return Ok(());
            }
            self.ops.vcpu_note(
                id,
                "the agent could not be reached; used the plain ACPI eject",
            );
            return self.cpus.signal_remove(id).map_err(|e| e.to_string());
        }
        self.ops
            .vcpu_note(id, "no guest agent connected; used the plain ACPI eject");
        self.cpus.begin_remove(id).map_err(|e| e.to_string())
    }

    /// A line arrived from the guest agent.
    pub fn on_agent_line(&mut self, line: Option<Vec<u8>>) {
        let Some(msg) = self.agent.on_line(line) else {
            return;
        };
        match msg {
            GuestMessage::Ready { online, .. } => {
                for cpu in online {
                    self.on_guest_cpu(cpu, true);
                }
            }
            GuestMessage::Cpu {
                cpu,
                online,
                requested,
            } => {
                if !online && !requested {
                    log::warn!(
                        "guest: CPU {cpu} went offline without being asked (forced offline)"
                    );
                }
                self.on_guest_cpu(cpu, online);
            }
            GuestMessage::Prepared { cpu, ok, reason } => self.on_prepared(cpu, ok, reason),
            GuestMessage::Heartbeat | GuestMessage::Workers { .. } => {}
        }
    }

    fn on_prepared(&mut self, cpu: u32, ok: bool, reason: Option<String>) {
        let Some(slot) = self.preparing.get_mut(cpu as usize) else {
            return;
        };
        if slot.take().is_none() {
            log::warn!("agent: unexpected prepared answer for CPU {cpu}");
            return;
        }
        if ok {
            if let Err(e) = self.cpus.signal_remove(cpu) {
                self.fail(cpu, &e.to_string());
            }
            return;
        }
        let reason = reason.unwrap_or_else(|| "no reason given".into());
        let undo = self.cpus.cancel_remove(cpu);
        let mut msg = format!("the guest agent refused to offline it: {reason}");
        if let Err(e) = undo {
            msg.push_str(&format!(" (and undoing failed: {e})"));
        }
        self.fail(cpu, &msg);
    }

    /// The vCPU manager.
    pub fn cpus_mut(&mut self) -> &mut CpuManager {
        &mut self.cpus
    }

    /// Answers one control action.
    pub fn handle(&mut self, action: Action) -> Reply {
        match action {
            Action::GetVm => Reply::Vm(self.vm_info()),
            Action::GetVcpus => Reply::Vcpus(self.cpus.vcpu_list()),
            Action::GetOperation(id) => self.ops.reply(id),
            Action::GetMetrics => Reply::Metrics(self.metrics()),
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
        let plan = match plan(action, &self.cpus.states()) {
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
                Err(e) => self.fail(id, &e),
            }
        }
        Reply::Mutation(mutation)
    }

    fn fail(&mut self, id: u32, reason: &str) {
        if let Some(p) = self.preparing.get_mut(id as usize) {
            *p = None;
        }
        log::warn!("vCPU {id}: {reason}");
        self.failures += 1;
        self.ops.vcpu_failed(id, reason);
        if let Some(d) = self.deadlines.get_mut(id as usize) {
            *d = None;
        }
    }

    fn done(&mut self, id: u32) {
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
        let mut next: Option<Duration> = self.agent.silence_deadline();
        // Agent prepare steps that got no answer: fall back to ACPI.
        for i in 0..self.preparing.len() {
            let Some(asked) = self.preparing[i] else {
                continue;
            };
            let id = u32::try_from(i).unwrap_or(u32::MAX);
            let waited = now.duration_since(asked);
            if waited < AGENT_PREPARE_TIMEOUT && self.agent.connected() {
                let left = AGENT_PREPARE_TIMEOUT - waited;
                next = Some(next.map_or(left, |n| n.min(left)));
                continue;
            }
            self.preparing[i] = None;
            self.ops.vcpu_note(
                id,
                "the guest agent did not answer the prepare request; used the plain ACPI eject",
            );
            if let Err(e) = self.cpus.signal_remove(id) {
                self.fail(id, &e.to_string());
            }
        }
        let states = self.cpus.states();
        for (i, started) in self.deadlines.clone().into_iter().enumerate() {
            let Some(started) = started else { continue };
            let id = u32::try_from(i).unwrap_or(u32::MAX);
            let limit = match states[i] {
                api::VcpuState::Adding => ADD_TIMEOUT,
                api::VcpuState::Removing => REMOVE_TIMEOUT,
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
            let undo = if states[i] == api::VcpuState::Adding {
                self.cpus.cancel_add(id)
            } else {
                self.cpus.cancel_remove(id)
            };
            let what = if states[i] == api::VcpuState::Adding {
                "bring it online"
            } else {
                "eject it; it stays present"
            };
            let mut reason = format!("the guest did not {what} within {}s", limit.as_secs());
            if let Err(e) = undo {
                reason.push_str(&format!(" (and undoing failed: {e})"));
            }
            self.fail(id, &reason);
        }
        next
    }

    /// The VM is going down: every running operation fails.
    pub fn stop(&mut self) {
        self.stopping = true;
        self.ops.fail_all("the VM stopped");
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
        }
    }
}
