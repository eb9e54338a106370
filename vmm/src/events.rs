//! The VMM thread's event queue: what vCPU threads and devices report.
//!
//! A bounded queue plus an eventfd: senders (vCPU threads, in device
//! adapters) never block, and the event loop wakes on the eventfd and
//! takes a batch ([`EventReceiver::take_batch`]).
//!
//! The guest decides how many events it causes (every agent line is one),
//! so the queue is bounded: past its capacity, ordinary events
//! ([`VmEvent::AgentLine`]) are dropped and counted ([`EventReceiver::dropped`]).
//! Lifecycle events (power off, reset, vCPU failure, eject, insert
//! acknowledgement) take a reserved path: they are always queued, in order
//! with the rest, except that one identical to an event still queued is
//! coalesced with it (handling it twice would change nothing). That bounds
//! them by the number of vCPUs: at most one power off, one reset, and one
//! failure, eject and insert acknowledgement per vCPU id, so a guest flood
//! of agent lines can never make the VMM miss an eject.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::bus::lock;
use crate::ratelimit::RateLimiter;

/// Ordinary events queued at most (the VMM's default).
pub const DEFAULT_CAPACITY: usize = 256;

/// Events the event loop handles per epoll turn before it serves its other
/// sources (API requests, signals, deadlines) again.
pub const EVENTS_PER_TURN: usize = 64;

/// Events a vCPU thread reports to the VMM thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest powered off.
    PowerOff,
    /// The guest asked for a reset (reboot, triple fault).
    Reset,
    /// A vCPU cannot continue.
    Failed {
        /// Which vCPU.
        vcpu: u32,
        /// What happened.
        reason: String,
    },
    /// The guest ejected a vCPU through ACPI (`_EJ0`).
    Ejected(u32),
    /// The guest tried to eject a present vCPU with no removal pending.
    EjectRefused(u32),
    /// The guest's ACPI scan acknowledged the insertion of a vCPU.
    InsertAcked(u32),
    /// A line from the guest agent (`None`: an oversized line was dropped).
    AgentLine(Option<Vec<u8>>),
}

/// The identity of a lifecycle event, for coalescing duplicates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Lifecycle {
    PowerOff,
    Reset,
    Failed(u32),
    Ejected(u32),
    EjectRefused(u32),
    InsertAcked(u32),
}

impl VmEvent {
    /// `Some` for the events that are never dropped.
    fn lifecycle(&self) -> Option<Lifecycle> {
        match self {
            Self::PowerOff => Some(Lifecycle::PowerOff),
            Self::Reset => Some(Lifecycle::Reset),
            Self::Failed { vcpu, .. } => Some(Lifecycle::Failed(*vcpu)),
            Self::Ejected(id) => Some(Lifecycle::Ejected(*id)),
            // Coalesced per vCPU like the others, so a guest writing _EJ0
            // in a loop queues at most one per vCPU.
            Self::EjectRefused(id) => Some(Lifecycle::EjectRefused(*id)),
            Self::InsertAcked(id) => Some(Lifecycle::InsertAcked(*id)),
            Self::AgentLine(_) => None,
        }
    }
}

#[derive(Debug)]
struct Queue {
    events: VecDeque<VmEvent>,
    /// Ordinary (droppable) events in `events`.
    ordinary: usize,
    /// Lifecycle events in `events`.
    lifecycle: HashSet<Lifecycle>,
    warnings: RateLimiter,
}

impl Queue {
    /// The oldest event, if any, out of the queue and its bookkeeping.
    fn pop(&mut self) -> Option<VmEvent> {
        let event = self.events.pop_front()?;
        match event.lifecycle() {
            Some(key) => {
                self.lifecycle.remove(&key);
            }
            None => self.ordinary -= 1,
        }
        Some(event)
    }
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    capacity: usize,
    wake: EventFd,
    dropped: AtomicU64,
    coalesced: AtomicU64,
}

/// The sending side of the VMM thread's event queue.
#[derive(Clone, Debug)]
pub struct EventSender {
    shared: Arc<Shared>,
}

/// The VMM thread's side of the event queue: owns the wake eventfd.
#[derive(Debug)]
pub struct EventReceiver {
    shared: Arc<Shared>,
}

impl EventSender {
    /// A queue holding at most `capacity` ordinary events (plus the
    /// lifecycle events, see the module docs).
    pub fn new(capacity: usize) -> std::io::Result<(Self, EventReceiver)> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                events: VecDeque::new(),
                ordinary: 0,
                lifecycle: HashSet::new(),
                warnings: RateLimiter::default(),
            }),
            capacity,
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            dropped: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
        });
        Ok((
            Self {
                shared: shared.clone(),
            },
            EventReceiver { shared },
        ))
    }

    /// Queues an event and wakes the event loop. Never blocks; an ordinary
    /// event beyond the capacity is dropped and counted.
    pub fn send(&self, event: VmEvent) {
        self.send_all(std::iter::once(event));
    }

    /// Queues `events` in order as [`Self::send`] would one by one, under
    /// one lock, and wakes the event loop once: for what one guest write
    /// carried (a mailbox ring holds thousands of agent lines). Taking the
    /// lock per line, a vCPU thread takes it again and again before the
    /// woken VMM thread runs (a std mutex is not fair), and the VMM
    /// thread's [`EventReceiver::take_batch`] waited up to 30 ms for it.
    pub fn send_all(&self, events: impl IntoIterator<Item = VmEvent>) {
        let s = &*self.shared;
        let (mut queued, mut coalesced, mut dropped) = (false, 0, 0);
        let mut q = lock(&s.queue);
        for event in events {
            match event.lifecycle() {
                Some(key) => {
                    if !q.lifecycle.insert(key) {
                        coalesced += 1;
                        continue;
                    }
                }
                None if q.ordinary >= s.capacity => {
                    dropped += 1;
                    continue;
                }
                None => q.ordinary += 1,
            }
            q.events.push_back(event);
            queued = true;
        }
        let report = dropped > 0 && q.warnings.check("queue full").is_some();
        drop(q);
        if coalesced > 0 {
            s.coalesced.fetch_add(coalesced, Ordering::Relaxed);
        }
        if dropped > 0 {
            let total = s.dropped.fetch_add(dropped, Ordering::Relaxed) + dropped;
            if report {
                // Logged outside the lock: stderr may be slow.
                log::warn!(
                    "event queue full ({} events): dropped {dropped} agent line(s) ({total} dropped in all)",
                    s.capacity
                );
            }
        }
        if queued {
            let _ = s.wake.write(1);
        }
    }

    /// Ordinary events dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

impl EventReceiver {
    /// The eventfd that is readable while events may be queued.
    pub fn wake_fd(&self) -> &EventFd {
        &self.shared.wake
    }

    /// The oldest queued event, if any.
    pub fn try_next(&self) -> Option<VmEvent> {
        lock(&self.shared.queue).pop()
    }

    /// Consumes the wake-up and takes at most `max` events; if more remain,
    /// the eventfd is left readable so the loop comes back for them after
    /// serving its other sources.
    ///
    /// One lock for the whole batch: a flooding guest's vCPU thread takes
    /// the queue's lock for every line it sends, and a std mutex lets it
    /// take it again before a woken waiter runs, so every acquisition can
    /// cost the VMM thread a wait (a batch took up to 72 ms with one
    /// acquisition per event).
    pub fn take_batch(&self, max: usize) -> Vec<VmEvent> {
        let _ = self.shared.wake.read();
        let mut q = lock(&self.shared.queue);
        let mut batch = Vec::with_capacity(max.min(q.events.len()));
        while batch.len() < max {
            match q.pop() {
                Some(event) => batch.push(event),
                None => break,
            }
        }
        let more = !q.events.is_empty();
        drop(q);
        if more {
            let _ = self.shared.wake.write(1);
        }
        batch
    }

    /// Events queued now.
    pub fn len(&self) -> usize {
        lock(&self.shared.queue).events.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ordinary events dropped so far because the queue was full (a
    /// metric: the guest sent more than the VMM would queue).
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Lifecycle events coalesced with an identical one still queued.
    pub fn coalesced(&self) -> u64 {
        self.shared.coalesced.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(n: usize) -> VmEvent {
        VmEvent::AgentLine(Some(n.to_string().into_bytes()))
    }

    #[test]
    fn event_sender_wakes_the_loop() {
        let (tx, rx) = EventSender::new(8).unwrap();
        tx.send(VmEvent::Ejected(3));
        tx.send(VmEvent::PowerOff);
        assert_eq!(rx.wake_fd().read().unwrap(), 2);
        assert_eq!(rx.try_next(), Some(VmEvent::Ejected(3)));
        assert_eq!(rx.try_next(), Some(VmEvent::PowerOff));
        assert_eq!(rx.try_next(), None);
    }

    #[test]
    fn a_flood_is_bounded_and_counted_and_never_hides_lifecycle_events() {
        let (tx, rx) = EventSender::new(16).unwrap();
        for n in 0..10_000 {
            tx.send(line(n));
            if n == 5_000 {
                tx.send(VmEvent::Ejected(4));
                tx.send(VmEvent::InsertAcked(5));
                tx.send(VmEvent::Failed {
                    vcpu: 2,
                    reason: "x".into(),
                });
                tx.send(VmEvent::Reset);
                tx.send(VmEvent::PowerOff);
            }
        }
        assert_eq!(rx.len(), 16 + 5);
        assert_eq!(rx.dropped(), 10_000 - 16);
        assert_eq!(tx.dropped(), rx.dropped());
        let got: Vec<_> = std::iter::from_fn(|| rx.try_next()).collect();
        // The first 16 lines in order, then the lifecycle events.
        assert_eq!(got[..16], (0..16).map(line).collect::<Vec<_>>()[..]);
        assert_eq!(
            got[16..],
            [
                VmEvent::Ejected(4),
                VmEvent::InsertAcked(5),
                VmEvent::Failed {
                    vcpu: 2,
                    reason: "x".into()
                },
                VmEvent::Reset,
                VmEvent::PowerOff
            ]
        );
        // Room again once drained.
        tx.send(line(1));
        assert_eq!(rx.try_next(), Some(line(1)));
    }

    #[test]
    fn lifecycle_events_are_bounded_by_coalescing_duplicates_still_queued() {
        let (tx, rx) = EventSender::new(4).unwrap();
        // A guest hammering the power-off and eject registers.
        for _ in 0..10_000 {
            tx.send(VmEvent::PowerOff);
            tx.send(VmEvent::Ejected(3));
        }
        assert_eq!(rx.len(), 2);
        assert_eq!(rx.coalesced(), 2 * 9_999);
        assert_eq!(rx.dropped(), 0);
        assert_eq!(rx.try_next(), Some(VmEvent::PowerOff));
        // Once handled, the same event is queued again.
        tx.send(VmEvent::PowerOff);
        assert_eq!(rx.try_next(), Some(VmEvent::Ejected(3)));
        assert_eq!(rx.try_next(), Some(VmEvent::PowerOff));
        assert!(rx.is_empty());
    }

    #[test]
    fn send_all_queues_as_one_by_one_and_wakes_once() {
        let (tx, rx) = EventSender::new(4).unwrap();
        tx.send(line(0));
        let batch =
            (1..10)
                .map(line)
                .chain([VmEvent::Ejected(1), VmEvent::PowerOff, VmEvent::Ejected(1)]);
        tx.send_all(batch);
        assert_eq!(rx.wake_fd().read().unwrap(), 2);
        assert_eq!((rx.len(), rx.dropped(), rx.coalesced()), (6, 6, 1));
        let got: Vec<_> = std::iter::from_fn(|| rx.try_next()).collect();
        let mut want: Vec<_> = (0..4).map(line).collect();
        want.extend([VmEvent::Ejected(1), VmEvent::PowerOff]);
        assert_eq!(got, want);
        // Nothing queued (all dropped or coalesced): no wake-up.
        tx.send_all((0..4).map(line));
        tx.send_all([line(9), VmEvent::Ejected(2)]);
        let _ = rx.wake_fd().read();
        tx.send_all([line(10), VmEvent::Ejected(2)]);
        assert!(rx.wake_fd().read().is_err());
        assert_eq!((rx.dropped(), rx.coalesced()), (6 + 2, 1 + 1));
    }

    #[test]
    fn a_batch_takes_at_most_max_and_leaves_the_loop_woken_for_the_rest() {
        let (tx, rx) = EventSender::new(1000).unwrap();
        for n in 0..100 {
            tx.send(line(n));
        }
        let first = rx.take_batch(EVENTS_PER_TURN);
        assert_eq!(first.len(), EVENTS_PER_TURN);
        assert_eq!(first[0], line(0));
        // Still readable: epoll comes back for the rest.
        assert!(rx.wake_fd().read().is_ok());
        let rest = rx.take_batch(EVENTS_PER_TURN);
        assert_eq!(rest.len(), 100 - EVENTS_PER_TURN);
        assert_eq!(rest[0], line(EVENTS_PER_TURN));
        // Drained: nothing left to wake for.
        assert!(rx.wake_fd().read().is_err());
        assert!(rx.take_batch(EVENTS_PER_TURN).is_empty());
    }
}
