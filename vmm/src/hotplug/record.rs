//! One record per vCPU: everything the VMM thread decides about a vCPU,
//! in one place, with a lifecycle whose variants carry their own data so
//! an impossible pair (a removal being prepared while the vCPU is being
//! added) cannot be written down.
//!
//! ```text
//!            add                      guest online (or insert acked, no agent)
//!   Absent ------> Adding{since, acked} -----------------------------> Present
//!     ^   \            | timeout: never started -> undone (eject)         |
//!     |    \           | timeout: started       -> Present, op failed     | remove
//!     |     \          v                                                  v
//!     |      +---- Removing{since, phase} <-----------------------------+
//!     |              Queued -> Preparing -> Prepared -> Ejecting --eject--> thread joined -> Absent
//!     |              cancel (timeout): Preparing/Prepared -> Restoring -> Present (guest online)
//!     +---- Stuck{since} <-- the thread did not stop; a later request retries the join
//! ```
//!
//! The register block keeps its own slots (vCPU threads touch it under
//! its mutex); the record is the VMM thread's decision, and the model
//! tests check the two agree after every step.

use std::time::Instant;

use api::VcpuState;

use crate::VcpuId;

/// Where a vCPU is in its life, as the VMM thread sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// Not plugged in; no thread.
    Absent,
    /// Hot-add requested at `since`; its thread waits for the guest's SIPI.
    Adding {
        /// When the add started.
        since: Instant,
        /// The guest's ACPI scan acknowledged the insertion (Linux has
        /// enumerated the CPU, offline).
        acked: bool,
    },
    /// Plugged in, its thread running.
    Present,
    /// Being removed since `since`.
    Removing {
        /// When the removal started.
        since: Instant,
        /// Where it stands with the guest.
        phase: RemovePhase,
    },
    /// Its thread did not stop when asked (at `since`); a later add or
    /// removal of this id retries the join.
    Stuck {
        /// When the join failed.
        since: Instant,
    },
}

/// Where a removal stands with the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemovePhase {
    /// Waiting for its turn with the agent (at most
    /// [`super::PREPARES_IN_FLIGHT`] prepares are out at once).
    Queued,
    /// Reserved, but the guest was never told (the `ignore_removal` hook).
    Withheld,
    /// The agent was asked at `asked` to park the CPU's workers and
    /// offline it.
    Preparing {
        /// When the request went out.
        asked: Instant,
    },
    /// The agent prepared it (workers parked, CPU offline); its eject waits
    /// until no other prepare is pending, so the guest's eject work never
    /// contends with the agent's next offline.
    Prepared,
    /// The ACPI eject was requested at `asked`.
    Ejecting {
        /// When the eject request was raised.
        asked: Instant,
        /// The agent had offlined the CPU first (a cancel must bring it
        /// back online).
        prepared: bool,
        /// The eject undoes an add the guest never started: the operation
        /// already failed, and the vCPU ends absent either way.
        undo_add: bool,
    },
    /// The removal was given up after the agent had offlined the CPU; the
    /// agent was asked at `asked` to bring it back online and unpark its
    /// workers. The vCPU is reported present once the agent confirms.
    Restoring {
        /// When the request went out.
        asked: Instant,
    },
}

impl RemovePhase {
    /// Whether the agent holds this removal (it answers before the eject).
    pub fn with_agent(self) -> bool {
        matches!(self, Self::Preparing { .. } | Self::Restoring { .. })
    }
}

/// Everything the VMM thread knows about one vCPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuRecord {
    /// Which vCPU.
    pub id: VcpuId,
    /// Its lifecycle.
    pub life: Lifecycle,
    /// What the guest last said about this CPU (online or offline).
    pub guest_online: Option<bool>,
    /// Linux's logical number for it (`cpuN`), as the agent reported.
    pub guest_cpu: Option<u32>,
    /// Requests for the current change that repeated one in flight.
    pub repeats: u32,
}

impl VcpuRecord {
    /// An absent vCPU.
    pub fn new(id: VcpuId) -> Self {
        Self {
            id,
            life: Lifecycle::Absent,
            guest_online: None,
            guest_cpu: None,
            repeats: 0,
        }
    }

    /// The state the API shows.
    pub fn state(&self) -> VcpuState {
        match self.life {
            Lifecycle::Absent => VcpuState::Absent,
            Lifecycle::Adding { .. } => VcpuState::Adding,
            Lifecycle::Present => VcpuState::Present,
            Lifecycle::Removing { .. } => VcpuState::Removing,
            Lifecycle::Stuck { .. } => VcpuState::Stuck,
        }
    }

    /// The removal phase, if it is being removed.
    pub fn phase(&self) -> Option<RemovePhase> {
        match self.life {
            Lifecycle::Removing { phase, .. } => Some(phase),
            _ => None,
        }
    }

    /// Whether its thread should be running (it may be stuck too).
    pub fn has_thread(&self) -> bool {
        !matches!(self.life, Lifecycle::Absent)
    }

    /// Forgets what the guest said (the CPU left the guest).
    pub fn forget_guest(&mut self) {
        self.guest_online = None;
        self.guest_cpu = None;
    }
}

/// The records of every possible vCPU, by id.
#[derive(Debug, Clone)]
pub struct Records {
    all: Vec<VcpuRecord>,
}

impl Records {
    /// `max` absent vCPUs.
    pub fn new(max: u32) -> Self {
        Self {
            all: VcpuId::all(max).map(VcpuRecord::new).collect(),
        }
    }

    /// How many vCPUs the VM can have.
    pub fn max(&self) -> u32 {
        u32::try_from(self.all.len()).unwrap_or(u32::MAX)
    }

    /// The record of `id`, if it is a possible vCPU.
    pub fn get(&self, id: VcpuId) -> Option<&VcpuRecord> {
        self.all.get(id.index())
    }

    /// The record of `id`, if it is a possible vCPU.
    pub fn get_mut(&mut self, id: VcpuId) -> Option<&mut VcpuRecord> {
        self.all.get_mut(id.index())
    }

    /// Every record, by ascending id.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &VcpuRecord> {
        self.all.iter()
    }

    /// The API states, by id (what `control::plan` decides on).
    pub fn states(&self) -> Vec<VcpuState> {
        self.all.iter().map(VcpuRecord::state).collect()
    }

    /// Ids whose removal is in `want` phase.
    pub fn in_phase(&self, want: impl Fn(RemovePhase) -> bool) -> Vec<VcpuId> {
        self.all
            .iter()
            .filter(|r| r.phase().is_some_and(&want))
            .map(|r| r.id)
            .collect()
    }

    /// vCPUs the guest has (present or being removed).
    pub fn present_count(&self) -> u32 {
        let n = self
            .all
            .iter()
            .filter(|r| matches!(r.life, Lifecycle::Present | Lifecycle::Removing { .. }))
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// The vCPU Linux calls `cpu{logical}`, if the agent said.
    pub fn by_guest_cpu(&self, logical: u32) -> Option<VcpuId> {
        self.all
            .iter()
            .find(|r| r.guest_cpu == Some(logical))
            .map(|r| r.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_show_their_state_and_phase() {
        let mut records = Records::new(4);
        let now = Instant::now();
        let id = VcpuId::new(2);
        assert_eq!(records.states(), vec![VcpuState::Absent; 4]);
        records.get_mut(id).unwrap().life = Lifecycle::Removing {
            since: now,
            phase: RemovePhase::Preparing { asked: now },
        };
        records.get_mut(VcpuId::new(1)).unwrap().life = Lifecycle::Stuck { since: now };
        assert_eq!(records.get(id).unwrap().state(), VcpuState::Removing);
        assert_eq!(records.in_phase(RemovePhase::with_agent), vec![id]);
        assert_eq!(records.present_count(), 1);
        assert_eq!(records.states()[1], VcpuState::Stuck);
        assert!(records.get(VcpuId::new(4)).is_none());
        records.get_mut(id).unwrap().guest_cpu = Some(1);
        assert_eq!(records.by_guest_cpu(1), Some(id));
    }
}
