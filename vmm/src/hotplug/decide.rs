//! The coordinator's decisions as pure functions of its state, so they are
//! tested without KVM: how a removal reaches the guest (and reaches it
//! again), which faults the test hooks accept, what a timeout says, and
//! the guest's worker view.

use std::time::{Duration, Instant};

use api::agent::{HostMessage, WorkerInfo};
use api::guest::cpu_work;
use api::{
    ApiError, ErrorCode, FaultKind, GuestWorker, GuestWorkers, OperationKind, VcpuList, VcpuState,
};

use crate::control::Plan;

/// Where a vCPU's removal stands with the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Removal {
    /// Waiting for its turn with the agent: at most
    /// [`super::PREPARES_IN_FLIGHT`] prepare requests are out at once.
    Queued,
    /// Reserved, but the guest was never told (the `ignore_removal` hook).
    Withheld,
    /// The agent was asked to prepare the CPU (park its workers, offline
    /// it) at this time; the ACPI eject follows its answer.
    Preparing(Instant),
    /// The agent prepared it (workers parked, CPU offline); its ACPI eject
    /// waits until no other prepare is pending, so that the guest's eject
    /// work never contends with the agent's next offline.
    Prepared,
    /// The ACPI eject was requested.
    Ejecting,
}

/// How a removal request goes to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    /// It does not (the `ignore_removal` hook).
    Withhold,
    /// Through the agent's prepare step, then the ACPI eject.
    Agent,
    /// Through the plain ACPI eject.
    Acpi,
}

/// How a new removal goes to the guest.
pub(super) fn first_route(agent_connected: bool, withhold: bool) -> Route {
    if withhold {
        Route::Withhold
    } else if agent_connected {
        Route::Agent
    } else {
        Route::Acpi
    }
}

/// How a removal in flight is sent again when the client asks again;
/// `None` while the agent is preparing it (its answer is awaited).
pub(super) fn resend_route(phase: Option<Removal>, agent_connected: bool) -> Option<Route> {
    match phase {
        Some(Removal::Preparing(_) | Removal::Queued | Removal::Prepared) => None,
        // The guest never heard of it: the whole request, as a new one.
        Some(Removal::Withheld) | None => Some(first_route(agent_connected, false)),
        // The agent (if any) already prepared it: the eject again.
        Some(Removal::Ejecting) => Some(Route::Acpi),
    }
}

/// The vCPUs already being removed that a `DELETE` asks to remove again:
/// those a remove plan waits for without starting them (`states` as they
/// were when the plan was made). Resizes only wait: a client polling with
/// the same resize must not keep re-sending the request (nor keep
/// extending its deadline).
pub(super) fn resignal_targets(plan: &Plan, states: &[VcpuState]) -> Vec<u32> {
    if plan.kind != OperationKind::Remove {
        return Vec::new();
    }
    plan.wait_for
        .iter()
        .copied()
        .filter(|id| !plan.remove.contains(id))
        .filter(|&id| states.get(id as usize) == Some(&VcpuState::Removing))
        .collect()
}

/// What an accepted test fault does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum FaultStep {
    /// Forward this message to the agent.
    Agent(HostMessage),
    /// Arm the one-shot `ignore_removal` hook for this vCPU.
    WithholdRemoval(u32),
}

/// Checks a test fault against the VM (`max_vcpus` possible vCPUs) and the
/// agent, and says what to do.
pub(super) fn fault_step(
    fault: FaultKind,
    cpu: Option<u32>,
    max_vcpus: usize,
    agent_connected: bool,
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
    Ok(FaultStep::Agent(HostMessage::Fault {
        fault: agent_fault,
        cpu,
        ms: None,
    }))
}

/// Why an add or removal the guest did not complete within `limit` failed,
/// and where that leaves the vCPU.
pub(super) fn timeout_reason(adding: bool, limit: Duration, withheld: bool) -> String {
    let secs = limit.as_secs();
    let mut reason = if adding {
        format!(
            "the guest did not bring it online within {secs} s; \
             the hot-add was cancelled and the vCPU is absent again"
        )
    } else {
        format!(
            "the guest did not eject it within {secs} s; \
             the removal was cancelled and the vCPU stays present"
        )
    };
    if withheld {
        reason.push_str(" (the ignore_removal test hook kept the request from the guest)");
    }
    reason
}

/// Whether to ask a connected agent for a fresh snapshot now, at most once
/// per `interval`.
pub(super) fn wants_snapshot(
    agent_connected: bool,
    last_asked: Option<Instant>,
    now: Instant,
    interval: Duration,
) -> bool {
    agent_connected && last_asked.is_none_or(|t| now.saturating_duration_since(t) >= interval)
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
    use api::VcpuInfo;
    use VcpuState::{Absent as A, Adding as D, Present as P, Removing as R};

    use super::*;
    use crate::control::{plan, Action};

    fn planned(action: Action, states: &[VcpuState]) -> Plan {
        plan(action, states).unwrap().unwrap()
    }

    #[test]
    fn removal_routes() {
        assert_eq!(first_route(true, true), Route::Withhold);
        assert_eq!(first_route(false, true), Route::Withhold);
        assert_eq!(first_route(true, false), Route::Agent);
        assert_eq!(first_route(false, false), Route::Acpi);
        let now = Instant::now();
        assert_eq!(resend_route(Some(Removal::Preparing(now)), true), None);
        assert_eq!(resend_route(Some(Removal::Preparing(now)), false), None);
        assert_eq!(resend_route(Some(Removal::Queued), true), None);
        // A withheld removal is sent for real: via the agent when connected.
        assert_eq!(
            resend_route(Some(Removal::Withheld), true),
            Some(Route::Agent)
        );
        assert_eq!(
            resend_route(Some(Removal::Withheld), false),
            Some(Route::Acpi)
        );
        // Already ejecting (prepared or not): the eject again.
        assert_eq!(
            resend_route(Some(Removal::Ejecting), true),
            Some(Route::Acpi)
        );
        assert_eq!(resend_route(None, false), Some(Route::Acpi));
    }

    #[test]
    fn repeated_removals_are_resignalled() {
        let states = [P, P, R, P];
        // DELETE of a vCPU being removed: ask again.
        assert_eq!(
            resignal_targets(&planned(Action::RemoveVcpu(2), &states), &states),
            vec![2]
        );
        // A fresh removal is started, not resignalled.
        assert!(resignal_targets(&planned(Action::RemoveVcpu(3), &states), &states).is_empty());
        // Removing an absent vCPU changes nothing.
        let states_a = [P, A];
        assert!(resignal_targets(&planned(Action::RemoveVcpu(1), &states_a), &states_a).is_empty());
        // Resizes only wait for removals in flight, whichever way they go.
        for desired in [2, 3] {
            let p = planned(Action::Resize { desired }, &states);
            assert!(p.wait_for.contains(&2));
            assert!(resignal_targets(&p, &states).is_empty(), "{desired}");
        }
        // Adds never resignal removals.
        let adding = [P, D, R];
        assert!(resignal_targets(&planned(Action::AddVcpu(1), &adding), &adding).is_empty());
    }

    #[test]
    fn faults_are_checked() {
        let code = |r: Result<FaultStep, ApiError>| r.unwrap_err().code;
        assert_eq!(
            fault_step(FaultKind::IgnoreRemoval, Some(3), 4, false),
            Ok(FaultStep::WithholdRemoval(3))
        );
        assert_eq!(
            code(fault_step(FaultKind::IgnoreRemoval, Some(4), 4, true)),
            ErrorCode::VcpuNotFound
        );
        assert_eq!(
            code(fault_step(FaultKind::IgnoreRemoval, Some(0), 4, true)),
            ErrorCode::Vcpu0NotRemovable
        );
        assert_eq!(
            code(fault_step(FaultKind::IgnoreRemoval, None, 4, true)),
            ErrorCode::MalformedRequest
        );
        assert_eq!(
            code(fault_step(FaultKind::AgentRefuseOffline, Some(1), 4, false)),
            ErrorCode::AgentUnavailable
        );
        assert_eq!(
            code(fault_step(FaultKind::AgentForceOffline, None, 4, true)),
            ErrorCode::MalformedRequest
        );
        assert_eq!(
            fault_step(FaultKind::AgentForceOffline, Some(1), 4, true),
            Ok(FaultStep::Agent(HostMessage::Fault {
                fault: Fault::ForceOffline,
                cpu: Some(1),
                ms: None
            }))
        );
        assert_eq!(
            fault_step(FaultKind::AgentSilence, None, 4, true),
            Ok(FaultStep::Agent(HostMessage::Fault {
                fault: Fault::Silence,
                cpu: None,
                ms: None
            }))
        );
        assert_eq!(
            code(fault_step(FaultKind::AgentSilence, None, 4, false)),
            ErrorCode::AgentUnavailable
        );
        assert_eq!(ErrorCode::AgentUnavailable.status(), 409);
    }

    #[test]
    fn timeouts_say_what_happened() {
        let limit = Duration::from_secs(30);
        assert_eq!(
            timeout_reason(false, limit, false),
            "the guest did not eject it within 30 s; \
             the removal was cancelled and the vCPU stays present"
        );
        assert!(timeout_reason(false, limit, true).ends_with("kept the request from the guest)"));
        assert!(timeout_reason(true, limit, false).contains("bring it online within 30 s"));
        assert!(timeout_reason(true, limit, false).contains("absent again"));
    }

    #[test]
    fn snapshots_are_asked_for_at_most_once_per_interval() {
        let now = Instant::now();
        let every = Duration::from_secs(1);
        assert!(wants_snapshot(true, None, now, every));
        assert!(!wants_snapshot(false, None, now, every));
        assert!(!wants_snapshot(true, Some(now), now, every));
        assert!(wants_snapshot(true, Some(now), now + every, every));
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
