//! The agent's part in the VMM's graceful removal (`prepare_remove`,
//! `cancel_remove`) and the test faults. Requests name the CPU by vCPU id;
//! everything done to it uses its logical number.

use std::sync::Arc;
use std::time::Duration;

use agent_proto::agent::{Fault, GuestMessage};
use smpboot::{CpuState, Topology};

use super::{reason, Agent, REFUSED_BY_FAULT};

impl Agent {
    /// The graceful removal protocol: park vCPU `id`'s workers
    /// (synchronously), write 0 to its `online`, and answer; if the write
    /// fails, unpark them again and answer with the reason. A vCPU the
    /// guest does not have is refused.
    pub fn prepare_remove(&mut self, id: u32) -> GuestMessage {
        let answer = |ok: bool, reason: Option<String>| GuestMessage::Prepared {
            cpu: id,
            ok,
            reason,
        };
        let Some(cpu) = self.logical_of(id) else {
            return answer(false, Some(format!("no CPU is vCPU {id} in the guest")));
        };
        let state = match self.registry.cpu_state(cpu) {
            Ok(state) => state,
            Err(e) => return answer(false, Some(e.to_string())),
        };
        if state != CpuState::Online {
            return match self.topo.is_online(cpu) {
                // Down already (forced, or asked twice): nothing runs there.
                Ok(false) => {
                    self.reconcile(cpu, true, false);
                    answer(true, None)
                }
                Ok(true) => answer(
                    false,
                    Some(format!("cpu{cpu} (vCPU {id}) workers are {state}")),
                ),
                Err(e) => answer(false, Some(e.to_string())),
            };
        }
        let refuse = self.refuse.remove(&id);
        let work = Arc::clone(self.workers.workload());
        work.set_online(cpu, false);
        let outcome = (|| {
            let mut hp = self.registry.hotplug().map_err(|e| e.to_string())?;
            hp.offline(cpu).map_err(|e| e.to_string())?;
            let write = if refuse {
                Err(REFUSED_BY_FAULT.to_owned())
            } else {
                self.topo.set_online(cpu, false).map_err(|e| reason(&e))
            };
            if let Err(why) = write {
                // CPU_DOWN_FAILED: the workers run again.
                return Err(match hp.failed_offline(cpu) {
                    Ok(()) => why,
                    Err(e) => format!("{why} (and the rollback failed: {e})"),
                });
            }
            Ok(())
        })();
        self.workers_dirty = true;
        match outcome {
            Ok(()) => {
                self.reconcile(cpu, true, false);
                answer(true, None)
            }
            Err(why) => {
                work.set_online(cpu, true);
                self.error(format!("cpu={cpu} vcpu={id} offline: {why}"));
                answer(false, Some(why))
            }
        }
    }

    /// The VMM gave up removing vCPU `id`: if the CPU is offline, bring it
    /// back (prepare, write 1, unpark), and answer whether it is online
    /// with its workers unparked. A CPU that was never taken down is just
    /// confirmed; one that was ejected already cannot come back.
    pub fn cancel_remove(&mut self, id: u32) -> GuestMessage {
        let answer = |ok: bool, reason: Option<String>| GuestMessage::Restored {
            cpu: id,
            ok,
            reason,
        };
        let Some(cpu) = self.logical_of(id) else {
            return answer(
                false,
                Some(format!("no CPU is vCPU {id} in the guest (ejected?)")),
            );
        };
        if !self.topo.sysfs().exists(cpu) {
            return answer(
                false,
                Some(format!("cpu{cpu} (vCPU {id}) no longer exists")),
            );
        }
        let outcome = (|| -> Result<bool, String> {
            let mut hp = self.registry.hotplug().map_err(|e| e.to_string())?;
            let mut state = hp.cpu_state(cpu).map_err(|e| e.to_string())?;
            let online = self.topo.is_online(cpu).map_err(|e| reason(&e))?;
            if state == CpuState::Online && online {
                return Ok(false);
            }
            if state == CpuState::Online {
                // Down behind the registry's back, the uevent not seen yet.
                hp.forced_offline(cpu).map_err(|e| e.to_string())?;
                state = CpuState::Offline;
            }
            if state == CpuState::Offline {
                hp.prepare(cpu).map_err(|e| format!("prepare: {e}"))?;
            }
            if !online {
                self.topo.set_online(cpu, true).map_err(|e| reason(&e))?;
            }
            hp.online(cpu).map_err(|e| e.to_string())?;
            Ok(true)
        })();
        match outcome {
            Ok(changed) => {
                if changed {
                    self.workers_dirty = true;
                    self.workers.workload().set_online(cpu, true);
                    self.trace(&format!("restored cpu={cpu} vcpu={id}"));
                    self.reconcile(cpu, true, false);
                }
                answer(true, None)
            }
            Err(why) => {
                self.error(format!("cpu={cpu} vcpu={id} restore: {why}"));
                answer(false, Some(why))
            }
        }
    }

    /// A test fault; `cpu` is a vCPU id. One without what it needs (a CPU,
    /// a delay) is dropped like a malformed line.
    pub(super) fn on_fault(&mut self, fault: Fault, cpu: Option<u32>, ms: Option<u64>) {
        self.trace(&format!("fault {fault:?} cpu={cpu:?} ms={ms:?}"));
        match (fault, cpu) {
            (Fault::RefuseOffline, Some(id)) => {
                self.refuse.insert(id);
            }
            // As an admin would: the uevent path must notice.
            (Fault::ForceOffline, Some(id)) => match self.logical_of(id) {
                Some(cpu) => {
                    if let Err(e) = self.topo.set_online(cpu, false) {
                        self.error(format!("cpu={cpu} vcpu={id} force offline: {}", reason(&e)));
                    }
                }
                None => self.error(format!("vcpu={id} force offline: no such CPU")),
            },
            (Fault::Silence, _) => {
                self.silenced = true;
                self.out.host.clear();
                self.held.clear();
                self.out.console.push("GUEST-AGENT silenced".into());
            }
            (Fault::DelayReport, _) => match ms {
                Some(ms) => self.delay_next = Some(Duration::from_millis(ms)),
                None => self.dropped_lines += 1,
            },
            (Fault::RefuseOffline | Fault::ForceOffline, None) => self.dropped_lines += 1,
        }
    }
}
