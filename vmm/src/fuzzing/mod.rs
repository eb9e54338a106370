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

/// The fuzz input reader, shared with the protocol crate's targets.
pub use agent_proto::fuzzing::Input;

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
