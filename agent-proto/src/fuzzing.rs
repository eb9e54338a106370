//! Fuzz target bodies for what a peer sends over the agent channel: the
//! line decoder and the message decoder ([`agent_lines`]), the mailbox
//! ring, its doorbells and the inbound stream ([`mailbox`]).
//!
//! Each body takes raw bytes, reads them as a small program ([`Input`]),
//! runs it against the real code and asserts the invariants (a panic is a
//! finding). The cargo-fuzz targets in `fuzz/` and the bounded property
//! tests in `tests/fuzz_props.rs` (stable `cargo test`) call the very same
//! functions. Not part of the crate's API; hidden from its docs.
#![allow(missing_docs)]

use std::sync::atomic::{AtomicU32, Ordering};

use crate::agent::{decode, encode, DecodeError, GuestMessage, HostMessage, Line, LineDecoder};
use crate::agent::{MAX_LINE, VERSION};
use std::collections::VecDeque;

use crate::mailbox::{segments, Inbound, Ring, Segment, CAPACITY, DOORBELL, RING_SIZE, WRAP};

/// A fuzz input read as a sequence of decisions. Past its end every read
/// gives zeros, so any byte string is a valid program.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Reads `data` from its start.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The next byte (0 past the end).
    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    /// One bit.
    pub fn bool(&mut self) -> bool {
        self.byte() & 1 == 1
    }

    /// A number below `n` (0 if `n` is 0): one byte for small `n`, two
    /// otherwise.
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        let raw = if n <= 256 {
            usize::from(self.byte())
        } else {
            usize::from(self.u16())
        };
        raw % n
    }

    /// At most `max` bytes, length first (two bytes).
    pub fn bytes(&mut self, max: usize) -> &'a [u8] {
        let want = usize::from(self.u16()).min(max);
        let n = want.min(self.data.len());
        let (taken, rest) = self.data.split_at(n);
        self.data = rest;
        taken
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

/// The obviously correct line splitter [`LineDecoder`] is checked against:
/// a line is the bytes up to `\n`; longer than [`MAX_LINE`] it is
/// [`Line::Oversized`], else complete without one trailing `\r`.
#[derive(Debug, Default)]
pub struct ModelLines {
    pending: Vec<u8>,
    len: usize,
}

impl ModelLines {
    /// Feeds `bytes`, appending the lines they complete to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<Line>) {
        for &b in bytes {
            if b == b'\n' {
                if self.len > MAX_LINE {
                    out.push(Line::Oversized);
                } else {
                    let mut line = std::mem::take(&mut self.pending);
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    out.push(Line::Complete(line));
                }
                self.pending.clear();
                self.len = 0;
            } else {
                self.len += 1;
                if self.len <= MAX_LINE {
                    self.pending.push(b);
                }
            }
        }
    }
}

fn newlines(bytes: &[u8]) -> usize {
    bytes.iter().filter(|&&b| b == b'\n').count()
}

/// Target `agent_lines`: a byte stream from the guest (or the host), cut
/// into chunks the input chooses, through [`LineDecoder`]; the lines must
/// be what [`ModelLines`] makes of the whole stream, each chunk yields at
/// most one line per newline it holds, and the decoder never buffers more
/// than [`MAX_LINE`] bytes. Every complete line (and the stream as one
/// line) then goes through [`check_line`].
pub fn agent_lines(data: &[u8]) {
    let mut input = Input::new(data);
    let mut state = input.u32() | 1;
    let stream = input.rest();
    let mut decoder = LineDecoder::new();
    let mut got = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        // xorshift32: chunk sizes from 1 byte (the UART) to whole rings.
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let size = match state % 4 {
            0 => 1,
            1 => 1 + (state >> 8) as usize % 64,
            2 => 1 + (state >> 8) as usize % 9000,
            _ => rest.len(),
        };
        let (chunk, more) = rest.split_at(size.min(rest.len()));
        rest = more;
        let lines = decoder.push(chunk);
        assert!(
            lines.len() <= newlines(chunk),
            "{} lines from {} newlines",
            lines.len(),
            newlines(chunk)
        );
        assert!(
            decoder.buffered_capacity() <= MAX_LINE,
            "the decoder holds {} bytes",
            decoder.buffered_capacity()
        );
        got.extend(lines);
    }
    let mut want = Vec::new();
    ModelLines::default().push(stream, &mut want);
    assert_eq!(got, want, "the decoder and the model disagree");
    for line in &got {
        if let Line::Complete(bytes) = line {
            check_line(bytes);
        }
    }
    check_line(stream);
}

/// One line (without its newline) through [`decode`] as a guest message
/// and as a host message: never a panic, the error is the right one, and
/// a decoded message encodes to a line that decodes to it again.
pub fn check_line(line: &[u8]) {
    check_decode::<GuestMessage>(line);
    check_decode::<HostMessage>(line);
}

fn check_decode<T>(line: &[u8])
where
    T: serde::Serialize + for<'de> serde::Deserialize<'de> + PartialEq + std::fmt::Debug,
{
    match decode::<T>(line) {
        Ok(msg) => {
            assert!(line.len() <= MAX_LINE);
            let encoded = encode(&msg);
            assert!(encoded.ends_with('\n'));
            let body = &encoded.as_bytes()[..encoded.len() - 1];
            assert!(!body.contains(&b'\n'), "an encoded line holds a newline");
            assert!(!body.contains(&DOORBELL), "an encoded line holds a NUL");
            // Re-encoding adds at most the defaulted fields the peer left
            // out (`requested`, `cpus`); strings and numbers never grow.
            assert!(
                body.len() <= line.len() + 64,
                "{} bytes re-encoded as {}",
                line.len(),
                body.len()
            );
            if body.len() <= MAX_LINE {
                let again: T = decode(body).expect("a re-encoded message decodes");
                assert_eq!(again, msg, "the message does not survive re-encoding");
            }
        }
        Err(e) => {
            let _ = e.to_string();
            match e {
                DecodeError::TooLong => assert!(line.len() > MAX_LINE),
                DecodeError::NotUtf8 => {
                    assert!(line.len() <= MAX_LINE && std::str::from_utf8(line).is_err());
                }
                DecodeError::Version(v) => assert_ne!(v, VERSION),
                DecodeError::Malformed(_) => assert!(line.len() <= MAX_LINE),
            }
        }
    }
}

/// Heap memory standing in for one ring's shared page, and the raw
/// accesses of a peer that writes whatever it likes into it.
#[derive(Debug)]
struct Page {
    _memory: Vec<u64>,
    base: *mut u8,
}

impl Page {
    fn new() -> Self {
        let mut memory = vec![0u64; RING_SIZE / 8];
        let base = memory.as_mut_ptr().cast::<u8>();
        Self {
            _memory: memory,
            base,
        }
    }

    /// A ring over the page.
    fn ring(&self) -> Ring {
        // SAFETY: `base` is the start of `_memory`: 8-byte aligned,
        // RING_SIZE bytes, alive as long as the page (the rings made here
        // are dropped before it), and accessed only through rings and the
        // volatile / atomic accesses below.
        unsafe { Ring::new(self.base) }
    }

    fn counter(&self, offset: usize) -> &AtomicU32 {
        debug_assert!(offset == 8 || offset == 12);
        // SAFETY: offsets 8 and 12 are 4-byte aligned inside the page, and
        // the counters are only ever accessed atomically (as the Ring does).
        unsafe { &*self.base.add(offset).cast::<AtomicU32>() }
    }

    fn head(&self) -> u32 {
        self.counter(8).load(Ordering::Acquire)
    }

    fn tail(&self) -> u32 {
        self.counter(12).load(Ordering::Acquire)
    }

    fn set_head(&self, v: u32) {
        self.counter(8).store(v, Ordering::Release);
    }

    fn set_tail(&self, v: u32) {
        self.counter(12).store(v, Ordering::Release);
    }

    /// Data byte `index` of the stream (as the ring places it).
    fn data(&self, index: u32) -> u8 {
        let at = 64 + (index % CAPACITY) as usize;
        // SAFETY: 64 + index % CAPACITY < RING_SIZE: inside the page.
        unsafe { self.base.add(at).read_volatile() }
    }

    /// A peer's raw write of `bytes` at `offset` of the page, outside the
    /// counters (bytes 8..16), wrapping within the page.
    fn scribble(&self, offset: usize, bytes: &[u8]) {
        for (i, &b) in bytes.iter().enumerate() {
            let at = (offset + i) % RING_SIZE;
            if (8..16).contains(&at) {
                continue;
            }
            // SAFETY: at < RING_SIZE: inside the page; not a counter.
            unsafe { self.base.add(at).write_volatile(b) }
        }
    }

    /// What a consumer must read now: the bytes between tail and head, or
    /// `None` if the counters are impossible.
    fn readable(&self) -> Option<Vec<u8>> {
        let (head, tail) = (self.head(), self.tail());
        if head >= WRAP || tail >= WRAP {
            return None;
        }
        let used = if head >= tail {
            head - tail
        } else {
            WRAP - tail + head
        };
        (used <= CAPACITY).then(|| (0..used).map(|i| self.data(advance(tail, i))).collect())
    }
}

/// `counter + by`, wrapping where the ring's counters wrap ([`WRAP`]).
fn advance(counter: u32, by: u32) -> u32 {
    let sum = (u64::from(counter) + u64::from(by)) % u64::from(WRAP);
    u32::try_from(sum).expect("below WRAP")
}

/// A counter value a hostile peer picks: anything, or near the other
/// counter (inside, at and just past the capacity), or near the wrap
/// (the ring's, and 2^32).
fn pick_counter(input: &mut Input<'_>, other: u32) -> u32 {
    let small = u32::from(input.u16());
    match input.byte() % 7 {
        0 => input.u32(),
        1 => other.wrapping_add(small % (CAPACITY + 64)),
        2 => other.wrapping_sub(small % 64),
        3 => other.wrapping_add(CAPACITY),
        4 => u32::MAX - small % 64,
        5 => WRAP - 1 - small % (CAPACITY + 64),
        _ => small,
    }
}

/// Target `mailbox`: one ring of the agent mailbox between a consumer (the
/// VMM's or the agent's [`Inbound`], fed UART bytes with doorbells) and a
/// peer that pushes well-formed bytes, writes any counter values and
/// scribbles over the page. Checked against a model of the ring after
/// every step: the consumer reads exactly the bytes between tail and head
/// (nothing from a ring whose counters are impossible, which is counted),
/// leaves tail = head, yields the lines [`ModelLines`] makes of the UART
/// and ring bytes in stream order, and never buffers more than
/// [`MAX_LINE`] + [`RING_SIZE`] bytes; the producer writes at most the
/// free space, where the ring says.
pub fn mailbox(data: &[u8]) {
    let mut input = Input::new(data);
    let page = Page::new();
    let ours = page.ring();
    let peer = page.ring();
    if !input.byte().is_multiple_of(8) {
        ours.init();
    }
    let mut inbound = Inbound::new();
    let mut model = ModelLines::default();
    // The ring's contents while only the well-behaved producer and the
    // consumer touched it (`None` once the peer wrote counters or data):
    // what comes out must be exactly what went in.
    let mut known = Some(VecDeque::new());
    let mut steps = 0;
    while !input.is_empty() && steps < 512 {
        steps += 1;
        match input.byte() % 9 {
            0 => {
                let v = pick_counter(&mut input, page.tail());
                page.set_head(v);
                known = None;
            }
            1 => {
                let v = pick_counter(&mut input, page.head());
                page.set_tail(v);
                known = None;
            }
            2 => {
                let offset = usize::from(input.u16());
                let bytes = input.bytes(RING_SIZE);
                page.scribble(offset, bytes);
                known = None;
            }
            3 => {
                let bytes = input.bytes(2 * RING_SIZE);
                check_push(&page, &peer, bytes, &mut known);
            }
            4 => {
                let uart = input.bytes(4096);
                let drains = uart.contains(&DOORBELL);
                check_known(&page, &mut known, drains);
                check_receive(&page, &ours, &mut inbound, &mut model, uart, true);
            }
            5 => {
                let uart = input.bytes(4096);
                check_receive(&page, &ours, &mut inbound, &mut model, uart, false);
            }
            6 => {
                // A consumer outside the inbound stream (the bytes are gone).
                check_known(&page, &mut known, true);
                let want = page.readable();
                let head = page.head();
                let mut out = Vec::new();
                match (ours.pop_into(&mut out), want) {
                    (Ok(n), Some(want)) => {
                        assert_eq!(n, want.len());
                        assert_eq!(out, want);
                        assert_eq!(page.tail(), head);
                    }
                    (Err(_), None) => assert!(out.is_empty()),
                    (got, want) => panic!("pop gave {got:?}, the model {want:?}"),
                }
            }
            7 => {
                let pending = ours.pending();
                assert!(pending <= CAPACITY);
                let expected = page.readable().map_or(0, |r| r.len());
                assert_eq!(pending as usize, expected);
                let _ = ours.has_magic();
            }
            _ => {
                ours.init();
                known = Some(VecDeque::new());
            }
        }
    }
}

/// Before a consumer drains the ring: with only the well-behaved producer
/// at work, it holds exactly the bytes pushed since the last drain (then
/// none, after the drain).
fn check_known(page: &Page, known: &mut Option<VecDeque<u8>>, drains: bool) {
    if let Some(queue) = known.as_mut() {
        let held = page
            .readable()
            .expect("a ring only the well-behaved sides touched is corrupt");
        assert!(
            held.iter().eq(queue.iter()),
            "the ring does not hold what was pushed into it ({} bytes pushed, {} held)",
            queue.len(),
            held.len()
        );
        if drains {
            queue.clear();
        }
    }
}

fn check_push(page: &Page, peer: &Ring, bytes: &[u8], known: &mut Option<VecDeque<u8>>) {
    let (head, tail) = (page.head(), page.tail());
    let sane = head < WRAP && tail < WRAP;
    let used = if head >= tail {
        head - tail
    } else {
        WRAP.wrapping_sub(tail).wrapping_add(head)
    };
    match peer.push(bytes) {
        Ok(n) => {
            assert!(sane && used <= CAPACITY, "a push into a corrupt ring");
            let free = (CAPACITY - used) as usize;
            assert_eq!(n, bytes.len().min(free));
            let n32 = u32::try_from(n).expect("n <= CAPACITY");
            assert_eq!(page.head(), advance(head, n32));
            if let Some(queue) = known.as_mut() {
                queue.extend(&bytes[..n]);
            }
        }
        Err(_) => {
            assert!(!sane || used > CAPACITY, "a push refused on a sane ring");
            assert!(known.is_none(), "the well-behaved sides corrupted the ring");
            assert_eq!(page.head(), head, "a refused push moved the head");
        }
    }
}

fn check_receive(
    page: &Page,
    ring: &Ring,
    inbound: &mut Inbound,
    model: &mut ModelLines,
    uart: &[u8],
    with_ring: bool,
) {
    // What the consumer must do, computed first from the raw page.
    let mut want = Vec::new();
    let (mut doorbells, mut corrupt, mut ring_bytes) = (0u32, 0u32, 0usize);
    let tail_before = page.tail();
    let mut tail_after = tail_before;
    if with_ring {
        for piece in uart.split_inclusive(|&b| b == DOORBELL) {
            let (data, bell) = match piece.split_last() {
                Some((&DOORBELL, data)) => (data, true),
                _ => (piece, false),
            };
            model.push(data, &mut want);
            if bell {
                doorbells += 1;
                match page.readable() {
                    Some(bytes) => {
                        // The consumer leaves tail = head; later doorbells of
                        // this batch find the ring empty.
                        ring_bytes += bytes.len();
                        model.push(&bytes, &mut want);
                        tail_after = page.head();
                        page.set_tail(tail_after);
                    }
                    None => corrupt += 1,
                }
            }
        }
        // Undo the model's own tail moves: the consumer makes them.
        page.set_tail(tail_before);
    } else {
        model.push(uart, &mut want);
    }
    let got = inbound.receive(uart, with_ring.then_some(ring));
    assert_eq!(got.doorbells, doorbells);
    assert_eq!(got.corrupt, corrupt);
    assert_eq!(got.lines, want, "the inbound lines and the model disagree");
    assert!(
        got.lines.len() <= newlines(uart) + ring_bytes,
        "more lines than newlines"
    );
    if with_ring {
        assert_eq!(page.tail(), tail_after, "the consumer left a wrong tail");
    }
    let held = inbound.buffered_capacity();
    assert!(
        held <= MAX_LINE + RING_SIZE,
        "the inbound stream holds {held} bytes (bound {})",
        MAX_LINE + RING_SIZE
    );
    // The splitter alone: pieces and doorbells rebuild the bytes.
    let mut rebuilt = Vec::with_capacity(uart.len());
    let mut bells = 0;
    for segment in segments(uart) {
        match segment {
            Segment::Data(d) => {
                assert!(!d.is_empty() && !d.contains(&DOORBELL));
                rebuilt.extend_from_slice(d);
            }
            Segment::Doorbell => {
                bells += 1;
                rebuilt.push(DOORBELL);
            }
        }
    }
    assert_eq!(rebuilt, uart);
    assert_eq!(bells, uart.iter().filter(|&&b| b == DOORBELL).count());
}
