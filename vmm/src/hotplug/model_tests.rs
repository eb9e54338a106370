//! Model-based tests of the coordinator: seeded random sequences of API
//! changes, guest actions (scans, onlines, ejects, the agent's answers,
//! silence) and clock advances against the fake machine and a simulated
//! guest, with the invariants checked after every step.
//!
//! `MODEL_CASES` (default 10,000) and `MODEL_STEPS` (default 40) size the
//! run; a failure prints its seed, and `MODEL_SEED=N` replays that case.

use std::collections::VecDeque;
use std::time::Duration;

use api::agent::{GuestMessage, HostMessage};
use api::{OperationStatus, VcpuState};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::record::Lifecycle;
use super::tests::Harness;
use super::GuestEvent;
use crate::control::{Change, Mutation, OperationTable};
use crate::VcpuId;

const MAX: u32 = 6;

/// What the simulated guest knows of one CPU.
#[derive(Debug, Clone, Copy, Default)]
struct GuestCpu {
    /// Linux enumerated it (`cpuN` exists).
    known: bool,
    /// Online.
    online: bool,
}

struct Model {
    h: Harness,
    guest: Vec<GuestCpu>,
    agent_alive: bool,
    /// Host messages the agent has not acted on yet.
    inbox: VecDeque<HostMessage>,
    /// Every operation started, with when (on the fake clock).
    ops: Vec<(
        std::time::Instant,
        tokio::sync::watch::Receiver<api::Operation>,
    )>,
}

impl Model {
    fn new(rng: &mut StdRng) -> Self {
        let boot = rng.gen_range(1..=2);
        let agent = rng.gen_bool(0.8);
        let h = Harness::new(MAX, boot, agent);
        let mut guest = vec![GuestCpu::default(); MAX as usize];
        for g in guest.iter_mut().take(boot as usize) {
            *g = GuestCpu {
                known: true,
                online: true,
            };
        }
        Self {
            h,
            guest,
            agent_alive: agent,
            inbox: VecDeque::new(),
            ops: Vec::new(),
        }
    }

    fn report(&mut self, msg: GuestMessage) {
        if self.agent_alive {
            self.h.agent(msg);
        }
    }

    fn step(&mut self, rng: &mut StdRng) {
        self.inbox.extend(self.h.sent());
        match rng.gen_range(0..10) {
            0 | 1 => {
                let change = match rng.gen_range(0..3) {
                    0 => Change::Resize {
                        desired: rng.gen_range(1..=MAX),
                    },
                    1 => Change::Add(rng.gen_range(0..MAX)),
                    _ => Change::Remove(rng.gen_range(0..MAX)),
                };
                if let Ok(Mutation::Started { progress, .. }) = self.h.mutate(change) {
                    self.ops.push((self.h.now, progress));
                }
            }
            2 => self.h.scan_some(rng, &mut self.guest),
            3 => {
                // The guest brings an enumerated CPU online (the agent, or udev).
                let id = rng.gen_range(1..MAX) as usize;
                let v = self.h.c.machine.vcpus[id];
                if self.guest[id].known && !self.guest[id].online && v.thread && !v.eject_acked {
                    self.h.c.machine.vcpus[id].started = true;
                    self.guest[id].online = true;
                    let logical = u32::try_from(id).unwrap_or(0) + 10;
                    self.report(GuestMessage::Cpu {
                        cpu: u32::try_from(id).unwrap_or(0),
                        logical: Some(logical),
                        online: true,
                        requested: true,
                    });
                }
            }
            4 => {
                // The guest acts on an eject request: acknowledge, offline, eject.
                // A guest that acknowledged an eject request goes through
                // with it even if the request was withdrawn meanwhile.
                let id = rng.gen_range(1..MAX) as usize;
                let vcpu = VcpuId::new(u32::try_from(id).unwrap_or(0));
                let v = &mut self.h.c.machine.vcpus[id];
                if v.eject_acked && !v.ejected && v.thread {
                    self.guest[id] = GuestCpu::default();
                    if v.eject_pending {
                        self.h.eject(vcpu.get());
                    } else {
                        v.eject_acked = false;
                        self.h.event(GuestEvent::EjectRefused(vcpu));
                    }
                } else if v.eject_pending && !v.ejected {
                    v.eject_acked = true;
                }
            }
            5 => self.agent_acts(rng),
            6 => self.agent_alive = self.agent_alive && rng.gen_bool(0.7),
            _ => {
                let d = Duration::from_millis(rng.gen_range(100..20_000));
                self.h.advance(d, self.agent_alive);
            }
        }
        self.h.now += Duration::from_millis(1);
        self.h.c.tick(self.h.now);
    }

    /// The agent answers its oldest request.
    fn agent_acts(&mut self, rng: &mut StdRng) {
        if !self.agent_alive {
            return;
        }
        let Some(msg) = self.inbox.pop_front() else {
            return;
        };
        match msg {
            HostMessage::PrepareRemove { cpu } => {
                let ok = rng.gen_bool(0.8) && self.guest[cpu as usize].known;
                if ok {
                    self.guest[cpu as usize].online = false;
                }
                self.report(GuestMessage::Prepared {
                    cpu,
                    ok,
                    reason: (!ok).then(|| "refused".into()),
                });
            }
            HostMessage::CancelRemove { cpu } => {
                let g = &mut self.guest[cpu as usize];
                let ok = g.known;
                g.online = g.known;
                self.report(GuestMessage::Restored {
                    cpu,
                    ok,
                    reason: None,
                });
            }
            _ => {}
        }
    }

    fn check(&self, seed: u64, step: usize) {
        let at = || format!("seed {seed} step {step}");
        let m = &self.h.c.machine;
        for r in self.h.c.records().iter() {
            let i = r.id.index();
            let v = m.vcpus[i];
            let g = self.guest[i];
            // Never a CPU the guest runs without a thread behind it.
            assert!(
                !g.online || v.thread,
                "{}: vCPU {i} online without a thread: {r:?}",
                at()
            );
            // The record and the machinery agree.
            assert_eq!(
                r.has_thread(),
                v.thread,
                "{}: vCPU {i} thread: {r:?} {v:?}",
                at()
            );
            if r.life == Lifecycle::Absent {
                assert!(!v.present, "{}: absent vCPU {i} still plugged in", at());
            }
            if matches!(r.life, Lifecycle::Present) {
                assert!(
                    v.present || v.ejected,
                    "{}: present vCPU {i} not plugged",
                    at()
                );
            }
            // What the VMM reports as online is online in the guest.
            if r.state() == VcpuState::Present && r.guest_online == Some(true) {
                assert!(
                    g.online,
                    "{}: vCPU {i} reported online, offline in the guest",
                    at()
                );
            }
        }
        // No operation outlives its total deadline.
        for (started, op) in &self.ops {
            let op = op.borrow();
            if op.status == OperationStatus::Running {
                let age = self.h.now.saturating_duration_since(*started);
                assert!(age < OperationTable::DEADLINE, "{}: {op:?}", at());
            }
        }
    }

    /// A responsive guest from here on: everything settles, every
    /// operation ends.
    fn settle(&mut self, rng: &mut StdRng, seed: u64) {
        self.agent_alive = true;
        for _ in 0..30 {
            self.inbox.extend(self.h.sent());
            self.agent_acts(rng);
            self.h.scan_some(rng, &mut self.guest);
            self.h.advance(Duration::from_secs(5), true);
        }
        self.h.advance(OperationTable::DEADLINE, true);
        for (_, op) in &self.ops {
            assert!(
                op.borrow().status.is_finished(),
                "seed {seed}: an operation never ended: {:?}",
                op.borrow()
            );
        }
    }
}

impl Harness {
    /// The guest's scan acknowledges some pending inserts.
    fn scan_some(&mut self, rng: &mut StdRng, guest: &mut [GuestCpu]) {
        for id in 0..MAX {
            let v = &mut self.c.machine.vcpus[id as usize];
            if v.inserting && rng.gen_bool(0.7) {
                v.inserting = false;
                v.insert_acked = true;
                guest[id as usize].known = true;
                self.event(GuestEvent::InsertAcked(VcpuId::new(id)));
            }
        }
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn coordinator_model() {
    let cases = env("MODEL_CASES", 10_000);
    let steps = usize::try_from(env("MODEL_STEPS", 40)).unwrap_or(40);
    let seeds: Vec<u64> = match std::env::var("MODEL_SEED") {
        Ok(s) => vec![s.parse().expect("MODEL_SEED is a number")],
        Err(_) => (0..cases).collect(),
    };
    for seed in seeds {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut model = Model::new(&mut rng);
        for step in 0..steps {
            model.step(&mut rng);
            model.check(seed, step);
        }
        model.settle(&mut rng, seed);
        model.check(seed, steps);
    }
}
