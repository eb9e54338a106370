//! Target `http`: raw bytes from an API client, served in-process by the
//! real server (hyper, the connection's bounds, the router, the resource
//! parsers, the responses) over a socketpair, with a fake VMM on the
//! other side of the control channel that answers at once (the same
//! `control::plan` rules and `OperationTable` as the VMM, every change
//! confirmed as soon as it is made).

use std::cell::Cell;
use std::time::{Duration, Instant};

use api::{
    ErrorBody, ErrorCode, FaultInjected, FaultKind, FaultTarget, GuestWorkers, VcpuInfo, VcpuList,
    VcpuState, VmInfo, VmState,
};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

use crate::api_server::{self, ApiMetrics, ServerOptions};
use crate::control::{self, respond, Change, ControlReceiver, OperationTable, Query, Request};

/// vCPUs of the fake VM (2 present at boot).
const MAX_VCPUS: u32 = 8;

/// The whole exchange must end within this (every wait in it is bounded
/// well below: the client sends everything and closes its side at once).
const EXCHANGE_BOUND: Duration = Duration::from_secs(20);

/// One answer read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// The headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Answer {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What the server sent back for one input.
#[derive(Debug, Clone, Default)]
pub struct HttpExchange {
    /// Its answers, in order (interim `100 Continue` ones included).
    pub answers: Vec<Answer>,
}

/// The fake VMM's state.
#[derive(Debug)]
struct FakeVmm {
    states: Vec<VcpuState>,
    table: OperationTable,
}

impl FakeVmm {
    fn new() -> Self {
        Self {
            states: (0..MAX_VCPUS)
                .map(|i| {
                    if i < 2 {
                        VcpuState::Present
                    } else {
                        VcpuState::Absent
                    }
                })
                .collect(),
            table: OperationTable::new(),
        }
    }

    fn answer(&mut self, request: Request) {
        match request {
            Request::Query(Query::Vm(reply)) => respond(reply, self.vm()),
            Request::Query(Query::Vcpus(reply)) => respond(reply, self.vcpus()),
            Request::Query(Query::Operation { id, reply }) => respond(reply, self.table.get(id)),
            Request::Query(Query::Metrics(reply)) => respond(reply, Default::default()),
            Request::Query(Query::Workers(reply)) => respond(
                reply,
                GuestWorkers {
                    agent_connected: Some(true),
                    ..GuestWorkers::unknown()
                },
            ),
            Request::InjectFault { fault, cpu, reply } => respond(reply, inject(fault, cpu)),
            Request::Mutate { change, reply } => {
                let answer = self.mutate(change);
                respond(reply, answer);
            }
        }
    }

    fn mutate(&mut self, change: Change) -> Result<control::Mutation, api::ApiError> {
        let plan = control::plan(change, &self.states)?;
        let mutation = self.table.track(&plan, Instant::now());
        // The guest confirms at once.
        for &id in &plan.add {
            self.states[id as usize] = VcpuState::Present;
            self.table.vcpu_done(id);
        }
        for &id in &plan.remove {
            self.states[id as usize] = VcpuState::Absent;
            self.table.vcpu_done(id);
        }
        Ok(mutation)
    }

    fn vm(&self) -> VmInfo {
        let present = self
            .states
            .iter()
            .filter(|s| **s == VcpuState::Present)
            .count();
        VmInfo {
            state: VmState::Running,
            boot_vcpus: 2,
            max_vcpus: MAX_VCPUS,
            present_vcpus: u32::try_from(present).unwrap_or(u32::MAX),
            memory_mib: 512,
            agent_connected: Some(true),
            agent_version: Some("fuzz".into()),
            workload: None,
        }
    }

    fn vcpus(&self) -> VcpuList {
        VcpuList {
            max_vcpus: MAX_VCPUS,
            vcpus: (0..MAX_VCPUS)
                .zip(&self.states)
                .map(|(id, state)| VcpuInfo {
                    id,
                    state: *state,
                    guest_online: (*state == VcpuState::Present).then_some(true),
                    guest_cpu: None,
                    workers: None,
                })
                .collect(),
        }
    }

    /// Answers requests as they come, forever (the exchange ends first).
    async fn serve(&mut self, receiver: &ControlReceiver, answered: &Cell<u64>) {
        use std::os::fd::AsRawFd;
        let fd = receiver.wake_fd().as_raw_fd();
        // SAFETY: `fd` is the receiver's eventfd, open for as long as the
        // receiver, which this future borrows and so outlives the AsyncFd
        // (dropped with the future) that registers it.
        let wake = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .expect("register the eventfd");
        loop {
            for request in receiver.drain() {
                self.answer(request);
                answered.set(answered.get() + 1);
            }
            match wake.readable().await {
                Ok(mut guard) => guard.clear_ready(),
                Err(e) => panic!("the control eventfd: {e}"),
            }
        }
    }
}

/// The real VMM's rules for a test fault, simplified.
fn inject(fault: FaultKind, cpu: Option<u32>) -> Result<FaultInjected, api::ApiError> {
    if cpu.is_some_and(|id| id >= MAX_VCPUS) {
        return Err(api::ApiError::new(ErrorCode::VcpuNotFound, "no such vCPU"));
    }
    let target = match (fault.agent_fault(), cpu) {
        (None, Some(0)) => {
            return Err(api::ApiError::new(ErrorCode::Vcpu0NotRemovable, "vCPU 0"));
        }
        (None, _) => FaultTarget::Vmm,
        (Some(_), _) => FaultTarget::Agent,
    };
    Ok(FaultInjected { fault, cpu, target })
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
}

/// The server's options: the defaults, test hooks served, and short
/// deadlines (nothing should wait for them: the client sends everything
/// at once).
fn options() -> ServerOptions {
    ServerOptions {
        reply_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(2),
        test_hooks: true,
        ..ServerOptions::default()
    }
}

/// Serves `request` (raw bytes, any number of requests) on one connection
/// and returns what came back. Panics if a check fails.
pub fn serve_http(request: &[u8]) -> HttpExchange {
    ignore_sigpipe();
    let started = Instant::now();
    let raw = RUNTIME.with(|rt| rt.block_on(exchange(request)));
    assert!(
        started.elapsed() < EXCHANGE_BOUND,
        "the exchange took {:?}",
        started.elapsed()
    );
    let exchange = HttpExchange {
        answers: parse_answers(&raw, request.windows(4).any(|w| w == b"HEAD")),
    };
    check(request, &exchange);
    exchange
}

/// Target `http`: [`serve_http`]. Checked: the exchange ends (bounded), every
/// byte that comes back is a well-formed HTTP/1.1 answer, no more answers
/// than the input had lines, every JSON error body is the API's error
/// with the status its code maps to, never `internal` or `unavailable`
/// (the fake VMM answers everything at once), and every other JSON body
/// parses.
pub fn http(data: &[u8]) {
    super::install_logger();
    ignore_sigpipe();
    let _ = serve_http(data);
}

/// As in the VMM (Rust's runtime ignores SIGPIPE before `main`; a fuzz
/// target's `main` is libFuzzer's): a write to a closed socket fails with
/// EPIPE instead of killing the process.
fn ignore_sigpipe() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: setting a signal's disposition to SIG_IGN installs no
        // handler code; it is what the Rust runtime does for every binary.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    });
}

/// Polls of the runtime without progress (bytes either way, a request
/// answered by the fake VMM) after which the server is taken to be idle:
/// waiting for bytes the client will never send, or for a timer.
const QUIET_POLLS: u32 = 16;

async fn exchange(request: &[u8]) -> Vec<u8> {
    let (server_end, mut client) = UnixStream::pair().expect("a socketpair");
    let (control, receiver) = control::channel().expect("a control channel");
    let server = api_server::serve_connection(
        server_end,
        control,
        std::sync::Arc::new(ApiMetrics::new()),
        options(),
    );
    let answered = Cell::new(0u64);
    // The client sends everything, reads what comes back until the server
    // closes or goes idle, then closes its end. It never half-closes:
    // hyper drops the request in flight when a client shuts down its
    // write side while it is answering (its `half_close` is off).
    let client = async {
        let (mut rd, mut wr) = client.split();
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let (mut written, mut quiet, mut seen) = (0, 0, 0);
        while written < request.len() || quiet < QUIET_POLLS {
            tokio::select! {
                biased;
                read = rd.read(&mut buf) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        out.extend_from_slice(&buf[..n]);
                        quiet = 0;
                    }
                },
                wrote = wr.write(&request[written..]), if written < request.len() => {
                    // A server that stopped reading (it answered an error
                    // and closes) takes no more.
                    written = wrote.map_or(request.len(), |n| written + n.max(1));
                    quiet = 0;
                }
                () = tokio::task::yield_now() => {
                    quiet = if answered.get() == seen { quiet + 1 } else { 0 };
                    seen = answered.get();
                }
            }
        }
        drop(client);
        out
    };
    let mut fake = FakeVmm::new();
    let both = async {
        let ((), out) = tokio::join!(server, client);
        out
    };
    let bounded = tokio::time::timeout(EXCHANGE_BOUND, both);
    tokio::select! {
        out = bounded => out.expect("the server did not finish the connection in time"),
        () = fake.serve(&receiver, &answered) => unreachable!("the fake VMM stops only with the exchange"),
    }
}

/// Splits what came back into answers; panics on anything malformed.
/// With `head_asked` (the input held a `HEAD`), an answer whose body is not
/// there (another answer or the end follows) is taken to answer a `HEAD`.
fn parse_answers(raw: &[u8], head_asked: bool) -> Vec<Answer> {
    let mut answers = Vec::new();
    let mut rest = raw;
    while !rest.is_empty() {
        let end = rest
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("an answer without a whole head: {:?}", text(rest)));
        let head = std::str::from_utf8(&rest[..end])
            .unwrap_or_else(|_| panic!("a head that is not UTF-8: {:?}", text(rest)));
        rest = &rest[end + 4..];
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .strip_prefix("HTTP/1.1 ")
            .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("a bad status line: {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (n, v) = l
                    .split_once(':')
                    .unwrap_or_else(|| panic!("a bad header line: {l:?}"));
                (n.to_ascii_lowercase(), v.trim().to_owned())
            })
            .collect();
        let mut answer = Answer {
            status,
            headers,
            body: Vec::new(),
        };
        let length = answer.header("content-length").map(|v| {
            v.parse::<usize>()
                .unwrap_or_else(|_| panic!("a bad content-length: {v:?}"))
        });
        assert!(
            answer.header("transfer-encoding").is_none(),
            "a chunked answer: {head:?}"
        );
        let bodiless = head_asked && (rest.is_empty() || rest.starts_with(b"HTTP/1."));
        match length {
            Some(_) if bodiless => {}
            Some(n) => {
                assert!(n <= rest.len(), "a body cut short: {head:?}");
                answer.body = rest[..n].to_vec();
                rest = &rest[n..];
            }
            None if status < 200 || status == 204 || status == 304 => {}
            None => panic!("an answer without a length: {head:?}"),
        }
        answers.push(answer);
    }
    answers
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned()
}

/// The checks on the answers to `request`.
fn check(request: &[u8], exchange: &HttpExchange) {
    let finals = exchange.answers.iter().filter(|a| a.status >= 200).count();
    let lines = request.iter().filter(|&&b| b == b'\n').count();
    assert!(
        finals <= lines + 1,
        "{finals} answers to {lines} lines: {:?}",
        text(request)
    );
    for answer in &exchange.answers {
        let json = answer
            .header("content-type")
            .is_some_and(|t| t == "application/json");
        // An answer to a HEAD has the length of a body it does not carry.
        let head = answer.body.is_empty() && answer.header("content-length") != Some("0");
        if !json || head {
            continue;
        }
        if answer.status >= 400 {
            let body: ErrorBody = serde_json::from_slice(&answer.body).unwrap_or_else(|e| {
                panic!(
                    "{e}: an error body {:?}",
                    String::from_utf8_lossy(&answer.body)
                )
            });
            let code = body.error.code;
            assert_eq!(code.status(), answer.status, "{body:?}");
            assert!(!body.error.message.is_empty());
            assert!(
                !matches!(code, ErrorCode::Internal | ErrorCode::Unavailable),
                "the server failed: {body:?} for {:?}",
                text(request)
            );
        } else {
            serde_json::from_slice::<serde_json::Value>(&answer.body).unwrap_or_else(|e| {
                panic!("{e}: a body {:?}", String::from_utf8_lossy(&answer.body))
            });
        }
    }
}
