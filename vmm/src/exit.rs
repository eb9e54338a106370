//! How the VMM ends: why the VM ended ([`ExitReason`]) and the process
//! exit status of each outcome ([`ExitStatus`]), plus the panic guard
//! around the VMM's run ([`run_guarded`]).
//!
//! | status | meaning |
//! |---|---|
//! | 0 | the guest powered off |
//! | 1 | VMM error: invalid configuration, KVM unusable, the VM could not be built or booted |
//! | 2 | the guest reset or rebooted (the VMM does not reboot it) |
//! | 3 | a vCPU failed (KVM entry failure, internal error, a vCPU thread panicked) |
//! | 4 | the VMM was signalled (SIGINT, SIGTERM), during start-up or while running |
//! | 5 | the guest agent reported a fatal error |
//! | 6 | the VMM panicked (vCPU threads stopped, API socket removed) |
//! | 7 | killed by seccomp: a thread made a system call outside its filter (one line on stderr names the thread and the call) |

use std::panic::{catch_unwind, AssertUnwindSafe, UnwindSafe};
use std::process::ExitCode;

/// The VMM's process exit statuses (see the module docs for the table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ExitStatus {
    /// 0: the guest powered off.
    PowerOff = 0,
    /// 1: the VMM could not do its job (configuration, KVM, boot).
    VmmError = 1,
    /// 2: the guest reset or rebooted.
    Reset = 2,
    /// 3: a vCPU failed.
    VcpuFailed = 3,
    /// 4: SIGINT or SIGTERM.
    Signalled = 4,
    /// 5: the guest agent reported a fatal error.
    AgentFailed = 5,
    /// 6: the VMM panicked.
    Panic = 6,
    /// 7: killed by seccomp: a thread made a forbidden system call
    /// (`seccomp::sigsys`).
    Seccomp = 7,
}

impl ExitStatus {
    /// Every status, in numeric order.
    pub const ALL: [ExitStatus; 8] = [
        Self::PowerOff,
        Self::VmmError,
        Self::Reset,
        Self::VcpuFailed,
        Self::Signalled,
        Self::AgentFailed,
        Self::Panic,
        Self::Seccomp,
    ];

    /// The numeric process exit status.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// One line saying what the status means.
    pub const fn meaning(self) -> &'static str {
        match self {
            Self::PowerOff => "the guest powered off",
            Self::VmmError => "VMM error (configuration, KVM, boot)",
            Self::Reset => "the guest reset",
            Self::VcpuFailed => "a vCPU failed",
            Self::Signalled => "the VMM was signalled (SIGINT/SIGTERM)",
            Self::AgentFailed => "the guest agent failed",
            Self::Panic => "the VMM panicked",
            Self::Seccomp => "killed by seccomp (a forbidden system call)",
        }
    }
}

impl From<ExitStatus> for ExitCode {
    fn from(s: ExitStatus) -> Self {
        ExitCode::from(s.code())
    }
}

/// Why the VM ended.
///
/// Each reason maps to a distinct process exit status
/// ([`ExitReason::status`]): 0 power off, 2 reset, 3 vCPU failure,
/// 4 signalled, 5 guest agent failure. The VMM's own failures are not
/// reasons the VM ended but statuses of the process: 1 for an error
/// (configuration, KVM, boot), 6 for a panic, 7 for a forbidden system
/// call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (exit status 0).
    PowerOff,
    /// The guest reset or rebooted (exit status 2: the VMM does not reboot).
    Reset,
    /// A vCPU failed (exit status 3).
    GuestFailed(String),
    /// SIGINT or SIGTERM (exit status 4).
    Signalled,
    /// The guest agent said `fatal` before powering off (exit status 5).
    AgentFailed(String),
}

impl ExitReason {
    /// The process exit status for this reason.
    pub fn status(&self) -> ExitStatus {
        match self {
            Self::PowerOff => ExitStatus::PowerOff,
            Self::Reset => ExitStatus::Reset,
            Self::GuestFailed(_) => ExitStatus::VcpuFailed,
            Self::Signalled => ExitStatus::Signalled,
            Self::AgentFailed(_) => ExitStatus::AgentFailed,
        }
    }

    /// The VMM's process exit status for this reason, as a number.
    pub fn exit_code(&self) -> i32 {
        i32::from(self.status().code())
    }
}

/// The text of a panic payload (`panic!` with a literal or a format).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

/// Runs `run`; if it panics, runs `cleanup` (which must not panic: a
/// panic there is swallowed) and returns [`ExitStatus::Panic`].
pub fn run_guarded(
    run: impl FnOnce() -> ExitStatus + UnwindSafe,
    cleanup: impl FnOnce(),
) -> ExitStatus {
    match catch_unwind(run) {
        Ok(status) => status,
        Err(_) => {
            let _ = catch_unwind(AssertUnwindSafe(cleanup));
            ExitStatus::Panic
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_distinct_and_documented() {
        let codes: Vec<u8> = ExitStatus::ALL.iter().map(|s| s.code()).collect();
        assert_eq!(codes, [0, 1, 2, 3, 4, 5, 6, 7]);
        let doc = include_str!("exit.rs");
        for s in ExitStatus::ALL {
            assert!(
                doc.contains(&format!("//! | {} | ", s.code())),
                "status {} is missing from the table",
                s.code()
            );
            assert!(!s.meaning().is_empty());
        }
    }

    #[test]
    fn reasons_map_to_their_statuses() {
        let cases = [
            (ExitReason::PowerOff, 0),
            (ExitReason::Reset, 2),
            (ExitReason::GuestFailed("vCPU 1: x".into()), 3),
            (ExitReason::Signalled, 4),
            (ExitReason::AgentFailed("oom".into()), 5),
        ];
        for (reason, code) in cases {
            assert_eq!(reason.exit_code(), code, "{reason:?}");
            assert_eq!(i32::from(reason.status().code()), code);
        }
    }

    #[test]
    fn a_panic_runs_the_cleanup_and_exits_6() {
        let mut cleaned = false;
        let status = run_guarded(|| -> ExitStatus { panic!("boom") }, || cleaned = true);
        assert_eq!(status, ExitStatus::Panic);
        assert_eq!(status.code(), 6);
        assert!(cleaned);
        // No panic: the run's own status, no cleanup.
        let status = run_guarded(|| ExitStatus::Reset, || unreachable!());
        assert_eq!(status, ExitStatus::Reset);
        // A panicking cleanup still ends in status 6.
        let status = run_guarded(|| panic!("boom"), || panic!("again"));
        assert_eq!(status, ExitStatus::Panic);
    }

    #[test]
    fn panic_messages_are_read_from_either_payload() {
        let p = catch_unwind(|| panic!("literal")).unwrap_err();
        assert_eq!(panic_message(p.as_ref()), "literal");
        let n = 7;
        let p = catch_unwind(|| panic!("formatted {n}")).unwrap_err();
        assert_eq!(panic_message(p.as_ref()), "formatted 7");
    }
}
