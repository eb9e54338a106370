//! Planning a mutation from the vCPU states: the API's rules of which ids
//! a resize, add or remove changes and what it waits for.

use std::collections::BTreeSet;

use api::{ApiError, ErrorCode, OperationKind, VcpuState};

use super::Change;

/// What a mutation has to do, computed by [`plan`] from the vCPU states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// What was asked.
    pub kind: OperationKind,
    /// The requested count, for a resize.
    pub desired: Option<u32>,
    /// vCPUs to start hot-adding now (ascending).
    pub add: Vec<u32>,
    /// vCPUs to start hot-removing now (descending).
    pub remove: Vec<u32>,
    /// vCPUs the operation waits for: those above plus any already in
    /// flight that the request depends on. Empty: nothing to do.
    pub wait_for: Vec<u32>,
}

impl Plan {
    pub(super) fn new(kind: OperationKind, desired: Option<u32>) -> Self {
        Self {
            kind,
            desired,
            add: Vec::new(),
            remove: Vec::new(),
            wait_for: Vec::new(),
        }
    }
}

/// Plan a change against `states` (indexed by vCPU id; its length is the
/// maximum).
///
/// Rules: an id beyond the maximum is `vcpu_not_found`; removing vCPU 0 is
/// `vcpu0_not_removable`; a count of 0 or above the maximum is
/// `invalid_vcpu_count`; adding a vCPU being removed (or the reverse) is a
/// `conflict`; asking for what is already true, or already in flight, is
/// not an error (the plan then starts nothing). A stuck vCPU (its thread
/// did not stop; the coordinator retries the join before planning) is a
/// `conflict` for any change that needs it.
pub fn plan(change: Change, states: &[VcpuState]) -> Result<Plan, ApiError> {
    match change {
        Change::Resize { desired } => plan_resize(states, desired),
        Change::Add(id) => plan_add(states, id),
        Change::Remove(id) => plan_remove(states, id),
    }
}

fn state_of(states: &[VcpuState], id: u32) -> Result<VcpuState, ApiError> {
    usize::try_from(id)
        .ok()
        .and_then(|i| states.get(i).copied())
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::VcpuNotFound,
                format!(
                    "no vCPU {id}: ids go from 0 to {}",
                    states.len().saturating_sub(1)
                ),
            )
        })
}

fn conflict(id: u32, state: VcpuState) -> ApiError {
    let message = match state {
        VcpuState::Adding => format!("vCPU {id} is being added; retry when that has finished"),
        VcpuState::Stuck => format!(
            "vCPU {id} is stuck: its thread did not stop when asked, \
             and retrying the join failed; retry later"
        ),
        _ => format!("vCPU {id} is being removed; retry when that has finished"),
    };
    ApiError::new(ErrorCode::Conflict, message)
}

pub(super) fn plan_add(states: &[VcpuState], id: u32) -> Result<Plan, ApiError> {
    let mut plan = Plan::new(OperationKind::Add, None);
    match state_of(states, id)? {
        VcpuState::Present => {}
        VcpuState::Adding => plan.wait_for.push(id),
        VcpuState::Absent => {
            plan.add.push(id);
            plan.wait_for.push(id);
        }
        state @ (VcpuState::Removing | VcpuState::Stuck) => return Err(conflict(id, state)),
    }
    Ok(plan)
}

pub(super) fn plan_remove(states: &[VcpuState], id: u32) -> Result<Plan, ApiError> {
    let state = state_of(states, id)?;
    if id == 0 {
        return Err(ApiError::new(
            ErrorCode::Vcpu0NotRemovable,
            "vCPU 0 cannot be removed",
        ));
    }
    let mut plan = Plan::new(OperationKind::Remove, None);
    match state {
        VcpuState::Absent => {}
        VcpuState::Removing => plan.wait_for.push(id),
        VcpuState::Present => {
            plan.remove.push(id);
            plan.wait_for.push(id);
        }
        VcpuState::Adding | VcpuState::Stuck => return Err(conflict(id, state)),
    }
    Ok(plan)
}

fn plan_resize(states: &[VcpuState], desired: u32) -> Result<Plan, ApiError> {
    let max = states.len();
    let wanted = usize::try_from(desired).unwrap_or(usize::MAX);
    if wanted == 0 || wanted > max {
        return Err(ApiError::new(
            ErrorCode::InvalidVcpuCount,
            format!("desired must be between 1 and {max}, not {desired}"),
        ));
    }
    let ids = || (0..max).filter_map(|i| u32::try_from(i).ok().map(|id| (id, states[i])));
    let effective = ids()
        .filter(|(_, s)| matches!(s, VcpuState::Present | VcpuState::Adding))
        .count();
    let mut plan = Plan::new(OperationKind::Resize, Some(desired));
    if wanted > effective {
        let absent: Vec<u32> = ids()
            .filter(|(_, s)| *s == VcpuState::Absent)
            .map(|(id, _)| id)
            .take(wanted - effective)
            .collect();
        if absent.len() < wanted - effective {
            let busy = ids().find(|(_, s)| matches!(s, VcpuState::Removing | VcpuState::Stuck));
            return Err(match busy {
                Some((id, state)) => conflict(id, state),
                None => ApiError::new(ErrorCode::Internal, "no free vCPU slot"),
            });
        }
        plan.add = absent;
    } else if wanted < effective {
        let highest = ids()
            .rev()
            .filter(|(id, s)| *id != 0 && matches!(s, VcpuState::Present | VcpuState::Adding))
            .take(effective - wanted);
        for (id, state) in highest {
            if state == VcpuState::Adding {
                return Err(conflict(id, state));
            }
            plan.remove.push(id);
        }
    }
    let in_flight = ids().filter(|(_, s)| s.in_flight()).map(|(id, _)| id);
    let wait_for: BTreeSet<u32> = in_flight
        .chain(plan.add.iter().copied())
        .chain(plan.remove.iter().copied())
        .collect();
    plan.wait_for = wait_for.into_iter().collect();
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use VcpuState::{Absent as A, Adding as D, Present as P, Removing as R};

    fn resize(states: &[VcpuState], desired: u32) -> Result<Plan, ApiError> {
        plan(Change::Resize { desired }, states)
    }

    #[test]
    fn resize_adds_lowest_absent_and_removes_highest_present() {
        let p = resize(&[P, A, P, A, A], 4).unwrap();
        assert_eq!(
            (p.add, p.remove, p.wait_for),
            (vec![1, 3], vec![], vec![1, 3])
        );
        let p = resize(&[P, P, P, A, P], 2).unwrap();
        assert_eq!(
            (p.add, p.remove, p.wait_for),
            (vec![], vec![4, 2], vec![2, 4])
        );
    }

    #[test]
    fn resize_is_idempotent() {
        let p = resize(&[P, P, A], 2).unwrap();
        assert!(p.wait_for.is_empty() && p.add.is_empty() && p.remove.is_empty());
        // Already in flight: nothing new, wait for what is in flight.
        let p = resize(&[P, P, D], 3).unwrap();
        assert_eq!((p.add, p.wait_for), (vec![], vec![2]));
        let p = resize(&[P, P, R], 2).unwrap();
        assert_eq!((p.remove, p.wait_for), (vec![], vec![2]));
    }

    #[test]
    fn resize_rejects_bad_counts_and_conflicts() {
        for n in [0, 4, u32::MAX] {
            assert_eq!(
                resize(&[P, A, A], n).unwrap_err().code,
                ErrorCode::InvalidVcpuCount
            );
        }
        // Shrinking would have to cancel an add in flight.
        assert_eq!(resize(&[P, P, D], 2).unwrap_err().code, ErrorCode::Conflict);
        // Growing needs a slot still being removed.
        assert_eq!(resize(&[P, P, R], 3).unwrap_err().code, ErrorCode::Conflict);
    }

    #[test]
    fn add_and_remove_rules() {
        let states = [P, A, D, R, P];
        let add = |id| plan(Change::Add(id), &states);
        let remove = |id| plan(Change::Remove(id), &states);
        assert_eq!(add(1).unwrap().add, vec![1]);
        assert!(add(0).unwrap().wait_for.is_empty());
        assert_eq!(add(2).unwrap().wait_for, vec![2]);
        assert_eq!(add(3).unwrap_err().code, ErrorCode::Conflict);
        assert_eq!(add(5).unwrap_err().code, ErrorCode::VcpuNotFound);
        assert_eq!(remove(0).unwrap_err().code, ErrorCode::Vcpu0NotRemovable);
        assert_eq!(remove(4).unwrap().remove, vec![4]);
        assert!(remove(1).unwrap().wait_for.is_empty());
        assert_eq!(remove(2).unwrap_err().code, ErrorCode::Conflict);
        assert_eq!(remove(3).unwrap().wait_for, vec![3]);
        assert_eq!(remove(9).unwrap_err().code, ErrorCode::VcpuNotFound);
        let stuck = [P, VcpuState::Stuck, A];
        assert_eq!(
            plan(Change::Add(1), &stuck).unwrap_err().code,
            ErrorCode::Conflict
        );
        assert_eq!(
            plan(Change::Remove(1), &stuck).unwrap_err().code,
            ErrorCode::Conflict
        );
        // A stuck slot is not free: growing past it needs it.
        assert_eq!(resize(&stuck, 3).unwrap_err().code, ErrorCode::Conflict);
        assert_eq!(resize(&stuck, 2).unwrap().add, vec![2]);
    }
}
