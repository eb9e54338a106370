//! Console output: one short line per `write(2)`.
//!
//! In the nested test setup every console byte is a trapped UART access
//! (about 15 ms per line), so the agent says little, always in whole lines
//! of the form `GUEST-<WORD> key=value ...` that a harness can match.

use std::io::Write;

/// Writes `line` and a newline to stdout (the console for PID 1) in a
/// single write. Errors are ignored: there is nowhere else to report them.
pub fn say(line: &str) {
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(&buf);
    let _ = out.flush();
}
