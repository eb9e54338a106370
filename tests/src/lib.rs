//! End-to-end test harness: boots our VMM with a stock Linux guest, either
//! directly on this machine's `/dev/kvm` or inside an *emulated KVM host*
//! (QEMU TCG with nested SVM, `testhost-init` as its PID 1), and gives
//! every test and the `launch` binary one API for it:
//! [`VmSpec`] -> [`launch`] -> [`RunningVm`] (console, API socket, exit).
//!
//! [`workload`] runs a user's program in the guest under vCPU churn (the
//! `launch --run` mode).
//!
//! Threads: every launched process has one console reader thread per
//! output stream; the API forward has an accept thread, one link reader and
//! two pumps per connection ([`mux`]). Several VMs may run at once on one
//! machine (distinct API sockets); the test suite still runs one at a time
//! through its own lock, which the launcher does not take ([`locks`]).

#![deny(missing_docs)]

pub mod artifacts;
pub mod bench;
pub mod console;
pub mod emulated;
pub mod error;
pub mod guest_view;
pub mod host;
pub mod inside;
pub mod job;
pub mod launcher;
pub mod locks;
pub mod mux;
pub mod ops;
pub mod sys;
pub mod vm;
pub mod workload;

pub use console::Echo;
pub use error::{chain, conclude, run_test, skip, BoxError, Error, Result};
pub use host::HostKind;
pub use vm::{
    launch, launch_host_job, launch_host_job_on, run, GuestKernel, HostJob, Matcher, RunningVm,
    VmSpec,
};
