//! A simulated CPU topology and placement, for tests and benchmarks.
//!
//! [`SimTopology`] holds any number of simulated CPUs; tests drive it like
//! the kernel: bring CPUs up and down, refuse a step (like
//! `cpuN/hotplug/fail`), or take a CPU down "on its own" to exercise forced
//! offlining. [`SimPlacement`] records the logical CPU as where a thread
//! runs, or another online CPU when the thread's CPU is down (the kernel
//! breaks the affinity of threads of a dead CPU); optionally it also pins
//! simulated CPU n to a real CPU, round-robin.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::placement::{pin_current_thread, Placement, PlacementError};
use crate::topology::{CpuEvent, CpuEventKind, Topology, TopologyError};

#[derive(Debug)]
struct SimInner {
    online: Box<[AtomicBool]>,
    events: Mutex<VecDeque<CpuEvent>>,
    event_ready: Condvar,
    refuse: Mutex<HashSet<(u32, bool)>>,
}

impl SimInner {
    fn flag(&self, cpu: u32) -> Result<&AtomicBool, TopologyError> {
        usize::try_from(cpu)
            .ok()
            .and_then(|i| self.online.get(i))
            .ok_or(TopologyError::UnknownCpu(cpu))
    }

    fn events(&self) -> MutexGuard<'_, VecDeque<CpuEvent>> {
        self.events.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn change(&self, cpu: u32, online: bool) -> Result<(), TopologyError> {
        let flag = self.flag(cpu)?;
        // Hold the queue lock so events come out in the order of changes.
        let mut events = self.events();
        if flag.swap(online, Ordering::SeqCst) != online {
            let kind = if online {
                CpuEventKind::Online
            } else {
                CpuEventKind::Offline
            };
            events.push_back(CpuEvent { cpu, kind });
            self.event_ready.notify_all();
        }
        Ok(())
    }
}

/// Simulated CPUs `0..possible`.
#[derive(Debug, Clone)]
pub struct SimTopology {
    inner: Arc<SimInner>,
}

impl SimTopology {
    /// `possible` CPUs, of which `online` are up (others are ignored).
    pub fn new(possible: u32, online: impl IntoIterator<Item = u32>) -> Self {
        let flags: Box<[AtomicBool]> = (0..possible).map(|_| AtomicBool::new(false)).collect();
        for cpu in online {
            if let Some(f) = usize::try_from(cpu).ok().and_then(|i| flags.get(i)) {
                f.store(true, Ordering::SeqCst);
            }
        }
        SimTopology {
            inner: Arc::new(SimInner {
                online: flags,
                events: Mutex::new(VecDeque::new()),
                event_ready: Condvar::new(),
                refuse: Mutex::new(HashSet::new()),
            }),
        }
    }

    /// A placement that follows this topology's online state.
    pub fn placement(&self) -> SimPlacement {
        SimPlacement {
            inner: Arc::clone(&self.inner),
            real: None,
        }
    }

    /// The CPU goes down without anyone asking (an admin, the kernel): the
    /// state changes and an `Offline` event is queued.
    pub fn force_offline(&self, cpu: u32) -> Result<(), TopologyError> {
        self.inner.change(cpu, false)
    }

    /// The CPU comes up without anyone asking; an `Online` event is queued.
    pub fn force_online(&self, cpu: u32) -> Result<(), TopologyError> {
        self.inner.change(cpu, true)
    }

    /// The next `set_online(cpu, online)` fails once, like writing a
    /// hotplug step to `cpuN/hotplug/fail`.
    pub fn refuse_next(&self, cpu: u32, online: bool) {
        self.inner
            .refuse
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((cpu, online));
    }

    /// Events queued and not yet taken.
    pub fn pending_events(&self) -> usize {
        self.inner.events().len()
    }

    fn cpu_count(&self) -> u32 {
        u32::try_from(self.inner.online.len()).unwrap_or(u32::MAX)
    }
}

impl Topology for SimTopology {
    fn possible_cpus(&self) -> Result<Vec<u32>, TopologyError> {
        Ok((0..self.cpu_count()).collect())
    }

    fn online_cpus(&self) -> Result<Vec<u32>, TopologyError> {
        Ok((0..self.cpu_count())
            .filter(|&c| self.inner.flag(c).is_ok_and(|f| f.load(Ordering::SeqCst)))
            .collect())
    }

    fn is_online(&self, cpu: u32) -> Result<bool, TopologyError> {
        Ok(self.inner.flag(cpu)?.load(Ordering::SeqCst))
    }

    fn set_online(&self, cpu: u32, online: bool) -> Result<(), TopologyError> {
        self.inner.flag(cpu)?;
        let refused = self
            .inner
            .refuse
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(cpu, online));
        if refused {
            return Err(if online {
                TopologyError::OnlineRefused(cpu)
            } else {
                TopologyError::OfflineRefused(cpu)
            });
        }
        self.inner.change(cpu, online)
    }

    fn next_event(&self, timeout: Duration) -> Result<Option<CpuEvent>, TopologyError> {
        let deadline = Instant::now() + timeout;
        let mut events = self.inner.events();
        loop {
            if let Some(e) = events.pop_front() {
                return Ok(Some(e));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            events = self
                .inner
                .event_ready
                .wait_timeout(events, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Placement on simulated CPUs; see the module docs.
#[derive(Debug, Clone)]
pub struct SimPlacement {
    inner: Arc<SimInner>,
    real: Option<Arc<[u32]>>,
}

impl SimPlacement {
    /// Also pins simulated CPU n to `real_cpus[n % len]` (empty: no pinning).
    pub fn pinned_onto(mut self, real_cpus: Vec<u32>) -> Self {
        self.real = (!real_cpus.is_empty()).then(|| real_cpus.into());
        self
    }
}

impl Placement for SimPlacement {
    fn bind(&self, cpu: u32) -> Result<(), PlacementError> {
        self.inner
            .flag(cpu)
            .map_err(|_| PlacementError::Unknown(cpu))?;
        match &self.real {
            Some(real) => {
                let index =
                    usize::try_from(cpu).map_err(|_| PlacementError::Unknown(cpu))? % real.len();
                pin_current_thread(real[index])
            }
            None => Ok(()),
        }
    }

    fn current_cpu(&self, cpu: u32) -> u32 {
        if self.inner.flag(cpu).is_ok_and(|f| f.load(Ordering::SeqCst)) {
            return cpu;
        }
        // The CPU is down: the kernel moved the thread to some online CPU.
        self.inner
            .online
            .iter()
            .position(|f| f.load(Ordering::SeqCst))
            .and_then(|i| u32::try_from(i).ok())
            .unwrap_or(cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_online_queues_events_only_on_change() {
        let t = SimTopology::new(4, [0, 1]);
        assert_eq!(t.online_cpus().unwrap(), vec![0, 1]);
        t.set_online(1, true).unwrap();
        assert_eq!(t.pending_events(), 0);
        t.set_online(2, true).unwrap();
        t.force_offline(0).unwrap();
        let e = t.next_event(Duration::ZERO).unwrap().unwrap();
        assert_eq!((e.cpu, e.kind), (2, CpuEventKind::Online));
        let e = t.next_event(Duration::ZERO).unwrap().unwrap();
        assert_eq!((e.cpu, e.kind), (0, CpuEventKind::Offline));
        assert!(t.next_event(Duration::from_millis(1)).unwrap().is_none());
        assert!(matches!(
            t.set_online(4, true),
            Err(TopologyError::UnknownCpu(4))
        ));
    }

    #[test]
    fn refused_step_fails_once() {
        let t = SimTopology::new(2, [0, 1]);
        t.refuse_next(1, false);
        assert!(matches!(
            t.set_online(1, false),
            Err(TopologyError::OfflineRefused(1))
        ));
        assert!(t.is_online(1).unwrap());
        t.set_online(1, false).unwrap();
        assert!(!t.is_online(1).unwrap());
    }

    #[test]
    fn placement_follows_the_topology() {
        let t = SimTopology::new(8, [0, 5]);
        let p = t.placement();
        assert_eq!(p.current_cpu(5), 5);
        assert_eq!(p.current_cpu(3), 0);
        assert!(p.bind(7).is_ok());
        assert!(matches!(p.bind(8), Err(PlacementError::Unknown(8))));
    }

    #[test]
    fn next_event_wakes_on_a_change() {
        let t = SimTopology::new(2, [0]);
        let t2 = t.clone();
        let h = std::thread::spawn(move || t2.next_event(Duration::from_secs(10)).unwrap());
        std::thread::sleep(Duration::from_millis(5));
        t.force_online(1).unwrap();
        assert_eq!(h.join().unwrap().unwrap().kind, CpuEventKind::Online);
    }
}
