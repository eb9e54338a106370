//! The agent session: the VMM's conversation with the guest agent. It owns
//! the link (line decoding, outbox, mailbox), knows whether the agent is
//! alive (from the clock the coordinator passes in), when it last answered
//! a prepare request, and throttles worker-snapshot requests. It decides
//! nothing about vCPUs: the coordinator does.

use std::time::{Duration, Instant};

use api::agent::{GuestMessage, HostMessage};

use crate::agent::{AgentLink, AGENT_SILENCE_LIMIT};

/// `GET /api/v1/guest/workers` asks a connected agent for a fresh snapshot
/// at most this often (each one costs the guest exits).
pub const SNAPSHOT_REQUEST_INTERVAL: Duration = Duration::from_secs(1);
/// How soon to retry pushing host messages the guest's UART FIFO could not
/// take yet.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(2);

/// Where host messages' bytes go (the agent UART's receive FIFO): takes
/// bytes, returns how many it took.
pub type Outlet = Box<dyn FnMut(&[u8]) -> usize + Send>;

/// The agent session (see the module docs).
pub struct AgentSession {
    link: AgentLink,
    outlet: Outlet,
    last_seen: Option<Instant>,
    /// When the agent last answered a prepare request: requests sent
    /// together are answered one after another, so each one's timeout runs
    /// from the later of its sending and the previous answer.
    last_prepared: Option<Instant>,
    snapshot_at: Option<Instant>,
    snapshot_asked: Option<Instant>,
    /// The agent said it is stopping (a service agent stopped on purpose)
    /// and has not said ready since.
    stopped: bool,
}

impl std::fmt::Debug for AgentSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentSession")
            .field("link", &self.link)
            .field("last_seen", &self.last_seen)
            .finish_non_exhaustive()
    }
}

impl AgentSession {
    /// A session over `link`, writing to `outlet`.
    pub fn new(link: AgentLink, outlet: Outlet) -> Self {
        Self {
            link,
            outlet,
            last_seen: None,
            last_prepared: None,
            snapshot_at: None,
            snapshot_asked: None,
            stopped: false,
        }
    }

    /// The link (counters, version, worker snapshot).
    pub fn link(&self) -> &AgentLink {
        &self.link
    }

    /// Whether the agent said ready, has not said it is stopping since, and
    /// has spoken within [`AGENT_SILENCE_LIMIT`].
    pub fn connected(&self, now: Instant) -> bool {
        !self.stopped
            && self.link.version().is_some()
            && self
                .last_seen
                .is_some_and(|t| now.saturating_duration_since(t) < AGENT_SILENCE_LIMIT)
    }

    /// `Some(connected)` once an agent was ever seen, else `None`.
    pub fn connection_state(&self, now: Instant) -> Option<bool> {
        self.link.version().map(|_| self.connected(now))
    }

    /// Decodes a line from the guest; returns the message if it is valid.
    pub fn on_line(&mut self, line: Option<Vec<u8>>, now: Instant) -> Option<GuestMessage> {
        self.flush();
        let msg = self.link.on_line(line)?;
        self.last_seen = Some(now);
        match &msg {
            // A (re)started agent: its old snapshot no longer holds.
            GuestMessage::Ready { .. } => {
                self.snapshot_at = None;
                self.snapshot_asked = None;
                self.stopped = false;
            }
            GuestMessage::Stopping { .. } => self.stopped = true,
            GuestMessage::Workers { .. } => self.snapshot_at = Some(now),
            GuestMessage::Prepared { .. } => self.last_prepared = Some(now),
            _ => {}
        }
        Some(msg)
    }

    /// Queues `msg` for the agent; false when it cannot be (the guest is
    /// not reading).
    pub fn send(&mut self, msg: &HostMessage) -> bool {
        let outlet = &mut self.outlet;
        self.link.send(msg, |b| outlet(b))
    }

    /// Pushes queued host messages into the guest's FIFO or ring.
    pub fn flush(&mut self) {
        let outlet = &mut self.outlet;
        self.link.flush(|b| outlet(b));
    }

    /// When a prepare request sent at `asked` times out after `limit`.
    pub fn prepare_deadline(&self, asked: Instant, limit: Duration) -> Instant {
        self.last_prepared.map_or(asked, |t| t.max(asked)) + limit
    }

    /// When the session next needs the clock: a flush retry, or the agent
    /// falling silent.
    pub fn next_wake(&self, now: Instant) -> Option<Instant> {
        let silent = self
            .last_seen
            .filter(|_| self.connected(now))
            .map(|t| t + AGENT_SILENCE_LIMIT);
        let flush = self.link.has_pending_output().then(|| now + FLUSH_INTERVAL);
        [silent, flush].into_iter().flatten().min()
    }

    /// Asks a connected agent for a fresh worker snapshot, at most once per
    /// [`SNAPSHOT_REQUEST_INTERVAL`].
    pub fn maybe_ask_snapshot(&mut self, now: Instant) {
        let due = self
            .snapshot_asked
            .is_none_or(|t| now.saturating_duration_since(t) >= SNAPSHOT_REQUEST_INTERVAL);
        if self.connected(now) && due {
            self.snapshot_asked = Some(now);
            self.send(&HostMessage::Snapshot);
        }
    }

    /// When the current worker snapshot arrived (`None`: none since the
    /// agent last started).
    pub fn snapshot_at(&self) -> Option<Instant> {
        self.snapshot_at
    }
}

#[cfg(test)]
/// Test helpers for the session (used by the coordinator tests too).
pub mod tests {
    use std::sync::{Arc, Mutex};

    use api::agent::{decode, encode};

    use super::*;

    /// A session whose sent bytes land in the returned buffer.
    pub fn session() -> (AgentSession, Arc<Mutex<Vec<u8>>>) {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let sink = sent.clone();
        let outlet: Outlet = Box::new(move |b| {
            sink.lock().unwrap().extend_from_slice(b);
            b.len()
        });
        (AgentSession::new(AgentLink::new(), outlet), sent)
    }

    /// The host messages sent so far (and forgets them).
    pub fn take_sent(sent: &Mutex<Vec<u8>>) -> Vec<HostMessage> {
        let bytes = std::mem::take(&mut *sent.lock().unwrap());
        bytes
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| decode(l).unwrap())
            .collect()
    }

    /// `msg` as the line the agent sends.
    pub fn line(msg: &GuestMessage) -> Option<Vec<u8>> {
        Some(encode(msg).trim_end().as_bytes().to_vec())
    }

    #[test]
    fn liveness_follows_the_clock() {
        let (mut s, sent) = session();
        let t0 = Instant::now();
        assert_eq!(s.connection_state(t0), None);
        let ready = GuestMessage::Ready {
            version: "1".into(),
            online: vec![0],
            cpus: vec![],
        };
        assert!(s.on_line(line(&ready), t0).is_some());
        assert!(s.connected(t0));
        assert_eq!(s.next_wake(t0), Some(t0 + AGENT_SILENCE_LIMIT));
        let later = t0 + AGENT_SILENCE_LIMIT;
        assert!(!s.connected(later));
        assert_eq!(s.connection_state(later), Some(false));
        assert_eq!(s.next_wake(later), None);
        // Snapshots: at most one request per interval, only when connected.
        s.maybe_ask_snapshot(later);
        assert!(take_sent(&sent).is_empty());
        s.on_line(line(&GuestMessage::Heartbeat), later);
        s.maybe_ask_snapshot(later);
        s.maybe_ask_snapshot(later + Duration::from_millis(10));
        assert_eq!(take_sent(&sent), vec![HostMessage::Snapshot]);
        s.maybe_ask_snapshot(later + SNAPSHOT_REQUEST_INTERVAL);
        assert_eq!(take_sent(&sent), vec![HostMessage::Snapshot]);
    }

    #[test]
    fn a_stopping_agent_is_gone_at_once_until_it_is_ready_again() {
        let (mut s, _) = session();
        let t0 = Instant::now();
        let ready = GuestMessage::Ready {
            version: "1".into(),
            online: vec![0],
            cpus: vec![],
        };
        s.on_line(line(&ready), t0);
        assert!(s.connected(t0));
        let stopping = GuestMessage::Stopping {
            reason: "signal=SIGTERM".into(),
        };
        assert!(s.on_line(line(&stopping), t0).is_some());
        assert!(!s.connected(t0));
        assert_eq!(s.connection_state(t0), Some(false));
        // A late line of the old agent does not bring it back ...
        s.on_line(line(&GuestMessage::Heartbeat), t0);
        assert!(!s.connected(t0));
        assert_eq!(s.next_wake(t0), None);
        // ... its successor's ready does.
        let t1 = t0 + Duration::from_secs(1);
        s.on_line(line(&ready), t1);
        assert!(s.connected(t1));
    }

    #[test]
    fn prepare_deadlines_run_from_the_previous_answer() {
        let (mut s, _) = session();
        let t0 = Instant::now();
        let limit = Duration::from_secs(10);
        assert_eq!(s.prepare_deadline(t0, limit), t0 + limit);
        let answer = t0 + Duration::from_secs(4);
        let prepared = GuestMessage::Prepared {
            cpu: 3,
            ok: true,
            reason: None,
        };
        s.on_line(line(&prepared), answer);
        assert_eq!(s.prepare_deadline(t0, limit), answer + limit);
    }
}
