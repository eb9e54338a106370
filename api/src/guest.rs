//! `GET /api/v1/guest/workers`: the guest's view, as its agent reports it:
//! whether the agent is connected, every per-CPU worker thread of its
//! registry, and how much work each CPU has done.

use serde::{Deserialize, Serialize};

use crate::agent::WorkerInfo;

/// One worker thread of the guest's registry (one descriptor on one CPU).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestWorker {
    /// The descriptor's name (e.g. "ksoftirqd").
    pub descriptor: String,
    /// The CPU the thread belongs to.
    pub cpu: u32,
    /// As the registry reports it: "active", "parked", "failed", "none"
    /// (passed through unchanged, so a newer agent may send others).
    pub status: String,
    /// The CPU it last ran on, if it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_cpu: Option<u32>,
    /// How often its `setup` callback ran.
    pub setup_calls: u64,
    /// How often its `park` callback ran.
    pub park_calls: u64,
    /// How often its `unpark` callback ran.
    pub unpark_calls: u64,
    /// How often its `thread_fn` (one unit of work) ran.
    pub thread_fn_calls: u64,
}

impl From<&WorkerInfo> for GuestWorker {
    fn from(w: &WorkerInfo) -> Self {
        let [setup_calls, park_calls, unpark_calls, thread_fn_calls] = w.counts;
        Self {
            descriptor: w.descriptor.clone(),
            cpu: w.cpu,
            status: w.status.clone(),
            last_cpu: w.last_cpu,
            setup_calls,
            park_calls,
            unpark_calls,
            thread_fn_calls,
        }
    }
}

/// Work items one CPU's workers have done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuWork {
    /// The CPU.
    pub cpu: u32,
    /// Items done on it so far.
    pub items_done: u64,
}

/// The answer to `GET /api/v1/guest/workers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestWorkers {
    /// Whether the guest agent is connected; absent while no agent was
    /// ever seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_connected: Option<bool>,
    /// The guest agent's version, once it has said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// How old the snapshot below is, in milliseconds; absent (and the
    /// lists empty) until the agent has sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_age_ms: Option<u64>,
    /// Every worker thread, as the agent listed them.
    pub workers: Vec<GuestWorker>,
    /// Items done, per CPU.
    pub work: Vec<CpuWork>,
}

impl GuestWorkers {
    /// Nothing known: no agent, no snapshot.
    pub fn unknown() -> Self {
        Self {
            agent_connected: None,
            agent_version: None,
            snapshot_age_ms: None,
            workers: Vec::new(),
            work: Vec::new(),
        }
    }

    /// The workers of `cpu`.
    pub fn on_cpu(&self, cpu: u32) -> impl Iterator<Item = &GuestWorker> {
        self.workers.iter().filter(move |w| w.cpu == cpu)
    }

    /// Items done on `cpu`, if the agent reported it.
    pub fn items_done(&self, cpu: u32) -> Option<u64> {
        self.work
            .iter()
            .find(|w| w.cpu == cpu)
            .map(|w| w.items_done)
    }
}

/// The API view of the agent's per-CPU counters (`(cpu, items)` pairs).
pub fn cpu_work(done: &[(u32, u64)]) -> Vec<CpuWork> {
    done.iter()
        .map(|&(cpu, items_done)| CpuWork { cpu, items_done })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> WorkerInfo {
        WorkerInfo {
            descriptor: "ksoftirqd".into(),
            cpu: 2,
            status: "parked".into(),
            last_cpu: None,
            counts: [1, 2, 3, 40],
        }
    }

    #[test]
    fn worker_counts_get_names() {
        let w = GuestWorker::from(&info());
        assert_eq!(
            (
                w.setup_calls,
                w.park_calls,
                w.unpark_calls,
                w.thread_fn_calls
            ),
            (1, 2, 3, 40)
        );
        let json = serde_json::to_value(&w).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"descriptor": "ksoftirqd", "cpu": 2, "status": "parked",
                "setup_calls": 1, "park_calls": 2, "unpark_calls": 3, "thread_fn_calls": 40})
        );
        assert_eq!(serde_json::from_value::<GuestWorker>(json).unwrap(), w);
    }

    #[test]
    fn lookups_and_unknown() {
        let none = GuestWorkers::unknown();
        assert_eq!(
            serde_json::to_value(&none).unwrap(),
            serde_json::json!({"workers": [], "work": []})
        );
        let mut other = info();
        other.cpu = 0;
        let all = GuestWorkers {
            agent_connected: Some(true),
            agent_version: Some("1".into()),
            snapshot_age_ms: Some(5),
            workers: vec![GuestWorker::from(&info()), GuestWorker::from(&other)],
            work: cpu_work(&[(0, 7), (2, 9)]),
        };
        assert_eq!(all.on_cpu(2).count(), 1);
        assert_eq!(all.on_cpu(1).count(), 0);
        assert_eq!(all.items_done(2), Some(9));
        assert_eq!(all.items_done(1), None);
    }
}
