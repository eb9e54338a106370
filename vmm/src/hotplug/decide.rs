//! Pure functions of the coordinator: which faults the test hooks accept,
//! and the guest's worker view.

use std::time::Duration;

use api::agent::{HostMessage, WorkerInfo};
use api::guest::cpu_work;
use api::{ApiError, ErrorCode, FaultKind, GuestWorker, GuestWorkers, VcpuList};

/// What an accepted test fault does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum FaultStep {
    /// Forward this message to the agent.
    Agent(HostMessage),
    /// Arm the one-shot `ignore_removal` hook for this vCPU.
    WithholdRemoval(u32),
    /// Arm the one-shot `ignore_eject` hook for this vCPU.
    WithholdEject(u32),
}

/// Checks a test fault against the VM (`max_vcpus` possible vCPUs) and the
/// agent, and says what to do; `add_timeout` sizes `agent_delay_report`'s
/// delay (past it).
pub(super) fn fault_step(
    fault: FaultKind,
    cpu: Option<u32>,
    max_vcpus: usize,
    agent_connected: bool,
    add_timeout: Duration,
) -> Result<FaultStep, ApiError> {
    if let Some(id) = cpu.filter(|&id| id as usize >= max_vcpus) {
        return Err(ApiError::new(
            ErrorCode::VcpuNotFound,
            format!(
                "no vCPU {id}: ids go from 0 to {}",
                max_vcpus.saturating_sub(1)
            ),
        ));
    }
    let Some(agent_fault) = fault.agent_fault() else {
        return match cpu {
            None => Err(ApiError::new(
                ErrorCode::MalformedRequest,
                format!("`cpu` is required for {fault}"),
            )),
            Some(0) => Err(ApiError::new(
                ErrorCode::Vcpu0NotRemovable,
                "vCPU 0 cannot be removed, so there is no removal to ignore",
            )),
            Some(id) if fault == FaultKind::IgnoreEject => Ok(FaultStep::WithholdEject(id)),
            Some(id) => Ok(FaultStep::WithholdRemoval(id)),
        };
    };
    if fault.needs_cpu() && cpu.is_none() {
        return Err(ApiError::new(
            ErrorCode::MalformedRequest,
            format!("`cpu` is required for {fault}"),
        ));
    }
    if !agent_connected {
        return Err(ApiError::new(
            ErrorCode::AgentUnavailable,
            format!("{fault} is carried out by the guest agent, and none is connected"),
        ));
    }
    let ms = (fault == FaultKind::AgentDelayReport).then(|| {
        let past = add_timeout + Duration::from_secs(3);
        u64::try_from(past.as_millis()).unwrap_or(u64::MAX)
    });
    Ok(FaultStep::Agent(HostMessage::Fault {
        fault: agent_fault,
        cpu,
        ms,
    }))
}

/// The agent's last snapshot, and how old it is.
#[derive(Debug, Clone, Copy)]
pub(super) struct Snapshot<'a> {
    /// Every worker thread.
    pub workers: &'a [WorkerInfo],
    /// (CPU, items done).
    pub done: &'a [(u32, u64)],
    /// Since it arrived.
    pub age: Duration,
}

/// The answer to `GET /api/v1/guest/workers`.
pub(super) fn workers_view(
    agent_connected: Option<bool>,
    agent_version: Option<&str>,
    snapshot: Option<Snapshot<'_>>,
) -> GuestWorkers {
    let mut view = GuestWorkers::unknown();
    view.agent_connected = agent_connected;
    view.agent_version = agent_version.map(str::to_owned);
    if let Some(s) = snapshot {
        view.snapshot_age_ms = Some(u64::try_from(s.age.as_millis()).unwrap_or(u64::MAX));
        view.workers = s.workers.iter().map(GuestWorker::from).collect();
        view.work = cpu_work(s.done);
    }
    view
}

/// Lists each vCPU's workers from the snapshot, if there is one (else the
/// field stays absent: unknown).
pub(super) fn attach_workers(list: &mut VcpuList, workers: Option<&[WorkerInfo]>) {
    let Some(workers) = workers else { return };
    for vcpu in &mut list.vcpus {
        vcpu.workers = Some(
            workers
                .iter()
                .filter(|w| w.cpu == vcpu.id)
                .map(GuestWorker::from)
                .collect(),
        );
    }
}

#[cfg(test)]
mod tests {
    use api::agent::Fault;
    use api::{VcpuInfo, VcpuState};
    use VcpuState::{Absent as A, Present as P};

    use super::*;

    fn step(
        fault: FaultKind,
        cpu: Option<u32>,
        max: usize,
        agent: bool,
    ) -> Result<FaultStep, ApiError> {
        fault_step(fault, cpu, max, agent, Duration::from_secs(5))
    }

    #[test]
    fn faults_are_checked() {
        assert_eq!(
            step(FaultKind::IgnoreEject, Some(2), 4, true),
            Ok(FaultStep::WithholdEject(2))
        );
        assert_eq!(
            step(FaultKind::AgentDelayReport, None, 4, true),
            Ok(FaultStep::Agent(HostMessage::Fault {
                fault: Fault::DelayReport,
                cpu: None,
                ms: Some(8000)
            }))
        );
        let code = |r: Result<FaultStep, ApiError>| r.unwrap_err().code;
        assert_eq!(
            step(FaultKind::IgnoreRemoval, Some(3), 4, false),
            Ok(FaultStep::WithholdRemoval(3))
        );
        assert_eq!(
            code(step(FaultKind::IgnoreRemoval, Some(4), 4, true)),
            ErrorCode::VcpuNotFound
        );
        assert_eq!(
            code(step(FaultKind::IgnoreRemoval, Some(0), 4, true)),
            ErrorCode::Vcpu0NotRemovable
        );
        assert_eq!(
            code(step(FaultKind::IgnoreRemoval, None, 4, true)),
            ErrorCode::MalformedRequest
        );
        assert_eq!(
            code(step(FaultKind::AgentRefuseOffline, Some(1), 4, false)),
            ErrorCode::AgentUnavailable
        );
        assert_eq!(
            code(step(FaultKind::AgentForceOffline, None, 4, true)),
            ErrorCode::MalformedRequest
        );
        assert_eq!(
            step(FaultKind::AgentForceOffline, Some(1), 4, true),
            Ok(FaultStep::Agent(HostMessage::Fault {
                fault: Fault::ForceOffline,
                cpu: Some(1),
                ms: None
            }))
        );
        assert_eq!(
            step(FaultKind::AgentSilence, None, 4, true),
            Ok(FaultStep::Agent(HostMessage::Fault {
                fault: Fault::Silence,
                cpu: None,
                ms: None
            }))
        );
        assert_eq!(
            code(step(FaultKind::AgentSilence, None, 4, false)),
            ErrorCode::AgentUnavailable
        );
        assert_eq!(ErrorCode::AgentUnavailable.status(), 409);
    }

    fn worker(cpu: u32, status: &str) -> WorkerInfo {
        WorkerInfo {
            descriptor: format!("w{cpu}"),
            cpu,
            status: status.into(),
            last_cpu: Some(cpu),
            counts: [1, 0, 0, 5],
        }
    }

    #[test]
    fn worker_views() {
        let unknown = workers_view(None, None, None);
        assert_eq!(unknown, GuestWorkers::unknown());
        let workers = [worker(0, "active"), worker(1, "parked")];
        let view = workers_view(
            Some(true),
            Some("0.1"),
            Some(Snapshot {
                workers: &workers,
                done: &[(0, 10), (1, 2)],
                age: Duration::from_millis(120),
            }),
        );
        assert_eq!(view.agent_version.as_deref(), Some("0.1"));
        assert_eq!(view.snapshot_age_ms, Some(120));
        assert_eq!(view.workers.len(), 2);
        assert_eq!(view.workers[1].status, "parked");
        assert_eq!(view.items_done(0), Some(10));

        let vcpu = |id, state| VcpuInfo {
            id,
            state,
            guest_online: None,
            guest_cpu: None,
            workers: None,
        };
        let mut list = VcpuList {
            max_vcpus: 3,
            vcpus: vec![vcpu(0, P), vcpu(1, P), vcpu(2, A)],
        };
        attach_workers(&mut list, None);
        assert!(list.vcpus.iter().all(|v| v.workers.is_none()));
        attach_workers(&mut list, Some(&workers));
        let names = |i: usize| -> Vec<String> {
            let ws = list.vcpus[i].workers.as_ref().unwrap();
            ws.iter().map(|w| w.descriptor.clone()).collect()
        };
        assert_eq!(names(0), vec!["w0"]);
        assert_eq!(names(1), vec!["w1"]);
        assert!(names(2).is_empty());
    }
}
