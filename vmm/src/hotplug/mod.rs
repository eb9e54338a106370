//! Hotplug on the VMM thread, in three parts:
//!
//! - the [`Coordinator`] (`coordinator.rs`, `removal.rs`, `timeouts.rs`):
//!   turns API changes into steps of the machinery, keeps one
//!   [`record::VcpuRecord`] per vCPU and the operations, completes them
//!   from what the guest does, and gives every wait a deadline whose
//!   outcome leaves the VMM and the guest agreeing;
//! - the agent session (`session.rs`): the conversation with the guest
//!   agent (link, outbox or mailbox, liveness, snapshot throttling);
//! - the views (`views.rs`): read-only answers (`GET /vm`, `/vcpus`,
//!   `/guest/workers`, metrics) built from the records and the session;
//! - the user's workload (`workload.rs`): its state, and its output on
//!   stderr for the launcher, acknowledged to the agent as it is written.
//!
//! The coordinator never reads a clock: every entry point takes `now`, and
//! [`Coordinator::tick`] says when it next needs to be called. It drives
//! the machinery through the [`machine::Machine`] trait. Both seams let
//! the unit and model tests run it without KVM or real time.

mod coordinator;
mod decide;
pub mod machine;
pub mod record;
mod removal;
pub mod session;
mod timeouts;
mod views;
pub mod workload;

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod tests;

use std::time::Duration;

pub use coordinator::{Coordinator, GuestEvent, VmFacts};

/// How many removals the agent is asked to prepare at once. It prepares
/// them one after another (Linux offlines one CPU at a time), but with the
/// requests already in the guest no round trip separates two offlines; the
/// bound keeps the requests within the outbox.
pub const PREPARES_IN_FLIGHT: usize = 8;

/// How long the guest has for each step, and what happens when it runs out
/// (each outcome leaves the VMM and the guest agreeing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From the add request to the guest's online report (or, without an
    /// agent, its insert acknowledgement). Then: if the guest never started
    /// the vCPU the add is undone (withdrawn, or ejected if the guest
    /// enumerated it); if it did, the vCPU stays present and the operation
    /// fails.
    pub add: Duration,
    /// For the agent to answer a prepare request (from the later of the
    /// request and its previous answer). Then: the plain ACPI eject.
    pub prepare: Duration,
    /// From the eject request to the guest's eject. Then: the request is
    /// withdrawn and the vCPU stays (a CPU the agent had offlined is
    /// brought back online first).
    pub eject: Duration,
    /// For the agent to bring a CPU back online after a cancelled removal.
    /// Then: the vCPU is present, reported as the guest last said.
    pub restore: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            add: Duration::from_secs(30),
            prepare: Duration::from_secs(10),
            eject: Duration::from_secs(30),
            restore: Duration::from_secs(10),
        }
    }
}
