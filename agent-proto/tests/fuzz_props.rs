//! The fuzz targets `agent_lines` and `mailbox` (`agent_proto::fuzzing`)
//! as bounded property tests: the committed corpus plus seeded random
//! inputs (see `fuzz/props.rs`; `FUZZ_CASES`, `FUZZ_SEED`).

#[path = "../../fuzz/props.rs"]
mod props;

use agent_proto::agent::{encode, Fault, GuestMessage, HostMessage, WorkerInfo, MAX_LINE};
use agent_proto::fuzzing;
use agent_proto::mailbox::CAPACITY;
use rand::rngs::StdRng;
use rand::Rng;

/// Lines a real peer sends, one of each kind.
fn real_lines() -> Vec<String> {
    let guest = [
        GuestMessage::Ready {
            version: "0.1.0".into(),
            online: vec![0, 6],
            cpus: vec![(0, 0), (6, 1)],
        },
        GuestMessage::Heartbeat,
        GuestMessage::Cpu {
            cpu: 6,
            logical: Some(1),
            online: true,
            requested: true,
        },
        GuestMessage::Prepared {
            cpu: 6,
            ok: false,
            reason: Some("EBUSY: Device or resource busy".into()),
        },
        GuestMessage::Restored {
            cpu: 6,
            ok: true,
            reason: None,
        },
        GuestMessage::Workers {
            workers: vec![WorkerInfo {
                descriptor: "rcuc".into(),
                cpu: 6,
                status: "active".into(),
                last_cpu: Some(6),
                counts: [1, 0, 0, 9],
            }],
            done: vec![(0, 10), (6, 7)],
        },
        GuestMessage::Fatal {
            reason: "panic: \"x\"\n".into(),
        },
    ];
    let host = [
        HostMessage::PrepareRemove { cpu: 6 },
        HostMessage::CancelRemove { cpu: 6 },
        HostMessage::Snapshot,
        HostMessage::Poweroff,
        HostMessage::Fault {
            fault: Fault::DelayReport,
            cpu: None,
            ms: Some(3000),
        },
    ];
    guest
        .iter()
        .map(encode)
        .chain(host.iter().map(encode))
        .collect()
}

/// A stream of real lines, near-limit lines, junk and line ends.
fn stream(rng: &mut StdRng) -> Vec<u8> {
    let lines = real_lines();
    let mut out: Vec<u8> = (0..4).map(|_| rng.gen()).collect();
    for _ in 0..rng.gen_range(0..12) {
        match rng.gen_range(0..8) {
            0..=2 => out.extend(lines[rng.gen_range(0..lines.len())].as_bytes()),
            3 => {
                // Around the limit, with or without a carriage return.
                let len = MAX_LINE - 2 + rng.gen_range(0..5);
                out.extend(std::iter::repeat_n(b'x', len));
                if rng.gen() {
                    out.push(b'\r');
                }
                out.push(b'\n');
            }
            4 => out.extend(b"\r\n"),
            5 => out.push(b'\n'),
            6 => out.extend(props::random_bytes(rng, 64)),
            _ => {
                // A real line cut short.
                let line = &lines[rng.gen_range(0..lines.len())];
                out.extend(&line.as_bytes()[..rng.gen_range(0..line.len())]);
            }
        }
    }
    out
}

#[test]
fn agent_lines() {
    props::run("agent_lines", 3000, fuzzing::agent_lines, stream);
}

/// A mailbox program: mostly sane counters, pushes of lines, UART bytes
/// with doorbells.
fn mailbox_program(rng: &mut StdRng) -> Vec<u8> {
    let lines = real_lines();
    let mut out = vec![1u8];
    for _ in 0..rng.gen_range(1..24) {
        let op: u8 = rng.gen_range(0..9);
        out.push(op);
        match op {
            0 | 1 => {
                out.extend(rng.gen::<u16>().to_le_bytes());
                let kind: u8 = rng.gen_range(0..7);
                out.push(kind);
                out.extend(rng.gen::<u32>().to_le_bytes());
            }
            2 => {
                out.extend(rng.gen::<u16>().to_le_bytes());
                let bytes = props::random_bytes(rng, 32);
                out.extend(u16::try_from(bytes.len()).unwrap().to_le_bytes());
                out.extend(bytes);
            }
            3 => {
                let mut bytes = Vec::new();
                if rng.gen_range(0..4) == 0 {
                    let n = rng.gen_range(0..=CAPACITY as usize + 8);
                    bytes.extend((0..n).map(|i| if i % 50 == 49 { b'\n' } else { b'a' }));
                } else {
                    for _ in 0..rng.gen_range(1..6) {
                        bytes.extend(lines[rng.gen_range(0..lines.len())].as_bytes());
                    }
                }
                out.extend(u16::try_from(bytes.len()).unwrap().to_le_bytes());
                out.extend(bytes);
            }
            4 | 5 => {
                let mut bytes = Vec::new();
                for _ in 0..rng.gen_range(1..4) {
                    match rng.gen_range(0..3) {
                        0 => bytes.push(0),
                        1 => bytes.extend(b"{\"v\":2,"),
                        _ => bytes.extend(b"\n"),
                    }
                }
                out.extend(u16::try_from(bytes.len()).unwrap().to_le_bytes());
                out.extend(bytes);
            }
            _ => {}
        }
    }
    out
}

#[test]
fn mailbox() {
    props::run("mailbox", 2000, fuzzing::mailbox, mailbox_program);
}

/// Regression (`mailbox`, `crash-wrap-puts-two-bytes-in-one-slot`): the
/// counters wrapped at 2^32, which the capacity (16320) does not divide,
/// so bytes 256 apart around the wrap shared a slot and a ring more than
/// 256 bytes full across the wrap gave back other bytes than were pushed.
/// They now wrap at `WRAP`, a multiple of the capacity.
#[test]
fn bytes_cross_the_counters_wrap_intact() {
    use agent_proto::mailbox::{Ring, RING_SIZE, WRAP};
    use std::sync::atomic::{AtomicU32, Ordering};

    for start in [WRAP - 1000, WRAP - CAPACITY, WRAP - 1, 0, u32::MAX / 2] {
        let mut page = vec![0u64; RING_SIZE / 8];
        let base = page.as_mut_ptr().cast::<u8>();
        // SAFETY: `page` is 8-byte aligned, RING_SIZE bytes, and outlives
        // the rings and counters used below, which are its only accesses.
        let (producer, consumer) = unsafe { (Ring::new(base), Ring::new(base)) };
        producer.init();
        for offset in [8, 12] {
            // SAFETY: the head (8) and tail (12) counters of the page,
            // 4-byte aligned, only accessed atomically.
            unsafe { &*base.add(offset).cast::<AtomicU32>() }.store(start, Ordering::Release);
        }
        for round in 0..4u32 {
            let sent: Vec<u8> = (0..CAPACITY - round)
                // Not periodic in 256 (the distance of the old collision).
                .map(|i| (i.wrapping_mul(31) ^ (i >> 8) ^ round).to_le_bytes()[0])
                .collect();
            assert_eq!(producer.push(&sent), Ok(sent.len()));
            let mut got = Vec::new();
            assert_eq!(consumer.pop_into(&mut got), Ok(sent.len()));
            assert!(
                got == sent,
                "start {start:#x}, round {round}: bytes changed"
            );
        }
    }
}
