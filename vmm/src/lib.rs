//! A small VMM whose specialty is changing a running guest's vCPUs.
//!
//! # Threading model
//! - The **VMM thread** runs the event loop (`event_loop`): it owns the
//!   vCPU manager, answers control requests from the API thread, and
//!   reacts to vCPU exits (guest power off, reset, failure).
//! - One **vCPU thread** per running vCPU (`vcpu`): it loops in
//!   `KVM_RUN` and dispatches port-I/O and MMIO exits to the device bus.
//!   It is told to stop through its handle (a stop flag, then a signal
//!   whose handler sets `immediate_exit` on the vCPU's own thread) and
//!   joined with a bound.
//! - The **API thread** (`api_server`) serves HTTP on a Unix socket and
//!   turns each request into a typed control message carrying its own
//!   reply channel (`control`).
//! - The **console thread** (`vm::console`) writes COM1's output.
//!
//! Each thread installs its own seccomp filter (`seccomp`) before it
//! handles guest or client input.
//!
//! Devices (`devices`) are plain state machines without I/O; their owners
//! turn results into interrupts and vCPU changes.
#![deny(missing_docs)]

pub mod acpi;
pub mod agent;
pub mod api_server;
pub mod boot;
pub mod bus;
pub mod config;
pub mod control;
pub mod cpu_manager;
pub mod devices;
pub mod event_loop;
pub mod events;
pub mod exit;
#[doc(hidden)]
pub mod fuzzing;
pub mod hotplug;
pub mod kvm_check;
pub mod layout;
pub mod memory;
pub mod privileges;
pub mod procstat;
pub mod ratelimit;
pub mod seccomp;
pub mod signals;
#[cfg(test)]
mod testlog;
pub mod vcpu;
pub mod vcpu_id;

pub use vcpu_id::VcpuId;
pub mod vm;
pub mod x86;
