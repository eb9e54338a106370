//! The guest-agent protocol, shared by the VMM and the guest agent.
//!
//! - [`agent`]: the messages (one JSON object per line, versioned), their
//!   encoding and the checks every received line goes through.
//! - [`mailbox`]: the shared-memory rings that carry the same byte stream
//!   beside the agent UART, which then carries only doorbells.
//! - [`workload`]: the user's program the agent runs beside itself: its
//!   description, its output's bounds and credits, its exit status.
//!
//! Every `cpu` in a message is a *vCPU id* (the KVM vCPU id, the APIC ID,
//! the `_UID` of the ACPI processor device, the HTTP API's id), never
//! Linux's logical CPU number; the agent translates (see `agent`).
//!
//! This crate depends only on serde, serde_json and thiserror: the static
//! guest agent links it, and must not link an HTTP stack, an async
//! runtime or a CLI parser. No unsafe code, except [`mailbox`]'s ring over
//! shared guest memory.
#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod agent;
#[doc(hidden)]
#[allow(unsafe_code)]
pub mod fuzzing;
#[allow(unsafe_code)]
pub mod mailbox;
pub mod workload;
