//! The guest-agent protocol: line-delimited JSON over the guest's second
//! UART (ttyS1 inside the guest, COM2 in the VMM), or through the
//! [mailbox](crate::mailbox) beside it.
//!
//! Every message is one line of at most [`MAX_LINE`] bytes: a JSON object
//! with the protocol version `v` and a `type`. A UART costs one VM exit per
//! byte, so messages stay short and snapshots are sent on change or on
//! request, not continuously. A peer never trusts a line blindly: lines
//! that are too long, not UTF-8, not JSON, of another version or of an
//! unknown type are counted and dropped ([`LineDecoder`], [`decode`]).
//!
//! # CPU numbers
//! Every `cpu` on the wire, both ways, is a **vCPU id**: the KVM vCPU id,
//! the APIC ID, the `_UID` of the ACPI processor device and the HTTP API's
//! id, all one number. Linux numbers its CPUs otherwise: a hot-added CPU
//! gets the next free *logical* number (`/sys/devices/system/cpu/cpuN`),
//! so in a guest booted with vCPU 0 only, vCPU 6 added first becomes
//! `cpu1`. The agent translates (it reads `cpuN/firmware_node/uid`) and
//! reports Linux's number beside the id where it helps (`logical`, and
//! `cpus` in `ready`); the VMM never sees a logical number as a `cpu`.
//!
//! # Version 2
//! Version 1 put Linux's logical numbers in `cpu` fields. Version 2: vCPU
//! ids everywhere, `logical` in `cpu`, `cpus` in `ready`, and the
//! `cancel_remove` / `restored`, `fatal` and `delay` (test fault) messages.
//! Later additions, sent only to a VMM of the same build: the workload
//! messages (`workload_started`, `workload_output`, `workload_exit`,
//! `workload_failed`; `workload_ack` back), see [`crate::workload`].
//!
//! # Examples (one line each)
//! Guest to host:
//! ```text
//! {"v":2,"type":"ready","version":"0.1.0","online":[0,6],"cpus":[[0,0],[6,1]]}
//! {"v":2,"type":"heartbeat"}
//! {"v":2,"type":"cpu","cpu":6,"logical":1,"online":true,"requested":true}
//! {"v":2,"type":"prepared","cpu":6,"ok":false,"reason":"EBUSY: Device or resource busy"}
//! {"v":2,"type":"restored","cpu":6,"ok":true}
//! {"v":2,"type":"workers","workers":[{"d":"rcuc","c":6,"s":"active","l":6,"n":[1,0,0,9]}],"done":[[0,10],[6,7]]}
//! {"v":2,"type":"fatal","reason":"panic: index out of bounds at guest/src/agent.rs:10:5"}
//! ```
//! Host to guest (each at most [`MAX_HOST_LINE`] bytes):
//! ```text
//! {"v":2,"type":"prepare_remove","cpu":6}
//! {"v":2,"type":"cancel_remove","cpu":6}
//! {"v":2,"type":"snapshot"}
//! {"v":2,"type":"poweroff"}
//! {"v":2,"type":"fault","f":"refuse_offline","cpu":6}
//! {"v":2,"type":"fault","f":"delay","ms":3000}
//! ```

use serde::{Deserialize, Serialize};

use crate::workload::WorkloadStream;

/// Protocol version spoken by this build.
pub const VERSION: u32 = 2;
/// Longest accepted line, newline excluded.
pub const MAX_LINE: usize = 8192;
/// Host-to-guest lines, newline included, must fit the UART's receive
/// FIFO (64 bytes): a unit test checks the longest encoding of each.
pub const MAX_HOST_LINE: usize = 63;

/// One worker thread as the guest's registry reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerInfo {
    /// Descriptor name (e.g. "ksoftirqd").
    #[serde(rename = "d")]
    pub descriptor: String,
    /// The vCPU id of the CPU the thread belongs to.
    #[serde(rename = "c")]
    pub cpu: u32,
    /// "active", "parked", "failed" or "none".
    #[serde(rename = "s")]
    pub status: String,
    /// The vCPU id of the CPU it last ran on, if it ran (and that CPU is
    /// known).
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
        /// vCPU ids of the CPUs online.
        online: Vec<u32>,
        /// (vCPU id, Linux's logical number) of every CPU the guest knows
        /// (present, online or not), by ascending id.
        #[serde(default)]
        cpus: Vec<(u32, u32)>,
    },
    /// Still alive (sent every [`HEARTBEAT_MS`] while idle).
    Heartbeat,
    /// A CPU came online or went offline.
    Cpu {
        /// vCPU id.
        cpu: u32,
        /// Linux's logical number of the CPU (`cpuN`), when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        logical: Option<u32>,
        /// Its new state.
        online: bool,
        /// Whether the agent itself asked for it (false: forced offline).
        #[serde(default)]
        requested: bool,
    },
    /// Answer to [`HostMessage::PrepareRemove`].
    Prepared {
        /// vCPU id.
        cpu: u32,
        /// Workers parked and the CPU offline.
        ok: bool,
        /// Why not, when `ok` is false.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Answer to [`HostMessage::CancelRemove`].
    Restored {
        /// vCPU id.
        cpu: u32,
        /// The CPU is online with its workers unparked.
        ok: bool,
        /// Why not, when `ok` is false (e.g. the CPU was ejected already).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Every worker thread and the per-CPU work counters.
    Workers {
        /// The worker threads.
        workers: Vec<WorkerInfo>,
        /// (vCPU id, items done) pairs.
        done: Vec<(u32, u64)>,
    },
    /// The agent failed (a panic, an unrecoverable error) and powers the
    /// guest off next: the last thing it sends.
    Fatal {
        /// What went wrong.
        reason: String,
    },
    /// A service agent (not the guest's init) is stopping on purpose (its
    /// service manager stopped it): the VMM counts it gone at once rather
    /// than after [`HEARTBEAT_MS`]-based silence, and again connected at
    /// its next [`GuestMessage::Ready`]. Not a failure: the guest goes on.
    Stopping {
        /// Why (e.g. `signal=SIGTERM`).
        reason: String,
    },
    /// The workload ([`crate::workload`]) started as the agent's child.
    WorkloadStarted {
        /// Its process id in the guest.
        pid: u32,
    },
    /// Whole lines the workload wrote on one stream, in order; costs one
    /// credit of [`crate::workload::WINDOW`].
    WorkloadOutput {
        /// The stream.
        #[serde(rename = "s")]
        stream: WorkloadStream,
        /// The lines, without their newlines.
        lines: Vec<String>,
    },
    /// The workload ended, after its last `workload_output`; the agent
    /// powers the guest off next.
    WorkloadExit {
        /// Its exit status, when it exited.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<i32>,
        /// The signal that killed it, when one did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
    },
    /// The workload could not be started; the agent powers the guest off
    /// next.
    WorkloadFailed {
        /// Why (the description was unusable, exec failed).
        reason: String,
        /// The program (or its ELF interpreter) does not exist.
        #[serde(default)]
        not_found: bool,
    },
}

/// Messages from the VMM to the guest agent (each at most
/// [`MAX_HOST_LINE`] bytes, newline included).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum HostMessage {
    /// Park the CPU's workers and take it offline; answer `prepared`.
    PrepareRemove {
        /// vCPU id.
        cpu: u32,
    },
    /// The VMM gave up a removal the agent was preparing or had prepared:
    /// bring the CPU back online if it is offline, unpark its workers, and
    /// answer `restored`.
    CancelRemove {
        /// vCPU id.
        cpu: u32,
    },
    /// Send a `workers` snapshot.
    Snapshot,
    /// Power the guest off.
    Poweroff,
    /// Test hook (only sent when the VMM runs with test hooks enabled):
    /// make the agent misbehave on purpose. `cpu` goes with the faults
    /// that concern one CPU and `ms` with [`Fault::DelayReport`]: never
    /// both at their longest, or the line would not fit [`MAX_HOST_LINE`].
    Fault {
        /// What to do.
        #[serde(rename = "f")]
        fault: Fault,
        /// The vCPU id it applies to, where relevant.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cpu: Option<u32>,
        /// Milliseconds, for [`Fault::DelayReport`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ms: Option<u64>,
    },
    /// The VMM wrote out `n` more `workload_output` messages: the agent may
    /// send that many more ([`crate::workload::WINDOW`]).
    WorkloadAck {
        /// Messages acknowledged.
        n: u32,
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
    /// Online the next hot-added CPU at once as usual, but hold its `cpu`
    /// online report (and nothing else) back for `ms` milliseconds, as a
    /// slow guest would. Named `delay` on the wire (the line must fit
    /// [`MAX_HOST_LINE`]).
    #[serde(rename = "delay")]
    DelayReport,
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

    /// Heap bytes held for the partial line (the fuzz targets' memory
    /// bound).
    #[doc(hidden)]
    pub fn buffered_capacity(&self) -> usize {
        self.buf.capacity()
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

    fn guest_messages() -> Vec<GuestMessage> {
        vec![
            GuestMessage::Ready {
                version: "0.1.0".into(),
                online: vec![0, 6],
                cpus: vec![(0, 0), (3, 2), (6, 1)],
            },
            GuestMessage::Heartbeat,
            GuestMessage::Stopping {
                reason: "signal=SIGTERM".into(),
            },
            GuestMessage::Cpu {
                cpu: 6,
                logical: Some(1),
                online: true,
                requested: true,
            },
            GuestMessage::Cpu {
                cpu: 3,
                logical: None,
                online: false,
                requested: false,
            },
            GuestMessage::Prepared {
                cpu: 2,
                ok: false,
                reason: Some("EBUSY".into()),
            },
            GuestMessage::Restored {
                cpu: 6,
                ok: true,
                reason: None,
            },
            GuestMessage::Restored {
                cpu: 6,
                ok: false,
                reason: Some("cpu1 (vCPU 6) no longer exists".into()),
            },
            GuestMessage::Workers {
                workers: vec![WorkerInfo {
                    descriptor: "ksoftirqd".into(),
                    cpu: 6,
                    status: "active".into(),
                    last_cpu: Some(6),
                    counts: [1, 0, 0, 7],
                }],
                done: vec![(0, 10), (6, 7)],
            },
            GuestMessage::Fatal {
                reason: "panic: \"quoted\"\nnewline".into(),
            },
        ]
    }

    /// Every host message at its longest: the largest numbers in every
    /// field it carries.
    fn longest_host_messages() -> Vec<HostMessage> {
        let cpu = u32::MAX;
        let mut msgs = vec![
            HostMessage::PrepareRemove { cpu },
            HostMessage::CancelRemove { cpu },
            HostMessage::Snapshot,
            HostMessage::Poweroff,
        ];
        for fault in [Fault::RefuseOffline, Fault::ForceOffline, Fault::Silence] {
            msgs.push(HostMessage::Fault {
                fault,
                cpu: Some(cpu),
                ms: None,
            });
        }
        msgs.push(HostMessage::Fault {
            fault: Fault::DelayReport,
            cpu: None,
            ms: Some(u64::MAX),
        });
        msgs.push(HostMessage::WorkloadAck { n: u32::MAX });
        msgs
    }

    #[test]
    fn messages_round_trip_as_versioned_lines() {
        for m in guest_messages() {
            let line = encode(&m);
            assert!(
                line.ends_with('\n') && line.starts_with("{\"v\":2,"),
                "{line}"
            );
            let back: GuestMessage = decode(line.trim_end().as_bytes()).unwrap();
            assert_eq!(back, m);
        }
        for m in longest_host_messages() {
            let line = encode(&m);
            assert_eq!(
                decode::<HostMessage>(line.trim_end().as_bytes()).unwrap(),
                m
            );
        }
    }

    #[test]
    fn every_host_message_fits_the_uart_fifo() {
        let mut longest = 0;
        for m in longest_host_messages() {
            let line = encode(&m);
            assert!(line.len() <= MAX_HOST_LINE, "{} bytes: {line}", line.len());
            longest = longest.max(line.len());
        }
        // The variants are all there (a new one must be added above).
        let names: std::collections::HashSet<_> = longest_host_messages()
            .iter()
            .map(std::mem::discriminant)
            .collect();
        assert_eq!(names.len(), 6);
        assert!(longest > 50, "the test covers the long ones: {longest}");
    }

    #[test]
    fn the_wire_format_is_stable() {
        let lines = [
            (
                encode(&GuestMessage::Cpu {
                    cpu: 6,
                    logical: Some(1),
                    online: true,
                    requested: true,
                }),
                r#"{"v":2,"type":"cpu","cpu":6,"logical":1,"online":true,"requested":true}"#,
            ),
            (
                encode(&GuestMessage::Ready {
                    version: "0.1.0".into(),
                    online: vec![0, 6],
                    cpus: vec![(0, 0), (6, 1)],
                }),
                r#"{"v":2,"type":"ready","version":"0.1.0","online":[0,6],"cpus":[[0,0],[6,1]]}"#,
            ),
            (
                encode(&GuestMessage::Restored {
                    cpu: 6,
                    ok: true,
                    reason: None,
                }),
                r#"{"v":2,"type":"restored","cpu":6,"ok":true}"#,
            ),
            (
                encode(&GuestMessage::Fatal { reason: "x".into() }),
                r#"{"v":2,"type":"fatal","reason":"x"}"#,
            ),
            (
                encode(&HostMessage::CancelRemove { cpu: 6 }),
                r#"{"v":2,"type":"cancel_remove","cpu":6}"#,
            ),
            (
                encode(&HostMessage::Fault {
                    fault: Fault::DelayReport,
                    cpu: None,
                    ms: Some(3000),
                }),
                r#"{"v":2,"type":"fault","f":"delay","ms":3000}"#,
            ),
            (
                encode(&HostMessage::Fault {
                    fault: Fault::RefuseOffline,
                    cpu: Some(6),
                    ms: None,
                }),
                r#"{"v":2,"type":"fault","f":"refuse_offline","cpu":6}"#,
            ),
        ];
        for (line, want) in lines {
            assert_eq!(line, format!("{want}\n"));
        }
        // Fields version 2 added may be left out by a peer.
        let ready: GuestMessage =
            decode(br#"{"v":2,"type":"ready","version":"1","online":[0]}"#).unwrap();
        assert_eq!(
            ready,
            GuestMessage::Ready {
                version: "1".into(),
                online: vec![0],
                cpus: vec![]
            }
        );
        let cpu: GuestMessage = decode(br#"{"v":2,"type":"cpu","cpu":3,"online":false}"#).unwrap();
        assert_eq!(
            cpu,
            GuestMessage::Cpu {
                cpu: 3,
                logical: None,
                online: false,
                requested: false
            }
        );
    }

    #[test]
    fn malformed_lines_are_rejected_with_a_reason() {
        type Check = fn(&DecodeError) -> bool;
        let bad: &[(&[u8], Check)] = &[
            (b"", |e| matches!(e, DecodeError::Malformed(_))),
            (b"not json", |e| matches!(e, DecodeError::Malformed(_))),
            (b"[1,2]", |e| matches!(e, DecodeError::Malformed(_))),
            (b"{\"v\":1,\"type\":\"heartbeat\"}", |e| {
                matches!(e, DecodeError::Version(1))
            }),
            (b"{\"v\":3,\"type\":\"heartbeat\"}", |e| {
                matches!(e, DecodeError::Version(3))
            }),
            (b"{\"type\":\"heartbeat\"}", |e| {
                matches!(e, DecodeError::Malformed(_))
            }),
            (b"{\"v\":2,\"type\":\"reboot\"}", |e| {
                matches!(e, DecodeError::Malformed(_))
            }),
            (
                b"{\"v\":2,\"type\":\"cpu\",\"cpu\":-1,\"online\":true}",
                |e| matches!(e, DecodeError::Malformed(_)),
            ),
            (
                b"{\"v\":2,\"type\":\"cpu\",\"cpu\":1,\"online\":true,\"x\":1}",
                |e| matches!(e, DecodeError::Malformed(_)),
            ),
            (
                b"{\"v\":2,\"type\":\"cpu\",\"cpu\":1,\"logical\":-1,\"online\":true}",
                |e| matches!(e, DecodeError::Malformed(_)),
            ),
            (
                b"{\"v\":2,\"type\":\"ready\",\"version\":\"1\",\"online\":[],\"cpus\":[[1]]}",
                |e| matches!(e, DecodeError::Malformed(_)),
            ),
            (b"{\"v\":2,\"type\":\"restored\",\"cpu\":1}", |e| {
                matches!(e, DecodeError::Malformed(_))
            }),
            (b"{\"v\":2,\"type\":\"fatal\"}", |e| {
                matches!(e, DecodeError::Malformed(_))
            }),
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
        for bad in [
            &b"{\"v\":2,\"type\":\"cancel_remove\"}"[..],
            b"{\"v\":2,\"type\":\"cancel_remove\",\"cpu\":4294967296}",
            b"{\"v\":2,\"type\":\"fault\",\"fault\":\"silence\"}",
            b"{\"v\":2,\"type\":\"fault\",\"f\":\"delay\",\"ms\":-1}",
            b"{\"v\":2,\"type\":\"fault\",\"f\":\"delay_report\"}",
        ] {
            let e = decode::<HostMessage>(bad).unwrap_err();
            assert!(
                matches!(e, DecodeError::Malformed(_)),
                "{:?} gave {e:?}",
                String::from_utf8_lossy(bad)
            );
        }
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
