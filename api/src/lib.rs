//! The VMM's HTTP API: the JSON types, the route table, an async client
//! with a blocking wrapper, and the `vmmctl` command line built on it.
//!
//! The server lives in the `vmm` crate (`vmm::api_server`); this crate has
//! no KVM and no server, so the CLI, the tests and other tools can use it
//! anywhere. `openapi.yaml` beside this crate describes the same API; a
//! test checks it lists exactly [`routes::ROUTES`].
//!
//! # Conventions
//! - JSON in and out; request bodies reject unknown fields.
//! - Errors are `{"error": {"code": "...", "message": "..."}}` ([`ErrorBody`]).
//! - Mutations answer `202` with an [`Operation`] while the guest works,
//!   `200` with the operation when nothing had to change or when
//!   `?wait=SECONDS` saw it finish, and `504` with the still-running
//!   operation when the wait ran out.
//! - The server is bounded (connections, request deadline, waiters,
//!   connection lifetime; see `openapi.yaml`): a connection beyond the
//!   limit is answered `503` (`unavailable`), a late body `408`
//!   (`request_timeout`), a `?wait` beyond the waiter limit `202`.
//! - The default socket is never directly in `/tmp` ([`socket`]).
//! - Test hooks (`/api/v1/test/...`, [`routes::Route::test_only`]) are
//!   served only by a VMM started with `--test-hooks`; otherwise they answer
//!   `404` like an unknown path.
//!
//! No unsafe code, except one `geteuid` call in [`socket`].
#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod cli;
pub mod client;
pub mod error;
pub mod fault;
pub mod guest;
pub mod operation;
pub mod options;
pub mod routes;
pub mod socket;
pub mod vcpu;
pub mod vm;

/// The guest-agent protocol and its mailbox, from the `agent-proto` crate
/// (re-exported so `api::agent::...` paths keep working).
pub use agent_proto::{agent, mailbox, workload};
pub use error::{ApiError, ErrorBody, ErrorCode};
pub use fault::{FaultInjected, FaultKind, FaultRequest, FaultTarget};
pub use guest::{CpuWork, GuestWorker, GuestWorkers};
pub use operation::{Operation, OperationKind, OperationStatus};
pub use vcpu::{ResizeRequest, VcpuInfo, VcpuList, VcpuState};
pub use vm::{VmInfo, VmState, WorkloadInfo, WorkloadState};
