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
use std::time::{Duration, Instant};

use api::agent::{decode, encode, GuestMessage, HostMessage, Line, LineDecoder, WorkerInfo};

use crate::events::{EventSender, VmEvent};

/// How long without any message before the agent counts as disconnected.
/// An agent blocked in a CPU offline while the guest kernel is busy with
/// hotplug work cannot send its heartbeat; this leaves it room for that.
pub const AGENT_SILENCE_LIMIT: Duration = Duration::from_secs(6);
/// Host-to-guest bytes kept while the guest is not reading ttyS1; past
/// this, new messages are refused (the agent is not listening).
pub const OUTBOX_LIMIT: usize = 4096;

/// COM2's output: bytes from the guest, split into lines for the VMM thread.
#[derive(Debug)]
pub struct AgentSink {
    decoder: LineDecoder,
    events: EventSender,
}

impl AgentSink {
    /// A sink queueing complete lines on `events`.
    pub fn new(events: EventSender) -> Self {
        Self {
            decoder: LineDecoder::new(),
            events,
        }
    }
}

impl Write for AgentSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for line in self.decoder.push(buf) {
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
    counters: AgentCounters,
    /// Encoded host messages not yet taken by the UART's 64-byte receive
    /// FIFO; pushed as the guest drains it.
    outbox: std::collections::VecDeque<u8>,
}

impl AgentLink {
    /// No agent seen yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes one line from the guest (`None`: an oversized line was
    /// dropped). Returns the message if it is valid.
    pub fn on_line(&mut self, line: Option<Vec<u8>>) -> Option<GuestMessage> {
        let Some(bytes) = line else {
            self.counters.dropped += 1;
            log::warn!("agent: dropped an oversized line");
            return None;
        };
        match decode::<GuestMessage>(&bytes) {
            Ok(msg) => {
                self.counters.messages += 1;
                self.last_seen = Some(Instant::now());
                match &msg {
                    GuestMessage::Ready { version, .. } => {
                        log::info!("agent: connected, version {version}");
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
                log::warn!("agent: dropped a line: {e}");
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

    /// Pushes queued bytes into the FIFO until it is full.
    pub fn flush(&mut self, mut enqueue: impl FnMut(&[u8]) -> usize) {
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

    /// Whether bytes wait for room in the guest's FIFO.
    pub fn has_pending_output(&self) -> bool {
        !self.outbox.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_queues_lines_for_the_vmm_thread() {
        let (tx, rx, _wake) = EventSender::new().unwrap();
        let mut sink = AgentSink::new(tx);
        sink.write_all(b"{\"v\":1,\"type\":\"heart").unwrap();
        assert!(rx.try_recv().is_err());
        sink.write_all(b"beat\"}\n").unwrap();
        assert_eq!(
            rx.try_recv().unwrap(),
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
}
