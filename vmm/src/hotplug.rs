//! Hotplug coordination on the VMM thread: turns API mutations into vCPU
//! manager steps, tracks them as operations, and completes those
//! operations from what the guest does (insert acknowledged, CPU online,
//! vCPU ejected).

use std::time::{Duration, Instant};

use api::{ApiError, ErrorCode, VmInfo, VmState};

use crate::control::{plan, Action, OperationTable, Reply, VmmMetrics};
use crate::cpu_manager::CpuManager;

/// How long the guest has to eject a vCPU before its removal fails (the
/// vCPU then stays present and usable; a later removal may succeed).
pub const REMOVE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the guest has to bring a hot-added vCPU online.
pub const ADD_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// Whether a guest agent confirms hot-adds (CPU online); without one,
    /// the guest's acknowledgement of the insertion completes an add.
    agent_connected: bool,
    stopping: bool,
}

impl Hotplug {
    /// A coordinator over a started vCPU manager.
    pub fn new(cpus: CpuManager, facts: VmFacts) -> Self {
        let n = cpus.states().len();
        Self {
            cpus,
            ops: OperationTable::new(),
            facts,
            failures: 0,
            deadlines: vec![None; n],
            agent_connected: false,
            stopping: false,
        }
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
            match self.cpus.begin_remove(id) {
                Ok(()) => self.deadlines[id as usize] = Some(now),
                Err(e) => self.fail(id, &e.to_string()),
            }
        }
        Reply::Mutation(mutation)
    }

    fn fail(&mut self, id: u32, reason: &str) {
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
        if !self.agent_connected && self.cpus.confirm_add(id) {
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
        let mut next: Option<Duration> = None;
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
            agent_connected: None,
            agent_version: None,
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
