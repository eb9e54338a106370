//! The channels the benchmark drives inside the emulated host: a minimal
//! HTTP/1.1 client for our API on its Unix socket, a QMP client kept open
//! for QEMU (events timestamped as they arrive), and a timestamped reader
//! of a VMM's guest console.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{BenchError, Result};

/// One request to our API (a fresh connection, `Connection: close`);
/// returns the status and the body.
pub fn http(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
    let what = || format!("{method} {path}");
    let mut s = UnixStream::connect(socket).map_err(|e| BenchError::io(what(), e))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| BenchError::io(what(), e))?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .map_err(|e| BenchError::io(what(), e))?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)
        .map_err(|e| BenchError::io(what(), e))?;
    let text = String::from_utf8_lossy(&resp);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| BenchError::Protocol(format!("{}: bad response {text:?}", what())))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A line with the moment it was read.
#[derive(Debug, Clone)]
pub struct Stamped {
    /// When the reader got it.
    pub at: Instant,
    /// The line, without its end.
    pub line: String,
}

/// Lines of a stream, read on a thread and timestamped.
#[derive(Debug)]
pub struct Lines {
    rx: Receiver<Stamped>,
    /// Every line seen so far (for error reports).
    pub seen: Vec<Stamped>,
}

impl Lines {
    /// Reads `stream` on a thread until its end.
    pub fn spawn(stream: impl Read + Send + 'static) -> Lines {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\r', '\n'])
                            .to_string();
                        if tx
                            .send(Stamped {
                                at: Instant::now(),
                                line,
                            })
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
        Lines {
            rx,
            seen: Vec::new(),
        }
    }

    /// The next line that `pred` accepts, within `timeout`.
    pub fn wait(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<Stamped> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if self.seen.len() > 400 {
                        self.seen.drain(..200);
                    }
                    if pred(&l.line) {
                        return Ok(l);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(BenchError::Timeout {
                        what: format!("{what}; last lines: {}", self.tail(8)),
                        secs: timeout.as_secs_f64(),
                    })
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(BenchError::Protocol(format!(
                        "stream ended waiting for {what}; last lines: {}",
                        self.tail(12)
                    )))
                }
            }
        }
    }

    /// Discards what has arrived so far (keeps it in `seen`).
    pub fn drain(&mut self) {
        while let Ok(l) = self.rx.try_recv() {
            self.seen.push(l);
        }
    }

    /// The last `n` lines seen, joined with ` | `.
    pub fn tail(&self, n: usize) -> String {
        let start = self.seen.len().saturating_sub(n);
        self.seen[start..]
            .iter()
            .map(|l| l.line.as_str())
            .collect::<Vec<_>>()
            .join(" | ")
    }
}

/// A QMP connection, kept open; replies and events arrive on one reader.
#[derive(Debug)]
pub struct Qmp {
    out: UnixStream,
    lines: Lines,
    events: Vec<Stamped>,
}

impl Qmp {
    /// Connects (retrying until the socket exists) and negotiates.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(BenchError::io(format!("connect {}", path.display()), e))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let reader = s.try_clone().map_err(|e| BenchError::io("qmp", e))?;
        let mut q = Qmp {
            out: s,
            lines: Lines::spawn(reader),
            events: Vec::new(),
        };
        q.lines
            .wait("the QMP greeting", timeout, |l| l.contains("\"QMP\""))?;
        q.execute(r#"{"execute":"qmp_capabilities"}"#)?;
        Ok(q)
    }

    /// Sends a command without waiting for its reply.
    pub fn send(&mut self, cmd: &str) -> Result<()> {
        self.out
            .write_all(format!("{cmd}\n").as_bytes())
            .map_err(|e| BenchError::io("qmp send", e))
    }

    /// Waits for the next command reply (events are kept for
    /// [`Qmp::event`]); an `error` reply is an error.
    pub fn reply(&mut self) -> Result<Value> {
        loop {
            let l = self
                .lines
                .wait("a QMP reply", Duration::from_secs(30), |_| true)?;
            if l.line.contains("\"event\"") {
                self.events.push(l);
                continue;
            }
            let v: Value = serde_json::from_str(&l.line)
                .map_err(|e| BenchError::Protocol(format!("bad QMP line {:?}: {e}", l.line)))?;
            if let Some(err) = v.get("error") {
                return Err(BenchError::Protocol(format!("QMP error: {err}")));
            }
            return Ok(v);
        }
    }

    /// Sends a command and waits for its reply.
    pub fn execute(&mut self, cmd: &str) -> Result<Value> {
        self.send(cmd)?;
        self.reply()
    }

    /// Waits for an event named `name` whose line contains `needle`
    /// (possibly received already while waiting for a reply).
    pub fn event(&mut self, name: &str, needle: &str, timeout: Duration) -> Result<Stamped> {
        let matches = |l: &str| {
            let tight = l.replace(' ', "");
            tight.contains(&format!("\"event\":\"{name}\"")) && tight.contains(needle)
        };
        if let Some(i) = self.events.iter().position(|e| matches(&e.line)) {
            return Ok(self.events.remove(i));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let l = self
                .lines
                .wait(&format!("QMP event {name} {needle}"), left, |_| true)?;
            if matches(&l.line) {
                return Ok(l);
            }
            if l.line.contains("\"event\"") {
                self.events.push(l);
            }
        }
    }

    /// Drops whatever was received so far (stale events).
    pub fn drain(&mut self) {
        self.lines.drain();
        self.events.clear();
    }
}
