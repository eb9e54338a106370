//! The agent mailbox: the agent channel's bytes through shared memory.
//!
//! Over the agent UART (COM2) every byte costs the guest at least one VM
//! exit (two when receiving: RBR and LSR), which nested is a quarter of a
//! millisecond: a 60-byte report took ~20 ms. The mailbox carries the same
//! byte stream (the line-delimited JSON of [`crate::agent`]) through two
//! rings in a small region of guest-physical memory that is not RAM to the
//! guest (absent from e820 and ACPI), and keeps the UART for doorbells
//! only: a producer pushes bytes into its ring, then sends one [`DOORBELL`]
//! byte (`0x00`, never part of a JSON line) over the UART; the consumer, on
//! reading a doorbell, drains the ring ([`segments`] splits what the UART
//! delivered). So a message costs a handful of
//! exits whatever its length.
//!
//! ```text
//! MAILBOX_GPA + 0           host -> guest ring (RING_SIZE bytes)
//! MAILBOX_GPA + RING_SIZE   guest -> host ring
//! ring: [0..8) MAGIC (written by the VMM at boot)
//!       [8..12) head: bytes produced, modulo WRAP (producer writes)
//!       [12..16) tail: bytes consumed, modulo WRAP (consumer writes)
//!       [64..RING_SIZE) data, byte i of the stream at 64 + i % CAPACITY
//! ```
//!
//! The counters wrap at [`WRAP`], a multiple of [`CAPACITY`], not at 2^32
//! (which the capacity does not divide): so byte `i` keeps its slot
//! `i % CAPACITY` across the wrap.
//!
//! Ordering: within the stream, bytes before a doorbell on the UART come
//! before the ring's bytes. The consumer drains the ring only where a
//! doorbell sits in the UART stream, after the UART bytes ahead of it, so
//! a producer may switch from UART bytes to the ring between any two bytes.
//! The agent opens the mailbox at start (when [`MAGIC`] is there) and
//! rings from its first message on; the VMM switches its own direction to
//! the ring on the first doorbell it reads.
//!
//! Neither side trusts the other's counters: a ring whose head and tail are
//! more than [`CAPACITY`] apart is reported as [`RingError::Corrupt`] and
//! nothing is read from it.

use std::sync::atomic::{AtomicU32, Ordering};

use thiserror::Error;

use crate::agent::{Line, LineDecoder};

/// Guest-physical address of the mailbox: in the 32-bit MMIO hole, beside
/// the hotplug registers, never RAM to the guest.
pub const MAILBOX_GPA: u64 = 0xd001_0000;
/// Bytes of one ring (header and data).
pub const RING_SIZE: usize = 0x4000;
/// Bytes of the whole mailbox (two rings).
pub const MAILBOX_SIZE: usize = 2 * RING_SIZE;
/// Offset of the host -> guest ring.
pub const TO_GUEST: usize = 0;
/// Offset of the guest -> host ring.
pub const TO_HOST: usize = RING_SIZE;
/// "VMMAGNT1": the VMM serves a mailbox.
pub const MAGIC: u64 = u64::from_le_bytes(*b"VMMAGNT1");
/// The UART byte that says "the ring has bytes for you".
pub const DOORBELL: u8 = 0;
/// Where the data starts in a ring.
const DATA: usize = 64;
/// Data bytes a ring holds.
#[allow(clippy::cast_possible_truncation)] // 16320 fits
pub const CAPACITY: u32 = (RING_SIZE - DATA) as u32;

/// Where the counters wrap: the largest multiple of [`CAPACITY`] a u32
/// holds (`0xFFFF_FF00`). Wrapping at 2^32 instead put the bytes 256 apart
/// around the wrap into one slot (2^32 % CAPACITY = 256), so a ring more
/// than 256 bytes full across it lost data (found by the `mailbox` fuzz
/// target).
pub const WRAP: u32 = u32::MAX / CAPACITY * CAPACITY;

/// `counter + by` modulo [`WRAP`].
fn advance(counter: u32, by: u32) -> u32 {
    let sum = (u64::from(counter) + u64::from(by)) % u64::from(WRAP);
    // Below WRAP: fits.
    u32::try_from(sum).unwrap_or(0)
}

/// A ring's counters do not describe a possible state.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum RingError {
    /// head - tail exceeds the capacity, or a counter is not below [`WRAP`].
    #[error("mailbox ring corrupt: head {head}, tail {tail}")]
    Corrupt {
        /// Bytes produced.
        head: u32,
        /// Bytes consumed.
        tail: u32,
    },
}

/// One ring of the mailbox, as seen by one side.
#[derive(Debug)]
pub struct Ring {
    base: *mut u8,
}

// SAFETY: a Ring only holds the address of shared memory that
// `Ring::new`'s caller keeps mapped for the Ring's life; every access is a
// volatile byte access or an atomic on the counters, which are meant to be
// shared with another agent (the other side of the mailbox).
unsafe impl Send for Ring {}
// SAFETY: as for Send: no access through &Ring assumes exclusive use.
unsafe impl Sync for Ring {}

impl Ring {
    /// A ring at `base`.
    ///
    /// # Safety
    /// `base` must be 8-byte aligned, valid for reads and writes of
    /// [`RING_SIZE`] bytes for the life of the ring, and only ever
    /// accessed elsewhere through another `Ring` (this side or the peer).
    pub unsafe fn new(base: *mut u8) -> Self {
        Self { base }
    }

    fn counter(&self, offset: usize) -> &AtomicU32 {
        // SAFETY: offsets 8 and 12 are 4-byte aligned within the mapped
        // ring (Ring::new's contract) and only accessed atomically.
        unsafe { &*self.base.add(offset).cast::<AtomicU32>() }
    }

    fn head(&self) -> &AtomicU32 {
        self.counter(8)
    }

    fn tail(&self) -> &AtomicU32 {
        self.counter(12)
    }

    /// Writes the magic and empties the ring (the VMM, before the guest runs).
    pub fn init(&self) {
        for (i, b) in MAGIC.to_le_bytes().iter().enumerate() {
            // SAFETY: within the mapped ring (Ring::new's contract).
            unsafe { self.base.add(i).write_volatile(*b) }
        }
        self.head().store(0, Ordering::Release);
        self.tail().store(0, Ordering::Release);
    }

    /// Whether the VMM initialised this ring.
    pub fn has_magic(&self) -> bool {
        let mut bytes = [0u8; 8];
        for (i, b) in bytes.iter_mut().enumerate() {
            // SAFETY: within the mapped ring (Ring::new's contract).
            *b = unsafe { self.base.add(i).read_volatile() };
        }
        u64::from_le_bytes(bytes) == MAGIC
    }

    fn used(head: u32, tail: u32) -> Result<u32, RingError> {
        let corrupt = RingError::Corrupt { head, tail };
        if head >= WRAP || tail >= WRAP {
            return Err(corrupt);
        }
        let used = if head >= tail {
            head - tail
        } else {
            WRAP - tail + head
        };
        if used > CAPACITY {
            return Err(corrupt);
        }
        Ok(used)
    }

    fn slot(&self, index: u32) -> *mut u8 {
        // SAFETY: DATA + (index % CAPACITY) < RING_SIZE, within the ring.
        unsafe { self.base.add(DATA + (index % CAPACITY) as usize) }
    }

    /// Producer: appends as much of `bytes` as fits; returns how much.
    pub fn push(&self, bytes: &[u8]) -> Result<usize, RingError> {
        let head = self.head().load(Ordering::Relaxed);
        let tail = self.tail().load(Ordering::Acquire);
        let free = CAPACITY - Self::used(head, tail)?;
        let n = bytes.len().min(free as usize);
        for (i, b) in bytes[..n].iter().enumerate() {
            let at = advance(head, u32::try_from(i).unwrap_or(u32::MAX));
            // SAFETY: a data slot of the mapped ring, not yet published to
            // the consumer (beyond head).
            unsafe { self.slot(at).write_volatile(*b) }
        }
        let n32 = u32::try_from(n).unwrap_or(0);
        self.head().store(advance(head, n32), Ordering::Release);
        Ok(n)
    }

    /// Consumer: moves every available byte into `out`; returns how many.
    pub fn pop_into(&self, out: &mut Vec<u8>) -> Result<usize, RingError> {
        let head = self.head().load(Ordering::Acquire);
        let tail = self.tail().load(Ordering::Relaxed);
        let used = Self::used(head, tail)?;
        out.reserve(used as usize);
        for i in 0..used {
            // SAFETY: a data slot the producer published (below head).
            out.push(unsafe { self.slot(advance(tail, i)).read_volatile() });
        }
        self.tail().store(head, Ordering::Release);
        Ok(used as usize)
    }

    /// Bytes waiting for the consumer (0 if the counters are corrupt).
    pub fn pending(&self) -> u32 {
        let head = self.head().load(Ordering::Acquire);
        let tail = self.tail().load(Ordering::Acquire);
        Self::used(head, tail).unwrap_or(0)
    }
}

/// A piece of what was read from the agent UART.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment<'a> {
    /// Stream bytes (part of the line-delimited JSON).
    Data(&'a [u8]),
    /// A doorbell: drain the ring here.
    Doorbell,
}

/// Splits bytes read from the agent UART into stream bytes and doorbells,
/// in order.
pub fn segments(bytes: &[u8]) -> impl Iterator<Item = Segment<'_>> {
    let mut rest = bytes;
    let mut bell_next = false;
    std::iter::from_fn(move || {
        if std::mem::take(&mut bell_next) {
            return Some(Segment::Doorbell);
        }
        if rest.is_empty() {
            return None;
        }
        match rest.iter().position(|&b| b == DOORBELL) {
            Some(0) => {
                rest = &rest[1..];
                Some(Segment::Doorbell)
            }
            Some(at) => {
                let data = &rest[..at];
                rest = &rest[at + 1..];
                bell_next = true;
                Some(Segment::Data(data))
            }
            None => Some(Segment::Data(std::mem::take(&mut rest))),
        }
    })
}

/// The receiving side of one direction of the agent channel: the line
/// decoder, fed with the UART's stream bytes and, at each doorbell, with
/// what the ring holds. Without a ring every byte is stream data (a stray
/// NUL then lands in a line that fails to decode and is dropped there).
#[derive(Debug, Default)]
pub struct Inbound {
    decoder: LineDecoder,
    ring_bytes: Vec<u8>,
}

/// What one batch of UART bytes yielded.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Received {
    /// Complete (or oversized) lines, in stream order.
    pub lines: Vec<Line>,
    /// Doorbells seen.
    pub doorbells: u32,
    /// Doorbells whose ring had impossible counters (nothing was read).
    pub corrupt: u32,
}

impl Inbound {
    /// Nothing received yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Heap bytes held between calls: the partial line and the last
    /// ring's bytes (the fuzz targets' memory bound).
    #[doc(hidden)]
    pub fn buffered_capacity(&self) -> usize {
        self.decoder.buffered_capacity() + self.ring_bytes.capacity()
    }

    /// Decodes `bytes` read from the UART, draining `ring` at each doorbell.
    pub fn receive(&mut self, bytes: &[u8], ring: Option<&Ring>) -> Received {
        let mut got = Received::default();
        let Some(ring) = ring else {
            got.lines = self.decoder.push(bytes);
            return got;
        };
        for segment in segments(bytes) {
            match segment {
                Segment::Data(data) => got.lines.extend(self.decoder.push(data)),
                Segment::Doorbell => {
                    got.doorbells += 1;
                    self.ring_bytes.clear();
                    if ring.pop_into(&mut self.ring_bytes).is_err() {
                        got.corrupt += 1;
                    }
                    got.lines.extend(self.decoder.push(&self.ring_bytes));
                }
            }
        }
        got
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Heap memory standing in for the shared page.
    struct Page(Vec<u64>);

    impl Page {
        fn new() -> Self {
            Self(vec![0u64; RING_SIZE / 8])
        }
        fn ring(&mut self) -> Ring {
            // SAFETY: the Vec is 8-byte aligned, RING_SIZE bytes long and
            // outlives the rings of each test; tests access it only
            // through rings.
            unsafe { Ring::new(self.0.as_mut_ptr().cast()) }
        }
    }

    #[test]
    fn bytes_come_out_in_order_across_the_wrap() {
        let mut page = Page::new();
        let producer = page.ring();
        let consumer = page.ring();
        producer.init();
        assert!(consumer.has_magic());
        let mut got = Vec::new();
        let mut sent: Vec<u8> = Vec::new();
        for round in 0..20u32 {
            let chunk: Vec<u8> = (0..1000u32)
                .map(|i| (i * 7 + round).to_le_bytes()[0] | 1)
                .collect();
            assert_eq!(producer.push(&chunk), Ok(1000));
            sent.extend(&chunk);
            assert_eq!(consumer.pending(), 1000);
            assert_eq!(consumer.pop_into(&mut got), Ok(1000));
        }
        assert_eq!(got, sent);
        assert_eq!(consumer.pop_into(&mut got), Ok(0));
    }

    #[test]
    fn a_full_ring_takes_what_fits() {
        let mut page = Page::new();
        let ring = page.ring();
        ring.init();
        let big = vec![b'x'; CAPACITY as usize + 100];
        assert_eq!(ring.push(&big), Ok(CAPACITY as usize));
        assert_eq!(ring.push(b"more"), Ok(0));
        let mut out = Vec::new();
        assert_eq!(ring.pop_into(&mut out), Ok(CAPACITY as usize));
        assert_eq!(ring.push(b"more"), Ok(4));
    }

    #[test]
    fn corrupt_counters_are_refused_not_followed() {
        let mut page = Page::new();
        let ring = page.ring();
        ring.init();
        // A peer writing a head far ahead of the tail.
        ring.head().store(CAPACITY + 1, Ordering::Release);
        let mut out = Vec::new();
        assert_eq!(
            ring.pop_into(&mut out),
            Err(RingError::Corrupt {
                head: CAPACITY + 1,
                tail: 0
            })
        );
        assert!(out.is_empty());
        assert!(ring.push(b"x").is_err());
        assert_eq!(ring.pending(), 0);
    }

    #[test]
    fn no_magic_without_init() {
        let mut page = Page::new();
        assert!(!page.ring().has_magic());
    }

    #[test]
    fn inbound_takes_uart_bytes_first_then_the_ring_at_the_doorbell() {
        let mut page = Page::new();
        let ring = page.ring();
        ring.init();
        ring.push(b"2}\n{\"c\":3}\n").unwrap();
        let mut inbound = Inbound::new();
        let got = inbound.receive(b"{\"b\":\0", Some(&ring));
        assert_eq!(
            got.lines,
            [
                Line::Complete(b"{\"b\":2}".to_vec()),
                Line::Complete(b"{\"c\":3}".to_vec())
            ]
        );
        assert_eq!((got.doorbells, got.corrupt), (1, 0));
        // Without a ring a NUL is stream data.
        let got = Inbound::new().receive(b"x\0y\n", None);
        assert_eq!(got.lines, [Line::Complete(b"x\0y".to_vec())]);
        assert_eq!(got.doorbells, 0);
    }

    #[test]
    fn doorbells_split_the_uart_stream() {
        use Segment::{Data, Doorbell};
        let seen: Vec<Segment<'_>> = segments(b"ab\0c\0\0d").collect();
        assert_eq!(
            seen,
            [
                Data(b"ab"),
                Doorbell,
                Data(b"c"),
                Doorbell,
                Doorbell,
                Data(b"d")
            ]
        );
        assert_eq!(segments(b"").count(), 0);
        assert_eq!(segments(b"\0").collect::<Vec<_>>(), [Doorbell]);
        assert_eq!(segments(b"x\0").collect::<Vec<_>>(), [Data(b"x"), Doorbell]);
    }
}
