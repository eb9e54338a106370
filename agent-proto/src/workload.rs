//! The user's workload: what the launcher puts in the guest for the agent
//! to run ([`WorkloadSpec`], at [`SPEC_PATH`] in the initramfs), how its
//! output travels to the VMM (whole lines, bounded, packed into
//! `workload_output` messages under a credit window), and the exit status
//! convention everyone reports ([`shell_status`]).
//!
//! # Messages (guest to host, one line each)
//! ```text
//! {"v":2,"type":"workload_started","pid":97}
//! {"v":2,"type":"workload_output","s":"out","lines":["iteration 1","iteration 2"]}
//! {"v":2,"type":"workload_output","s":"err","lines":["warning: x"]}
//! {"v":2,"type":"workload_exit","status":3}
//! {"v":2,"type":"workload_exit","signal":9}
//! {"v":2,"type":"workload_failed","reason":"cannot run /bin/x: No such file or directory (os error 2)","not_found":true}
//! ```
//! and host to guest `{"v":2,"type":"workload_ack","n":1}`: the VMM wrote
//! out `n` more `workload_output` messages. The agent keeps at most
//! [`WINDOW`] of them unacknowledged and stops reading the workload's
//! pipes while the window is full, so a host that reads slowly slows the
//! workload down (its writes block) instead of losing lines or crowding
//! out the agent's CPU reports in the VMM's bounded event queue.
//!
//! # Bounds
//! A line is at most [`MAX_LINE_BYTES`] bytes of the workload's output
//! and at most [`MAX_PIECE_JSON`] bytes once JSON-escaped; a longer line
//! arrives as several lines (cut at character boundaries). Output that is
//! not UTF-8 is replaced character by character (U+FFFD). One trailing
//! carriage return is dropped. A message packs as many lines as fit in
//! [`MAX_LINE`] (encoded).
//!
//! The messages are additions to protocol version 2: an agent sends them
//! only when the launcher gave it a workload, which only a VMM of the same
//! build is started with, so the version is unchanged.

use serde::{Deserialize, Serialize};

use crate::agent::{GuestMessage, MAX_LINE};

/// Where the launcher writes the workload's description in the guest's
/// initramfs; the agent runs it when the file exists.
pub const SPEC_PATH: &str = "/etc/workload.json";
/// Largest accepted description (bytes).
pub const MAX_SPEC: usize = 64 * 1024;
/// `workload_output` messages the agent may have unacknowledged.
pub const WINDOW: u32 = 16;
/// Longest line of output forwarded whole (bytes of the workload's output).
pub const MAX_LINE_BYTES: usize = 2048;
/// Longest line once JSON-escaped (control characters take 6 bytes).
pub const MAX_PIECE_JSON: usize = 4096;
/// Room kept in every `workload_output` line for the envelope.
const ENVELOPE_ROOM: usize = 128;

/// The `PATH` a workload gets unless its description sets one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What to run: written by the launcher as JSON at [`SPEC_PATH`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Program and arguments; a program without `/` is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Extra environment, `NAME=value` each, over the defaults (`PATH`,
    /// `HOME=/root`, `USER=root`, `TMPDIR=/tmp`, `LANG=C.UTF-8`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// Working directory (default `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

/// Why a workload description is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// Not the JSON of a [`WorkloadSpec`].
    #[error("malformed workload description: {0}")]
    Malformed(String),
    /// Larger than [`MAX_SPEC`].
    #[error("workload description larger than {MAX_SPEC} bytes")]
    TooLarge,
    /// No program.
    #[error("the workload has no command")]
    Empty,
    /// A string holds a NUL byte (exec cannot pass it).
    #[error("NUL byte in {0}")]
    Nul(&'static str),
    /// An environment entry is not `NAME=value`.
    #[error("environment entry {0:?} is not NAME=value")]
    Env(String),
}

impl WorkloadSpec {
    /// Runs `argv` with the default environment.
    pub fn new(argv: Vec<String>) -> Self {
        Self {
            argv,
            env: Vec::new(),
            cwd: None,
        }
    }

    /// Checks what exec needs.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.argv.first().is_none_or(|p| p.is_empty()) {
            return Err(SpecError::Empty);
        }
        if self.argv.iter().any(|a| a.contains('\0')) {
            return Err(SpecError::Nul("the command"));
        }
        for e in &self.env {
            if e.contains('\0') {
                return Err(SpecError::Nul("the environment"));
            }
            if e.split_once('=').is_none_or(|(k, _)| k.is_empty()) {
                return Err(SpecError::Env(e.clone()));
            }
        }
        if self.cwd.as_deref().is_some_and(|c| c.contains('\0')) {
            return Err(SpecError::Nul("the working directory"));
        }
        Ok(())
    }

    /// The file's contents.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }

    /// Parses and validates the file's contents.
    pub fn from_json(bytes: &[u8]) -> Result<Self, SpecError> {
        if bytes.len() > MAX_SPEC {
            return Err(SpecError::TooLarge);
        }
        let spec: Self =
            serde_json::from_slice(bytes).map_err(|e| SpecError::Malformed(e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    /// The environment the workload gets: the defaults, then [`Self::env`]
    /// (a later entry replaces an earlier one of the same name).
    pub fn environment(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = [
            ("PATH", DEFAULT_PATH),
            ("HOME", "/root"),
            ("USER", "root"),
            ("LOGNAME", "root"),
            ("TMPDIR", "/tmp"),
            ("LANG", "C.UTF-8"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        for entry in &self.env {
            if let Some((k, v)) = entry.split_once('=') {
                env.retain(|(name, _)| name != k);
                env.push((k.to_owned(), v.to_owned()));
            }
        }
        env
    }
}

/// Which of the workload's streams a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadStream {
    /// Standard output.
    Out,
    /// Standard error.
    Err,
}

/// The exit status a shell would give: the workload's own exit status,
/// 128 + the signal that killed it, 127 if the program (or its ELF
/// interpreter) does not exist, 126 if it could not be started otherwise.
pub fn shell_status(status: Option<i32>, signal: Option<i32>, not_found: bool) -> i32 {
    match (status, signal) {
        (Some(s), _) => s,
        (None, Some(sig)) => 128 + sig,
        (None, None) if not_found => 127,
        (None, None) => 126,
    }
}

/// The length of `text` as a JSON string, quotes included, as serde_json
/// writes it (it escapes `"`, `\` and the C0 controls, nothing else).
pub fn json_len(text: &str) -> usize {
    2 + text.bytes().map(escaped_len).sum::<usize>()
}

fn escaped_len(b: u8) -> usize {
    match b {
        b'"' | b'\\' | b'\x08' | b'\x0c' | b'\n' | b'\r' | b'\t' => 2,
        0..=0x1f => 6,
        _ => 1,
    }
}

/// Cuts `text` into pieces of at most [`MAX_PIECE_JSON`] bytes each once
/// JSON-escaped, at character boundaries (an empty line stays one piece).
fn cut_by_json(text: String) -> Vec<String> {
    if json_len(&text) <= MAX_PIECE_JSON {
        return vec![text];
    }
    let mut pieces = Vec::new();
    let (mut start, mut cost) = (0, 2);
    for (i, c) in text.char_indices() {
        let mut buf = [0u8; 4];
        let add = c
            .encode_utf8(&mut buf)
            .bytes()
            .map(escaped_len)
            .sum::<usize>();
        if cost + add > MAX_PIECE_JSON {
            pieces.push(text[start..i].to_owned());
            (start, cost) = (i, 2);
        }
        cost += add;
    }
    pieces.push(text[start..].to_owned());
    pieces
}

/// Splits one output stream into bounded lines (see the module docs).
#[derive(Debug, Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// Nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes held back, waiting for the end of their line.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Feeds bytes; returns the lines (and pieces of overlong lines) they
    /// completed.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        for chunk in bytes.split_inclusive(|&b| b == b'\n') {
            self.pending.extend_from_slice(chunk);
            if self.pending.last() == Some(&b'\n') {
                self.pending.pop();
                if self.pending.last() == Some(&b'\r') {
                    self.pending.pop();
                }
                let line = std::mem::take(&mut self.pending);
                self.emit(&line, &mut out);
                continue;
            }
            while self.pending.len() > MAX_LINE_BYTES {
                let end = char_boundary(&self.pending, MAX_LINE_BYTES);
                let piece: Vec<u8> = self.pending.drain(..end).collect();
                self.emit(&piece, &mut out);
            }
        }
        out
    }

    /// The end of the stream: what is pending, as a last line.
    pub fn finish(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.pending.is_empty() {
            let rest = std::mem::take(&mut self.pending);
            self.emit(&rest, &mut out);
        }
        out
    }

    /// `bytes` (one line, or the head of one) as lines of at most
    /// [`MAX_LINE_BYTES`] each (an empty line stays one).
    fn emit(&self, mut bytes: &[u8], out: &mut Vec<String>) {
        loop {
            let end = if bytes.len() > MAX_LINE_BYTES {
                char_boundary(bytes, MAX_LINE_BYTES)
            } else {
                bytes.len()
            };
            let (piece, rest) = bytes.split_at(end);
            out.extend(cut_by_json(String::from_utf8_lossy(piece).into_owned()));
            if rest.is_empty() {
                return;
            }
            bytes = rest;
        }
    }
}

/// The largest cut at or below `max` that does not split a UTF-8 sequence
/// (`max` itself when no boundary is near: the bytes are not UTF-8).
fn char_boundary(bytes: &[u8], max: usize) -> usize {
    (max.saturating_sub(3)..=max)
        .rev()
        .find(|&i| bytes.get(i).is_none_or(|&b| (b as i8) >= -0x40))
        .unwrap_or(max)
}

/// Packs lines (as [`LineSplitter`] makes them) into as few
/// `workload_output` messages as fit in [`MAX_LINE`] each, in order.
pub fn pack_output(stream: WorkloadStream, lines: Vec<String>) -> Vec<GuestMessage> {
    let budget = MAX_LINE - ENVELOPE_ROOM;
    let mut msgs = Vec::new();
    let mut batch: Vec<String> = Vec::new();
    let mut size = 0;
    for line in lines {
        let cost = json_len(&line) + 1;
        if !batch.is_empty() && size + cost > budget {
            msgs.push(GuestMessage::WorkloadOutput {
                stream,
                lines: std::mem::take(&mut batch),
            });
            size = 0;
        }
        size += cost;
        batch.push(line);
    }
    if !batch.is_empty() {
        msgs.push(GuestMessage::WorkloadOutput {
            stream,
            lines: batch,
        });
    }
    msgs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{decode, encode, HostMessage, MAX_HOST_LINE};

    #[test]
    fn json_len_is_what_serde_json_writes() {
        let all: String = (0u8..=0x7f).map(char::from).collect();
        for text in [all.as_str(), "", "é\"\\\u{7f}\u{fffd}", "plain text"] {
            assert_eq!(json_len(text), serde_json::to_string(text).unwrap().len());
        }
    }

    #[test]
    fn lines_are_split_whole_and_bounded() {
        let mut s = LineSplitter::new();
        assert!(s.push(b"par").is_empty());
        assert_eq!(s.push(b"tial\r\nnext\n\nlast"), ["partial", "next", ""]);
        assert_eq!(s.finish(), ["last"]);
        assert!(s.finish().is_empty());
        // An overlong line comes in pieces of at most MAX_LINE_BYTES.
        let long = "x".repeat(MAX_LINE_BYTES * 2 + 10) + "\n";
        let got = s.push(long.as_bytes());
        assert_eq!(
            got.iter().map(String::len).collect::<Vec<_>>(),
            [MAX_LINE_BYTES, MAX_LINE_BYTES, 10]
        );
        // Never inside a UTF-8 sequence; invalid bytes replaced.
        let mut text = "é".repeat(MAX_LINE_BYTES).into_bytes();
        text.extend_from_slice(b"\xff\n");
        let got = s.push(&text);
        assert!(got.iter().all(|l| l.len() <= MAX_LINE_BYTES));
        assert_eq!(got.concat(), "é".repeat(MAX_LINE_BYTES) + "\u{fffd}");
        // Control characters: the escaped piece stays bounded too.
        let mut controls = vec![1u8; MAX_LINE_BYTES];
        controls.push(b'\n');
        let got = s.push(&controls);
        assert!(got.len() >= 3, "{}", got.len());
        assert!(got.iter().all(|l| json_len(l) <= MAX_PIECE_JSON));
        assert_eq!(got.concat().len(), MAX_LINE_BYTES);
    }

    #[test]
    fn packed_messages_fit_a_line_and_keep_the_order() {
        let mut s = LineSplitter::new();
        let mut input = Vec::new();
        for i in 0..500u32 {
            input.extend(format!("line {i} \"quoted\" \x1b[1m\n").bytes());
        }
        input.extend_from_slice(&[0u8; 3 * MAX_LINE_BYTES]);
        input.push(b'\n');
        let lines = s.push(&input);
        let msgs = pack_output(WorkloadStream::Err, lines.clone());
        assert!(msgs.len() > 2 && msgs.len() < 20, "{}", msgs.len());
        let mut back = Vec::new();
        for m in &msgs {
            let line = encode(m);
            assert!(line.len() - 1 <= MAX_LINE, "{} bytes", line.len());
            match decode::<GuestMessage>(line.trim_end().as_bytes()).unwrap() {
                GuestMessage::WorkloadOutput { stream, lines } => {
                    assert_eq!(stream, WorkloadStream::Err);
                    back.extend(lines);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(back, lines);
        assert!(pack_output(WorkloadStream::Out, Vec::new()).is_empty());
    }

    #[test]
    fn the_wire_format_is_stable() {
        let cases = [
            (
                encode(&GuestMessage::WorkloadStarted { pid: 97 }),
                r#"{"v":2,"type":"workload_started","pid":97}"#,
            ),
            (
                encode(&GuestMessage::WorkloadOutput {
                    stream: WorkloadStream::Out,
                    lines: vec!["a".into(), "b\tc".into()],
                }),
                r#"{"v":2,"type":"workload_output","s":"out","lines":["a","b\tc"]}"#,
            ),
            (
                encode(&GuestMessage::WorkloadExit {
                    status: Some(3),
                    signal: None,
                }),
                r#"{"v":2,"type":"workload_exit","status":3}"#,
            ),
            (
                encode(&GuestMessage::WorkloadExit {
                    status: None,
                    signal: Some(9),
                }),
                r#"{"v":2,"type":"workload_exit","signal":9}"#,
            ),
            (
                encode(&GuestMessage::WorkloadFailed {
                    reason: "x".into(),
                    not_found: true,
                }),
                r#"{"v":2,"type":"workload_failed","reason":"x","not_found":true}"#,
            ),
            (
                encode(&HostMessage::WorkloadAck { n: 1 }),
                r#"{"v":2,"type":"workload_ack","n":1}"#,
            ),
        ];
        for (line, want) in cases {
            assert_eq!(line, format!("{want}\n"));
        }
        let ack = encode(&HostMessage::WorkloadAck { n: u32::MAX });
        assert!(ack.len() <= MAX_HOST_LINE, "{ack}");
        for bad in [
            &br#"{"v":2,"type":"workload_output","s":"log","lines":[]}"#[..],
            br#"{"v":2,"type":"workload_started"}"#,
            br#"{"v":2,"type":"workload_exit","status":"3"}"#,
            br#"{"v":2,"type":"workload_output","s":"out","lines":[1]}"#,
        ] {
            assert!(decode::<GuestMessage>(bad).is_err());
        }
    }

    #[test]
    fn specs_round_trip_and_are_checked() {
        let mut spec = WorkloadSpec::new(vec!["/bin/t".into(), "--n".into(), "a b".into()]);
        spec.env = vec!["A=1".into(), "PATH=/x".into()];
        let back = WorkloadSpec::from_json(spec.to_json().as_bytes()).unwrap();
        assert_eq!(back, spec);
        let env = back.environment();
        assert!(env.contains(&("PATH".into(), "/x".into())));
        assert!(env.contains(&("HOME".into(), "/root".into())));
        assert_eq!(env.iter().filter(|(k, _)| k == "PATH").count(), 1);
        for (json, want) in [
            (r#"{"argv":[]}"#, SpecError::Empty),
            (r#"{"argv":[""]}"#, SpecError::Empty),
            (r#"{"argv":["a\u0000"]}"#, SpecError::Nul("the command")),
            (
                r#"{"argv":["a"],"env":["=1"]}"#,
                SpecError::Env("=1".into()),
            ),
            (r#"{"argv":["a"],"env":["X"]}"#, SpecError::Env("X".into())),
        ] {
            assert_eq!(WorkloadSpec::from_json(json.as_bytes()), Err(want));
        }
        assert!(matches!(
            WorkloadSpec::from_json(br#"{"argv":["a"],"user":"x"}"#),
            Err(SpecError::Malformed(_))
        ));
        assert_eq!(
            WorkloadSpec::from_json(&vec![b' '; MAX_SPEC + 1]),
            Err(SpecError::TooLarge)
        );
    }

    #[test]
    fn shell_statuses() {
        assert_eq!(shell_status(Some(3), None, false), 3);
        assert_eq!(shell_status(Some(0), None, false), 0);
        assert_eq!(shell_status(None, Some(9), false), 137);
        assert_eq!(shell_status(None, None, true), 127);
        assert_eq!(shell_status(None, None, false), 126);
    }
}
