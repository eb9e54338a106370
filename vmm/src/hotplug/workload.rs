//! The user's workload as the VMM sees it (`agent_proto::workload`): the
//! agent starts it in the guest and reports its start, its output and its
//! end; the VMM keeps its state for `GET /api/v1/vm` and writes one line
//! per event on stderr, for the launcher (whole lines, one write each,
//! under the process's stderr lock, so they never mix with log lines):
//!
//! ```text
//! VMM-WORKLOAD-START pid=97
//! VMM-WORKLOAD-OUT: <a line the workload wrote on its stdout>
//! VMM-WORKLOAD-ERR: <a line it wrote on its stderr>
//! VMM-WORKLOAD-EXIT status=3
//! VMM-WORKLOAD-EXIT status=137 signal=9
//! VMM-WORKLOAD-EXIT status=127 error="cannot run \"/bin/x\": ..."
//! ```
//!
//! `status` is what a shell would say (`agent_proto::workload::shell_status`).
//! The workload's text is guest text: control characters other than tab,
//! and Unicode line separators and bidirectional overrides, are written as
//! `\u{1b}`-style escapes; everything else is passed as it came.
//!
//! The lines go through a bounded queue to a writer thread, so the VMM
//! thread never blocks on a slow reader of stderr. Flow control: every
//! `workload_output` message is acknowledged (`workload_ack`) only while
//! the queue holds less than [`HIGH_WATER`] bytes; otherwise the
//! acknowledgements are owed and [`WorkloadTracker::pump_acks`] (from the
//! coordinator's tick) sends them once the writer caught up. The agent
//! stops reading the workload's output while its window is used up, so
//! nothing is dropped and the queue stays bounded (window x message size).

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use api::agent::{GuestMessage, HostMessage};
use api::workload::{shell_status, WorkloadStream};
use api::{WorkloadInfo, WorkloadState};

use super::session::AgentSession;

/// Queued bytes above which acknowledgements are held back.
pub const HIGH_WATER: usize = 64 * 1024;
/// How often owed acknowledgements are retried.
const ACK_RETRY: Duration = Duration::from_millis(10);

/// Where the writer thread puts the lines (stderr in the VMM).
pub type Sink = Box<dyn FnMut(&[u8]) -> io::Result<()> + Send>;

#[derive(Debug, Default)]
struct Queue {
    lines: VecDeque<String>,
    bytes: usize,
    /// The writer holds lines it took and has not written yet.
    writing: bool,
}

/// The lines on their way to stderr (see the module docs).
#[derive(Debug, Default)]
pub struct OutputQueue {
    inner: Arc<(Mutex<Queue>, Condvar)>,
    writer: bool,
}

fn lock(m: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl OutputQueue {
    /// Starts the writer thread over `sink` (without one, lines stay
    /// queued: the unit tests take them).
    pub fn start_writer(&mut self, mut sink: Sink) -> io::Result<()> {
        let inner = Arc::clone(&self.inner);
        std::thread::Builder::new()
            .name("workload-out".into())
            .spawn(move || {
                // Like the console thread: it only writes what it is given.
                crate::seccomp::enter(crate::seccomp::ThreadClass::Console);
                loop {
                    let batch: Vec<String> = {
                        let (m, cv) = &*inner;
                        let mut q = lock(m);
                        while q.lines.is_empty() {
                            q = cv.wait(q).unwrap_or_else(|e| e.into_inner());
                        }
                        q.writing = true;
                        q.lines.drain(..).collect()
                    };
                    let bytes: usize = batch.iter().map(String::len).sum();
                    let text = batch.concat();
                    // A failed write (stderr closed) drops the lines: there is
                    // nowhere else to put them.
                    let _ = sink(text.as_bytes());
                    let (m, cv) = &*inner;
                    let mut q = lock(m);
                    q.bytes = q.bytes.saturating_sub(bytes);
                    q.writing = false;
                    cv.notify_all();
                }
            })?;
        self.writer = true;
        Ok(())
    }

    /// Queues one line (its newline included).
    fn push(&self, line: String) {
        let (m, cv) = &*self.inner;
        let mut q = lock(m);
        q.bytes += line.len();
        q.lines.push_back(line);
        cv.notify_all();
    }

    /// Bytes queued or being written.
    pub fn pending_bytes(&self) -> usize {
        lock(&self.inner.0).bytes
    }

    /// Waits up to `timeout` until the writer wrote everything; false if it
    /// did not (or there is no writer and lines are queued).
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.inner;
        let mut q = lock(m);
        while !q.lines.is_empty() || q.writing {
            let left = deadline.saturating_duration_since(Instant::now());
            if !self.writer || left.is_zero() {
                return false;
            }
            q = cv
                .wait_timeout(q, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// The queued lines (tests, without a writer).
    #[cfg(test)]
    pub fn take(&self) -> Vec<String> {
        let mut q = lock(&self.inner.0);
        q.bytes = 0;
        q.lines.drain(..).collect()
    }
}

/// Guest text for a line of our own: control characters (except tab),
/// line separators and bidirectional overrides escaped.
pub fn escape_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let odd = (c.is_control() && c != '\t')
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if odd {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// The workload's state and its output's way out (see the module docs).
#[derive(Debug, Default)]
pub struct WorkloadTracker {
    info: Option<WorkloadInfo>,
    output: OutputQueue,
    acks_owed: u32,
}

impl WorkloadTracker {
    /// The output queue (to start its writer, to flush it at exit).
    pub fn output_mut(&mut self) -> &mut OutputQueue {
        &mut self.output
    }

    /// `GET /api/v1/vm`'s `workload`: `None` until the agent started one.
    pub fn info(&self) -> Option<WorkloadInfo> {
        self.info.clone()
    }

    /// A workload message from the agent.
    pub fn on_message(&mut self, msg: GuestMessage, session: &mut AgentSession) {
        match msg {
            GuestMessage::WorkloadStarted { pid } => {
                log::info!("workload started in the guest (pid {pid})");
                self.info = Some(WorkloadInfo {
                    state: WorkloadState::Running,
                    pid: Some(pid),
                    exit_status: None,
                    signal: None,
                    error: None,
                    output_lines: 0,
                });
                self.output.push(format!("VMM-WORKLOAD-START pid={pid}\n"));
            }
            GuestMessage::WorkloadOutput { stream, lines } => {
                let tag = match stream {
                    WorkloadStream::Out => "OUT",
                    WorkloadStream::Err => "ERR",
                };
                let n = lines.len() as u64;
                let mut text = String::new();
                for line in lines {
                    text.push_str(&format!("VMM-WORKLOAD-{tag}: {}\n", escape_line(&line)));
                }
                self.output.push(text);
                if let Some(info) = self.info.as_mut() {
                    info.output_lines += n;
                }
                self.acks_owed = self.acks_owed.saturating_add(1);
                self.pump_acks(session);
            }
            GuestMessage::WorkloadExit { status, signal } => {
                let code = shell_status(status, signal, false);
                let info = self
                    .info
                    .get_or_insert_with(|| unknown(WorkloadState::Exited));
                info.state = WorkloadState::Exited;
                info.exit_status = Some(code);
                info.signal = signal;
                let mut line = format!("VMM-WORKLOAD-EXIT status={code}");
                if let Some(sig) = signal {
                    line.push_str(&format!(" signal={sig}"));
                }
                log::info!("workload ended: {line}");
                self.output.push(line + "\n");
            }
            GuestMessage::WorkloadFailed { reason, not_found } => {
                let code = shell_status(None, None, not_found);
                let info = self
                    .info
                    .get_or_insert_with(|| unknown(WorkloadState::Failed));
                info.state = WorkloadState::Failed;
                info.exit_status = Some(code);
                info.error = Some(reason.clone());
                let line = format!(
                    "VMM-WORKLOAD-EXIT status={code} error=\"{}\"",
                    reason.escape_debug()
                );
                log::warn!("the workload could not start: {}", reason.escape_debug());
                self.output.push(line + "\n");
            }
            _ => {}
        }
    }

    /// Sends the owed acknowledgements if the writer has room.
    pub fn pump_acks(&mut self, session: &mut AgentSession) {
        if self.acks_owed == 0 || self.output.pending_bytes() >= HIGH_WATER {
            return;
        }
        if session.send(&HostMessage::WorkloadAck { n: self.acks_owed }) {
            self.acks_owed = 0;
        }
    }

    /// When [`Self::pump_acks`] should run again.
    pub fn next_wake(&self, now: Instant) -> Option<Instant> {
        (self.acks_owed > 0).then_some(now + ACK_RETRY)
    }
}

fn unknown(state: WorkloadState) -> WorkloadInfo {
    WorkloadInfo {
        state,
        pid: None,
        exit_status: None,
        signal: None,
        error: None,
        output_lines: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::super::session::tests::{session, take_sent};
    use super::*;

    fn output(stream: WorkloadStream, lines: &[&str]) -> GuestMessage {
        GuestMessage::WorkloadOutput {
            stream,
            lines: lines.iter().map(|l| (*l).to_owned()).collect(),
        }
    }

    #[test]
    fn lines_state_and_acknowledgements() {
        let (mut s, sent) = session();
        let mut w = WorkloadTracker::default();
        assert_eq!(w.info(), None);
        w.on_message(GuestMessage::WorkloadStarted { pid: 97 }, &mut s);
        assert_eq!(w.info().unwrap().state, WorkloadState::Running);
        w.on_message(
            output(WorkloadStream::Out, &["a \"b\"\\", "\x1b[2J\tx\u{202e}"]),
            &mut s,
        );
        w.on_message(output(WorkloadStream::Err, &["warn"]), &mut s);
        assert_eq!(
            take_sent(&sent),
            [
                HostMessage::WorkloadAck { n: 1 },
                HostMessage::WorkloadAck { n: 1 }
            ]
        );
        w.on_message(
            GuestMessage::WorkloadExit {
                status: None,
                signal: Some(9),
            },
            &mut s,
        );
        let info = w.info().unwrap();
        assert_eq!(
            (info.state, info.exit_status, info.signal, info.output_lines),
            (WorkloadState::Exited, Some(137), Some(9), 3)
        );
        assert_eq!(
            w.output_mut().take().concat(),
            "VMM-WORKLOAD-START pid=97\n\
             VMM-WORKLOAD-OUT: a \"b\"\\\n\
             VMM-WORKLOAD-OUT: \\u{1b}[2J\tx\\u{202e}\n\
             VMM-WORKLOAD-ERR: warn\n\
             VMM-WORKLOAD-EXIT status=137 signal=9\n"
        );
    }

    #[test]
    fn a_slow_writer_holds_the_acknowledgements_back() {
        let (mut s, sent) = session();
        let mut w = WorkloadTracker::default();
        let big = "x".repeat(2000);
        let lines: Vec<&str> = vec![big.as_str(); 4];
        let now = Instant::now();
        let mut acked = 0;
        for _ in 0..20 {
            w.on_message(output(WorkloadStream::Out, &lines), &mut s);
            acked += take_sent(&sent).len();
        }
        // No writer: the queue fills past the high water, then acks stop.
        assert!(w.output.pending_bytes() >= HIGH_WATER);
        assert!(acked < 20, "{acked}");
        assert_eq!(w.next_wake(now), Some(now + ACK_RETRY));
        w.pump_acks(&mut s);
        assert!(take_sent(&sent).is_empty());
        // The writer catches up: the owed acks go out together.
        w.output_mut().take();
        w.pump_acks(&mut s);
        let owed = u32::try_from(20 - acked).unwrap();
        assert_eq!(take_sent(&sent), [HostMessage::WorkloadAck { n: owed }]);
        assert_eq!(w.next_wake(now), None);
    }

    #[test]
    fn the_coordinator_shows_it_in_get_vm_and_acknowledges_through_tick() {
        let mut h = super::super::tests::Harness::new(2, 1, true);
        h.sent();
        assert_eq!(h.c.vm_info(h.now).workload, None);
        h.agent(GuestMessage::WorkloadStarted { pid: 5 });
        h.agent(output(WorkloadStream::Out, &["x"; 3]));
        assert_eq!(h.sent(), [HostMessage::WorkloadAck { n: 1 }]);
        let info = h.c.vm_info(h.now).workload.unwrap();
        assert_eq!(
            (info.state, info.pid, info.output_lines),
            (WorkloadState::Running, Some(5), 3)
        );
        // A full queue holds the acks back; the tick sends them once it drained.
        h.c.workload.output.push("y".repeat(HIGH_WATER));
        h.agent(output(WorkloadStream::Err, &["z"]));
        assert!(h.sent().is_empty());
        assert_eq!(h.c.tick(h.now), Some(h.now + ACK_RETRY));
        h.c.workload_mut().output_mut().take();
        h.c.tick(h.now);
        assert_eq!(h.sent(), [HostMessage::WorkloadAck { n: 1 }]);
        h.agent(GuestMessage::WorkloadExit {
            status: Some(3),
            signal: None,
        });
        let info = h.c.vm_info(h.now).workload.unwrap();
        assert_eq!(
            (info.state, info.exit_status, info.output_lines),
            (WorkloadState::Exited, Some(3), 4)
        );
    }

    #[test]
    fn a_failed_start_and_the_writer_thread() {
        let (mut s, _) = session();
        let mut w = WorkloadTracker::default();
        let written = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = Arc::clone(&written);
        w.output_mut()
            .start_writer(Box::new(move |b| {
                sink.lock().unwrap().extend_from_slice(b);
                Ok(())
            }))
            .unwrap();
        w.on_message(
            GuestMessage::WorkloadFailed {
                reason: "cannot run \"/bin/x\"\n".into(),
                not_found: true,
            },
            &mut s,
        );
        assert!(w.output.flush(Duration::from_secs(5)));
        assert_eq!(
            String::from_utf8(written.lock().unwrap().clone()).unwrap(),
            "VMM-WORKLOAD-EXIT status=127 error=\"cannot run \\\"/bin/x\\\"\\n\"\n"
        );
        let info = w.info().unwrap();
        assert_eq!(
            (info.state, info.exit_status),
            (WorkloadState::Failed, Some(127))
        );
        assert_eq!(w.output.pending_bytes(), 0);
    }
}
