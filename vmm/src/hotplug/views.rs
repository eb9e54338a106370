//! Read-only answers, built from the records, the operations and the
//! agent session: `GET /api/v1/vm`, `/vcpus`, `/guest/workers` and the
//! metrics. Nothing here changes the coordinator's state.

use std::time::Instant;

use api::{GuestWorkers, VcpuInfo, VcpuList, VmInfo, VmState};

use super::decide::{self, Snapshot};
use super::machine::Machine;
use super::record::Lifecycle;
use super::Coordinator;
use crate::control::VmmMetrics;

impl<M: Machine> Coordinator<M> {
    /// `GET /api/v1/vm`.
    pub(super) fn vm_info(&self, now: Instant) -> VmInfo {
        let link = self.session.link();
        VmInfo {
            state: if self.stopping {
                VmState::Stopping
            } else {
                VmState::Running
            },
            boot_vcpus: self.facts.boot_vcpus,
            max_vcpus: self.records.max(),
            present_vcpus: self.records.present_count(),
            memory_mib: self.facts.memory_mib,
            agent_connected: self.session.connection_state(now),
            agent_version: link.version().map(str::to_owned),
            workload: self.workload.info(),
        }
    }

    /// `GET /api/v1/vcpus`: every vCPU, with its workers from the agent's
    /// last snapshot.
    pub(super) fn vcpu_list(&self) -> VcpuList {
        let mut list = VcpuList {
            max_vcpus: self.records.max(),
            vcpus: self
                .records
                .iter()
                .map(|r| VcpuInfo {
                    id: r.id.get(),
                    state: r.state(),
                    guest_online: r.guest_online,
                    guest_cpu: r.guest_cpu,
                    workers: None,
                })
                .collect(),
        };
        let workers = self
            .session
            .snapshot_at()
            .map(|_| self.session.link().workers().0);
        decide::attach_workers(&mut list, workers);
        list
    }

    /// `GET /api/v1/guest/workers`.
    pub(super) fn guest_workers(&self, now: Instant) -> GuestWorkers {
        let link = self.session.link();
        let (workers, done) = link.workers();
        let snapshot = self.session.snapshot_at().map(|at| Snapshot {
            workers,
            done,
            age: now.saturating_duration_since(at),
        });
        decide::workers_view(self.session.connection_state(now), link.version(), snapshot)
    }

    /// `GET /api/v1/metrics` (the VMM's part).
    pub(super) fn metrics(&self) -> VmmMetrics {
        let (created, reused) = self.machine.fd_counts();
        let stuck = self
            .records
            .iter()
            .filter(|r| matches!(r.life, Lifecycle::Stuck { .. }))
            .count();
        let link = self.session.link();
        VmmMetrics {
            hot_adds: self.counters.hot_adds,
            hot_removes: self.counters.hot_removes,
            hotplug_failures: self.counters.failures,
            ignored_register_accesses: self.machine.ignored_register_accesses(),
            vcpu_fds_created: created,
            vcpu_fds_reused: reused,
            agent_lines_dropped: link.counters().dropped,
            agent_mailbox_corrupt: link.mailbox_corrupt(),
            stuck_vcpus: u64::try_from(stuck).unwrap_or(u64::MAX),
            repeated_requests: self.counters.repeated,
            guest_events_dropped: self.events_dropped,
            process: crate::procstat::ProcessStats {
                guest_resident_bytes: self.guest_ram.as_ref().map_or(0, |m| m.resident_bytes()),
                ..self.probe.read()
            },
        }
    }
}
