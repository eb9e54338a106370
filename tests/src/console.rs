//! Console capture: lines from the VMM (and the emulated host), stamped
//! with the time since launch, waited on by tests.
//!
//! Each attached source (a child's stdout or stderr) has a reader thread
//! that appends complete lines and wakes waiters. Waits end early with
//! [`WaitError::Closed`] once every source reached end of file.

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

#[derive(Debug, Default)]
struct State {
    lines: Vec<Line>,
    open_sources: usize,
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
        Console {
            inner: Arc::new((Mutex::new(State::default()), Condvar::new())),
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
        self.state().lines.push(line);
        self.inner.1.notify_all();
    }

    /// Number of lines so far: a mark for [`Console::wait_for_after`].
    pub fn len(&self) -> usize {
        self.state().lines.len()
    }

    /// True before the first line.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True once every attached source reached end of file.
    pub fn closed(&self) -> bool {
        self.state().open_sources == 0
    }

    /// All lines so far.
    pub fn lines(&self) -> Vec<Line> {
        self.state().lines.clone()
    }

    /// The lines from index `mark` on (a reader that follows the console
    /// keeps its own mark).
    pub fn lines_from(&self, mark: usize) -> Vec<Line> {
        let st = self.state();
        st.lines
            .get(mark..)
            .map(<[Line]>::to_vec)
            .unwrap_or_default()
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
            if let Some(i) = st.lines[next.min(st.lines.len())..]
                .iter()
                .position(|l| pred(&l.text))
            {
                let idx = next + i;
                return Ok((idx, st.lines[idx].text.clone()));
            }
            next = st.lines.len().max(mark);
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
        for line in &st.lines[start..] {
            let _ = writeln!(out, "{}", format_line(line));
        }
        out
    }
}

/// `[   12.345] text`.
pub fn format_line(line: &Line) -> String {
    format!("[{:>9.3}] {}", line.at.as_secs_f64(), line.text)
}
