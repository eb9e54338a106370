//! Users' own workloads under vCPU churn: what `launch --add ... --run
//! ... --churn ...` does.
//!
//! 1. [`image`]: the guest initramfs is the default image's (the agent as
//!    `/init`) plus the `--add`ed files (dynamically linked programs bring
//!    their `ldd` libraries, or the run stops asking to link statically)
//!    and the workload's description at `/etc/workload.json`
//!    (`api::workload::WorkloadSpec`: argv, environment, directory).
//! 2. The agent, once ready, starts the workload as its child (not as PID
//!    1), forwards its stdout and stderr over the agent channel (mailbox)
//!    in bounded lines under a credit window, reports its start and end,
//!    and powers the guest off when it ended.
//! 3. The VMM prints `VMM-WORKLOAD-START`, `-OUT:`, `-ERR:` and `-EXIT
//!    status=N` lines on its stderr and shows the workload in `GET
//!    /api/v1/vm`.
//! 4. [`run`] follows the console for those lines (directly or through the
//!    emulated host, the same), hands the workload's lines to its
//!    [`Sink`] (the launcher: the workload's stdout on stdout, its stderr
//!    on stderr, its own lines on stderr as `launch: ...`), drives the
//!    [`churn`] from the workload's start through the HTTP API, and ends
//!    with a [`status`].

pub mod args;
pub mod churn;
pub mod cli;
pub mod image;
mod run;

pub use run::{follow, parse_line, run, Config, Outcome, RunError, Sink, VmmLine};

/// The launcher's exit statuses with `--run`.
///
/// | status | meaning |
/// |---|---|
/// | 0-122 | the workload's own exit status |
/// | 123 | the emulated KVM host failed under the VM (a reset, a panic such as its kernel stack overflowing, a lockup, silence, or the nested guest failing the way the nested emulation makes it fail): the nested emulation's fault on this machine, not the guest's or the VMM's; said in one line, `launch: the emulated KVM host failed (...)`. Plain mode (without `--run`) too |
/// | 2 | bad options or unusable `--add` files (nothing booted), e.g. a dynamically linked program whose libraries cannot be found |
/// | 124 | a churn step failed (the resize was refused, failed or timed out); the VM is stopped |
/// | 125 | the VM or the guest failed before the workload ended (VMM error, guest reset or crash, agent failure, `--timeout`), or the launcher could not prepare the run |
/// | 126 | the workload could not be started (not executable, bad format, bad working directory) |
/// | 127 | the workload's program does not exist in the guest (or its ELF interpreter does not) |
/// | 128+N | the workload was killed by signal N |
/// | 130 | the launcher got SIGINT or SIGTERM (the VM is stopped) |
///
/// The workload's own statuses 123 to 127 and above 128 read the same as
/// these, as they do in a shell. Without `--run` the launcher exits with
/// the VMM's status (0 to 7, its README table), 1 for its own errors, 123
/// and 130 as here.
pub mod status {
    /// Bad options or files.
    pub const USAGE: i32 = 2;
    /// The emulated KVM host failed (the nested emulation's fault).
    pub const HOST_FAILED: i32 = 123;
    /// A churn step failed.
    pub const CHURN_FAILED: i32 = 124;
    /// The VM or the guest failed, or the run could not be prepared.
    pub const VM_FAILED: i32 = 125;
    /// The workload could not be started.
    pub const CANNOT_START: i32 = 126;
    /// The workload's program does not exist.
    pub const NOT_FOUND: i32 = 127;
    /// Interrupted.
    pub const INTERRUPTED: i32 = 130;
}
