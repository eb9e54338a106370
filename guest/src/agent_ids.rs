//! The agent's translation between vCPU ids (messages) and Linux's
//! logical CPU numbers (sysfs, the registry): reading ids from sysfs into
//! the [`IdMap`](crate::ids::IdMap) and naming things by id.

use agent_proto::agent::WorkerInfo;

use super::Agent;
use crate::sysfs::{CpuList, IdSource, VcpuId};

impl Agent {
    /// Reads the vCPU id of `cpu{cpu}` and records it; `None` if sysfs does
    /// not tell (yet: a hot-added CPU's firmware node appears just after
    /// its `add` uevent, and an offline CPU has no APIC ID in
    /// `/proc/cpuinfo`).
    pub(super) fn learn(&mut self, cpu: u32) -> Option<u32> {
        let VcpuId { id, source } = match self.topo.sysfs().vcpu_id(cpu) {
            Ok(found) => found,
            Err(e) => {
                self.trace(&e.to_string());
                return None;
            }
        };
        if self.ids.id(cpu) == Some(id) {
            return Some(id);
        }
        for (logical, old) in self.ids.insert(cpu, id) {
            self.out.console.push(format!(
                "GUEST-WARN cpu{cpu} is vCPU {id}: dropped the pairing cpu{logical} = vCPU {old}"
            ));
        }
        match source {
            IdSource::FirmwareUid => self.trace(&format!("cpu{cpu} is vCPU {id} ({source})")),
            IdSource::ApicId => self.out.console.push(format!(
                "GUEST-WARN cpu{cpu} is vCPU {id} ({source}: no firmware node)"
            )),
        }
        Some(id)
    }

    /// Learns the id of every present CPU not mapped yet.
    pub(super) fn learn_present(&mut self) {
        let present = match self.topo.present_cpus() {
            Ok(present) => present,
            Err(e) => return self.error(format!("present CPUs: {e}")),
        };
        for cpu in present.iter() {
            if self.ids.id(cpu).is_none() {
                self.learn(cpu);
            }
        }
    }

    /// The vCPU id of `cpu{cpu}`, read from sysfs if not known yet.
    pub(super) fn id_of(&mut self, cpu: u32) -> Option<u32> {
        self.ids.id(cpu).or_else(|| self.learn(cpu))
    }

    /// The logical number of vCPU `id`; if unknown, every present CPU not
    /// mapped yet is read first.
    pub(super) fn logical_of(&mut self, id: u32) -> Option<u32> {
        if let Some(cpu) = self.ids.logical(id) {
            return Some(cpu);
        }
        self.learn_present();
        self.ids.logical(id)
    }

    /// The vCPU ids of the logical CPUs `cpus` that have one.
    pub(super) fn vcpus(&self, cpus: &CpuList) -> CpuList {
        cpus.iter().filter_map(|cpu| self.ids.id(cpu)).collect()
    }

    /// A `workers` message's contents, named by vCPU id: threads and
    /// counters of a removed CPU under the id it had, those of a CPU never
    /// mapped left out.
    pub(super) fn by_vcpu_id(
        &self,
        workers: Vec<WorkerInfo>,
        done: Vec<(u32, u64)>,
    ) -> (Vec<WorkerInfo>, Vec<(u32, u64)>) {
        let workers = workers
            .into_iter()
            .filter_map(|mut w| {
                w.cpu = self.ids.label(w.cpu)?;
                w.last_cpu = w.last_cpu.and_then(|c| self.ids.label(c));
                Some(w)
            })
            .collect();
        let mut done: Vec<_> = done
            .into_iter()
            .filter_map(|(cpu, n)| Some((self.ids.label(cpu)?, n)))
            .collect();
        done.sort_unstable();
        (workers, done)
    }

    /// The map between vCPU ids and logical numbers.
    pub fn ids(&self) -> &crate::ids::IdMap {
        &self.ids
    }
}
