//! Target `agent_sink`: the VMM's end of the agent channel, a guest on the
//! other end that writes COM2 bytes, pushes into or scribbles over the
//! mailbox, and reads (or not) what the VMM sends.

use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use api::agent::{decode, encode, Fault, GuestMessage, HostMessage};
use api::mailbox::{Ring, CAPACITY, DOORBELL, MAILBOX_SIZE, RING_SIZE, TO_GUEST, TO_HOST, WRAP};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::{install_logger, Input};
use crate::agent::{AgentLink, AgentSink, Mailbox, OUTBOX_LIMIT};
use crate::events::{EventReceiver, EventSender, VmEvent, EVENTS_PER_TURN};
use crate::layout::AGENT_MAILBOX_BASE;
use crate::memory::{create_guest_memory, GuestRam, MIN_MEMORY};
use crate::ratelimit::{ManualClock, RateLimiter, DEFAULT_INTERVAL};

/// Guest memory with its mailbox, mapped once per process (the mailbox
/// is zeroed at the start of every run).
fn guest_ram() -> &'static GuestRam {
    static RAM: OnceLock<GuestRam> = OnceLock::new();
    RAM.get_or_init(|| create_guest_memory(MIN_MEMORY).expect("guest memory"))
}

/// The guest's side of the mailbox: raw access to both rings' pages.
#[derive(Debug, Clone, Copy)]
struct GuestSide {
    base: *mut u8,
}

impl GuestSide {
    fn new(mem: &GuestRam) -> Self {
        let base = mem
            .get_host_address(GuestAddress(AGENT_MAILBOX_BASE))
            .expect("the mailbox is mapped");
        Self { base }
    }

    /// Zeroes the whole mailbox (a fresh run).
    fn zero(self) {
        for i in 0..MAILBOX_SIZE {
            // SAFETY: within the mailbox mapping of the process-wide guest
            // memory, which is never unmapped; only this thread's run uses it.
            unsafe { self.base.add(i).write_volatile(0) }
        }
    }

    /// The ring at `offset` (TO_GUEST or TO_HOST) as the guest sees it.
    fn ring(self, offset: usize) -> Ring {
        // SAFETY: a ring of the mailbox mapping (page aligned, RING_SIZE
        // bytes, never unmapped); the run touches it only through rings
        // and the atomic / volatile accesses of this type.
        unsafe { Ring::new(self.base.add(offset)) }
    }

    fn counter(self, ring: usize, which: usize) -> &'static AtomicU32 {
        debug_assert!(which == 8 || which == 12);
        // SAFETY: a 4-byte aligned counter of a ring inside the mapping,
        // which lives for the process; counters are only accessed
        // atomically.
        unsafe { &*self.base.add(ring + which).cast::<AtomicU32>() }
    }

    fn data(self, ring: usize, index: u32) -> u8 {
        // SAFETY: 64 + index % CAPACITY < RING_SIZE: inside the ring.
        unsafe {
            self.base
                .add(ring + 64 + (index % CAPACITY) as usize)
                .read_volatile()
        }
    }

    /// What a consumer of `ring` reads now (`None`: impossible counters).
    fn readable(self, ring: usize) -> Option<Vec<u8>> {
        let head = self.counter(ring, 8).load(Ordering::Acquire);
        let tail = self.counter(ring, 12).load(Ordering::Acquire);
        if head >= WRAP || tail >= WRAP {
            return None;
        }
        let used = if head >= tail {
            head - tail
        } else {
            WRAP - tail + head
        };
        let index = |i: u32| {
            let at = (u64::from(tail) + u64::from(i)) % u64::from(WRAP);
            u32::try_from(at).expect("below WRAP")
        };
        (used <= CAPACITY).then(|| (0..used).map(|i| self.data(ring, index(i))).collect())
    }

    /// A raw write of `bytes` at `offset` of the mailbox, counters excepted.
    fn scribble(self, offset: usize, bytes: &[u8]) {
        for (i, &b) in bytes.iter().enumerate() {
            let at = (offset + i) % MAILBOX_SIZE;
            if (8..16).contains(&(at % RING_SIZE)) {
                continue;
            }
            // SAFETY: at < MAILBOX_SIZE, inside the mapping; not a counter.
            unsafe { self.base.add(at).write_volatile(b) }
        }
    }
}

/// Host messages the VMM sends.
fn host_message(input: &mut Input<'_>) -> HostMessage {
    let cpu = input.u32() % 300;
    match input.byte() % 6 {
        0 => HostMessage::PrepareRemove { cpu },
        1 => HostMessage::CancelRemove { cpu },
        2 => HostMessage::Snapshot,
        3 => HostMessage::Poweroff,
        4 => HostMessage::Fault {
            fault: Fault::RefuseOffline,
            cpu: Some(cpu),
            ms: None,
        },
        _ => HostMessage::Fault {
            fault: Fault::DelayReport,
            cpu: None,
            ms: Some(u64::from(input.u32())),
        },
    }
}

/// What the run saw, for the integrity checks at the end.
#[derive(Debug, Default)]
struct Seen {
    /// The guest wrote counters or bytes of its own into the rings.
    hostile: bool,
    /// Host bytes the link accepted, in order.
    accepted: Vec<u8>,
    /// What the link put into the UART FIFO.
    fifo: Vec<u8>,
    /// What the guest read from its ring.
    from_ring: Vec<u8>,
    /// Doorbells the guest rang.
    doorbells: u64,
}

/// Target `agent_sink`: [`AgentSink`] (the vCPU thread's end: COM2 bytes
/// and doorbells into lines and events) and [`AgentLink`] (the VMM
/// thread's end: lines into messages; host messages into the FIFO or the
/// ring) against a guest that may misbehave in every way. Checked: the
/// events a write queues never exceed the newlines it carried (UART bytes
/// and what the ring held at its doorbell), the queue never beyond its
/// capacity, a corrupt ring is read nothing from and counted once per
/// doorbell, every line is accounted for (message, dropped or empty), and
/// with a well-behaved guest the host's bytes arrive whole and in order
/// and the outbox stays within [`OUTBOX_LIMIT`].
pub fn agent_sink(data: &[u8]) {
    install_logger();
    let mut input = Input::new(data);
    let mem = guest_ram();
    let guest = GuestSide::new(mem);
    guest.zero();
    let mailbox = if !input.byte().is_multiple_of(4) {
        Some(Mailbox::new(mem).expect("the mailbox"))
    } else {
        None
    };
    let capacity = 1 + input.below(64);
    let (events, rx) = EventSender::new(capacity).expect("event queue");
    let clock = ManualClock::new();
    let limiter = || RateLimiter::new(DEFAULT_INTERVAL, Arc::new(clock.clone()));
    let mut sink = AgentSink::new(events, mailbox.clone()).with_rate_limiter(limiter());
    let mut link = AgentLink::new()
        .with_mailbox(mailbox.clone())
        .with_rate_limiter(limiter());
    let (to_guest, to_host) = (guest.ring(TO_GUEST), guest.ring(TO_HOST));
    let mut seen = Seen::default();
    let mut lines_handled = 0u64;
    let mut steps = 0;
    while !input.is_empty() && steps < 256 {
        steps += 1;
        match input.byte() % 9 {
            0 => {
                let bytes = input.bytes(2 * RING_SIZE);
                let _ = to_host.push(bytes);
            }
            1 => {
                seen.hostile = true;
                let ring = if input.bool() { TO_HOST } else { TO_GUEST };
                let which = if input.bool() { 8 } else { 12 };
                let other = guest.counter(ring, 20 - which).load(Ordering::Relaxed);
                let small = u32::from(input.u16());
                let value = match input.byte() % 5 {
                    0 => input.u32(),
                    1 => other.wrapping_add(small % (CAPACITY + 64)),
                    2 => other.wrapping_sub(small % 64),
                    3 => WRAP - 1 - small % (CAPACITY + 64),
                    _ => u32::MAX - small % 64,
                };
                guest.counter(ring, which).store(value, Ordering::Release);
            }
            2 => {
                seen.hostile = true;
                let offset = usize::from(input.u16());
                guest.scribble(offset, input.bytes(256));
            }
            3 => {
                let bytes = input.bytes(4096);
                let one_at_a_time = input.bool();
                if one_at_a_time {
                    // As the UART delivers them: one write per byte.
                    for b in bytes {
                        check_write(&mut sink, &rx, capacity, guest, &mailbox, &[*b], &mut seen);
                    }
                } else {
                    check_write(&mut sink, &rx, capacity, guest, &mailbox, bytes, &mut seen);
                }
            }
            4 => {
                let before = link.counters();
                let batch = rx.take_batch(EVENTS_PER_TURN);
                for event in batch {
                    let VmEvent::AgentLine(line) = event else {
                        panic!("the agent sink queued {event:?}");
                    };
                    lines_handled += 1;
                    let decodable = line.as_deref().map(decode::<GuestMessage>);
                    let got = link.on_line(line);
                    match (&got, decodable) {
                        (Some(msg), Some(Ok(want))) => assert_eq!(msg, &want),
                        (None, Some(Ok(msg))) => panic!("the link dropped {msg:?}"),
                        _ => {}
                    }
                }
                let after = link.counters();
                let handled = (after.messages - before.messages)
                    + (after.dropped - before.dropped)
                    + (after.empty - before.empty);
                assert!(handled <= lines_handled);
                let _ = (link.connected(), link.version(), link.workers());
            }
            5 => {
                let msg = host_message(&mut input);
                let room = input.below(65);
                let line = encode(&msg);
                if send(&mut link, &msg, room, &mut seen.fifo) {
                    seen.accepted.extend(line.as_bytes());
                }
            }
            6 => {
                let room = input.below(65);
                flush(&mut link, room, &mut seen.fifo);
            }
            7 => {
                let _ = to_guest.pop_into(&mut seen.from_ring);
            }
            _ => clock.advance(Duration::from_millis(u64::from(input.u16()))),
        }
        check_host_stream(&link, guest, &seen);
    }
    let _ = (
        link.mailbox_corrupt(),
        link.uses_mailbox(),
        sink.empty_lines(),
    );
}

/// Sends `msg` into a FIFO with `room` bytes free.
fn send(link: &mut AgentLink, msg: &HostMessage, room: usize, fifo: &mut Vec<u8>) -> bool {
    let mut room = room;
    link.send(msg, |bytes| {
        let n = bytes.len().min(room);
        fifo.extend_from_slice(&bytes[..n]);
        room -= n;
        n
    })
}

/// Flushes into a FIFO with `room` bytes free.
fn flush(link: &mut AgentLink, room: usize, fifo: &mut Vec<u8>) {
    let mut room = room;
    link.flush(|bytes| {
        let n = bytes.len().min(room);
        fifo.extend_from_slice(&bytes[..n]);
        room -= n;
        n
    });
}

/// One guest write to COM2, with its bounds checked.
fn check_write(
    sink: &mut AgentSink,
    rx: &EventReceiver,
    capacity: usize,
    guest: GuestSide,
    mailbox: &Option<Arc<Mailbox>>,
    bytes: &[u8],
    seen: &mut Seen,
) {
    let doorbells = bytes.iter().filter(|&&b| b == DOORBELL).count();
    let ring = mailbox.as_ref().map(|_| guest.readable(TO_HOST));
    let uart_newlines = bytes.iter().filter(|&&b| b == b'\n').count();
    let ring_newlines = match &ring {
        Some(Some(held)) if doorbells > 0 => held.iter().filter(|&&b| b == b'\n').count(),
        _ => 0,
    };
    let corrupt_before = mailbox.as_ref().map_or(0, |m| m.corrupt_doorbells());
    let (queued, dropped, empty) = (rx.len(), rx.dropped(), sink.empty_lines());
    assert_eq!(
        sink.write(bytes).expect("the sink takes every byte"),
        bytes.len()
    );
    let lines = (rx.len() + usize::try_from(rx.dropped() - dropped).unwrap_or(usize::MAX))
        .saturating_sub(queued)
        + usize::try_from(sink.empty_lines() - empty).unwrap_or(usize::MAX);
    assert!(
        lines <= uart_newlines + ring_newlines,
        "{lines} lines from {uart_newlines} UART and {ring_newlines} ring newlines"
    );
    assert!(rx.len() <= capacity, "the queue grew past its capacity");
    if let Some(mailbox) = mailbox {
        seen.doorbells += doorbells as u64;
        let corrupt = mailbox.corrupt_doorbells() - corrupt_before;
        match ring {
            // Impossible counters: every doorbell of the write finds them.
            Some(None) => assert_eq!(corrupt, doorbells as u64),
            _ => assert_eq!(corrupt, 0),
        }
        if doorbells > 0 {
            assert!(mailbox.in_use());
            // Drained, or corrupt and left alone.
            assert!(guest.readable(TO_HOST).is_none_or(|r| r.is_empty()));
        }
    }
}

/// With a guest that left the rings alone, the host's bytes reach it
/// whole and in order (FIFO first, then the ring), and what waits in the
/// outbox is within its bound.
fn check_host_stream(link: &AgentLink, guest: GuestSide, seen: &Seen) {
    let fifo_data: Vec<u8> = seen
        .fifo
        .iter()
        .copied()
        .filter(|&b| b != DOORBELL)
        .collect();
    if seen.hostile {
        return;
    }
    let mut delivered = fifo_data;
    delivered.extend_from_slice(&seen.from_ring);
    assert!(
        seen.accepted.starts_with(&delivered),
        "the guest got bytes the VMM did not send, or out of order"
    );
    // What the VMM pushed into the ring: its head counter (never wrapped
    // in one run: at most 256 messages).
    let pushed = guest.counter(TO_GUEST, 8).load(Ordering::Acquire) as usize;
    let fifo_len = seen.fifo.iter().filter(|&&b| b != DOORBELL).count();
    let outbox = seen
        .accepted
        .len()
        .checked_sub(fifo_len + pushed)
        .expect("more bytes left the outbox than entered it");
    assert!(outbox <= OUTBOX_LIMIT, "{outbox} bytes in the outbox");
    if outbox > 0 {
        assert!(link.has_pending_output());
    }
}
