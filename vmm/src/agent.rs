//! The VMM's side of the guest-agent channel (COM2, line-delimited JSON,
//! see `api::agent`).
//!
//! The UART's output sink ([`AgentSink`]) runs on the vCPU thread that
//! executed the guest's `out`: it only splits bytes into lines and queues
//! them for the VMM thread. The VMM thread decodes them into
//! [`GuestMessage`]s ([`AgentLink::on_line`]), tracks whether the agent is
//! alive, and writes host messages into the UART's receive FIFO. Nothing
//! the guest sends is trusted: bad lines are counted and dropped, empty
//! lines silently (they never reach the event queue), and warnings about
//! them are rate-limited (`crate::ratelimit`) with guest text escaped.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::agent::{decode, encode, GuestMessage, HostMessage, Line, WorkerInfo};
use api::mailbox::{Inbound, Ring, DOORBELL, TO_GUEST, TO_HOST};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::layout::AGENT_MAILBOX_BASE;
use crate::memory::GuestRam;
use crate::ratelimit::{escape_guest, RateLimiter};

use crate::events::{EventSender, VmEvent};

/// How long without any message before the agent counts as disconnected.
/// An agent blocked in a CPU offline while the guest kernel is busy with
/// hotplug work cannot send its heartbeat; this leaves it room for that.
pub const AGENT_SILENCE_LIMIT: Duration = Duration::from_secs(6);
/// Host-to-guest bytes kept while the guest is not reading ttyS1; past
/// this, new messages are refused (the agent is not listening).
pub const OUTBOX_LIMIT: usize = 4096;

/// The VMM's side of the agent mailbox (`api::mailbox`): the two rings in
/// the guest-memory region at [`AGENT_MAILBOX_BASE`].
#[derive(Debug)]
pub struct Mailbox {
    /// Keeps the region mapped for the rings' life.
    _mem: GuestRam,
    to_guest: Ring,
    to_host: Ring,
    /// The guest rang a doorbell: it reads the ring, so host messages go
    /// there too.
    in_use: AtomicBool,
    /// Ring accesses that found impossible counters (nothing was read or
    /// written): doorbells from the guest, sends to it.
    corrupt: AtomicU64,
}

impl Mailbox {
    /// The mailbox of `mem` (which maps it, see `memory::create_guest_memory`),
    /// initialised empty with its magic. `None` if `mem` has no mailbox.
    pub fn new(mem: &GuestRam) -> Option<Arc<Self>> {
        let base = mem
            .get_host_address(GuestAddress(AGENT_MAILBOX_BASE))
            .ok()?;
        let last = GuestAddress(AGENT_MAILBOX_BASE + api::mailbox::MAILBOX_SIZE as u64 - 1);
        // The whole mailbox must be one contiguous host mapping.
        let last_host = mem.get_host_address(last).ok()?;
        if last_host as usize - base as usize != api::mailbox::MAILBOX_SIZE - 1 {
            return None;
        }
        // SAFETY: base..base+MAILBOX_SIZE is one page-aligned mapping of
        // `mem`, kept alive by the clone held in the Mailbox; the VMM
        // touches it only through these rings, the guest through its own.
        let (to_guest, to_host) =
            unsafe { (Ring::new(base.add(TO_GUEST)), Ring::new(base.add(TO_HOST))) };
        to_guest.init();
        to_host.init();
        Some(Arc::new(Self {
            _mem: mem.clone(),
            to_guest,
            to_host,
            in_use: AtomicBool::new(false),
            corrupt: AtomicU64::new(0),
        }))
    }

    /// Whether the guest uses the mailbox.
    pub fn in_use(&self) -> bool {
        self.in_use.load(Ordering::Acquire)
    }

    /// Doorbells that found a corrupt ring.
    pub fn corrupt_doorbells(&self) -> u64 {
        self.corrupt.load(Ordering::Relaxed)
    }
}

/// Guest text shown in a warning at most (characters).
const GUEST_TEXT_SHOWN: usize = 120;

/// COM2's output: bytes from the guest (stream bytes, or doorbells that
/// say the mailbox holds them), split into lines for the VMM thread.
/// Empty lines are dropped here (counted); the event queue bounds the rest.
#[derive(Debug)]
pub struct AgentSink {
    inbound: Inbound,
    events: EventSender,
    mailbox: Option<Arc<Mailbox>>,
    empty_lines: u64,
    warnings: RateLimiter,
}

impl AgentSink {
    /// A sink queueing complete lines on `events`, draining `mailbox` on
    /// doorbells.
    pub fn new(events: EventSender, mailbox: Option<Arc<Mailbox>>) -> Self {
        Self {
            inbound: Inbound::new(),
            events,
            mailbox,
            empty_lines: 0,
            warnings: RateLimiter::default(),
        }
    }

    /// Rate-limits the sink's warnings with `warnings` (tests: a manual clock).
    pub fn with_rate_limiter(mut self, warnings: RateLimiter) -> Self {
        self.warnings = warnings;
        self
    }

    /// Empty lines dropped so far.
    pub fn empty_lines(&self) -> u64 {
        self.empty_lines
    }
}

impl Write for AgentSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let got = self
            .inbound
            .receive(buf, self.mailbox.as_deref().map(|m| &m.to_host));
        if let Some(mailbox) = &self.mailbox {
            if got.doorbells > 0 {
                mailbox.in_use.store(true, Ordering::Release);
            }
            if got.corrupt > 0 {
                let total = mailbox
                    .corrupt
                    .fetch_add(u64::from(got.corrupt), Ordering::Relaxed)
                    + u64::from(got.corrupt);
                self.warnings.warn(
                    "corrupt to-host ring",
                    format_args!(
                        "agent: the guest's mailbox ring has impossible counters; doorbell ignored ({total} corrupt accesses)"
                    ),
                );
            }
        }
        let mut events = Vec::with_capacity(got.lines.len());
        for line in got.lines {
            let event = match line {
                Line::Complete(bytes) if is_blank(&bytes) => {
                    self.empty_lines += 1;
                    continue;
                }
                Line::Complete(bytes) => Some(bytes),
                Line::Oversized => None,
            };
            events.push(VmEvent::AgentLine(event));
        }
        // One lock on the queue for the whole write (a ring of lines).
        self.events.send_all(events);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Whether a line is empty or only ASCII whitespace (dropped silently).
fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

/// Counters of the agent channel.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AgentCounters {
    /// Messages accepted.
    pub messages: u64,
    /// Lines dropped: oversized, not UTF-8, malformed, wrong version.
    pub dropped: u64,
    /// Empty lines dropped silently (not in `dropped`).
    pub empty: u64,
    /// Host messages that did not fit the guest's receive FIFO.
    pub send_failures: u64,
}

/// What the VMM knows of the guest agent.
#[derive(Debug, Default)]
pub struct AgentLink {
    version: Option<String>,
    last_seen: Option<Instant>,
    ever_connected: bool,
    workers: Vec<WorkerInfo>,
    done: Vec<(u32, u64)>,
    counters: AgentCounters,
    /// Encoded host messages not yet taken by the UART's 64-byte receive
    /// FIFO (or the mailbox ring); pushed as the guest drains it.
    outbox: std::collections::VecDeque<u8>,
    mailbox: Option<Arc<Mailbox>>,
    /// Bytes went into the ring but their doorbell did not fit the FIFO yet.
    doorbell_owed: bool,
    /// The mailbox was seen in use (logged once).
    mailbox_noted: bool,
    /// Rate limit of the warnings about what the guest sent.
    warnings: RateLimiter,
}

impl AgentLink {
    /// No agent seen yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sends through `mailbox` once the guest uses it.
    pub fn with_mailbox(mut self, mailbox: Option<Arc<Mailbox>>) -> Self {
        self.mailbox = mailbox;
        self
    }

    /// Rate-limits the link's warnings with `warnings` (tests: a manual clock).
    pub fn with_rate_limiter(mut self, warnings: RateLimiter) -> Self {
        self.warnings = warnings;
        self
    }

    /// Doorbells that found the guest's mailbox ring corrupt.
    pub fn mailbox_corrupt(&self) -> u64 {
        self.mailbox.as_ref().map_or(0, |m| m.corrupt_doorbells())
    }

    /// Whether the agent talks through the mailbox.
    pub fn uses_mailbox(&self) -> bool {
        self.mailbox.as_ref().is_some_and(|m| m.in_use())
    }

    /// Decodes one line from the guest (`None`: an oversized line was
    /// dropped). Returns the message if it is valid. Empty lines are
    /// dropped silently; warnings about bad ones are rate-limited, their
    /// text escaped.
    pub fn on_line(&mut self, line: Option<Vec<u8>>) -> Option<GuestMessage> {
        let Some(bytes) = line else {
            self.counters.dropped += 1;
            self.warnings.warn(
                "oversized line",
                format_args!("agent: dropped an oversized line"),
            );
            return None;
        };
        if is_blank(&bytes) {
            self.counters.empty += 1;
            return None;
        }
        if !self.mailbox_noted && self.uses_mailbox() {
            self.mailbox_noted = true;
            log::info!("agent: talks through the mailbox");
        }
        match decode::<GuestMessage>(&bytes) {
            Ok(msg) => {
                self.counters.messages += 1;
                self.last_seen = Some(Instant::now());
                match &msg {
                    GuestMessage::Ready { version, .. } => {
                        log::info!("agent: connected, version {version:?}");
                        self.version = Some(version.clone());
                        self.ever_connected = true;
                    }
                    GuestMessage::Workers { workers, done } => {
                        self.workers = workers.clone();
                        self.done = done.clone();
                    }
                    _ => {}
                }
                Some(msg)
            }
            Err(e) => {
                self.counters.dropped += 1;
                // Decode errors quote the guest's text: escaped, cut.
                self.warnings.warn(
                    "bad line",
                    format_args!(
                        "agent: dropped a line: {} (line: \"{}\")",
                        e.to_string().escape_debug(),
                        escape_guest(&bytes, GUEST_TEXT_SHOWN)
                    ),
                );
                None
            }
        }
    }

    /// Whether the agent said ready and has spoken recently.
    pub fn connected(&self) -> bool {
        self.version.is_some()
            && self
                .last_seen
                .is_some_and(|t| t.elapsed() < AGENT_SILENCE_LIMIT)
    }

    /// `Some(connected)` once an agent was ever seen, else `None`.
    pub fn connection_state(&self) -> Option<bool> {
        self.ever_connected.then(|| self.connected())
    }

    /// The agent's version, once it said.
    pub fn version(&self) -> Option<&str> {
        self.version.as_deref()
    }

    /// Time until the agent would count as silent (for the VMM's timer).
    pub fn silence_deadline(&self) -> Option<Duration> {
        let seen = self.last_seen?;
        AGENT_SILENCE_LIMIT.checked_sub(seen.elapsed())
    }

    /// The last worker snapshot and per-CPU work counters.
    pub fn workers(&self) -> (&[WorkerInfo], &[(u32, u64)]) {
        (&self.workers, &self.done)
    }

    /// Counters.
    pub fn counters(&self) -> AgentCounters {
        self.counters
    }

    /// Queues `msg` for the guest and pushes what fits into the UART's
    /// receive FIFO (`enqueue` takes bytes and says how many it took); the
    /// rest follows on [`Self::flush`]. Returns false when the outbox is
    /// full (the guest has not been reading).
    pub fn send(&mut self, msg: &HostMessage, enqueue: impl FnMut(&[u8]) -> usize) -> bool {
        let line = encode(msg);
        if self.outbox.len() + line.len() > OUTBOX_LIMIT {
            self.counters.send_failures += 1;
            log::warn!("agent: could not queue {msg:?} (guest not reading ttyS1?)");
            return false;
        }
        self.outbox.extend(line.as_bytes());
        self.flush(enqueue);
        true
    }

    /// Pushes queued bytes into the FIFO until it is full, or, once the
    /// agent uses the mailbox, into its ring followed by one doorbell.
    pub fn flush(&mut self, mut enqueue: impl FnMut(&[u8]) -> usize) {
        if let Some(mailbox) = self.mailbox.clone().filter(|m| m.in_use()) {
            while !self.outbox.is_empty() {
                let (chunk, _) = self.outbox.as_slices();
                match mailbox.to_guest.push(chunk) {
                    Ok(0) => break,
                    Ok(n) => {
                        self.outbox.drain(..n);
                        self.doorbell_owed = true;
                    }
                    Err(e) => {
                        // The guest wrote an impossible tail: keep the
                        // bytes (the outbox bound fails later sends);
                        // counted, and said at most once a second, not
                        // on every retry.
                        let total = mailbox.corrupt.fetch_add(1, Ordering::Relaxed) + 1;
                        self.warnings.warn(
                            "corrupt to-guest ring",
                            format_args!("agent: {e} ({total} corrupt accesses)"),
                        );
                        break;
                    }
                }
            }
            if self.doorbell_owed && enqueue(&[DOORBELL]) == 1 {
                self.doorbell_owed = false;
            }
            return;
        }
        while !self.outbox.is_empty() {
            let (chunk, _) = self.outbox.as_slices();
            let len = chunk.len();
            let taken = enqueue(chunk).min(len);
            self.outbox.drain(..taken);
            if taken < len || taken == 0 {
                break;
            }
        }
    }

    /// Whether bytes (or a doorbell) wait for room in the guest's FIFO or ring.
    pub fn has_pending_output(&self) -> bool {
        !self.outbox.is_empty() || self.doorbell_owed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_queues_lines_for_the_vmm_thread() {
        let (tx, rx) = EventSender::new(crate::events::DEFAULT_CAPACITY).unwrap();
        let mut sink = AgentSink::new(tx, None);
        sink.write_all(b"{\"v\":1,\"type\":\"heart").unwrap();
        assert!(rx.try_next().is_none());
        sink.write_all(b"beat\"}\n").unwrap();
        assert_eq!(
            rx.try_next().unwrap(),
            VmEvent::AgentLine(Some(b"{\"v\":1,\"type\":\"heartbeat\"}".to_vec()))
        );
    }

    #[test]
    fn link_tracks_connection_and_drops_bad_lines() {
        let mut link = AgentLink::new();
        assert_eq!(link.connection_state(), None);
        assert!(link.on_line(Some(b"garbage".to_vec())).is_none());
        assert!(link.on_line(None).is_none());
        assert_eq!(link.counters().dropped, 2);
        assert!(!link.connected());
        let ready = encode(&GuestMessage::Ready {
            version: "1.2.3".into(),
            online: vec![0],
            cpus: vec![(0, 0)],
        });
        assert!(link
            .on_line(Some(ready.trim_end().as_bytes().to_vec()))
            .is_some());
        assert!(link.connected());
        assert_eq!(link.connection_state(), Some(true));
        assert_eq!(link.version(), Some("1.2.3"));
        assert!(link.silence_deadline().unwrap() <= AGENT_SILENCE_LIMIT);
        // What the FIFO cannot take waits in the outbox, in order.
        let mut fifo: Vec<u8> = Vec::new();
        let mut room = 10;
        assert!(link.send(&HostMessage::Snapshot, |b| {
            let n = b.len().min(room);
            fifo.extend(&b[..n]);
            room -= n;
            n
        }));
        assert!(link.has_pending_output());
        assert!(link.send(&HostMessage::Poweroff, |_| 0));
        link.flush(|b| {
            fifo.extend(b);
            b.len()
        });
        assert!(!link.has_pending_output());
        let want = encode(&HostMessage::Snapshot) + &encode(&HostMessage::Poweroff);
        assert_eq!(String::from_utf8(fifo).unwrap(), want);
        // A guest that never reads: the outbox is bounded and says so.
        while link.send(&HostMessage::Snapshot, |_| 0) {}
        assert_eq!(link.counters().send_failures, 1);
    }

    /// The guest's view of the mailbox in `mem`: its (to_guest, to_host) rings.
    fn guest_rings(mem: &GuestRam) -> (Ring, Ring) {
        let base = mem
            .get_host_address(GuestAddress(AGENT_MAILBOX_BASE))
            .unwrap();
        // SAFETY: the mailbox mapping of `mem`, alive for the test; the
        // test plays the guest's side through these rings only.
        unsafe { (Ring::new(base.add(TO_GUEST)), Ring::new(base.add(TO_HOST))) }
    }

    #[test]
    fn mailbox_carries_both_directions_with_one_doorbell_each() {
        let mem = crate::memory::create_guest_memory(64 << 20).unwrap();
        let mailbox = Mailbox::new(&mem).unwrap();
        let (to_guest, to_host) = guest_rings(&mem);
        assert!(to_guest.has_magic() && to_host.has_magic());

        // Guest -> host: a line in the ring, then one doorbell byte.
        let (tx, rx) = EventSender::new(crate::events::DEFAULT_CAPACITY).unwrap();
        let mut sink = AgentSink::new(tx, Some(mailbox.clone()));
        let mut link = AgentLink::new().with_mailbox(Some(mailbox.clone()));
        assert!(!link.uses_mailbox());
        // Before the guest rang, host messages take the FIFO.
        let mut fifo: Vec<u8> = Vec::new();
        link.send(&HostMessage::Snapshot, |b| {
            fifo.extend(b);
            b.len()
        });
        assert_eq!(fifo, encode(&HostMessage::Snapshot).as_bytes());
        let line = b"{\"v\":1,\"type\":\"heartbeat\"}\n";
        assert_eq!(to_host.push(line), Ok(line.len()));
        sink.write_all(&[b'{', DOORBELL]).unwrap();
        assert_eq!(
            rx.try_next().unwrap(),
            VmEvent::AgentLine(Some(b"{{\"v\":1,\"type\":\"heartbeat\"}".to_vec()))
        );
        assert!(link.uses_mailbox());

        // Host -> guest: the ring, then a doorbell into the FIFO.
        let mut fifo: Vec<u8> = Vec::new();
        assert!(link.send(&HostMessage::Poweroff, |b| {
            fifo.extend(b);
            b.len()
        }));
        assert_eq!(fifo, [DOORBELL]);
        let mut got = Vec::new();
        to_guest.pop_into(&mut got).unwrap();
        assert_eq!(got, encode(&HostMessage::Poweroff).as_bytes());
        // A full FIFO: the doorbell is owed and sent on the next flush.
        assert!(link.send(&HostMessage::Snapshot, |_| 0));
        assert!(link.has_pending_output());
        let mut fifo: Vec<u8> = Vec::new();
        link.flush(|b| {
            fifo.extend(b);
            b.len()
        });
        assert_eq!(fifo, [DOORBELL]);
        assert!(!link.has_pending_output());
    }

    #[test]
    fn a_corrupt_guest_ring_is_counted_and_read_nothing_from() {
        let mem = crate::memory::create_guest_memory(64 << 20).unwrap();
        let mailbox = Mailbox::new(&mem).unwrap();
        let base = mem
            .get_host_address(GuestAddress(AGENT_MAILBOX_BASE))
            .unwrap();
        // The guest writes an impossible head into its ring's header.
        // SAFETY: the head counter of the mailbox's guest -> host ring.
        unsafe {
            base.add(TO_HOST + 8)
                .cast::<u32>()
                .write_volatile(u32::MAX / 2)
        };
        let (tx, rx) = EventSender::new(crate::events::DEFAULT_CAPACITY).unwrap();
        let mut sink = AgentSink::new(tx, Some(mailbox.clone()));
        sink.write_all(&[DOORBELL, DOORBELL]).unwrap();
        assert!(rx.try_next().is_none());
        assert_eq!(mailbox.corrupt_doorbells(), 2);
        // A guest that wrote an impossible tail into the host's ring: the
        // message stays queued (nothing written), no doorbell is rung.
        // SAFETY: the tail counter of the mailbox's host -> guest ring.
        unsafe {
            base.add(TO_GUEST + 12)
                .cast::<u32>()
                .write_volatile(u32::MAX / 2)
        };
        let mut link = AgentLink::new().with_mailbox(Some(mailbox.clone()));
        let mut fifo: Vec<u8> = Vec::new();
        assert!(link.send(&HostMessage::Snapshot, |b| {
            fifo.extend(b);
            b.len()
        }));
        assert!(fifo.is_empty());
        assert!(link.has_pending_output());
        assert_eq!(mailbox.corrupt_doorbells(), 3);
    }

    #[test]
    fn a_ring_of_newlines_and_a_doorbell_storm_make_bounded_events_and_logs() {
        crate::testlog::start();
        let mem = crate::memory::create_guest_memory(64 << 20).unwrap();
        let mailbox = Mailbox::new(&mem).unwrap();
        let (_, to_host) = guest_rings(&mem);
        let clock = crate::ratelimit::ManualClock::new();
        let limiter =
            || RateLimiter::new(crate::ratelimit::DEFAULT_INTERVAL, Arc::new(clock.clone()));
        let capacity = 32;
        let (tx, rx) = EventSender::new(capacity).unwrap();
        let mut sink = AgentSink::new(tx, Some(mailbox.clone())).with_rate_limiter(limiter());

        // A ring full of `\n`, rung again and again: nothing is queued.
        let full = vec![b'\n'; api::mailbox::CAPACITY as usize];
        let mut newlines = 0;
        for _ in 0..4 {
            newlines += to_host.push(&full).unwrap();
            sink.write_all(&[DOORBELL; 256]).unwrap();
        }
        assert!(newlines >= 4 * 16_000, "{newlines}");
        assert_eq!(sink.empty_lines(), newlines as u64);
        assert!(rx.is_empty());

        // A ring full of junk lines: the queue takes its capacity, drops
        // the rest and counts them.
        let junk = b"\x1b[2Jjunk\n".repeat(api::mailbox::CAPACITY as usize / 10);
        let mut lines = 0;
        for _ in 0..4 {
            let pushed = to_host.push(&junk).unwrap();
            lines += junk[..pushed].iter().filter(|&&b| b == b'\n').count();
            sink.write_all(&[DOORBELL; 256]).unwrap();
        }
        assert_eq!(rx.len(), capacity);
        assert_eq!(rx.dropped(), (lines - capacity) as u64);

        // The VMM thread decodes what was queued: a bounded number of
        // warnings, the guest's escape sequences escaped.
        let mut link = AgentLink::new()
            .with_mailbox(Some(mailbox.clone()))
            .with_rate_limiter(limiter());
        while let Some(VmEvent::AgentLine(line)) = rx.try_next() {
            assert!(link.on_line(line).is_none());
        }
        assert_eq!(link.counters().dropped, capacity as u64);
        // And a corrupt ring rung 10,000 times.
        // SAFETY: the head counter of the mailbox's guest -> host ring.
        unsafe {
            mem.get_host_address(GuestAddress(AGENT_MAILBOX_BASE))
                .unwrap()
                .add(TO_HOST + 8)
                .cast::<u32>()
                .write_volatile(u32::MAX / 2)
        };
        for _ in 0..100 {
            sink.write_all(&[DOORBELL; 100]).unwrap();
        }
        assert_eq!(mailbox.corrupt_doorbells(), 10_000);
        let logged = crate::testlog::lines();
        // One line per cause: the queue (its own limiter), the bad lines,
        // the corrupt ring.
        assert!(logged.len() <= 3, "{logged:#?}");
        assert!(logged.iter().any(|l| l.contains("dropped a line")));
        assert!(logged.iter().any(|l| l.contains("impossible counters")));
        assert!(
            logged.iter().all(|l| !l.contains('\x1b')),
            "guest text unescaped: {logged:?}"
        );

        // A second later, one more line per cause, with the suppressed count.
        clock.advance(crate::ratelimit::DEFAULT_INTERVAL);
        sink.write_all(&[DOORBELL]).unwrap();
        let logged = crate::testlog::lines();
        assert!(
            logged.last().unwrap().contains("(99 more suppressed)"),
            "{logged:#?}"
        );
    }

    #[test]
    fn empty_lines_are_dropped_silently_and_counted() {
        crate::testlog::start();
        let (tx, rx) = EventSender::new(crate::events::DEFAULT_CAPACITY).unwrap();
        let mut sink = AgentSink::new(tx, None);
        sink.write_all(b"\n\r\n  \n{\"v\":1,\"type\":\"heartbeat\"}\n\n")
            .unwrap();
        assert_eq!(sink.empty_lines(), 4);
        assert_eq!(rx.len(), 1);
        let mut link = AgentLink::new();
        assert!(link.on_line(Some(Vec::new())).is_none());
        assert_eq!(link.counters().empty, 1);
        assert_eq!(link.counters().dropped, 0);
        assert!(crate::testlog::lines().is_empty());
    }
}
