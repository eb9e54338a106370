//! HTTP/1.1 by hand over a plain Unix socket, for what the client library
//! never sends: partial requests, silence, duplicate headers, keep-alive.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use api::{ErrorBody, ErrorCode};

/// One answer read off the socket.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    /// A header's value (the first, names compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The JSON error's code, checking the body's shape and content type.
    pub fn error_code(&self) -> ErrorCode {
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{self:?}"
        );
        let body: ErrorBody = serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)));
        assert_eq!(body.error.code.status(), self.status);
        assert!(!body.error.message.is_empty());
        body.error.code
    }

    /// The error message of a JSON error.
    pub fn message(&self) -> String {
        let body: ErrorBody = serde_json::from_slice(&self.body).unwrap();
        body.error.message
    }
}

/// A connection; reads time out after 10 s.
pub fn connect(socket: &Path) -> UnixStream {
    let s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Send `bytes`.
pub fn send(s: &mut UnixStream, bytes: &[u8]) {
    s.write_all(bytes).unwrap();
}

/// A `GET` of `path` that keeps the connection open.
pub fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").into_bytes()
}

/// Read one answer: the head, then `Content-Length` bytes of body. `None`
/// if the connection closes (or breaks) before a whole head arrives.
pub fn read_answer(s: &mut UnixStream) -> Option<Answer> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(0) => return None,
            Ok(_) => buf.push(byte[0]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("no answer in time; got {:?}", String::from_utf8_lossy(&buf))
            }
            Err(_) => return None,
        }
    }
    let head = String::from_utf8(buf).unwrap();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_owned(), v.trim().to_owned())
        })
        .collect();
    let mut answer = Answer {
        status,
        headers,
        body: Vec::new(),
    };
    let len: usize = answer
        .header("content-length")
        .map_or(0, |v| v.parse().unwrap());
    answer.body = vec![0; len];
    s.read_exact(&mut answer.body).unwrap();
    Some(answer)
}

/// Whether the server closes `s` (EOF or reset, nothing more to read)
/// within `limit`; bytes that arrive meanwhile are returned as an error.
pub fn closed_within(s: &mut UnixStream, limit: Duration) -> Result<Duration, Vec<u8>> {
    let start = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                got.extend_from_slice(b"<still open>");
                return Err(got);
            }
            Err(_) => break,
        }
    }
    if got.is_empty() {
        Ok(start.elapsed())
    } else {
        Err(got)
    }
}
