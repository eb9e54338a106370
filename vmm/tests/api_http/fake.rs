//! A fake VMM behind the real API server: a thread that waits on the
//! control eventfd with epoll, drains the requests and answers them from a
//! simulated set of vCPUs, using the same `control::plan` rules and
//! `OperationTable` the real VMM uses. The guest "confirms" each change
//! after a configurable delay, never, or fails it. A simulated guest agent
//! has a worker snapshot and takes test faults (when the harness runs with
//! test hooks).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use api::client::BlockingClient;
use api::{
    ApiError, ErrorCode, FaultInjected, FaultKind, FaultTarget, GuestWorkers, VcpuInfo, VcpuList,
    VcpuState, VmInfo, VmState,
};
use vmm::api_server::{self, ApiMetrics, ApiServerHandle, ServerOptions};
use vmm::control::{
    self, respond, Change, ControlReceiver, Mutation, OperationTable, Query, Request, VmmMetrics,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// What the simulated guest does with a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Confirms it after this long.
    After(Duration),
    /// Never confirms it (until [`Fake::settle_all`]).
    Never,
    /// Fails it after this long.
    FailAfter(Duration),
}

/// The simulated VM.
#[derive(Debug)]
pub struct FakeState {
    pub states: Vec<VcpuState>,
    pub online: Vec<Option<bool>>,
    pub table: OperationTable,
    pub metrics: VmmMetrics,
    /// (vCPU, when it settles; None = never).
    pending: Vec<(u32, Option<Instant>, bool)>,
    pub settle: Settle,
    /// Drop requests without answering.
    pub drop_requests: bool,
    /// Delay every answer by this much (blocks the fake VMM thread).
    pub reply_delay: Duration,
    /// Whether the simulated guest agent is connected.
    pub agent_connected: bool,
    /// The version the simulated agent reports (guest text).
    pub agent_version: String,
    /// The agent's worker snapshot, once it sent one.
    pub snapshot: Option<GuestWorkers>,
    /// Faults accepted, in order.
    pub faults: Vec<(FaultKind, Option<u32>)>,
    /// The VMM honours test hooks (as `Hotplug::with_test_hooks`).
    pub test_hooks: bool,
    boot: u32,
}

impl FakeState {
    fn new(max: u32, boot: u32, settle: Settle) -> Self {
        let states = (0..max)
            .map(|i| {
                if i < boot {
                    VcpuState::Present
                } else {
                    VcpuState::Absent
                }
            })
            .collect();
        let online = (0..max).map(|i| (i < boot).then_some(true)).collect();
        Self {
            states,
            online,
            table: OperationTable::new(),
            metrics: VmmMetrics::default(),
            pending: Vec::new(),
            settle,
            drop_requests: false,
            reply_delay: Duration::ZERO,
            agent_connected: false,
            agent_version: "fake".to_owned(),
            snapshot: None,
            faults: Vec::new(),
            test_hooks: false,
            boot,
        }
    }

    fn vcpus(&self) -> VcpuList {
        VcpuList {
            max_vcpus: u32::try_from(self.states.len()).unwrap(),
            vcpus: self
                .states
                .iter()
                .zip(&self.online)
                .enumerate()
                .map(|(i, (state, online))| VcpuInfo {
                    id: u32::try_from(i).unwrap(),
                    state: *state,
                    guest_online: *online,
                    guest_cpu: None,
                    workers: self.snapshot.as_ref().map(|s| {
                        let id = u32::try_from(i).unwrap();
                        s.on_cpu(id).cloned().collect()
                    }),
                })
                .collect(),
        }
    }

    fn vm(&self) -> VmInfo {
        VmInfo {
            state: VmState::Running,
            boot_vcpus: self.boot,
            max_vcpus: u32::try_from(self.states.len()).unwrap(),
            present_vcpus: u32::try_from(
                self.states
                    .iter()
                    .filter(|s| matches!(s, VcpuState::Present | VcpuState::Removing))
                    .count(),
            )
            .unwrap(),
            memory_mib: 512,
            agent_connected: self.agent_connected.then_some(true),
            agent_version: self.agent_connected.then(|| self.agent_version.clone()),
            workload: None,
        }
    }

    fn workers(&self) -> GuestWorkers {
        match &self.snapshot {
            Some(s) => s.clone(),
            None => GuestWorkers {
                agent_connected: self.agent_connected.then_some(true),
                ..GuestWorkers::unknown()
            },
        }
    }

    fn answer(&mut self, request: Request) {
        match request {
            Request::Query(Query::Vm(reply)) => respond(reply, self.vm()),
            Request::Query(Query::Workers(reply)) => respond(reply, self.workers()),
            Request::Query(Query::Vcpus(reply)) => respond(reply, self.vcpus()),
            Request::Query(Query::Operation { id, reply }) => respond(reply, self.table.get(id)),
            Request::Query(Query::Metrics(reply)) => respond(reply, self.metrics),
            Request::InjectFault { fault, cpu, reply } => respond(reply, self.inject(fault, cpu)),
            Request::Mutate { change, reply } => {
                let answer = self.mutate(change);
                respond(reply, answer);
            }
        }
    }

    fn mutate(&mut self, change: Change) -> Result<Mutation, ApiError> {
        let plan = control::plan(change, &self.states)?;
        let mutation = self.table.track(&plan, Instant::now());
        let due = |settle| match settle {
            Settle::After(d) => (Some(Instant::now() + d), false),
            Settle::FailAfter(d) => (Some(Instant::now() + d), true),
            Settle::Never => (None, false),
        };
        for &id in &plan.add {
            self.states[id as usize] = VcpuState::Adding;
            self.online[id as usize] = Some(false);
            let (at, fail) = due(self.settle);
            self.pending.push((id, at, fail));
        }
        for &id in &plan.remove {
            self.states[id as usize] = VcpuState::Removing;
            let (at, fail) = due(self.settle);
            self.pending.push((id, at, fail));
        }
        Ok(mutation)
    }

    /// The real VMM's rules for a test fault, simplified.
    fn inject(&mut self, fault: FaultKind, cpu: Option<u32>) -> Result<FaultInjected, ApiError> {
        if !self.test_hooks {
            return Err(ApiError::new(ErrorCode::NotFound, "no such path"));
        }
        if cpu.is_some_and(|id| id as usize >= self.states.len()) {
            return Err(ApiError::new(ErrorCode::VcpuNotFound, "no such vCPU"));
        }
        let target = match (fault.agent_fault(), cpu) {
            (None, Some(0)) => {
                return Err(ApiError::new(ErrorCode::Vcpu0NotRemovable, "vCPU 0"));
            }
            (None, _) => FaultTarget::Vmm,
            (Some(_), _) if !self.agent_connected => {
                return Err(ApiError::new(ErrorCode::AgentUnavailable, "no agent"));
            }
            (Some(_), _) => FaultTarget::Agent,
        };
        self.faults.push((fault, cpu));
        Ok(FaultInjected { fault, cpu, target })
    }

    /// Settle every change whose time has come (all of them if `all`).
    fn settle_due(&mut self, all: bool) {
        let now = Instant::now();
        let (due, rest): (Vec<_>, Vec<_>) = self
            .pending
            .drain(..)
            .partition(|(_, at, _)| all || at.is_some_and(|t| t <= now));
        self.pending = rest;
        for (id, _, fail) in due {
            let i = id as usize;
            if fail {
                // The change is rolled back.
                self.states[i] = match self.states[i] {
                    VcpuState::Adding => VcpuState::Absent,
                    _ => VcpuState::Present,
                };
                self.online[i] = (self.states[i] == VcpuState::Present).then_some(true);
                self.metrics.hotplug_failures += 1;
                self.table.vcpu_failed(id, "the guest did not confirm it");
                continue;
            }
            match self.states[i] {
                VcpuState::Adding => {
                    self.states[i] = VcpuState::Present;
                    self.online[i] = Some(true);
                    self.metrics.hot_adds += 1;
                }
                VcpuState::Removing => {
                    self.states[i] = VcpuState::Absent;
                    self.online[i] = None;
                    self.metrics.hot_removes += 1;
                }
                VcpuState::Absent | VcpuState::Present | VcpuState::Stuck => {}
            }
            self.table.vcpu_done(id);
        }
    }
}

/// The fake VMM thread.
#[derive(Debug)]
pub struct Fake {
    pub state: Arc<Mutex<FakeState>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Fake {
    fn spawn(receiver: ControlReceiver, state: Arc<Mutex<FakeState>>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("fake_vmm".into())
                .spawn(move || run(receiver, state, stop))
                .unwrap()
        };
        Self {
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// Lock the simulated VM.
    pub fn lock(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap()
    }

    /// Confirm every change in flight now.
    pub fn settle_all(&self) {
        self.lock().settle_due(true);
    }

    /// Stop the thread and drop the receiver (the VMM is gone).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(receiver: ControlReceiver, state: Arc<Mutex<FakeState>>, stop: Arc<AtomicBool>) {
    let epoll = Epoll::new().unwrap();
    epoll
        .ctl(
            ControlOperation::Add,
            std::os::fd::AsRawFd::as_raw_fd(receiver.wake_fd()),
            EpollEvent::new(EventSet::IN, 0),
        )
        .unwrap();
    let mut events = [EpollEvent::default(); 4];
    while !stop.load(Ordering::SeqCst) {
        let _ = epoll.wait(5, &mut events);
        let requests: Vec<Request> = receiver.drain().collect();
        for request in requests {
            let (drop_it, delay) = {
                let s = state.lock().unwrap();
                (s.drop_requests, s.reply_delay)
            };
            if drop_it {
                continue;
            }
            std::thread::sleep(delay);
            state.lock().unwrap().answer(request);
        }
        state.lock().unwrap().settle_due(false);
    }
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A scratch directory removed on drop.
#[derive(Debug)]
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("vmm-api-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The real API server on a real Unix socket, backed by [`Fake`].
#[derive(Debug)]
pub struct Harness {
    pub server: Option<ApiServerHandle>,
    pub fake: Fake,
    pub metrics: Arc<ApiMetrics>,
    pub socket: PathBuf,
    _scratch: Scratch,
}

/// The API thread of every harness runs under the `vmm` binary's API
/// filter, enforced: a system call outside its list ends this test
/// process with status 7 and a line naming it.
fn enforce_seccomp() {
    static CONFIGURED: std::sync::Once = std::sync::Once::new();
    CONFIGURED.call_once(|| {
        vmm::seccomp::configure(vmm::seccomp::Settings::default()).unwrap();
    });
}

/// The default test VM: 8 possible vCPUs, 2 at boot.
pub const MAX: u32 = 8;
pub const BOOT: u32 = 2;

impl Harness {
    /// 8 possible vCPUs, 2 at boot, the guest confirming after `settle`.
    pub fn start(settle: Settle) -> Self {
        Self::start_with(MAX, BOOT, settle, ServerOptions::default())
    }

    /// The default test VM with `--test-hooks`: the server serves the
    /// test routes and the fake VMM honours them.
    pub fn start_with_hooks(settle: Settle) -> Self {
        let options = ServerOptions {
            test_hooks: true,
            ..ServerOptions::default()
        };
        Self::start_with(MAX, BOOT, settle, options)
    }

    pub fn start_with(max: u32, boot: u32, settle: Settle, options: ServerOptions) -> Self {
        enforce_seccomp();
        let scratch = Scratch::new();
        let socket = scratch.0.join("api.sock");
        let (sender, receiver) = control::channel().unwrap();
        let mut state = FakeState::new(max, boot, settle);
        state.test_hooks = options.test_hooks;
        let fake = Fake::spawn(receiver, Arc::new(Mutex::new(state)));
        let metrics = Arc::new(ApiMetrics::new());
        let server =
            api_server::start_with(&socket, sender, Arc::clone(&metrics), options).unwrap();
        Self {
            server: Some(server),
            fake,
            metrics,
            socket,
            _scratch: scratch,
        }
    }

    pub fn dir(&self) -> &Path {
        self.socket.parent().unwrap()
    }

    pub fn blocking(&self) -> BlockingClient {
        BlockingClient::new(&self.socket).unwrap()
    }

    /// Set how the guest settles later changes.
    pub fn set_settle(&self, settle: Settle) {
        self.fake.lock().settle = settle;
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().unwrap();
        }
    }
}
