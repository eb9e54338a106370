//! The guest agent: the guest's init (PID 1) and its link to the VMM.
//!
//! Today it mounts the kernel file systems, says `GUEST-READY` on the
//! console, brings hot-added CPUs online (Linux leaves them offline) and
//! reports each change of the online CPU set. It will grow a per-CPU worker
//! registry (the `smpboot` crate) and a protocol to the VMM over a second
//! UART.
//!
//! Threading: one thread. [`agent::run`] polls two descriptors, the
//! kernel's uevent netlink socket and a signalfd (SIGCHLD to reap orphans,
//! SIGTERM/SIGINT/SIGUSR2/SIGPWR to power off), and handles each event to
//! completion; writing a CPU's `online` file blocks until the kernel is
//! done with it, which orders the agent's reports after the kernel's work.
//!
//! Modules: [`init`] (PID 1 duties), [`sysfs`] (CPU lists and switches),
//! [`uevent`] (socket and parser), [`cmdline`] (`agent.*` options),
//! [`agent`] (state and loop), [`console`] (output).
//!
//! The binary is built static for the guest image (see the `resources`
//! crate) and also runs on a host as a plain process, where it mounts
//! nothing and never powers anything off.

pub mod agent;
pub mod cmdline;
pub mod console;
pub mod init;
pub mod sysfs;
pub mod uevent;
