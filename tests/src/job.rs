//! What `testhost-init` runs inside the emulated host, and the console
//! lines it answers with. Shared by the harness and `testhost-init`.

use serde::{Deserialize, Serialize};

/// Where the job description lives in the host initramfs.
pub const JOB_PATH: &str = "/job.json";
/// The serial port carrying the API forward inside the emulated host.
pub const FORWARD_TTY: &str = "/dev/ttyS1";

/// Printed once the modules are loaded and `/dev/kvm` works.
pub const READY: &str = "TESTHOST-READY";
/// Printed with the job's exit status, just before power-off.
pub const EXIT: &str = "TESTHOST-EXIT";
/// Printed on any failure of `testhost-init` itself.
pub const ERROR: &str = "TESTHOST-ERROR";

/// A kernel module to load, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Module {
    /// Path of the `.ko` file inside the emulated host.
    pub path: String,
    /// Module parameters, e.g. `nested=1`.
    pub params: String,
}

/// The job description, `/job.json` in the host initramfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Modules to load with `finit_module`, in order.
    pub modules: Vec<Module>,
    /// The program to run and its arguments (`argv[0]` is a path).
    pub argv: Vec<String>,
    /// Unix socket inside the emulated host that forwarded API channels
    /// connect to; `None` disables the forward.
    pub api_socket: Option<String>,
    /// Kill the program after this many seconds.
    pub timeout_secs: u64,
}

/// Exit status encoding of a program killed by a signal (shell convention).
pub fn signal_status(signal: i32) -> i32 {
    128 + signal
}

/// The status in a `TESTHOST-EXIT status=N ...` line.
pub fn parse_exit(line: &str) -> Option<i32> {
    let rest = line.trim().strip_prefix(EXIT)?;
    rest.split_whitespace()
        .find_map(|kv| kv.strip_prefix("status="))
        .and_then(|v| v.parse().ok())
}

/// The value of `key=` in a marker line such as `TESTHOST-READY boot_ms=2100`.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
}

/// Kernel messages that mean the emulated host itself failed (not our VMM).
const HOST_FAILURES: &[&str] = &[
    "watchdog: BUG: soft lockup",
    "BUG: soft lockup",
    "NMI watchdog: Watchdog detected hard LOCKUP",
];

/// If `line` reports a failure of the emulated host itself, which one.
pub fn host_failure(line: &str) -> Option<&'static str> {
    HOST_FAILURES.iter().copied().find(|p| line.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_markers() {
        assert_eq!(parse_exit("TESTHOST-EXIT status=0"), Some(0));
        assert_eq!(parse_exit("TESTHOST-EXIT status=137 signal=9"), Some(137));
        assert_eq!(parse_exit("GUEST TESTHOST-EXIT status=1"), None);
        assert_eq!(
            field("TESTHOST-READY boot_ms=2100 modules_ms=600", "modules_ms"),
            Some("600")
        );
        assert!(
            host_failure("[ 52.1] watchdog: BUG: soft lockup - CPU#1 stuck for 22s!").is_some()
        );
    }
}
