//! Console capture: lines from the VMM (and the emulated host), stamped
//! with the time since launch, waited on by tests.
//!
//! Each attached source (a child's stdout or stderr) has a reader thread
//! that appends complete lines and wakes waiters. Waits end early with
//! [`WaitError::Closed`] once every source reached end of file.
//!
//! Memory is bounded whatever the guest prints: the console keeps the
//! newest [`KEEP_LINES`] lines and at most [`KEEP_BYTES`] of text (older
//! lines are dropped and counted), and a line longer than [`MAX_LINE`] is
//! cut into pieces. Line indices (marks) count every line ever added, so
//! a mark stays valid after older lines are dropped.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use thiserror::Error;

/// One console line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Time since the console was created.
    pub at: Duration,
    /// The text, without line terminator.
    pub text: String,
}

/// Where arriving lines are also printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Echo {
    /// Nowhere (tests print the log on failure).
    Off,
    /// Standard output, as is (the `launch` binary); the emulated host's
    /// kernel lines only when they report its failure.
    Stdout,
    /// Standard error with timestamps (tests with `E2E_ECHO=1`).
    Stderr,
}

/// A wait on the console failed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WaitError {
    /// The time ran out.
    #[error("no matching console line within {0:?}")]
    Timeout(Duration),
    /// All sources closed (the process exited) without a match.
    #[error("console closed without a matching line")]
    Closed,
}

/// Lines kept, at most.
pub const KEEP_LINES: usize = 200_000;
/// Bytes of line text kept, at most.
pub const KEEP_BYTES: usize = 64 << 20;
/// Longest line: a longer one is cut into lines of this many bytes.
pub const MAX_LINE: usize = 64 << 10;

#[derive(Debug)]
struct State {
    /// Lines and bytes kept at most.
    keep: (usize, usize),
    /// The kept lines, oldest first.
    lines: VecDeque<Line>,
    /// Index (counting every line ever added) of `lines[0]`.
    first: usize,
    /// Bytes of text in `lines`.
    bytes: usize,
    open_sources: usize,
}

impl State {
    fn new(keep: (usize, usize)) -> Self {
        State {
            keep,
            lines: VecDeque::new(),
            first: 0,
            bytes: 0,
            open_sources: 0,
        }
    }

    /// Index after the newest line.
    fn end(&self) -> usize {
        self.first + self.lines.len()
    }

    /// The kept lines from index `mark` on.
    fn from(&self, mark: usize) -> impl Iterator<Item = &Line> {
        self.lines.iter().skip(mark.saturating_sub(self.first))
    }

    fn add(&mut self, line: Line) {
        self.bytes += line.text.len();
        self.lines.push_back(line);
        let (lines, bytes) = self.keep;
        while self.lines.len() > lines || (self.bytes > bytes && self.lines.len() > 1) {
            if let Some(old) = self.lines.pop_front() {
                self.bytes -= old.text.len();
                self.first += 1;
            }
        }
    }
}

/// What a follower of the console gets: the lines since its mark, its next
/// mark, and how many lines it missed because they were dropped first.
#[derive(Debug, Default)]
pub struct Follow {
    /// The new lines, oldest first.
    pub lines: Vec<Line>,
    /// The mark to follow from next time.
    pub next: usize,
    /// Lines dropped before this follower read them.
    pub missed: usize,
}

/// The captured console of one launch.
#[derive(Debug, Clone)]
pub struct Console {
    inner: Arc<(Mutex<State>, Condvar)>,
    start: Instant,
    echo: Echo,
}

impl Console {
    /// An empty console; time stamps count from now.
    pub fn new(echo: Echo) -> Self {
        Self::keeping(echo, KEEP_LINES, KEEP_BYTES)
    }

    /// An empty console that keeps at most `lines` lines and `bytes` bytes
    /// of text.
    pub fn keeping(echo: Echo, lines: usize, bytes: usize) -> Self {
        Console {
            inner: Arc::new((Mutex::new(State::new((lines, bytes))), Condvar::new())),
            start: Instant::now(),
            echo,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When this console started.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// Reads `source` on a thread until end of file, line by line;
    /// `prefix` is put before each of its lines (e.g. `"qemu: "`).
    pub fn attach<R: Read + Send + 'static>(
        &self,
        mut source: R,
        prefix: &'static str,
    ) -> JoinHandle<()> {
        self.state().open_sources += 1;
        let console = self.clone();
        thread::Builder::new()
            .name("console".into())
            .spawn(move || {
                let mut pending: Vec<u8> = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    match source.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            pending.extend_from_slice(&buf[..n]);
                            while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
                                let line: Vec<u8> = pending.drain(..=pos).collect();
                                console.push_bytes(prefix, &line[..pos]);
                            }
                            while pending.len() >= MAX_LINE {
                                let piece: Vec<u8> = pending.drain(..MAX_LINE).collect();
                                console.push_bytes(prefix, &piece);
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
                if !pending.is_empty() {
                    console.push_bytes(prefix, &pending);
                }
                console.state().open_sources -= 1;
                console.inner.1.notify_all();
            })
            .expect("spawn console reader")
    }

    fn push_bytes(&self, prefix: &str, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes);
        let text = text.trim_end_matches('\r').replace('\r', "");
        self.push(&format!("{prefix}{text}"));
    }

    /// Adds a line (the harness's own notes use this too).
    pub fn push(&self, text: &str) {
        let line = Line {
            at: self.start.elapsed(),
            text: text.to_string(),
        };
        match self.echo {
            Echo::Off => {}
            Echo::Stdout
                if line.text.starts_with(crate::job::HOST_PREFIX)
                    && crate::job::host_failure(&line.text).is_none()
                    && !crate::job::host_panic(&line.text) => {}
            Echo::Stdout => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{}", line.text);
                let _ = out.flush();
            }
            Echo::Stderr => eprintln!("{}", format_line(&line)),
        }
        self.state().add(line);
        self.inner.1.notify_all();
    }

    /// Number of lines so far (dropped ones included): a mark for
    /// [`Console::wait_for_after`] and [`Console::follow`].
    pub fn len(&self) -> usize {
        self.state().end()
    }

    /// Lines dropped so far to bound the memory.
    pub fn dropped(&self) -> usize {
        self.state().first
    }

    /// True before the first line.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True once every attached source reached end of file.
    pub fn closed(&self) -> bool {
        self.state().open_sources == 0
    }

    /// All kept lines.
    pub fn lines(&self) -> Vec<Line> {
        self.state().lines.iter().cloned().collect()
    }

    /// The kept lines from index `mark` on.
    pub fn lines_from(&self, mark: usize) -> Vec<Line> {
        self.state().from(mark).cloned().collect()
    }

    /// The lines since `mark` for a reader that follows the console, with
    /// its next mark and what it missed.
    pub fn follow(&self, mark: usize) -> Follow {
        let st = self.state();
        Follow {
            lines: st.from(mark).cloned().collect(),
            next: st.end().max(mark),
            missed: st.first.saturating_sub(mark),
        }
    }

    /// The first line matching `pred` (from the start), waiting up to `timeout`.
    pub fn wait_for(
        &self,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<String, WaitError> {
        self.wait_for_after(0, pred, timeout).map(|(_, l)| l)
    }

    /// The first line at index `mark` or later matching `pred`, with its index.
    pub fn wait_for_after(
        &self,
        mark: usize,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<(usize, String), WaitError> {
        let deadline = Instant::now() + timeout;
        let mut next = mark;
        let mut st = self.state();
        loop {
            let from = next.max(st.first);
            if let Some((i, l)) = st.from(from).enumerate().find(|(_, l)| pred(&l.text)) {
                return Ok((from + i, l.text.clone()));
            }
            next = st.end().max(mark);
            if st.open_sources == 0 {
                return Err(WaitError::Closed);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(WaitError::Timeout(timeout));
            }
            st = self
                .inner
                .1
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits until every source closed; false on timeout.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.state();
        while st.open_sources > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .inner
                .1
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// The whole log, one `[seconds] text` line each.
    pub fn log(&self) -> String {
        let mut out = String::new();
        for line in self.state().lines.iter() {
            let _ = writeln!(out, "{}", format_line(line));
        }
        out
    }

    /// The last `n` lines of [`Console::log`].
    pub fn tail(&self, n: usize) -> String {
        let st = self.state();
        let start = st.lines.len().saturating_sub(n);
        let mut out = String::new();
        for line in st.lines.iter().skip(start) {
            let _ = writeln!(out, "{}", format_line(line));
        }
        out
    }
}

/// `[   12.345] text`.
pub fn format_line(line: &Line) -> String {
    format!("[{:>9.3}] {}", line.at.as_secs_f64(), line.text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(lines: &[Line]) -> Vec<&str> {
        lines.iter().map(|l| l.text.as_str()).collect()
    }

    #[test]
    fn old_lines_are_dropped_and_marks_stay_valid() {
        let c = Console::keeping(Echo::Off, 3, 1 << 20);
        for i in 0..5 {
            c.push(&format!("l{i}"));
        }
        assert_eq!(c.len(), 5);
        assert_eq!(c.dropped(), 2);
        assert_eq!(texts(&c.lines()), ["l2", "l3", "l4"]);
        assert_eq!(texts(&c.lines_from(3)), ["l3", "l4"]);
        assert_eq!(texts(&c.lines_from(0)), ["l2", "l3", "l4"]);
        let f = c.follow(1);
        assert_eq!(
            (texts(&f.lines), f.next, f.missed),
            (vec!["l2", "l3", "l4"], 5, 1)
        );
        let f = c.follow(f.next);
        assert_eq!((f.lines.len(), f.next, f.missed), (0, 5, 0));
        let (i, l) = c
            .wait_for_after(0, |l| l.starts_with('l'), Duration::ZERO)
            .unwrap();
        assert_eq!((i, l.as_str()), (2, "l2"));
        let (i, _) = c
            .wait_for_after(4, |l| l.starts_with('l'), Duration::ZERO)
            .unwrap();
        assert_eq!(i, 4);
    }

    #[test]
    fn the_byte_bound_keeps_at_least_the_newest_line() {
        let c = Console::keeping(Echo::Off, 100, 10);
        c.push("aaaaaa");
        c.push("bbbbbb");
        assert_eq!(texts(&c.lines()), ["bbbbbb"]);
        c.push(&"c".repeat(50));
        assert_eq!(c.lines().len(), 1);
        assert_eq!(c.dropped(), 2);
    }

    #[test]
    fn an_endless_line_is_cut() {
        let c = Console::new(Echo::Off);
        let data = vec![b'x'; MAX_LINE * 2 + 10];
        c.attach(std::io::Cursor::new(data), "").join().unwrap();
        let lens: Vec<usize> = c.lines().iter().map(|l| l.text.len()).collect();
        assert_eq!(lens, [MAX_LINE, MAX_LINE, 10]);
    }
}
