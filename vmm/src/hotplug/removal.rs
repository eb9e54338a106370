//! Removals: through the agent's prepare step (park the CPU's workers,
//! offline it) then the ACPI eject, or the ACPI eject alone; and their
//! cancellation, which brings a CPU the agent offlined back online before
//! the vCPU counts as present again.

use std::time::Instant;

use api::agent::HostMessage;

use super::machine::{Machine, Withdraw};
use super::record::{Lifecycle, RemovePhase};
use super::{Coordinator, PREPARES_IN_FLIGHT};
use crate::VcpuId;

impl<M: Machine> Coordinator<M> {
    fn set_phase(&mut self, id: VcpuId, since: Instant, phase: RemovePhase) {
        if let Some(r) = self.records.get_mut(id) {
            r.life = Lifecycle::Removing { since, phase };
        }
    }

    /// Starts removing `id` (present): queued for the agent when one is
    /// connected, else the plain ACPI eject; or, with the `ignore_removal`
    /// hook armed, only reserved.
    pub(super) fn start_remove(&mut self, id: VcpuId, now: Instant) {
        if let Some(r) = self.records.get_mut(id) {
            r.repeats = 0;
        }
        if self.withhold.remove(&id) {
            self.set_phase(id, now, RemovePhase::Withheld);
            log::warn!("vCPU {id}: removal reserved but not sent (test hook ignore_removal)");
            self.ops.vcpu_note(
                id.get(),
                "test hook ignore_removal: the request was not sent to the guest",
            );
        } else if self.session.connected(now) {
            self.set_phase(id, now, RemovePhase::Queued);
        } else {
            self.ops.vcpu_note(
                id.get(),
                "no guest agent connected; used the plain ACPI eject",
            );
            self.eject(id, now, now, false);
        }
    }

    /// A `DELETE` repeated a removal in flight: counted, and the eject
    /// request raised again if the guest may have missed it (its deadline
    /// is not extended). A withheld removal is sent for real.
    pub(super) fn repeat_removal(&mut self, id: VcpuId, now: Instant) {
        let Some(Lifecycle::Removing { since, phase }) = self.records.get(id).map(|r| r.life)
        else {
            return;
        };
        match phase {
            RemovePhase::Withheld if self.session.connected(now) => {
                self.set_phase(id, since, RemovePhase::Queued);
            }
            RemovePhase::Withheld => self.eject(id, since, now, false),
            RemovePhase::Ejecting { .. } => {
                if let Err(e) = self.machine.request_eject(id) {
                    log::warn!("vCPU {id}: raising the eject request again failed: {e}");
                }
            }
            _ => {}
        }
    }

    /// Requests the ACPI eject of `id`; a failure gives the removal up.
    pub(super) fn eject(&mut self, id: VcpuId, since: Instant, now: Instant, prepared: bool) {
        let requested = if self.withhold_eject.remove(&id) {
            log::warn!("vCPU {id}: eject request not raised (test hook ignore_eject)");
            self.ops.vcpu_note(
                id.get(),
                "test hook ignore_eject: the eject request was not raised",
            );
            Ok(())
        } else {
            self.machine.request_eject(id)
        };
        match requested {
            Ok(()) => {
                log::info!("vCPU {id}: ACPI eject requested");
                let phase = RemovePhase::Ejecting {
                    asked: now,
                    prepared,
                    undo_add: false,
                };
                self.set_phase(id, since, phase);
            }
            Err(e) => {
                let reason = format!("the eject request failed: {e}");
                if prepared {
                    self.restore(id, since, now, &reason);
                } else {
                    self.keep(id, &reason);
                }
            }
        }
    }

    /// Gives the removal of `id` up before the guest acted on it: present.
    pub(super) fn keep(&mut self, id: VcpuId, reason: &str) {
        if let Some(r) = self.records.get_mut(id) {
            r.life = Lifecycle::Present;
        }
        self.fail(id, &format!("{reason}; the vCPU stays present"));
    }

    /// Gives the removal of `id` up after the agent offlined it: the agent
    /// brings it back online, and the vCPU is present once it confirms.
    pub(super) fn restore(&mut self, id: VcpuId, since: Instant, now: Instant, reason: &str) {
        if self
            .session
            .send(&HostMessage::CancelRemove { cpu: id.get() })
        {
            self.set_phase(id, since, RemovePhase::Restoring { asked: now });
            self.fail(
                id,
                &format!("{reason}; the guest agent is bringing the CPU back online"),
            );
        } else {
            self.keep(
                id,
                &format!("{reason}; the guest agent cannot be reached to bring it back online"),
            );
        }
    }

    /// Hands queued removals to the agent, up to [`PREPARES_IN_FLIGHT`] at
    /// once (highest id first); once none is queued or being prepared,
    /// ejects the prepared ones together (one guest scan removes them all).
    /// Without an agent, queued and preparing ones use the plain eject.
    pub(super) fn pump_prepares(&mut self, now: Instant) {
        let queued = |p: RemovePhase| p == RemovePhase::Queued;
        let preparing = |p: RemovePhase| matches!(p, RemovePhase::Preparing { .. });
        if !self.session.connected(now) {
            for id in self.records.in_phase(|p| queued(p) || preparing(p)) {
                self.ops.vcpu_note(
                    id.get(),
                    "the guest agent went away; used the plain ACPI eject",
                );
                let since = self.since(id, now);
                self.eject(id, since, now, false);
            }
        }
        let mut out = self.records.in_phase(preparing).len();
        for id in self.records.in_phase(queued).into_iter().rev() {
            if out >= PREPARES_IN_FLIGHT {
                break;
            }
            let since = self.since(id, now);
            if self
                .session
                .send(&HostMessage::PrepareRemove { cpu: id.get() })
            {
                log::debug!("vCPU {id}: asked the agent to prepare its removal");
                self.set_phase(id, since, RemovePhase::Preparing { asked: now });
                out += 1;
            } else {
                self.ops.vcpu_note(
                    id.get(),
                    "the agent could not be reached; used the plain ACPI eject",
                );
                self.eject(id, since, now, false);
            }
        }
        if out == 0 && self.records.in_phase(queued).is_empty() {
            for id in self.records.in_phase(|p| p == RemovePhase::Prepared) {
                let since = self.since(id, now);
                self.eject(id, since, now, true);
            }
        }
    }

    fn since(&self, id: VcpuId, now: Instant) -> Instant {
        match self.records.get(id).map(|r| r.life) {
            Some(Lifecycle::Removing { since, .. }) => since,
            _ => now,
        }
    }

    /// The agent answered a prepare request.
    pub(super) fn on_prepared(&mut self, id: VcpuId, ok: bool, reason: Option<String>) {
        log::debug!("agent: vCPU {id} prepared for removal: ok={ok}");
        let Some(Lifecycle::Removing { since, phase }) = self.records.get(id).map(|r| r.life)
        else {
            self.on_late_prepared(id, ok);
            return;
        };
        match phase {
            RemovePhase::Preparing { .. } if ok => {
                self.set_phase(id, since, RemovePhase::Prepared);
                if let Some(r) = self.records.get_mut(id) {
                    r.guest_online = Some(false);
                }
            }
            RemovePhase::Preparing { .. } => {
                let why = reason.unwrap_or_else(|| "no reason given".into());
                // The agent rolled back: the CPU is online, workers unparked.
                self.keep(
                    id,
                    &format!(
                        "the guest agent refused to offline it: {}",
                        why.escape_debug()
                    ),
                );
            }
            // Late: the VMM fell back to the plain eject meanwhile; the
            // CPU is offline now, which a cancel must undo.
            RemovePhase::Ejecting {
                asked, undo_add, ..
            } if ok => {
                let phase = RemovePhase::Ejecting {
                    asked,
                    prepared: true,
                    undo_add,
                };
                self.set_phase(id, since, phase);
                if let Some(r) = self.records.get_mut(id) {
                    r.guest_online = Some(false);
                }
            }
            _ => log::warn!("agent: late prepared answer for vCPU {id} ignored"),
        }
    }

    /// A prepared answer for a vCPU no longer being removed (the removal
    /// was given up meanwhile): the agent offlined a CPU the VMM keeps, so
    /// it is asked to bring it back.
    pub(super) fn on_late_prepared(&mut self, id: VcpuId, ok: bool) {
        let Some(r) = self.records.get_mut(id) else {
            return;
        };
        if !ok || r.life != Lifecycle::Present {
            return;
        }
        r.guest_online = Some(false);
        log::warn!("agent: prepared vCPU {id} after its removal was given up; bringing it back");
        self.session
            .send(&HostMessage::CancelRemove { cpu: id.get() });
    }

    /// The agent answered a cancel: the CPU is back online (or not).
    pub(super) fn on_restored(&mut self, id: VcpuId, ok: bool, reason: Option<String>) {
        let Some(r) = self.records.get_mut(id) else {
            return;
        };
        if r.life == Lifecycle::Present {
            // The answer to a late cancel (see `on_late_prepared`).
            r.guest_online = Some(ok);
            return;
        }
        if !matches!(r.phase(), Some(RemovePhase::Restoring { .. })) {
            log::warn!("agent: unexpected restored answer for vCPU {id}");
            return;
        }
        r.life = Lifecycle::Present;
        r.guest_online = Some(ok);
        if ok {
            log::info!("vCPU {id}: back online after the cancelled removal");
        } else {
            let why = reason.unwrap_or_default();
            log::warn!(
                "vCPU {id}: the agent could not bring it back online: {}",
                why.escape_debug()
            );
        }
    }

    /// The guest ejected `id`: stop its thread and complete the removal.
    pub(super) fn on_ejected(&mut self, id: VcpuId, now: Instant) {
        let Some(Lifecycle::Removing { phase, .. }) = self.records.get(id).map(|r| r.life) else {
            log::warn!("vCPU {id}: eject while not being removed, ignored");
            return;
        };
        let undo = matches!(phase, RemovePhase::Ejecting { undo_add: true, .. });
        if self.retire(id, now) {
            if undo {
                log::info!("vCPU {id}: the undone add was ejected; absent again");
            } else {
                self.counters.hot_removes += 1;
                log::info!("vCPU {id}: removed (ejected, thread joined)");
            }
            self.done(id);
        }
    }

    /// The guest ejected `id` although no removal was pending. After a
    /// withdrawn request the guest had already seen, the guest removed the
    /// CPU after all: so does the VMM. Anything else is ignored (counted by
    /// the register block).
    pub(super) fn on_eject_refused(&mut self, id: VcpuId, now: Instant) {
        if !self.late_eject_ok.remove(&id) {
            return;
        }
        log::warn!("vCPU {id}: the guest ejected it after the request was withdrawn; removing it");
        if self.retire(id, now) {
            self.counters.hot_removes += 1;
        }
    }

    /// The eject of `id` (asked at `asked`) ran out of time: withdraw it.
    /// If the guest already ejected, the removal wins (its event is on the
    /// way). Otherwise the vCPU stays, through the agent if it offlined it.
    pub(super) fn eject_timed_out(&mut self, id: VcpuId, since: Instant, now: Instant) {
        let Some(RemovePhase::Ejecting {
            prepared, undo_add, ..
        }) = self.records.get(id).and_then(|r| r.phase())
        else {
            return;
        };
        let secs = self.timeouts.eject.as_secs();
        let withdraw = self.machine.withdraw_eject(id);
        if withdraw == Withdraw::Ejected {
            log::info!("vCPU {id}: eject timeout lost the race with the guest's eject");
            return;
        }
        self.machine
            .diagnose(id, "the guest did not eject it in time");
        if withdraw == Withdraw::Seen {
            self.late_eject_ok.insert(id);
        }
        let mut reason = format!("the guest did not eject it within {secs} s");
        if withdraw == Withdraw::Seen {
            reason.push_str(" (it had acknowledged the request; a late eject still removes it)");
        }
        if undo_add {
            // The operation already failed when the add was undone.
            if let Some(r) = self.records.get_mut(id) {
                r.life = Lifecycle::Present;
            }
            log::warn!("vCPU {id}: {reason}; the undone add stays present, offline");
        } else if prepared {
            self.restore(id, since, now, &reason);
        } else {
            self.keep(id, &reason);
        }
    }
}
