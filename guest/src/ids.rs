//! vCPU ids and Linux's logical CPU numbers: [`IdMap`].
//!
//! Linux gives a hot-added CPU the next free logical number (`cpuN`) and
//! keeps it, so the numbers follow the order CPUs were first added, not
//! their vCPU ids (= APIC ID = ACPI `_UID` = the VMM's id). The agent talks
//! to the VMM in vCPU ids and to sysfs in logical numbers; this map, owned
//! by the agent, is the one place that translates. A CPU's pair is learnt
//! when the agent first meets `cpuN` (start-up, `add` uevent) and
//! forgotten when `cpuN` is removed: a re-added vCPU may get another
//! logical number.
//!
//! Threads of a removed CPU live on, parked, in the worker registry (keyed
//! by logical number, reused if that number comes back). So that snapshots
//! can still name them, a forgotten pair is kept as *former* until either
//! of its numbers is taken by a new pair ([`IdMap::label`]).

use std::collections::BTreeMap;

/// The bidirectional map between logical CPU numbers and vCPU ids.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IdMap {
    /// logical -> id, of CPUs present now.
    by_logical: BTreeMap<u32, u32>,
    /// id -> logical, the inverse of `by_logical`.
    by_id: BTreeMap<u32, u32>,
    /// logical -> id, of CPUs removed since (for naming their threads).
    former: BTreeMap<u32, u32>,
}

impl IdMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `cpu{logical}` is vCPU `id`. Returns the pairs
    /// `(logical, id)` it replaced because they shared one of the two
    /// numbers (empty when the pair was new or already known): a
    /// renumbering, or firmware giving two CPUs one id.
    pub fn insert(&mut self, logical: u32, id: u32) -> Vec<(u32, u32)> {
        if self.by_logical.get(&logical) == Some(&id) {
            return Vec::new();
        }
        let mut replaced = Vec::new();
        if let Some(old_id) = self.by_logical.remove(&logical) {
            self.by_id.remove(&old_id);
            replaced.push((logical, old_id));
        }
        if let Some(old_logical) = self.by_id.remove(&id) {
            self.by_logical.remove(&old_logical);
            replaced.push((old_logical, id));
        }
        self.former.retain(|&l, &mut i| l != logical && i != id);
        self.by_logical.insert(logical, id);
        self.by_id.insert(id, logical);
        replaced
    }

    /// Forgets `cpu{logical}` (removed); returns its id if it had one.
    pub fn forget(&mut self, logical: u32) -> Option<u32> {
        let id = self.by_logical.remove(&logical)?;
        self.by_id.remove(&id);
        self.former.insert(logical, id);
        Some(id)
    }

    /// The vCPU id of present `cpu{logical}`.
    pub fn id(&self, logical: u32) -> Option<u32> {
        self.by_logical.get(&logical).copied()
    }

    /// The logical number of present vCPU `id`.
    pub fn logical(&self, id: u32) -> Option<u32> {
        self.by_id.get(&id).copied()
    }

    /// The vCPU id to report things of `cpu{logical}` under: its present
    /// id, else the id it had when it was removed.
    pub fn label(&self, logical: u32) -> Option<u32> {
        self.id(logical)
            .or_else(|| self.former.get(&logical).copied())
    }

    /// `(vCPU id, logical number)` of every present CPU, by ascending id.
    pub fn pairs(&self) -> Vec<(u32, u32)> {
        self.by_id.iter().map(|(&id, &l)| (id, l)).collect()
    }

    /// How many present CPUs are mapped.
    pub fn len(&self) -> usize {
        self.by_logical.len()
    }

    /// Whether no present CPU is mapped.
    pub fn is_empty(&self) -> bool {
        self.by_logical.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_both_ways() {
        let mut m = IdMap::new();
        assert!(m.is_empty());
        assert!(m.insert(0, 0).is_empty());
        assert!(m.insert(1, 6).is_empty());
        assert!(m.insert(2, 3).is_empty());
        assert!(m.insert(1, 6).is_empty(), "known already");
        assert_eq!((m.id(1), m.logical(6)), (Some(6), Some(1)));
        assert_eq!((m.id(2), m.logical(3)), (Some(3), Some(2)));
        assert_eq!((m.id(5), m.logical(1)), (None, None));
        assert_eq!(m.pairs(), [(0, 0), (3, 2), (6, 1)]);
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn a_removed_cpu_is_forgotten_but_still_labels_its_threads() {
        let mut m = IdMap::new();
        m.insert(1, 6);
        m.insert(2, 3);
        assert_eq!(m.forget(1), Some(6));
        assert_eq!(m.forget(1), None, "once");
        assert_eq!((m.id(1), m.logical(6)), (None, None));
        assert_eq!(m.label(1), Some(6), "its parked threads");
        assert_eq!(m.pairs(), [(3, 2)]);
        // vCPU 6 comes back as cpu4: cpu1's threads are nobody's now.
        assert!(m.insert(4, 6).is_empty());
        assert_eq!(m.label(1), None);
        assert_eq!(
            (m.id(4), m.logical(6), m.label(4)),
            (Some(6), Some(4), Some(6))
        );
        // cpu2 (vCPU 3) removed, then cpu2 reused by vCPU 5.
        m.forget(2);
        assert_eq!(m.label(2), Some(3));
        m.insert(2, 5);
        assert_eq!((m.label(2), m.logical(3)), (Some(5), None));
        assert_eq!(m.pairs(), [(5, 2), (6, 4)]);
    }

    #[test]
    fn conflicting_pairs_replace_the_old_ones() {
        let mut m = IdMap::new();
        m.insert(1, 6);
        m.insert(2, 3);
        // cpu1 now says it is vCPU 3: both old pairs go.
        assert_eq!(m.insert(1, 3), [(1, 6), (2, 3)]);
        assert_eq!(m.pairs(), [(3, 1)]);
        assert_eq!((m.id(2), m.logical(6)), (None, None));
    }
}
