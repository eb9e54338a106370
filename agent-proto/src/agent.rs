//! The guest-agent protocol: line-delimited JSON over the guest's second
//! UART (ttyS1 inside the guest, COM2 in the VMM).
//!
//! Every message is one line of at most [`MAX_LINE`] bytes: a JSON object
//! with the protocol version `v` and a `type`. A UART costs one VM exit per
//! byte, so messages stay short and snapshots are sent on change or on
//! request, not continuously. A peer never trusts a line blindly: lines
//! that are too long, not UTF-8, not JSON, of another version or of an
//! unknown type are counted and dropped ([`LineDecoder`], [`decode`]).

use serde::{Deserialize, Serialize};

/// Protocol version spoken by this build.
pub const VERSION: u32 = 1;
/// Longest accepted line, newline excluded.
pub const MAX_LINE: usize = 8192;
/// Host-to-guest lines must fit the UART's receive FIFO (64 bytes).
pub const MAX_HOST_LINE: usize = 63;

/// One worker thread as the guest's registry reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerInfo {
    /// Descriptor name (e.g. "ksoftirqd").
    #[serde(rename = "d")]
    pub descriptor: String,
    /// The CPU the thread belongs to.
    #[serde(rename = "c")]
    pub cpu: u32,
    /// "active", "parked", "failed" or "none".
    #[serde(rename = "s")]
    pub status: String,
    /// The CPU it last ran on, if it ran.
    #[serde(rename = "l", default, skip_serializing_if = "Option::is_none")]
    pub last_cpu: Option<u32>,
    /// setup / park / unpark / thread_fn call counts.
    #[serde(rename = "n")]
    pub counts: [u64; 4],
}

/// Messages from the guest agent to the VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum GuestMessage {
    /// The agent started.
    Ready {
        /// Agent version.
        version: String,
        /// CPUs online.
        online: Vec<u32>,
    },
    /// Still alive (sent every [`HEARTBEAT_MS`] while idle).
    Heartbeat,
    /// A CPU came online or went offline.
    Cpu {
        /// CPU number.
        cpu: u32,
        /// Its new state.
        online: bool,
        /// Whether the agent itself asked for it (false: forced offline).
        #[serde(default)]
        requested: bool,
    },
    /// Answer to [`HostMessage::PrepareRemove`].
    Prepared {
        /// CPU number.
        cpu: u32,
        /// Workers parked and the CPU offline.
        ok: bool,
        /// Why not, when `ok` is false.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Every worker thread and the per-CPU work counters.
    Workers {
        /// The worker threads.
        workers: Vec<WorkerInfo>,
        /// (CPU, items done) pairs.
        done: Vec<(u32, u64)>,
    },
}

/// Messages from the VMM to the guest agent (each under [`MAX_HOST_LINE`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum HostMessage {
    /// Park the CPU's workers and take it offline; answer `prepared`.
    PrepareRemove {
        /// CPU number.
        cpu: u32,
    },
    /// Send a `workers` snapshot.
    Snapshot,
    /// Power the guest off.
    Poweroff,
    /// Test hook (only sent when the VMM runs with test hooks enabled):
    /// make the agent misbehave on purpose.
    Fault {
        /// What to do.
        fault: Fault,
        /// The CPU it applies to, where relevant.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cpu: Option<u32>,
    },
}

/// Misbehaviours the end-to-end tests ask of the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// Answer the next `prepare_remove` of `cpu` with failure after parking
    /// its workers, as if the offline write failed; roll the workers back.
    RefuseOffline,
    /// Write 0 to `cpu`'s online file directly, bypassing the registry (as
    /// an administrator would): the agent must detect the forced offline.
    ForceOffline,
    /// Stop talking to the VMM (no heartbeats, no answers), as a hung or
    /// killed agent would; the workers keep running.
    Silence,
}

/// How often an idle agent says it is alive.
pub const HEARTBEAT_MS: u64 = 1000;

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    v: u32,
    #[serde(flatten)]
    msg: T,
}

/// Why a line was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Longer than [`MAX_LINE`].
    #[error("line longer than {MAX_LINE} bytes")]
    TooLong,
    /// Not UTF-8.
    #[error("line is not UTF-8")]
    NotUtf8,
    /// Not a JSON object of a known message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// Another protocol version.
    #[error("protocol version {0}, expected {VERSION}")]
    Version(u32),
}

/// Encodes one message as a line (with the trailing newline).
pub fn encode<T: Serialize>(msg: &T) -> String {
    let mut s =
        serde_json::to_string(&Envelope { v: VERSION, msg }).unwrap_or_else(|_| String::from("{}"));
    s.push('\n');
    s
}

/// Decodes one line (without its newline).
pub fn decode<T: for<'de> Deserialize<'de>>(line: &[u8]) -> Result<T, DecodeError> {
    if line.len() > MAX_LINE {
        return Err(DecodeError::TooLong);
    }
    let text = std::str::from_utf8(line).map_err(|_| DecodeError::NotUtf8)?;
    #[derive(Deserialize)]
    struct V {
        v: u32,
    }
    let v: V = serde_json::from_str(text).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if v.v != VERSION {
        return Err(DecodeError::Version(v.v));
    }
    let env: Envelope<T> =
        serde_json::from_str(text).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    Ok(env.msg)
}

/// Splits a byte stream into lines of at most [`MAX_LINE`] bytes; an
/// oversized line is discarded up to its newline and reported once.
#[derive(Debug, Default)]
pub struct LineDecoder {
    buf: Vec<u8>,
    overflowed: bool,
}

/// One result of [`LineDecoder::push`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A complete line (newline and any carriage return removed).
    Complete(Vec<u8>),
    /// A line was longer than [`MAX_LINE`] and was dropped.
    Oversized,
}

impl LineDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; returns the lines they completed.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Line> {
        let mut out = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                if self.overflowed {
                    out.push(Line::Oversized);
                } else {
                    if self.buf.last() == Some(&b'\r') {
                        self.buf.pop();
                    }
                    out.push(Line::Complete(std::mem::take(&mut self.buf)));
                }
                self.buf.clear();
                self.overflowed = false;
            } else if !self.overflowed {
                if self.buf.len() >= MAX_LINE {
                    self.overflowed = true;
                    self.buf = Vec::new();
                } else {
                    self.buf.push(b);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_as_versioned_lines() {
        let msgs = vec![
            GuestMessage::Ready {
                version: "0.1.0".into(),
                online: vec![0, 1],
            },
            GuestMessage::Heartbeat,
            GuestMessage::Cpu {
                cpu: 3,
                online: false,
                requested: false,
            },
            GuestMessage::Prepared {
                cpu: 2,
                ok: false,
                reason: Some("EBUSY".into()),
            },
            GuestMessage::Workers {
                workers: vec![WorkerInfo {
                    descriptor: "ksoftirqd".into(),
                    cpu: 1,
                    status: "active".into(),
                    last_cpu: Some(1),
                    counts: [1, 0, 0, 7],
                }],
                done: vec![(0, 10), (1, 7)],
            },
        ];
        for m in msgs {
            let line = encode(&m);
            assert!(
                line.ends_with('\n') && line.starts_with("{\"v\":1,"),
                "{line}"
            );
            let back: GuestMessage = decode(line.trim_end().as_bytes()).unwrap();
            assert_eq!(back, m);
        }
        for m in [
            HostMessage::PrepareRemove { cpu: 4095 },
            HostMessage::Snapshot,
            HostMessage::Poweroff,
            HostMessage::Fault {
                fault: Fault::RefuseOffline,
                cpu: Some(4095),
            },
            HostMessage::Fault {
                fault: Fault::ForceOffline,
                cpu: Some(4095),
            },
            HostMessage::Fault {
                fault: Fault::Silence,
                cpu: None,
            },
        ] {
            let line = encode(&m);
            assert!(line.len() <= MAX_HOST_LINE, "{line}");
            assert_eq!(
                decode::<HostMessage>(line.trim_end().as_bytes()).unwrap(),
                m
            );
        }
    }

    #[test]
    fn malformed_lines_are_rejected_with_a_reason() {
        type Check = fn(&DecodeError) -> bool;
        let bad: &[(&[u8], Check)] = &[
            (b"", |e| matches!(e, DecodeError::Malformed(_))),
            (b"not json", |e| matches!(e, DecodeError::Malformed(_))),
            (b"[1,2]", |e| matches!(e, DecodeError::Malformed(_))),
            (b"{\"v\":2,\"type\":\"heartbeat\"}", |e| {
                matches!(e, DecodeError::Version(2))
            }),
            (b"{\"type\":\"heartbeat\"}", |e| {
                matches!(e, DecodeError::Malformed(_))
            }),
            (b"{\"v\":1,\"type\":\"reboot\"}", |e| {
                matches!(e, DecodeError::Malformed(_))
            }),
            (
                b"{\"v\":1,\"type\":\"cpu\",\"cpu\":-1,\"online\":true}",
                |e| matches!(e, DecodeError::Malformed(_)),
            ),
            (
                b"{\"v\":1,\"type\":\"cpu\",\"cpu\":1,\"online\":true,\"x\":1}",
                |e| matches!(e, DecodeError::Malformed(_)),
            ),
            (b"\xff\xfe", |e| matches!(e, DecodeError::NotUtf8)),
        ];
        for (line, ok) in bad {
            let e = decode::<GuestMessage>(line).unwrap_err();
            assert!(ok(&e), "{:?} gave {e:?}", String::from_utf8_lossy(line));
        }
        assert_eq!(
            decode::<GuestMessage>(&vec![b' '; MAX_LINE + 1]).unwrap_err(),
            DecodeError::TooLong
        );
    }

    #[test]
    fn line_decoder_splits_and_drops_oversized_lines() {
        let mut d = LineDecoder::new();
        assert!(d.push(b"ab").is_empty());
        assert_eq!(
            d.push(b"c\r\nde\n"),
            vec![
                Line::Complete(b"abc".to_vec()),
                Line::Complete(b"de".to_vec())
            ]
        );
        let big = vec![b'x'; MAX_LINE + 10];
        assert!(d.push(&big).is_empty());
        assert_eq!(
            d.push(b"yy\nok\n"),
            vec![Line::Oversized, Line::Complete(b"ok".to_vec())]
        );
        // Exactly MAX_LINE bytes is fine.
        let mut exact = vec![b'z'; MAX_LINE];
        exact.push(b'\n');
        assert_eq!(d.push(&exact), vec![Line::Complete(vec![b'z'; MAX_LINE])]);
    }
}
