//! The coordinator's one periodic entry point: [`Coordinator::tick`] runs
//! every deadline that has passed and says when it is next needed. Each
//! timeout's outcome leaves the VMM and the guest agreeing (see
//! [`super::Timeouts`]).

use std::time::{Duration, Instant};

use super::machine::{Machine, Started, Withdraw};
use super::record::{Lifecycle, RemovePhase};
use super::Coordinator;
use crate::VcpuId;

/// How long to keep asking whether the guest started a vCPU whose add
/// timed out, before assuming it did (the safe side: its thread is kept).
pub const STARTED_PROBE_LIMIT: Duration = Duration::from_secs(1);
/// How soon to ask again.
const STARTED_PROBE_RETRY: Duration = Duration::from_millis(20);

/// The earliest of several instants.
#[derive(Debug, Default)]
struct Earliest(Option<Instant>);

impl Earliest {
    fn add(&mut self, at: Option<Instant>) {
        if let Some(at) = at {
            self.0 = Some(self.0.map_or(at, |n| n.min(at)));
        }
    }
}

impl<M: Machine> Coordinator<M> {
    /// Runs every deadline that passed by `now`, flushes the agent's
    /// outbox, and returns when to be called next (`None`: nothing pending).
    pub fn tick(&mut self, now: Instant) -> Option<Instant> {
        self.session.flush();
        let mut next = Earliest::default();
        let ids: Vec<VcpuId> = self.records.iter().map(|r| r.id).collect();
        for id in ids {
            let Some(life) = self.records.get(id).map(|r| r.life) else {
                continue;
            };
            next.add(match life {
                Lifecycle::Adding { since, .. } => self.add_deadline(id, since, now),
                Lifecycle::Removing { since, phase } => self.remove_deadline(id, since, phase, now),
                _ => None,
            });
        }
        self.pump_prepares(now);
        next.add(self.ops.expire(now));
        self.workload.pump_acks(&mut self.session);
        next.add(self.workload.next_wake(now));
        next.add(self.session.next_wake(now));
        next.0
    }

    fn add_deadline(&mut self, id: VcpuId, since: Instant, now: Instant) -> Option<Instant> {
        let deadline = since + self.timeouts.add;
        if now < deadline {
            return Some(deadline);
        }
        let secs = self.timeouts.add.as_secs();
        let started = self.machine.started(id);
        if started == Started::Unknown && now < deadline + STARTED_PROBE_LIMIT {
            return Some(now + STARTED_PROBE_RETRY);
        }
        self.machine
            .diagnose(id, "the guest did not bring it online in time");
        if started != Started::No {
            // The guest runs code on it: stopping it now would leave the
            // guest a CPU without a thread. It stays.
            if let Some(r) = self.records.get_mut(id) {
                r.life = Lifecycle::Present;
            }
            self.counters.hot_adds += 1;
            self.fail(
                id,
                &format!(
                    "the guest started it but did not report it online within {secs} s; \
                     it stays present"
                ),
            );
            return None;
        }
        if self.machine.withdraw_insert(id) == Withdraw::Withdrawn {
            // The guest never scanned it: it never knew the vCPU.
            if self.retire(id, now) {
                self.fail(
                    id,
                    &format!(
                        "the guest did not scan the insertion within {secs} s; \
                         the add was withdrawn and the vCPU is absent again"
                    ),
                );
            }
            return None;
        }
        // The guest enumerated it but never started it: a real eject, so
        // that the guest forgets it and a later add of this id completes.
        match self.machine.request_eject(id) {
            Ok(()) => {
                if let Some(r) = self.records.get_mut(id) {
                    r.life = Lifecycle::Removing {
                        since: now,
                        phase: RemovePhase::Ejecting {
                            asked: now,
                            prepared: false,
                            undo_add: true,
                        },
                    };
                }
                self.fail(
                    id,
                    &format!(
                        "the guest did not bring it online within {secs} s and never \
                         started it; the add is undone (the guest is asked to eject it)"
                    ),
                );
                Some(now + self.timeouts.eject)
            }
            Err(e) => {
                if let Some(r) = self.records.get_mut(id) {
                    r.life = Lifecycle::Present;
                }
                self.fail(
                    id,
                    &format!(
                        "the guest did not bring it online within {secs} s, and undoing \
                         the add failed ({e}); it stays present, offline"
                    ),
                );
                None
            }
        }
    }

    fn remove_deadline(
        &mut self,
        id: VcpuId,
        since: Instant,
        phase: RemovePhase,
        now: Instant,
    ) -> Option<Instant> {
        match phase {
            RemovePhase::Queued | RemovePhase::Prepared => None,
            RemovePhase::Withheld => {
                let deadline = since + self.timeouts.eject;
                if now < deadline {
                    return Some(deadline);
                }
                let secs = self.timeouts.eject.as_secs();
                self.keep(
                    id,
                    &format!(
                        "the guest did not eject it within {secs} s (the ignore_removal \
                         test hook kept the request from the guest)"
                    ),
                );
                None
            }
            RemovePhase::Preparing { asked } => {
                let deadline = self.session.prepare_deadline(asked, self.timeouts.prepare);
                if now < deadline && self.session.connected(now) {
                    return Some(deadline);
                }
                self.ops.vcpu_note(
                    id.get(),
                    "the guest agent did not answer the prepare request; used the plain ACPI eject",
                );
                self.machine
                    .diagnose(id, "the guest agent did not answer its prepare request");
                self.eject(id, since, now, false);
                Some(now + self.timeouts.eject)
            }
            RemovePhase::Ejecting { asked, .. } => {
                let deadline = asked + self.timeouts.eject;
                if now < deadline {
                    return Some(deadline);
                }
                self.eject_timed_out(id, since, now);
                Some(now + self.timeouts.restore)
            }
            RemovePhase::Restoring { asked } => {
                let deadline = asked + self.timeouts.restore;
                if now < deadline {
                    return Some(deadline);
                }
                if let Some(r) = self.records.get_mut(id) {
                    r.life = Lifecycle::Present;
                }
                log::warn!(
                    "vCPU {id}: the guest agent did not confirm it back online within {} s; \
                     present, as the guest last reported it",
                    self.timeouts.restore.as_secs()
                );
                None
            }
        }
    }
}
