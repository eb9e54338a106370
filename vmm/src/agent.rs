//! The VMM's side of the guest-agent channel (COM2, line-delimited JSON,
//! see `api::agent`).
//!
//! The UART's output sink ([`AgentSink`]) runs on the vCPU thread that
//! executed the guest's `out`: it only splits bytes into lines and queues
//! them for the VMM thread. The VMM thread decodes them into
//! [`GuestMessage`]s ([`AgentLink::on_line`]), tracks whether the agent is
//! alive, and writes host messages into the UART's receive FIFO. Nothing
//! the guest sends is trusted: bad lines are counted and dropped.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::agent::{decode, encode, GuestMessage, HostMessage, Line, WorkerInfo};
use api::mailbox::{Inbound, Ring, DOORBELL, TO_GUEST, TO_HOST};
use api::{VcpuList, VcpuState};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::layout::AGENT_MAILBOX_BASE;
use crate::memory::GuestRam;

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

/// COM2's output: bytes from the guest (stream bytes, or doorbells that
/// say the mailbox holds them), split into lines for the VMM thread.
#[derive(Debug)]
pub struct AgentSink {
    inbound: Inbound,
    events: EventSender,
    mailbox: Option<Arc<Mailbox>>,
}

impl AgentSink {
    /// A sink queueing complete lines on `events`, draining `mailbox` on
    /// doorbells.
    pub fn new(events: EventSender, mailbox: Option<Arc<Mailbox>>) -> Self {
        Self {
            inbound: Inbound::new(),
            events,
            mailbox,
        }
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
            mailbox
                .corrupt
                .fetch_add(u64::from(got.corrupt), Ordering::Relaxed);
        }
        for line in got.lines {
            self.events.send(VmEvent::AgentLine(match line {
                Line::Complete(bytes) => Some(bytes),
                Line::Oversized => None,
            }));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Counters of the agent channel.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AgentCounters {
    /// Messages accepted.
    pub messages: u64,
    /// Lines dropped: oversized, not UTF-8, malformed, wrong version.
    pub dropped: u64,
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
    /// vCPU id -> Linux's logical number, as the agent last said.
    guest_cpus: std::collections::BTreeMap<u32, u32>,
    counters: AgentCounters,
    /// Encoded host messages not yet taken by the UART's 64-byte receive
    /// FIFO (or the mailbox ring); pushed as the guest drains it.
    outbox: std::collections::VecDeque<u8>,
    mailbox: Option<Arc<Mailbox>>,
    /// Bytes went into the ring but their doorbell did not fit the FIFO yet.
    doorbell_owed: bool,
    /// The mailbox was seen in use (logged once).
    mailbox_noted: bool,
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

    /// Doorbells that found the guest's mailbox ring corrupt.
    pub fn mailbox_corrupt(&self) -> u64 {
        self.mailbox.as_ref().map_or(0, |m| m.corrupt_doorbells())
    }

    /// Whether the agent talks through the mailbox.
    pub fn uses_mailbox(&self) -> bool {
        self.mailbox.as_ref().is_some_and(|m| m.in_use())
    }

    /// Decodes one line from the guest (`None`: an oversized line was
    /// dropped). Returns the message if it is valid.
    pub fn on_line(&mut self, line: Option<Vec<u8>>) -> Option<GuestMessage> {
        let Some(bytes) = line else {
            self.counters.dropped += 1;
            log::warn!("agent: dropped an oversized line");
            return None;
        };
        if !self.mailbox_noted && self.uses_mailbox() {
            self.mailbox_noted = true;
            log::info!("agent: talks through the mailbox");
        }
        match decode::<GuestMessage>(&bytes) {
            Ok(msg) => {
                self.counters.messages += 1;
                self.last_seen = Some(Instant::now());
                match &msg {
                    GuestMessage::Ready { version, cpus, .. } => {
                        log::info!("agent: connected, version {version:?}");
                        self.version = Some(version.clone());
                        self.ever_connected = true;
                        self.guest_cpus = cpus.iter().copied().collect();
                    }
                    GuestMessage::Cpu {
                        cpu,
                        logical: Some(logical),
                        ..
                    } => {
                        // Linux reuses a number only once its CPU is gone.
                        self.guest_cpus.retain(|_, l| l != logical);
                        self.guest_cpus.insert(*cpu, *logical);
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
                log::warn!("agent: dropped a line: {e}");
                None
            }
        }
    }

    /// Fills in Linux's number of each present (or removing) vCPU, as the
    /// agent last said; others keep none (a vCPU being added may come
    /// back under another number).
    pub fn attach_guest_cpus(&self, list: &mut VcpuList) {
        for v in &mut list.vcpus {
            if matches!(v.state, VcpuState::Present | VcpuState::Removing) {
                v.guest_cpu = self.guest_cpus.get(&v.id).copied();
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
                        // counted, and said once, not every retry.
                        if mailbox.corrupt.fetch_add(1, Ordering::Relaxed) == 0 {
                            log::warn!("agent: {e}");
                        }
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
        let (tx, rx, _wake) = EventSender::new().unwrap();
        let mut sink = AgentSink::new(tx, None);
        sink.write_all(b"{\"v\":1,\"type\":\"heart").unwrap();
        assert!(rx.try_recv().is_err());
        sink.write_all(b"beat\"}\n").unwrap();
        assert_eq!(
            rx.try_recv().unwrap(),
            VmEvent::AgentLine(Some(b"{\"v\":1,\"type\":\"heartbeat\"}".to_vec()))
        );
    }

    #[test]
    fn link_knows_linux_numbers_of_present_vcpus() {
        let mut link = AgentLink::new();
        let line = |m: &GuestMessage| Some(encode(m).trim_end().as_bytes().to_vec());
        link.on_line(line(&GuestMessage::Ready {
            version: "1".into(),
            online: vec![0, 6],
            cpus: vec![(0, 0), (6, 1)],
        }));
        let cpu = |cpu, logical| GuestMessage::Cpu {
            cpu,
            logical: Some(logical),
            online: true,
            requested: true,
        };
        link.on_line(line(&cpu(3, 2)));
        let vcpu = |id, state| api::VcpuInfo {
            id,
            state,
            guest_online: None,
            guest_cpu: None,
            workers: None,
        };
        let mut list = VcpuList {
            max_vcpus: 8,
            vcpus: vec![
                vcpu(0, VcpuState::Present),
                vcpu(3, VcpuState::Removing),
                vcpu(5, VcpuState::Present),
                vcpu(6, VcpuState::Adding),
            ],
        };
        link.attach_guest_cpus(&mut list);
        let got: Vec<_> = list.vcpus.iter().map(|v| v.guest_cpu).collect();
        assert_eq!(got, [Some(0), Some(2), None, None]);
        // cpu1 now belongs to vCPU 5: vCPU 6 (gone) no longer has it.
        link.on_line(line(&cpu(5, 1)));
        list.vcpus[3].state = VcpuState::Present;
        link.attach_guest_cpus(&mut list);
        let got: Vec<_> = list.vcpus.iter().map(|v| v.guest_cpu).collect();
        assert_eq!(got, [Some(0), Some(2), Some(1), None]);
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
        let (tx, rx, _wake) = EventSender::new().unwrap();
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
            rx.try_recv().unwrap(),
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
        let (tx, rx, _wake) = EventSender::new().unwrap();
        let mut sink = AgentSink::new(tx, Some(mailbox.clone()));
        sink.write_all(&[DOORBELL, DOORBELL]).unwrap();
        assert!(rx.try_recv().is_err());
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
}
