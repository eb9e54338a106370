//! The guest agent: the guest's init (PID 1) and its link to the VMM.
//!
//! It mounts the kernel file systems, runs per-CPU workers in an
//! [`smpboot`] registry, brings hot-added CPUs online and walks their
//! workers through prepare, online, offline and forced offline, takes part
//! in the VMM's graceful CPU removal, and reports all of it over the
//! second UART (`/dev/ttyS1`) in the `agent_proto::agent` protocol. The
//! console gets only a few `GUEST-*` lines.
//!
//! The VMM names CPUs by vCPU id, Linux by logical number (`cpuN`, in the
//! order it met them); the agent translates at its edge ([`ids`]): every
//! message carries vCPU ids, every sysfs write logical numbers.
//!
//! Threading: the agent's own thread runs [`event_loop::run`], polling the
//! kernel's uevent netlink socket, a signalfd (SIGCHLD to reap orphans,
//! SIGTERM/SIGINT/SIGUSR2/SIGPWR to power off) and the VMM channel, and
//! handles each event to completion. Besides it: one thread per (worker
//! kind, CPU) owned by the registry, and the load generator.
//!
//! Modules: [`init`] (PID 1 duties), [`sysfs`] (CPU lists, switches and
//! vCPU ids), [`ids`] (vCPU id <-> logical number),
//! [`uevent`] (socket and parser), [`topology`] (the registry's
//! `Topology`: sysfs + uevents), [`workers`] (the three worker kinds and
//! the load), [`channel`] (ttyS1), [`agent`] (the state machine: CPU
//! transitions, removal protocol, faults, reports), [`event_loop`] (I/O),
//! [`kmsg`] (kernel log lines), [`cmdline`] (`agent.*` options),
//! [`console`] (output), [`last_words`] (`fatal` to the VMM on a panic or
//! a fatal error), [`workload`] (the user's program, run beside the agent
//! when the launcher put one in the initramfs), [`hooks`] (the user's
//! command run on every CPU event).
//!
//! The binary is built static for the guest image (see the `resources`
//! crate) and also runs on a host as a plain process, where it mounts
//! nothing, writes nothing to sysfs and never powers anything off; and as
//! a service of a guest with its own init (`guest-agent --service`, see
//! [`event_loop::Mode`]), where it mounts nothing either but onlines CPUs
//! and talks to the VMM.

pub mod agent;
pub mod channel;
pub mod cmdline;
pub mod console;
pub mod event_loop;
#[doc(hidden)]
pub mod fuzzing;
pub mod hooks;
pub mod ids;
pub mod init;
pub mod kmsg;
pub mod last_words;
pub mod mailbox;
pub mod sysfs;
pub mod topology;
pub mod uevent;
pub mod workers;
pub mod workload;

/// An error and its sources, joined with `": "`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}
