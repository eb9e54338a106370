//! The typed boundary between the API thread and the VMM thread.
//!
//! The API thread parses each HTTP request into an [`Action`] (what it
//! asks), then sends the VMM thread a [`Request`] whose variant carries a
//! reply sender of exactly its answer's type (crosvm's pattern): a
//! [`Query`] is answered from the VMM's views, a [`Request::Mutate`] with
//! a [`Mutation`] or an error. A [`ControlSender`] is a std channel plus an
//! `EventFd` that wakes the VMM's event loop; the VMM thread owns the
//! [`ControlReceiver`] and drains it without blocking.
//!
//! Mutations answer at once. A started one carries a `watch` receiver of
//! its [`Operation`], so `?wait=SECONDS` is awaited on the API thread and
//! never blocks or polls the VMM thread.
//!
//! The VMM side keeps its operations in an [`OperationTable`] and plans a
//! [`Change`] with [`plan()`] (in `control/plan.rs`), which encodes the
//! API's rules (lowest absent ids are added, highest present ones removed,
//! vCPU 0 stays, repeating a request in flight is not an error).
//!
//! ```
//! use api::VcpuState;
//! use vmm::control::{self, Change, OperationTable, Query, Request};
//!
//! let (sender, receiver) = control::channel().unwrap();
//! let (mut states, mut table) = (vec![VcpuState::Present, VcpuState::Absent], OperationTable::new());
//! let now = std::time::Instant::now();
//! // API thread: `sender.ask(|reply| Request::Mutate { change: Change::Add(1), reply })`.
//! let (reply, _answer) = tokio::sync::oneshot::channel();
//! sender.send(Request::Mutate { change: Change::Add(1), reply }).unwrap();
//! // VMM thread, when `receiver.wake_fd()` is readable:
//! for request in receiver.drain() {
//!     match request {
//!         Request::Mutate { change, reply } => {
//!             let answer = control::plan(change, &states).map(|plan| {
//!                 let mutation = table.track(&plan, now);
//!                 plan.add.iter().for_each(|&id| states[id as usize] = VcpuState::Adding);
//!                 mutation // then start the hot-adds and removals
//!             });
//!             control::respond(reply, answer);
//!         }
//!         Request::Query(Query::Operation { id, reply }) => control::respond(reply, table.get(id)),
//!         _ => {} // other queries are answered from the VMM's views
//!     }
//! }
//! // Later the guest has vCPU 1 online: every operation waiting for it advances.
//! states[1] = VcpuState::Present;
//! table.vcpu_done(1);
//! assert!(table.running().is_empty());
//! ```

mod plan;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use api::{ApiError, FaultKind, Operation, OperationStatus};
use tokio::sync::{oneshot, watch};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use plan::{plan, Plan};

/// What an API request asks, as the router parsed it; the router turns
/// it into a typed [`Request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `GET /api/v1/vm`.
    GetVm,
    /// `GET /api/v1/vcpus`.
    GetVcpus,
    /// `PUT /api/v1/vcpus`.
    Resize {
        /// How many vCPUs should be present.
        desired: u32,
    },
    /// `PUT /api/v1/vcpus/{id}`.
    AddVcpu(u32),
    /// `DELETE /api/v1/vcpus/{id}`.
    RemoveVcpu(u32),
    /// `GET /api/v1/operations/{id}`.
    GetOperation(u64),
    /// `GET /api/v1/metrics`.
    GetMetrics,
    /// `GET /api/v1/guest/workers`.
    GetWorkers,
    /// `POST /api/v1/test/faults` (test hook).
    InjectFault {
        /// What to break.
        fault: FaultKind,
        /// The vCPU it applies to (checked against the fault's needs).
        cpu: Option<u32>,
    },
}

/// A change of the vCPU set, as the API asks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// `PUT /api/v1/vcpus`: make this many vCPUs present.
    Resize {
        /// How many vCPUs should be present.
        desired: u32,
    },
    /// `PUT /api/v1/vcpus/{id}`.
    Add(u32),
    /// `DELETE /api/v1/vcpus/{id}`.
    Remove(u32),
}

impl Action {
    /// The change this action asks for, if it is a mutation.
    pub fn change(self) -> Option<Change> {
        match self {
            Self::Resize { desired } => Some(Change::Resize { desired }),
            Self::AddVcpu(id) => Some(Change::Add(id)),
            Self::RemoveVcpu(id) => Some(Change::Remove(id)),
            _ => None,
        }
    }
}

/// Where one answer goes: each request carries the sender for exactly the
/// type of its answer, so no answer can be of the wrong kind.
pub type Responder<T> = oneshot::Sender<T>;

/// A question about the VM: answered from the VMM's views, never fails.
#[derive(Debug)]
pub enum Query {
    /// `GET /api/v1/vm`.
    Vm(Responder<api::VmInfo>),
    /// `GET /api/v1/vcpus`.
    Vcpus(Responder<api::VcpuList>),
    /// `GET /api/v1/operations/{id}`: `None` if unknown.
    Operation {
        /// The operation.
        id: u64,
        /// Where the answer goes.
        reply: Responder<Option<Operation>>,
    },
    /// `GET /api/v1/metrics`.
    Metrics(Responder<VmmMetrics>),
    /// `GET /api/v1/guest/workers`.
    Workers(Responder<api::GuestWorkers>),
}

/// One control message from the API thread to the VMM thread.
#[derive(Debug)]
pub enum Request {
    /// A question.
    Query(Query),
    /// A change of the vCPU set.
    Mutate {
        /// What to change.
        change: Change,
        /// Where the answer goes.
        reply: Responder<Result<Mutation, ApiError>>,
    },
    /// `POST /api/v1/test/faults` (test hook). A VMM without test hooks
    /// answers `not_found`, as for an unknown path.
    InjectFault {
        /// What to break.
        fault: FaultKind,
        /// The vCPU it applies to (checked against the fault's needs).
        cpu: Option<u32>,
        /// Where the answer goes.
        reply: Responder<Result<api::FaultInjected, ApiError>>,
    },
}

/// Sends an answer. A client that has gone away is not an error.
pub fn respond<T>(reply: Responder<T>, answer: T) {
    let _ = reply.send(answer);
}

/// What a resize, add or remove led to.
#[derive(Debug)]
pub enum Mutation {
    /// Nothing had to change (`200`); the operation is already succeeded.
    Unchanged(Operation),
    /// The VMM started the change, or it was already in flight (`202`).
    Started {
        /// The operation as it was when the VMM answered.
        operation: Operation,
        /// Every later state of the operation.
        progress: watch::Receiver<Operation>,
    },
}

impl Mutation {
    /// The started operation and its progress (tests: panics if unchanged).
    #[cfg(test)]
    pub(crate) fn expect_started(self) -> (Operation, watch::Receiver<Operation>) {
        match self {
            Self::Started {
                operation,
                progress,
            } => (operation, progress),
            Self::Unchanged(op) => panic!("unchanged: {op:?}"),
        }
    }
}

/// The VMM's counters, rendered by the API server as Prometheus text
/// together with its own request counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmmMetrics {
    /// vCPUs hot-added and confirmed online by the guest.
    pub hot_adds: u64,
    /// vCPUs hot-removed: ejected by the guest and their thread joined.
    pub hot_removes: u64,
    /// Hot-add or hot-remove operations that failed.
    pub hotplug_failures: u64,
    /// Guest accesses to the hotplug registers that were ignored (wrong
    /// width or offset, ejecting a vCPU not marked for removal, ...).
    pub ignored_register_accesses: u64,
    /// vCPU fds created (never more than the maximum: removed vCPUs keep
    /// their fd and re-adding reuses it).
    pub vcpu_fds_created: u64,
    /// Hot-adds that reused a kept vCPU fd.
    pub vcpu_fds_reused: u64,
    /// Lines from the guest agent dropped (oversized, malformed, wrong version).
    pub agent_lines_dropped: u64,
    /// Doorbells from the guest agent whose mailbox ring had impossible
    /// counters (nothing was read from it).
    pub agent_mailbox_corrupt: u64,
    /// vCPUs whose thread did not stop when asked (a gauge).
    pub stuck_vcpus: u64,
    /// Mutations that repeated a change already in flight (joined it).
    pub repeated_requests: u64,
    /// Guest-driven events the VMM thread dropped because its queue was
    /// full (a guest flooding a channel).
    pub guest_events_dropped: u64,
    /// The VMM process's open fds, threads and resident memory.
    pub process: crate::procstat::ProcessStats,
}

/// Why a control message could not be exchanged.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Creating the wake-up eventfd failed.
    #[error("cannot create the control eventfd")]
    EventFd(#[source] std::io::Error),
    /// The VMM thread dropped its receiver.
    #[error("the VMM thread is gone")]
    Disconnected,
    /// Writing the wake-up eventfd failed.
    #[error("cannot wake the VMM thread")]
    Wake(#[source] std::io::Error),
    /// The VMM dropped the request without answering.
    #[error("the VMM dropped the request")]
    NoReply,
}

/// A connected pair: the API thread's sender and the VMM thread's receiver.
pub fn channel() -> Result<(ControlSender, ControlReceiver), ControlError> {
    let wake = EventFd::new(EFD_NONBLOCK).map_err(ControlError::EventFd)?;
    let wake = Arc::new(wake);
    let (tx, rx) = mpsc::channel();
    Ok((
        ControlSender {
            tx,
            wake: Arc::clone(&wake),
        },
        ControlReceiver { rx, wake },
    ))
}

/// The API thread's end: send an action, wake the VMM, await the reply.
#[derive(Debug, Clone)]
pub struct ControlSender {
    tx: mpsc::Sender<Request>,
    wake: Arc<EventFd>,
}

impl ControlSender {
    /// Queue `request` and wake the VMM thread.
    pub fn send(&self, request: Request) -> Result<(), ControlError> {
        self.tx
            .send(request)
            .map_err(|_| ControlError::Disconnected)?;
        self.wake.write(1).map_err(ControlError::Wake)
    }

    /// Send the request `make` builds around a reply sender, and await
    /// the answer.
    pub async fn ask<T>(
        &self,
        make: impl FnOnce(Responder<T>) -> Request,
    ) -> Result<T, ControlError> {
        let (reply, answer) = oneshot::channel();
        self.send(make(reply))?;
        answer.await.map_err(|_| ControlError::NoReply)
    }
}

/// The VMM thread's end. Register [`ControlReceiver::wake_fd`] with the
/// event loop; when it is readable, [`ControlReceiver::drain`].
#[derive(Debug)]
pub struct ControlReceiver {
    rx: mpsc::Receiver<Request>,
    wake: Arc<EventFd>,
}

impl ControlReceiver {
    /// The eventfd written once per request (non-blocking).
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    /// Clear the eventfd, then return every queued request. Clearing first
    /// means a request queued meanwhile leaves the eventfd readable, so no
    /// wake-up is lost.
    pub fn drain(&self) -> mpsc::TryIter<'_, Request> {
        // EAGAIN (nothing to clear) is the only expected error.
        let _ = self.wake.read();
        self.rx.try_iter()
    }

    /// Block up to `timeout` for one request (for simple loops and tests;
    /// the event loop uses [`ControlReceiver::drain`]). `Ok(None)` on
    /// timeout.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<Request>, ControlError> {
        match self.rx.recv_timeout(timeout) {
            Ok(request) => Ok(Some(request)),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(ControlError::Disconnected),
        }
    }
}

/// The VMM side's record of operations: creates them, fans vCPU results
/// out to every operation waiting for that vCPU, and looks them up.
///
/// Running operations are kept until they finish; of the finished ones the
/// most recent `keep_finished` are kept.
#[derive(Debug)]
pub struct OperationTable {
    next_id: u64,
    entries: BTreeMap<u64, Entry>,
    finished: VecDeque<u64>,
    keep_finished: usize,
}

#[derive(Debug)]
struct Entry {
    progress: watch::Sender<Operation>,
    pending: BTreeSet<u32>,
    started: Instant,
    /// Past this the operation fails, whatever its vCPUs are doing.
    deadline: Instant,
}

impl Default for OperationTable {
    fn default() -> Self {
        Self::new()
    }
}

impl OperationTable {
    /// How many finished operations [`OperationTable::new`] keeps.
    pub const DEFAULT_KEEP_FINISHED: usize = 256;
    /// Every operation's total deadline: a backstop above the per-vCPU
    /// timeouts, so no operation runs forever.
    pub const DEADLINE: Duration = Duration::from_secs(120);

    /// An empty table keeping [`Self::DEFAULT_KEEP_FINISHED`] finished
    /// operations.
    pub fn new() -> Self {
        Self::with_capacity(Self::DEFAULT_KEEP_FINISHED)
    }

    /// An empty table keeping `keep_finished` finished operations.
    pub fn with_capacity(keep_finished: usize) -> Self {
        Self {
            next_id: 1,
            entries: BTreeMap::new(),
            finished: VecDeque::new(),
            keep_finished,
        }
    }

    /// Record the operation for `plan` and return the reply to send.
    ///
    /// Nothing to wait for: a succeeded operation, [`Mutation::Unchanged`].
    /// A running operation of the same kind, count and vCPUs: that one
    /// again (so repeating a request is idempotent). Otherwise a new
    /// running operation. Call it before starting the plan's changes.
    pub fn track(&mut self, plan: &Plan, now: Instant) -> Mutation {
        if let Some(entry) = self.entries.values().find(|e| {
            let op = e.progress.borrow();
            op.status == OperationStatus::Running
                && op.kind == plan.kind
                && op.desired == plan.desired
                && op.vcpus == plan.wait_for
        }) {
            return Mutation::Started {
                operation: entry.progress.borrow().clone(),
                progress: entry.progress.subscribe(),
            };
        }
        let id = self.next_id;
        self.next_id += 1;
        let operation = Operation {
            id,
            kind: plan.kind,
            desired: plan.desired,
            vcpus: plan.wait_for.clone(),
            status: OperationStatus::Running,
            reason: None,
            started_unix_ms: unix_ms(),
            duration_ms: None,
        };
        let (progress, receiver) = watch::channel(operation.clone());
        self.entries.insert(
            id,
            Entry {
                progress,
                pending: plan.wait_for.iter().copied().collect(),
                started: now,
                deadline: now + Self::DEADLINE,
            },
        );
        if plan.wait_for.is_empty() {
            let done = self.finish(id, OperationStatus::Succeeded, None, now);
            return Mutation::Unchanged(done.unwrap_or(operation));
        }
        Mutation::Started {
            operation,
            progress: receiver,
        }
    }

    /// The operation with `id`, if known.
    pub fn get(&self, id: u64) -> Option<Operation> {
        self.entries.get(&id).map(|e| e.progress.borrow().clone())
    }

    /// Whether a running operation waits for `vcpu`.
    pub fn waits_for(&self, vcpu: u32) -> bool {
        self.entries.values().any(|e| e.pending.contains(&vcpu))
    }

    /// Fails every running operation whose total deadline passed; returns
    /// the next deadline of those still running.
    pub fn expire(&mut self, now: Instant) -> Option<Instant> {
        let late: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.pending.is_empty() && e.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            let reason = format!(
                "the operation did not finish within {} s",
                Self::DEADLINE.as_secs()
            );
            self.finish(id, OperationStatus::Failed, Some(reason), now);
        }
        self.entries
            .values()
            .filter(|e| !e.pending.is_empty())
            .map(|e| e.deadline)
            .min()
    }

    /// The ids of the running operations, ascending.
    pub fn running(&self) -> Vec<u64> {
        self.entries
            .iter()
            .filter(|(_, e)| e.progress.borrow().status == OperationStatus::Running)
            .map(|(id, _)| *id)
            .collect()
    }

    /// The guest confirmed `vcpu` (added: online; removed: ejected and its
    /// thread joined). Every running operation waiting for it advances and
    /// succeeds when it waits for nothing more.
    pub fn vcpu_done(&mut self, vcpu: u32) {
        let mut done = Vec::new();
        for (id, entry) in &mut self.entries {
            if entry.pending.remove(&vcpu) && entry.pending.is_empty() {
                done.push(*id);
            }
        }
        for id in done {
            self.finish(id, OperationStatus::Succeeded, None, Instant::now());
        }
    }

    /// Changing `vcpu` failed: every running operation waiting for it fails
    /// with `reason`.
    pub fn vcpu_failed(&mut self, vcpu: u32, reason: &str) {
        let failed: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| e.pending.contains(&vcpu))
            .map(|(id, _)| *id)
            .collect();
        for id in failed {
            self.finish(
                id,
                OperationStatus::Failed,
                Some(format!("vCPU {vcpu}: {reason}")),
                Instant::now(),
            );
        }
    }

    /// Attach a note about `vcpu` (e.g. how it was done) to every running
    /// operation waiting for it; the note stays in `reason` on success. A
    /// note an operation already has is not added again, so a repeated
    /// request never grows it.
    pub fn vcpu_note(&mut self, vcpu: u32, note: &str) {
        let line = format!("vCPU {vcpu}: {note}");
        for entry in self.entries.values_mut() {
            let has = |op: &Operation| op.reason.as_deref().is_some_and(|r| r.contains(&line));
            if entry.pending.contains(&vcpu) && !has(&entry.progress.borrow()) {
                entry.progress.send_modify(|op| {
                    op.reason = Some(match op.reason.take() {
                        Some(prev) => format!("{prev}; {line}"),
                        None => line.clone(),
                    });
                });
            }
        }
    }

    /// Fail every running operation (e.g. the VM is shutting down).
    pub fn fail_all(&mut self, reason: &str) {
        for id in self.running() {
            self.finish(
                id,
                OperationStatus::Failed,
                Some(reason.to_owned()),
                Instant::now(),
            );
        }
    }

    /// Finish a running operation; returns its final state.
    fn finish(
        &mut self,
        id: u64,
        status: OperationStatus,
        reason: Option<String>,
        now: Instant,
    ) -> Option<Operation> {
        let entry = self.entries.get_mut(&id)?;
        if entry.progress.borrow().status.is_finished() {
            return None;
        }
        entry.pending.clear();
        let elapsed = now.saturating_duration_since(entry.started);
        let elapsed = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        entry.progress.send_modify(|op| {
            op.status = status;
            if let Some(r) = reason {
                op.reason = Some(match op.reason.take() {
                    Some(note) => format!("{r} ({note})"),
                    None => r,
                });
            }
            op.duration_ms = Some(elapsed);
        });
        let done = entry.progress.borrow().clone();
        self.finished.push_back(id);
        while self.finished.len() > self.keep_finished {
            if let Some(old) = self.finished.pop_front() {
                self.entries.remove(&old);
            }
        }
        Some(done)
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| u64::try_from(d.as_millis()).ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::plan::{plan_add, plan_remove};
    use super::*;
    use api::VcpuState::{Absent as A, Adding as D, Present as P};

    fn resize(states: &[api::VcpuState], desired: u32) -> Result<Plan, ApiError> {
        plan(Change::Resize { desired }, states)
    }

    fn started(m: Mutation) -> (Operation, watch::Receiver<Operation>) {
        m.expect_started()
    }

    #[test]
    fn table_tracks_and_fans_out() {
        let mut table = OperationTable::new();
        let grow = resize(&[P, A, A], 3).unwrap();
        let (op, progress) = started(table.track(&grow, Instant::now()));
        assert_eq!(op.status, OperationStatus::Running);
        assert_eq!(op.vcpus, vec![1, 2]);
        // Repeating the same request joins the same operation.
        let (again, _) = started(table.track(&resize(&[P, D, D], 3).unwrap(), Instant::now()));
        assert_eq!(again.id, op.id);
        // A single add of a vCPU in flight waits for it too.
        let (single, single_progress) =
            started(table.track(&plan_add(&[P, D, D], 2).unwrap(), Instant::now()));
        assert_ne!(single.id, op.id);
        table.vcpu_done(2);
        assert_eq!(single_progress.borrow().status, OperationStatus::Succeeded);
        assert_eq!(progress.borrow().status, OperationStatus::Running);
        table.vcpu_done(1);
        let done = progress.borrow().clone();
        assert_eq!(done.status, OperationStatus::Succeeded);
        assert!(done.duration_ms.is_some());
        assert_eq!(table.get(op.id), Some(done));
        assert!(table.running().is_empty());
    }

    #[test]
    fn table_failures_and_unchanged() {
        let mut table = OperationTable::new();
        let (op, progress) =
            started(table.track(&plan_remove(&[P, P], 1).unwrap(), Instant::now()));
        table.vcpu_failed(1, "guest did not eject it");
        let failed = progress.borrow().clone();
        assert_eq!(failed.status, OperationStatus::Failed);
        assert_eq!(
            failed.reason.as_deref(),
            Some("vCPU 1: guest did not eject it")
        );
        // A later result for the same vCPU does not resurrect it.
        table.vcpu_done(1);
        assert_eq!(table.get(op.id).unwrap().status, OperationStatus::Failed);
        match table.track(&plan_remove(&[P, A], 1).unwrap(), Instant::now()) {
            Mutation::Unchanged(op) => {
                assert_eq!(op.status, OperationStatus::Succeeded);
                assert!(op.is_noop());
                assert!(table.get(op.id).is_some());
            }
            Mutation::Started { .. } => panic!("expected unchanged"),
        }
        assert!(table.get(999).is_none());
        let (_, progress) = started(table.track(&plan_add(&[P, A], 1).unwrap(), Instant::now()));
        table.fail_all("shutting down");
        assert_eq!(progress.borrow().reason.as_deref(), Some("shutting down"));
    }

    #[test]
    fn table_forgets_old_finished_operations() {
        let mut table = OperationTable::with_capacity(2);
        let noop = plan_add(&[P], 0).unwrap();
        let ids: Vec<u64> = (0..3)
            .map(|_| match table.track(&noop, Instant::now()) {
                Mutation::Unchanged(op) => op.id,
                Mutation::Started { .. } => panic!("expected unchanged"),
            })
            .collect();
        assert!(table.get(ids[0]).is_none());
        assert!(table.get(ids[1]).is_some() && table.get(ids[2]).is_some());
        // Running operations are never forgotten.
        let (op, _) = started(table.track(&plan_add(&[P, A], 1).unwrap(), Instant::now()));
        for _ in 0..3 {
            table.track(&noop, Instant::now());
        }
        assert!(table.get(op.id).is_some());
    }

    #[test]
    fn notes_are_not_repeated_and_operations_have_a_deadline() {
        let mut table = OperationTable::new();
        let t0 = Instant::now();
        let (op, progress) = started(table.track(&plan_remove(&[P, P], 1).unwrap(), t0));
        for _ in 0..5 {
            table.vcpu_note(1, "asked again");
        }
        assert_eq!(
            progress.borrow().reason.as_deref(),
            Some("vCPU 1: asked again")
        );
        assert_eq!(table.expire(t0), Some(t0 + OperationTable::DEADLINE));
        assert_eq!(table.expire(t0 + OperationTable::DEADLINE), None);
        let op = table.get(op.id).unwrap();
        assert_eq!(op.status, OperationStatus::Failed);
        assert!(op.reason.unwrap().contains("did not finish within"));
    }

    fn ask_vm(sender: &ControlSender) -> oneshot::Receiver<api::VmInfo> {
        let (reply, answer) = oneshot::channel();
        sender.send(Request::Query(Query::Vm(reply))).unwrap();
        answer
    }

    #[test]
    fn channel_wakes_and_drains() {
        let (sender, receiver) = channel().unwrap();
        let _a = ask_vm(&sender);
        let _b = ask_vm(&sender);
        assert_eq!(receiver.wake_fd().read().unwrap(), 2);
        let _c = ask_vm(&sender);
        assert_eq!(receiver.drain().count(), 3);
        // drain() cleared the eventfd.
        assert!(receiver.wake_fd().read().is_err());
        assert!(receiver
            .recv_timeout(Duration::from_millis(1))
            .unwrap()
            .is_none());
    }

    #[test]
    fn typed_answers_travel_back_and_disconnect_is_reported() {
        let (sender, receiver) = channel().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let ask = sender.ask(|reply| Request::Query(Query::Operation { id: 3, reply }));
        let serve = async {
            tokio::task::yield_now().await;
            match receiver.drain().next() {
                Some(Request::Query(Query::Operation { id, reply })) => {
                    assert_eq!(id, 3);
                    respond(reply, None);
                }
                other => panic!("{other:?}"),
            }
        };
        let (answer, ()) = rt.block_on(async { tokio::join!(ask, serve) });
        assert_eq!(answer.unwrap(), None);
        // Dropped without an answer.
        let answer = ask_vm(&sender);
        drop(receiver.drain().next());
        assert!(rt.block_on(answer).is_err());
        drop(receiver);
        let (reply, _) = oneshot::channel();
        assert!(matches!(
            sender.send(Request::Query(Query::Metrics(reply))),
            Err(ControlError::Disconnected)
        ));
    }
}
