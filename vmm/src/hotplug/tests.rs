//! The coordinator on the fake machine and a fake clock: one test per
//! timeout and race the old coordinator got wrong.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::agent::{GuestMessage, HostMessage};
use api::{OperationStatus, VcpuState};

use super::machine::fake::FakeMachine;
use super::record::{Lifecycle, RemovePhase};
use super::session::tests::{line, session, take_sent};
use super::{Coordinator, GuestEvent, Timeouts, VmFacts};
use crate::control::{Change, Mutation};
use crate::VcpuId;

/// A coordinator over a fake machine, with its own clock.
pub struct Harness {
    pub c: Coordinator<FakeMachine>,
    pub sent: Arc<Mutex<Vec<u8>>>,
    pub now: Instant,
}

impl Harness {
    /// `max` vCPUs, `boot` of them running; with a connected agent if `agent`.
    pub fn new(max: u32, boot: u32, agent: bool) -> Self {
        let (s, sent) = session();
        let facts = VmFacts {
            boot_vcpus: boot,
            memory_mib: 256,
        };
        let c = Coordinator::new(FakeMachine::new(max, boot), max, facts, s)
            .with_timeouts(Timeouts::default());
        let mut h = Self {
            c,
            sent,
            now: Instant::now(),
        };
        if agent {
            h.agent(GuestMessage::Ready {
                version: "test".into(),
                online: (0..boot).collect(),
                cpus: (0..boot).map(|i| (i, i)).collect(),
            });
        }
        h
    }

    pub fn agent(&mut self, msg: GuestMessage) {
        self.c.on_event(GuestEvent::AgentLine(line(&msg)), self.now);
    }

    pub fn event(&mut self, e: GuestEvent) {
        self.c.on_event(e, self.now);
    }

    pub fn mutate(&mut self, change: Change) -> Result<Mutation, api::ApiError> {
        self.c.mutate(change, self.now)
    }

    /// Moves the clock on (the agent keeps its heartbeat if `alive`) and ticks.
    pub fn advance(&mut self, d: Duration, alive: bool) {
        let step = Duration::from_secs(1);
        let end = self.now + d;
        while self.now < end {
            self.now = (self.now + step).min(end);
            if alive {
                self.agent(GuestMessage::Heartbeat);
            }
            self.c.tick(self.now);
        }
    }

    pub fn sent(&self) -> Vec<HostMessage> {
        take_sent(&self.sent)
    }

    pub fn life(&self, id: u32) -> Lifecycle {
        self.c.records().get(VcpuId::new(id)).unwrap().life
    }

    pub fn state(&self, id: u32) -> VcpuState {
        self.c.records().get(VcpuId::new(id)).unwrap().state()
    }

    /// The guest's scan acknowledges every pending insert.
    pub fn scan(&mut self) {
        for id in 0..u32::try_from(self.c.machine.vcpus.len()).unwrap_or(0) {
            let v = &mut self.c.machine.vcpus[id as usize];
            if v.inserting {
                v.inserting = false;
                v.insert_acked = true;
                self.event(GuestEvent::InsertAcked(VcpuId::new(id)));
            }
        }
    }

    /// The guest ejects `id` as asked.
    pub fn eject(&mut self, id: u32) {
        let v = &mut self.c.machine.vcpus[id as usize];
        assert!(v.eject_pending, "eject of vCPU {id} not requested: {v:?}");
        v.ejected = true;
        v.present = false;
        self.event(GuestEvent::Ejected(VcpuId::new(id)));
    }
}

fn op_of(m: Mutation) -> (api::Operation, tokio::sync::watch::Receiver<api::Operation>) {
    m.expect_started()
}

fn online(cpu: u32, logical: u32) -> GuestMessage {
    GuestMessage::Cpu {
        cpu,
        logical: Some(logical),
        online: true,
        requested: true,
    }
}

#[test]
fn an_add_out_of_order_completes_by_vcpu_id_and_shows_linux_number() {
    let mut h = Harness::new(8, 1, true);
    let (_, progress) = op_of(h.mutate(Change::Add(6)).unwrap());
    h.scan();
    assert_eq!(h.state(6), VcpuState::Adding);
    // Linux calls it cpu1; the agent reports vCPU 6.
    h.agent(online(6, 1));
    assert_eq!(progress.borrow().status, OperationStatus::Succeeded);
    let r = h.c.records().get(VcpuId::new(6)).unwrap().clone();
    assert_eq!((r.state(), r.guest_cpu), (VcpuState::Present, Some(1)));
    assert_eq!(h.state(1), VcpuState::Absent);
    assert_eq!(h.c.vcpu_list().vcpus[6].guest_cpu, Some(1));
}

#[test]
fn finding_1_an_add_the_guest_started_but_reported_late_stays_present() {
    let mut h = Harness::new(4, 1, true);
    let (_, progress) = op_of(h.mutate(Change::Add(2)).unwrap());
    h.scan();
    h.c.machine.vcpus[2].started = true;
    h.advance(Timeouts::default().add, true);
    let op = progress.borrow().clone();
    assert_eq!(op.status, OperationStatus::Failed);
    assert!(op.reason.unwrap().contains("stays present"));
    // The thread the guest runs on was never stopped.
    assert!(h.c.machine.vcpus[2].thread);
    assert_eq!(h.state(2), VcpuState::Present);
    // The late report agrees.
    h.agent(online(2, 1));
    assert_eq!(
        h.c.records().get(VcpuId::new(2)).unwrap().guest_online,
        Some(true)
    );
}

#[test]
fn finding_1_an_add_the_guest_never_started_is_ejected_and_can_be_added_again() {
    let mut h = Harness::new(4, 1, true);
    let (_, progress) = op_of(h.mutate(Change::Add(3)).unwrap());
    h.scan(); // Linux enumerated it, never onlined it.
    h.c.machine.started_unknown_once.insert(3);
    h.advance(Timeouts::default().add + Duration::from_secs(1), true);
    assert_eq!(progress.borrow().status, OperationStatus::Failed);
    assert!(matches!(
        h.life(3),
        Lifecycle::Removing {
            phase: RemovePhase::Ejecting { undo_add: true, .. },
            ..
        }
    ));
    // The guest is told (a real eject); its thread stops only after it.
    assert!(h.c.machine.vcpus[3].thread);
    h.eject(3);
    assert_eq!(h.state(3), VcpuState::Absent);
    assert!(!h.c.machine.vcpus[3].thread);
    // A re-add of that id completes.
    let (_, progress) = op_of(h.mutate(Change::Add(3)).unwrap());
    h.scan();
    h.agent(online(3, 1));
    assert_eq!(progress.borrow().status, OperationStatus::Succeeded);
}

#[test]
fn finding_1_an_add_the_guest_never_scanned_is_withdrawn() {
    let mut h = Harness::new(4, 1, true);
    let (_, progress) = op_of(h.mutate(Change::Add(1)).unwrap());
    h.advance(Timeouts::default().add, true);
    let op = progress.borrow().clone();
    assert_eq!(op.status, OperationStatus::Failed);
    assert!(op.reason.unwrap().contains("withdrawn"));
    assert_eq!(h.state(1), VcpuState::Absent);
    assert_eq!(h.c.machine.vcpus[1], Default::default());
}

/// vCPUs 1..=n present, with the agent.
fn with_present(n: u32) -> Harness {
    let mut h = Harness::new(16, 1, true);
    for id in 1..=n {
        h.mutate(Change::Add(id)).unwrap();
        h.scan();
        h.agent(online(id, id));
    }
    h.sent();
    h
}

#[test]
fn finding_2_a_queued_removal_has_no_deadline_until_the_agent_is_asked() {
    let mut h = with_present(10);
    let (_, progress) = op_of(h.mutate(Change::Resize { desired: 1 }).unwrap());
    let asked = h.sent().len();
    assert_eq!(asked, super::PREPARES_IN_FLIGHT);
    // The agent takes its time but answers within each prepare timeout.
    for id in (1..=10).rev() {
        h.advance(Duration::from_secs(8), true);
        h.agent(GuestMessage::Prepared {
            cpu: id,
            ok: true,
            reason: None,
        });
    }
    for id in 1..=10 {
        assert!(
            matches!(
                h.life(id),
                Lifecycle::Removing {
                    phase: RemovePhase::Ejecting { .. },
                    ..
                }
            ),
            "vCPU {id}: {:?}",
            h.life(id)
        );
        h.eject(id);
    }
    assert_eq!(progress.borrow().status, OperationStatus::Succeeded);
}

#[test]
fn finding_2_an_eject_timeout_after_the_agent_offlined_brings_the_cpu_back() {
    let mut h = with_present(2);
    let (_, progress) = op_of(h.mutate(Change::Remove(2)).unwrap());
    assert_eq!(h.sent(), vec![HostMessage::PrepareRemove { cpu: 2 }]);
    h.agent(GuestMessage::Prepared {
        cpu: 2,
        ok: true,
        reason: None,
    });
    h.advance(Timeouts::default().eject, true);
    assert_eq!(h.sent(), vec![HostMessage::CancelRemove { cpu: 2 }]);
    let op = progress.borrow().clone();
    assert_eq!(op.status, OperationStatus::Failed);
    // Not present until the guest confirms it online.
    assert_eq!(h.state(2), VcpuState::Removing);
    assert!(!h.c.machine.vcpus[2].eject_pending);
    h.agent(GuestMessage::Restored {
        cpu: 2,
        ok: true,
        reason: None,
    });
    assert_eq!(h.state(2), VcpuState::Present);
    assert_eq!(
        h.c.records().get(VcpuId::new(2)).unwrap().guest_online,
        Some(true)
    );
}

#[test]
fn finding_2_a_timeout_that_loses_the_race_with_the_eject_is_a_success() {
    let mut h = with_present(1);
    let (_, progress) = op_of(h.mutate(Change::Remove(1)).unwrap());
    h.agent(GuestMessage::Prepared {
        cpu: 1,
        ok: true,
        reason: None,
    });
    // The guest ejects; the event is still queued when the deadline runs.
    h.c.machine.vcpus[1].ejected = true;
    h.advance(Timeouts::default().eject, true);
    assert_eq!(progress.borrow().status, OperationStatus::Running);
    h.event(GuestEvent::Ejected(VcpuId::new(1)));
    assert_eq!(progress.borrow().status, OperationStatus::Succeeded);
    assert_eq!(h.state(1), VcpuState::Absent);
}

#[test]
fn finding_3_a_thread_that_does_not_stop_is_stuck_then_retried() {
    let mut h = with_present(2);
    h.c.machine.stuck.insert(2);
    let (_, progress) = op_of(h.mutate(Change::Remove(2)).unwrap());
    h.agent(GuestMessage::Prepared {
        cpu: 2,
        ok: true,
        reason: None,
    });
    h.eject(2);
    assert_eq!(h.state(2), VcpuState::Stuck);
    let op = progress.borrow().clone();
    assert_eq!(op.status, OperationStatus::Failed);
    assert!(op.reason.unwrap().contains("stuck"));
    assert_eq!(h.c.metrics().stuck_vcpus, 1);
    // Still stuck: a change that needs it is a conflict, with its reason.
    let e = h.mutate(Change::Add(2)).unwrap_err();
    assert_eq!(e.code, api::ErrorCode::Conflict);
    // The thread stops: the next request retries the join and goes on.
    h.c.machine.stuck.clear();
    op_of(h.mutate(Change::Add(2)).unwrap());
    assert_eq!(h.state(2), VcpuState::Adding);
    assert_eq!(h.c.metrics().stuck_vcpus, 0);
}

#[test]
fn finding_4_repeated_deletes_keep_one_count_and_the_first_deadline() {
    let mut h = Harness::new(4, 2, false);
    let (op, progress) = op_of(h.mutate(Change::Remove(1)).unwrap());
    for _ in 0..5 {
        h.advance(Duration::from_secs(5), false);
        let (again, _) = op_of(h.mutate(Change::Remove(1)).unwrap());
        assert_eq!(again.id, op.id);
    }
    assert_eq!(h.c.records().get(VcpuId::new(1)).unwrap().repeats, 5);
    assert_eq!(h.c.metrics().repeated_requests, 5);
    let reason_before = progress.borrow().reason.clone();
    // The deadline ran from the first request, not the last.
    h.advance(Duration::from_secs(5), false);
    let done = progress.borrow().clone();
    assert_eq!(done.status, OperationStatus::Failed);
    assert!(done
        .reason
        .as_deref()
        .unwrap()
        .starts_with("vCPU 1: the guest did not eject it within 30 s"));
    assert_eq!(
        reason_before.as_deref().map(str::len),
        Some("vCPU 1: no guest agent connected; used the plain ACPI eject".len())
    );
    assert_eq!(h.state(1), VcpuState::Present);
}

#[test]
fn a_late_eject_after_a_withdrawn_request_the_guest_had_seen_removes_it() {
    let mut h = Harness::new(4, 2, false);
    op_of(h.mutate(Change::Remove(1)).unwrap());
    h.c.machine.vcpus[1].eject_acked = true;
    h.advance(Timeouts::default().eject, false);
    assert_eq!(h.state(1), VcpuState::Present);
    h.event(GuestEvent::EjectRefused(VcpuId::new(1)));
    assert_eq!(h.state(1), VcpuState::Absent);
    assert!(!h.c.machine.vcpus[1].thread);
    // Any other refused eject changes nothing.
    h.event(GuestEvent::EjectRefused(VcpuId::new(1)));
    h.event(GuestEvent::EjectRefused(VcpuId::new(0)));
    assert_eq!(h.state(0), VcpuState::Present);
}

#[test]
fn every_operation_has_a_total_deadline() {
    let mut h = Harness::new(4, 1, true);
    let (_, progress) = op_of(h.mutate(Change::Add(1)).unwrap());
    h.scan();
    // The guest never answers anything; the add is undone by an eject the
    // guest never does either; the operation still ends.
    h.advance(crate::control::OperationTable::DEADLINE, false);
    assert!(progress.borrow().status.is_finished());
    assert!(h.c.tick(h.now).is_none_or(|t| t > h.now));
}
