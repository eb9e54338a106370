//! `/api/v1/metrics`: the API's own request counters ([`ApiMetrics`]) and
//! the Prometheus text that joins them with the VMM's counters.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use super::parse::{Parsed, RequestError, RequestParts};
use crate::control::{Action, VmmMetrics};

/// `Content-Type` of the Prometheus text exposition format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Statuses counted one by one; any other is counted as `other`.
const STATUSES: [u16; 13] = [
    200, 202, 400, 404, 405, 408, 409, 413, 415, 422, 500, 503, 504,
];

/// API requests answered, by HTTP status, and the server's bounds at work.
/// Shared between the API thread (which counts) and whoever else wants to
/// read them.
#[derive(Debug, Default)]
pub struct ApiMetrics {
    by_status: [AtomicU64; STATUSES.len()],
    other: AtomicU64,
    refused_connections: AtomicU64,
    waits_over_limit: AtomicU64,
}

impl ApiMetrics {
    /// All counters at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Count one request answered with `status`.
    pub fn count(&self, status: u16) {
        let counter = match STATUSES.iter().position(|s| *s == status) {
            Some(i) => &self.by_status[i],
            None => &self.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Count one connection refused at the connection limit.
    pub fn count_refused_connection(&self) {
        self.refused_connections.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections refused at the connection limit.
    pub fn refused_connections(&self) -> u64 {
        self.refused_connections.load(Ordering::Relaxed)
    }

    /// Count one `?wait` not honoured at the waiter limit.
    pub fn count_wait_over_limit(&self) {
        self.waits_over_limit.fetch_add(1, Ordering::Relaxed);
    }

    /// Mutations whose `?wait` was not honoured at the waiter limit.
    pub fn waits_over_limit(&self) -> u64 {
        self.waits_over_limit.load(Ordering::Relaxed)
    }

    /// Requests answered with `status` (statuses not counted one by one
    /// read as the shared `other` counter).
    pub fn requests(&self, status: u16) -> u64 {
        match STATUSES.iter().position(|s| *s == status) {
            Some(i) => self.by_status[i].load(Ordering::Relaxed),
            None => self.other.load(Ordering::Relaxed),
        }
    }

    /// Requests answered, all statuses.
    pub fn total(&self) -> u64 {
        self.by_status
            .iter()
            .chain(std::iter::once(&self.other))
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// The Prometheus text of `vmm`'s counters and these.
    pub fn render(&self, vmm: &VmmMetrics) -> String {
        let mut text = String::new();
        let counters = [
            (
                "vmm_vcpu_hot_adds_total",
                "vCPUs hot-added and confirmed online by the guest.",
                vmm.hot_adds,
            ),
            (
                "vmm_vcpu_hot_removes_total",
                "vCPUs hot-removed: ejected by the guest and their thread joined.",
                vmm.hot_removes,
            ),
            (
                "vmm_vcpu_hotplug_failures_total",
                "Hot-add or hot-remove operations that failed.",
                vmm.hotplug_failures,
            ),
            (
                "vmm_hotplug_ignored_register_accesses_total",
                "Guest accesses to the hotplug registers that were ignored.",
                vmm.ignored_register_accesses,
            ),
            (
                "vmm_vcpu_fds_created_total",
                "vCPU fds created; removed vCPUs keep theirs for reuse.",
                vmm.vcpu_fds_created,
            ),
            (
                "vmm_vcpu_fds_reused_total",
                "Hot-adds that reused a kept vCPU fd.",
                vmm.vcpu_fds_reused,
            ),
            (
                "vmm_agent_lines_dropped_total",
                "Lines from the guest agent dropped as oversized or malformed.",
                vmm.agent_lines_dropped,
            ),
            (
                "vmm_agent_mailbox_corrupt_total",
                "Accesses to the guest agent's mailbox rings that found them corrupt (nothing moved).",
                vmm.agent_mailbox_corrupt,
            ),
            (
                "vmm_repeated_requests_total",
                "Mutations that repeated a change already in flight and joined it.",
                vmm.repeated_requests,
            ),
            (
                "vmm_guest_events_dropped_total",
                "Guest-driven events dropped because the VMM thread's queue was full.",
                vmm.guest_events_dropped,
            ),
        ];
        for (name, help, value) in counters {
            let _ = write!(
                text,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
            );
        }
        let gauges = [
            (
                "vmm_vcpus_stuck",
                "vCPUs whose thread did not stop when asked.",
                vmm.stuck_vcpus,
            ),
            (
                "process_open_fds",
                "Open file descriptors of the VMM process.",
                vmm.process.open_fds,
            ),
            (
                "process_threads",
                "Threads of the VMM process.",
                vmm.process.threads,
            ),
            (
                "process_resident_memory_bytes",
                "Resident memory of the VMM process in bytes, guest memory included.",
                vmm.process.resident_bytes,
            ),
            (
                "vmm_guest_memory_resident_bytes",
                "Of the process's resident memory, the guest's RAM.",
                vmm.process.guest_resident_bytes,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = write!(
                text,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"
            );
        }
        let name = "vmm_api_requests_total";
        let _ = write!(
            text,
            "# HELP {name} API requests answered, by HTTP status.\n# TYPE {name} counter\n"
        );
        for (status, counter) in STATUSES.iter().zip(&self.by_status) {
            let _ = writeln!(
                text,
                "{name}{{status=\"{status}\"}} {}",
                counter.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            text,
            "{name}{{status=\"other\"}} {}",
            self.other.load(Ordering::Relaxed)
        );
        let bounds = [
            (
                "vmm_api_connections_refused_total",
                "Connections answered 503 and closed at the API's connection limit.",
                self.refused_connections(),
            ),
            (
                "vmm_api_waits_over_limit_total",
                "Mutations whose ?wait was not honoured (answered 202 at once) at the API's waiter limit.",
                self.waits_over_limit(),
            ),
        ];
        for (name, help, value) in bounds {
            let _ = write!(
                text,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
            );
        }
        text
    }
}

/// `GET /api/v1/metrics`.
pub(super) fn parse_get(req: &RequestParts) -> Result<Parsed, RequestError> {
    req.no_query()?;
    req.no_body()?;
    Ok(Parsed::new(Action::GetMetrics))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_status() {
        let metrics = ApiMetrics::new();
        metrics.count(200);
        metrics.count(200);
        metrics.count(409);
        metrics.count(418);
        assert_eq!(metrics.requests(200), 2);
        assert_eq!(metrics.requests(409), 1);
        assert_eq!(metrics.requests(418), 1);
        assert_eq!(metrics.total(), 4);
    }

    #[test]
    fn prometheus_text() {
        let metrics = ApiMetrics::new();
        metrics.count(202);
        metrics.count(408);
        metrics.count_refused_connection();
        metrics.count_wait_over_limit();
        metrics.count_wait_over_limit();
        let vmm = VmmMetrics {
            hot_adds: 3,
            hot_removes: 1,
            hotplug_failures: 0,
            ignored_register_accesses: 7,
            vcpu_fds_created: 8,
            vcpu_fds_reused: 2,
            agent_lines_dropped: 5,
            agent_mailbox_corrupt: 1,
            stuck_vcpus: 1,
            repeated_requests: 2,
            guest_events_dropped: 3,
            process: crate::procstat::ProcessStats {
                open_fds: 20,
                threads: 5,
                resident_bytes: 4096,
                guest_resident_bytes: 1024,
                fd_table: 64,
            },
        };
        let text = metrics.render(&vmm);
        assert!(text.contains(
            "vmm_vcpu_fds_created_total 8
"
        ));
        assert!(text.contains(
            "vmm_vcpu_fds_reused_total 2
"
        ));
        assert!(text.contains(
            "vmm_agent_lines_dropped_total 5
"
        ));
        assert!(
            text.contains("# TYPE vmm_vcpu_hot_adds_total counter\nvmm_vcpu_hot_adds_total 3\n")
        );
        assert!(text.contains("vmm_hotplug_ignored_register_accesses_total 7\n"));
        assert!(text.contains("# TYPE vmm_vcpus_stuck gauge\nvmm_vcpus_stuck 1\n"));
        assert!(text.contains("vmm_repeated_requests_total 2\n"));
        assert!(text.contains("vmm_guest_events_dropped_total 3\n"));
        assert!(text.contains("# TYPE process_open_fds gauge\nprocess_open_fds 20\n"));
        assert!(text.contains("process_resident_memory_bytes 4096\n"));
        assert!(text.contains("vmm_api_requests_total{status=\"202\"} 1\n"));
        assert!(text.contains("vmm_api_requests_total{status=\"other\"} 0\n"));
        assert!(text.contains("vmm_api_requests_total{status=\"408\"} 1\n"));
        assert!(text.contains("vmm_api_connections_refused_total 1\n"));
        assert!(text.contains("vmm_api_waits_over_limit_total 2\n"));
        // Every sample line is `name{labels} value` or `name value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').unwrap();
            value.parse::<u64>().unwrap();
        }
    }
}
