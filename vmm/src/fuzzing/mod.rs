//! Fuzz target bodies for what a guest or an API client can send the VMM:
//! the agent channel's VMM end (`agent_sink`), the buses with every
//! device model (`bus`) and the HTTP API (`http`).
//!
//! Each body takes raw bytes, reads them as a small program ([`Input`]),
//! runs it against the real code (no KVM) and asserts the invariants; a
//! panic is a finding. The cargo-fuzz targets in `fuzz/` and the bounded
//! property tests in `vmm/tests/fuzz_props.rs` (stable `cargo test`) call
//! the same functions. Not part of the crate's API; hidden from its docs.
//!
//! While a body runs, a logger formats every record (so the warnings'
//! formatting of guest text runs too) and checks that no raw control
//! character or bidi control reaches the log: guest text must be escaped.

mod agent;
mod bus;
mod http;

pub use agent::agent_sink;
pub use bus::bus;
pub use http::{http, serve_http, Answer, HttpExchange};

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

    /// A number below `n` (0 if `n` is 0).
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

/// Formats every record and checks that it carries no raw control
/// characters (guest text is escaped before it is logged).
#[derive(Debug)]
struct CheckingLogger;

/// Whether `c` must never reach the log raw: C0/C1 controls (tab and
/// newline excepted), DEL, and the bidi controls.
fn unsafe_in_log(c: char) -> bool {
    (c.is_control() && c != '\n' && c != '\t')
        || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

impl log::Log for CheckingLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let text = record.args().to_string();
        assert!(
            !text.chars().any(unsafe_in_log),
            "raw control characters in a log record: {text:?}"
        );
    }

    fn flush(&self) {}
}

/// Installs the checking logger (once per process; a no-op if another
/// logger is set).
pub fn install_logger() {
    static LOGGER: CheckingLogger = CheckingLogger;
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Trace);
    }
}
