//! The launcher's plain mode (`launch` without `--run`): boot, say where
//! the API socket is, wait for the VMM's end or Ctrl-C, and exit with the
//! VMM's status, or [`HOST_FAILED`] with one plain line when the emulated
//! KVM host itself failed under the VM ([`host_failure_line`]).

use std::time::{Duration, Instant};

use crate::emulated::silent_host;
use crate::{Error, HostKind, Result, RunningVm};

pub use crate::workload::status::HOST_FAILED;

/// The one line the launcher says when the emulated KVM host failed; the
/// harness's `classification` (console text of the emulated host, or the
/// nested guest's) comes out escaped.
pub fn host_failure_line(classification: &str) -> String {
    let mut why = api::cli::escape::field(classification.trim()).into_owned();
    if why.chars().count() > 240 {
        why = why.chars().take(240).collect::<String>() + "...";
    }
    format!(
        "the emulated KVM host failed ({why}): this is a fault of the nested emulation on \
         this machine, not of the guest or the VMM; see tests/README.md"
    )
}

/// Looks, every [`crate::emulated::HOST_CHECK_EVERY`], for a failure of a
/// running VM's emulated host that does not end the VM by itself (a frozen
/// host: its heartbeat stopped), and stops the VM when it finds one.
#[derive(Debug)]
pub struct HostWatch {
    last: Instant,
}

impl HostWatch {
    /// A watch whose first look is one interval from now.
    pub fn new() -> Self {
        HostWatch {
            last: Instant::now(),
        }
    }

    /// The failure, once due and found (the VM is then stopped).
    pub fn failed(&mut self, vm: &mut RunningVm) -> Option<String> {
        if vm.host_kind() != HostKind::Emulated
            || self.last.elapsed() < crate::emulated::HOST_CHECK_EVERY
        {
            return None;
        }
        self.last = Instant::now();
        let why = vm.host_failure()?;
        vm.kill();
        Some(why)
    }
}

impl Default for HostWatch {
    fn default() -> Self {
        Self::new()
    }
}

/// The emulated host's failure behind `e`, if that is what it is.
fn host_failure_of(e: &Error) -> Option<String> {
    match e {
        Error::HostFailed(why) => Some(why.clone()),
        _ => None,
    }
}

/// What plain mode needs beside the VM.
pub struct Plain<'a> {
    /// The launcher's own lines (the caller prefixes `launch: `).
    pub say: &'a mut dyn FnMut(&str),
    /// Polled: a SIGINT/SIGTERM number once one came.
    pub interrupted: &'a dyn Fn() -> Option<i32>,
    /// `--timeout`: the emulated host ends the VMM after it, and a host
    /// that says nothing for [`crate::emulated::JOB_REPORT_GRACE`] more has stopped.
    pub timeout: Option<Duration>,
    /// Whether the socket is the one `vmmctl` finds without being told.
    pub socket_is_default: bool,
}

impl std::fmt::Debug for Plain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plain")
            .field("timeout", &self.timeout)
            .field("socket_is_default", &self.socket_is_default)
            .finish_non_exhaustive()
    }
}

impl Plain<'_> {
    /// Boots with `boot` and follows the VM to its end: the exit status.
    pub fn run(&mut self, boot: impl FnOnce() -> Result<RunningVm>) -> i32 {
        let mut vm = match boot() {
            Ok(vm) => vm,
            Err(e) => return self.failed(&e, None),
        };
        self.announce(&vm);
        let started = Instant::now();
        let mut watch = HostWatch::new();
        loop {
            match vm.try_exit() {
                Ok(Some(status)) => {
                    if status != 0 {
                        if let Some(why) = vm.nested_guest_failure() {
                            (self.say)(&format!("the VMM exited with status {status}"));
                            (self.say)(&host_failure_line(&why));
                            return HOST_FAILED;
                        }
                    }
                    (self.say)(&format!("VMM exited with status {status}"));
                    return status;
                }
                Ok(None) => {}
                Err(e) => return self.failed(&e, Some(&vm)),
            }
            if let Some(sig) = (self.interrupted)() {
                (self.say)(&format!("signal {sig}: stopping the VM"));
                vm.kill();
                return crate::workload::status::INTERRUPTED;
            }
            if let Some(why) = watch.failed(&mut vm) {
                (self.say)(&host_failure_line(&why));
                return HOST_FAILED;
            }
            if let (HostKind::Emulated, Some(t)) = (vm.host_kind(), self.timeout) {
                let waited = started.elapsed();
                if let Some(why) = silent_host(waited, t) {
                    vm.kill();
                    (self.say)(&host_failure_line(&why));
                    return HOST_FAILED;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn announce(&mut self, vm: &RunningVm) {
        let sock = vm.api_socket().display().to_string();
        match vm.host_kind() {
            HostKind::Direct => (self.say)("VMM running on this machine's /dev/kvm"),
            HostKind::Emulated => {
                let t = vm.host_timings().unwrap_or_default();
                (self.say)(&format!(
                    "VMM running inside the emulated KVM host (ready after {:.1} s); \
                     its API socket is forwarded over the host's ttyS1",
                    t.to_ready.as_secs_f64()
                ));
            }
        }
        (self.say)(&format!("API socket: {sock}"));
        (self.say)(&format!(
            "try: curl --unix-socket {sock} http://localhost/api/v1/vm"
        ));
        if self.socket_is_default {
            (self.say)(" or: vmmctl status   (cargo run -p api --bin vmmctl -- status)");
        } else {
            (self.say)(&format!(" or: VMM_SOCKET={sock} vmmctl status"));
        }
        (self.say)("Ctrl-C stops the VM");
    }

    /// A failed boot or run: the host's failure in its one line and
    /// [`HOST_FAILED`], anything else as an error with status 1.
    fn failed(&mut self, e: &Error, vm: Option<&RunningVm>) -> i32 {
        let host = host_failure_of(e).or_else(|| vm.and_then(RunningVm::host_failure));
        match host {
            Some(why) => {
                (self.say)(&host_failure_line(&why));
                HOST_FAILED
            }
            None => {
                (self.say)(&format!("error: {}", crate::chain(e)));
                1
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_is_one_escaped_line() {
        let line = host_failure_line("host: [ 9.0] BUG\u{1b}[2J\nnext");
        assert!(
            line.starts_with("the emulated KVM host failed (host: [ 9.0] BUG\\u{1b}[2J\\nnext)")
        );
        assert!(line.ends_with("not of the guest or the VMM; see tests/README.md"));
        assert!(!line.contains(['\n', '\u{1b}']));
        let long = host_failure_line(&"x".repeat(1000));
        assert!(long.len() < 400, "{long}");
    }
}
