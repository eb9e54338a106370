//! A plain-data picture of the registry (statement 23).
//!
//! Every type here is a struct of public fields or a fieldless enum, so a
//! caller can serialise it however it likes (the guest agent sends it to
//! the host; tests assert on it).

use std::sync::atomic::Ordering;

use crate::control::{Control, ThreadStatus};
use crate::event::DescriptorId;
use crate::hotplug::CpuState;
use crate::registry::State;

/// Completed calls of each callback of one thread. A call that panicked
/// counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallCounts {
    /// `create` calls (0 or 1).
    pub create: u64,
    /// `setup` calls (0 or 1).
    pub setup: u64,
    /// `park` calls.
    pub park: u64,
    /// `unpark` calls.
    pub unpark: u64,
    /// `thread_fn` calls.
    pub thread_fn: u64,
    /// `cleanup` calls (0 or 1; a stopped thread is no longer listed).
    pub cleanup: u64,
}

/// One (descriptor, CPU) pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadSnapshot {
    /// The CPU.
    pub cpu: u32,
    /// The thread's name (the pattern with the CPU).
    pub name: String,
    /// [`ThreadStatus::Absent`] when the pair has no thread.
    pub status: ThreadStatus,
    /// A park is requested and not undone: the thread is blocked in park or
    /// about to be. Independent of `status`, which only becomes
    /// [`ThreadStatus::Parked`] through a `park` callback.
    pub parked: bool,
    /// The CPU the thread last ran a callback on.
    pub last_cpu: Option<u32>,
    /// A number unique to this thread within the registry: it stays the
    /// same across park and unpark (the thread is never re-created).
    pub serial: Option<u64>,
    /// Callback counts.
    pub calls: CallCounts,
    /// Why the thread failed, if it did (statement 25).
    pub failure: Option<String>,
}

/// One registered descriptor and its threads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescriptorSnapshot {
    /// The registration.
    pub id: DescriptorId,
    /// The descriptor's name pattern.
    pub name_pattern: String,
    /// One entry per possible CPU, ascending.
    pub threads: Vec<ThreadSnapshot>,
}

/// One possible CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuSnapshot {
    /// The CPU.
    pub cpu: u32,
    /// The registry's view of it.
    pub state: CpuState,
    /// How many times it went down without `offline` (statement 11).
    pub forced_offlines: u64,
}

/// The whole registry at one instant (taken under the hotplug lock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Possible CPUs, ascending.
    pub cpus: Vec<CpuSnapshot>,
    /// Registered descriptors, oldest registration first.
    pub descriptors: Vec<DescriptorSnapshot>,
    /// Forced offlines over all CPUs.
    pub forced_offlines: u64,
}

impl Snapshot {
    pub(crate) fn capture(state: &State) -> Snapshot {
        let cpus = state
            .possible
            .iter()
            .filter_map(|&cpu| {
                state.slot(cpu).ok().map(|slot| CpuSnapshot {
                    cpu,
                    state: slot.state,
                    forced_offlines: slot.forced_offlines,
                })
            })
            .collect();
        let descriptors = state
            .descriptors
            .iter()
            .map(|reg| DescriptorSnapshot {
                id: reg.id,
                name_pattern: reg.desc.name_pattern().to_owned(),
                threads: state
                    .possible
                    .iter()
                    .map(|&cpu| {
                        let name = reg.desc.thread_name(cpu);
                        match reg.thread(cpu) {
                            Some(t) => thread_snapshot(cpu, name, &t.control, t.is_parked()),
                            None => absent(cpu, name),
                        }
                    })
                    .collect(),
            })
            .collect();
        Snapshot {
            cpus,
            descriptors,
            forced_offlines: state.forced_offlines,
        }
    }

    /// The descriptor with registration `id`.
    pub fn descriptor(&self, id: DescriptorId) -> Option<&DescriptorSnapshot> {
        self.descriptors.iter().find(|d| d.id == id)
    }

    /// The thread of registration `id` on `cpu`.
    pub fn thread(&self, id: DescriptorId, cpu: u32) -> Option<&ThreadSnapshot> {
        self.descriptor(id)?.threads.iter().find(|t| t.cpu == cpu)
    }

    /// The registry's view of `cpu`.
    pub fn cpu(&self, cpu: u32) -> Option<&CpuSnapshot> {
        self.cpus.iter().find(|c| c.cpu == cpu)
    }
}

fn thread_snapshot(cpu: u32, name: String, c: &Control, parked: bool) -> ThreadSnapshot {
    let n = &c.counters;
    ThreadSnapshot {
        cpu,
        name,
        status: c.status(),
        parked,
        last_cpu: c.last_cpu(),
        serial: Some(c.serial),
        calls: CallCounts {
            create: n.create.load(Ordering::Acquire),
            setup: n.setup.load(Ordering::Acquire),
            park: n.park.load(Ordering::Acquire),
            unpark: n.unpark.load(Ordering::Acquire),
            thread_fn: n.thread_fn.load(Ordering::Acquire),
            cleanup: n.cleanup.load(Ordering::Acquire),
        },
        failure: c.failure(),
    }
}

fn absent(cpu: u32, name: String) -> ThreadSnapshot {
    ThreadSnapshot {
        cpu,
        name,
        status: ThreadStatus::Absent,
        parked: false,
        last_cpu: None,
        serial: None,
        calls: CallCounts::default(),
        failure: None,
    }
}

#[cfg(test)]
mod tests {
    use crate::{Registry, SimTopology, ThreadDescriptor, ThreadStatus};
    use std::sync::Arc;

    #[test]
    fn snapshot_lists_every_possible_cpu() {
        let topo = SimTopology::new(3, [0]);
        let r = Registry::builder()
            .topology(&topo)
            .unwrap()
            .placement(Arc::new(topo.placement()))
            .build()
            .unwrap();
        let d = ThreadDescriptor::builder("s/%u", |_| false, |_| {}).build();
        let h = r.register(&d).unwrap();
        let s = r.snapshot().unwrap();
        assert_eq!(s.cpus.len(), 3);
        let desc = s.descriptor(h.descriptor()).unwrap();
        assert_eq!(desc.name_pattern, "s/%u");
        assert_eq!(desc.threads.len(), 3);
        assert_eq!(
            s.thread(h.descriptor(), 1).unwrap().status,
            ThreadStatus::Absent
        );
        assert_eq!(s.thread(h.descriptor(), 2).unwrap().name, "s/2");
        assert!(s.thread(h.descriptor(), 0).unwrap().serial.is_some());
        assert_eq!(s.cpu(0).unwrap().forced_offlines, 0);
    }
}
