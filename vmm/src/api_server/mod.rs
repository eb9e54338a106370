//! The HTTP API server: hyper 1 on a tokio current-thread runtime in its
//! own thread, serving a Unix socket.
//!
//! # Threading
//! [`start`] binds the socket (mode 0600, see the `socket` module) and
//! builds the runtime on the caller's thread, so every setup error is
//! returned there, then moves both to the `vmm_api` thread. That thread accepts
//! connections and answers requests; it never touches VMM state. Each
//! request becomes a [`crate::control::Action`] sent through the
//! [`ControlSender`] (which wakes the VMM's event loop); the reply comes
//! back on the request's own channel. `?wait` awaits the operation's
//! `watch` channel here, so the VMM thread is never blocked or polled.
//!
//! # Bounds
//! Nothing a client does can hold the server: connections are capped
//! (one more is answered `503` and closed), a request must arrive within
//! a deadline (headers and body), `?wait` waiters are capped apart (one
//! more is answered `202` at once), and a connection serves a bounded
//! number of requests for a bounded time. [`ServerOptions`] has the
//! numbers and the answers; `connection` the accept loop and the
//! per-connection bounds. Errors hyper answers itself, before any request
//! reaches the router, have no JSON body (hyper's `http1::Builder` offers
//! no hook for them): `400` for a malformed request line or header, an
//! invalid `Content-Length` or two that differ (identical ones are
//! merged into one), `431` for headers over its buffer, `414` for an
//! over-long URI; a request whose headers are late gets no answer.
//!
//! # Layout
//! `connection` accepts and serves connections; `router` matches paths
//! and methods; `vm`, `vcpus`, `operations`,
//! `metrics`, `guest` and `test_hooks` parse their requests into actions
//! (one small file per resource); `parse` has the shared query and body
//! rules; `response` builds the answers.
//!
//! Test-hook routes (`api::routes::Route::test_only`) are served only with
//! [`ServerOptions::test_hooks`]; otherwise they answer `404` like any
//! unknown path, whatever the method.
//!
//! [`ApiServerHandle::shutdown`] (or dropping the handle) stops accepting,
//! lets requests in flight finish for up to [`ServerOptions::grace`],
//! joins the thread and removes the socket file.

mod connection;
mod guest;
mod metrics;
mod operations;
mod parse;
mod response;
mod router;
mod socket;
mod test_hooks;
mod vcpus;
mod vm;

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::{oneshot, Semaphore};

pub use metrics::{ApiMetrics, PROMETHEUS_CONTENT_TYPE};
pub use socket::SocketError;

use crate::control::ControlSender;

/// Why the server could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// The socket could not be set up.
    #[error("cannot set up the API socket")]
    Socket(#[from] SocketError),
    /// The tokio runtime could not be built.
    #[error("cannot build the API runtime")]
    Runtime(#[source] std::io::Error),
    /// The listener could not be registered with the runtime.
    #[error("cannot register the API socket")]
    Register(#[source] std::io::Error),
    /// The thread could not be spawned.
    #[error("cannot spawn the API thread")]
    Spawn(#[source] std::io::Error),
    /// The thread panicked.
    #[error("the API thread panicked")]
    Panicked,
}

/// Tunables; [`ServerOptions::default`] is what [`start`] uses. The
/// bounds, and what a client beyond each one gets:
///
/// | bound | default | beyond it |
/// |---|---|---|
/// | [`max_connections`](Self::max_connections) | 64 | `503` `unavailable` (with `Retry-After: 1`), closed |
/// | [`request_timeout`](Self::request_timeout) | 5 s | headers late: closed (hyper sends nothing); body late: `408` `request_timeout`, closed |
/// | [`max_waiters`](Self::max_waiters) | 32 | `?wait` not honoured: `202` with the operation |
/// | [`max_connection_age`](Self::max_connection_age) | 5 min | no further request on it; closed after its answer |
/// | [`max_requests_per_connection`](Self::max_requests_per_connection) | 1000 | the last answer says `Connection: close` |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerOptions {
    /// How long to wait for the VMM thread's reply before answering 503.
    pub reply_timeout: Duration,
    /// How long a client may take to send a request, headers and body,
    /// counted from the connection's start or the previous answer (so it is
    /// also how long a keep-alive connection may sit idle). Headers not in
    /// by then: the connection is closed without an answer (hyper's header
    /// timeout); a body not in by then: `408` and the connection is closed.
    pub request_timeout: Duration,
    /// Connections served at once. One more is answered `503` at once and
    /// closed, never left waiting in the listen backlog.
    pub max_connections: usize,
    /// Mutations waiting for their operation (`?wait`) at once. One more is
    /// answered as without `wait`: `202` with the operation (the change is
    /// made, not refused), which the client can poll.
    pub max_waiters: usize,
    /// How long one connection may be used for new requests; after that it
    /// is closed once its request in flight (if any) is answered.
    pub max_connection_age: Duration,
    /// Requests served on one keep-alive connection; the last answer
    /// carries `Connection: close`.
    pub max_requests_per_connection: u32,
    /// How long shutdown lets requests in flight finish.
    pub grace: Duration,
    /// Serve the test-hook routes (the VMM's `--test-hooks`); off, they
    /// answer `404` like an unknown path.
    pub test_hooks: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            reply_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(5),
            max_connections: 64,
            max_waiters: 32,
            max_connection_age: Duration::from_secs(5 * 60),
            max_requests_per_connection: 1000,
            grace: Duration::from_secs(1),
            test_hooks: false,
        }
    }
}

/// What every request handler shares.
#[derive(Debug)]
struct ServerState {
    control: ControlSender,
    metrics: Arc<ApiMetrics>,
    options: ServerOptions,
    /// One permit per `?wait` in progress ([`ServerOptions::max_waiters`]).
    waiters: Arc<Semaphore>,
}

/// The running server. Dropping it shuts the server down too.
#[derive(Debug)]
pub struct ApiServerHandle {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    socket: socket::SocketFile,
}

impl ApiServerHandle {
    /// The socket path the server listens on.
    pub fn socket_path(&self) -> &Path {
        self.socket.path()
    }

    /// Stop accepting, let requests in flight finish (bounded), join the
    /// thread and remove the socket file.
    pub fn shutdown(mut self) -> Result<(), ApiServerError> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), ApiServerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let joined = match self.thread.take() {
            Some(thread) => thread.join().map_err(|_| ApiServerError::Panicked),
            None => Ok(()),
        };
        self.socket.remove();
        joined
    }
}

impl Drop for ApiServerHandle {
    fn drop(&mut self) {
        if let Err(e) = self.stop_and_join() {
            log::error!("API server: {e}");
        }
    }
}

/// Serves one connection on `stream` as the accept loop serves each
/// client (the router, the connection's bounds), until it ends; no socket
/// file, no connection cap. The fuzz target `http` serves raw request
/// bytes through it in-process.
#[doc(hidden)]
pub async fn serve_connection(
    stream: tokio::net::UnixStream,
    control: ControlSender,
    metrics: Arc<ApiMetrics>,
    options: ServerOptions,
) {
    let state = Arc::new(ServerState {
        control,
        metrics,
        options,
        waiters: Arc::new(Semaphore::new(options.max_waiters)),
    });
    // Never closing: the connection ends by itself.
    let (_closing, closing) = tokio::sync::watch::channel(false);
    connection::connection(stream, state, closing).await;
}

/// Serve the API on `socket_path` with default options.
pub fn start(
    socket_path: &Path,
    control: ControlSender,
    metrics: Arc<ApiMetrics>,
) -> Result<ApiServerHandle, ApiServerError> {
    start_with(socket_path, control, metrics, ServerOptions::default())
}

/// Serve the API on `socket_path`.
pub fn start_with(
    socket_path: &Path,
    control: ControlSender,
    metrics: Arc<ApiMetrics>,
    options: ServerOptions,
) -> Result<ApiServerHandle, ApiServerError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ApiServerError::Runtime)?;
    let (listener, socket) = socket::bind(socket_path)?;
    let listener = {
        let _entered = runtime.enter();
        listener
            .set_nonblocking(true)
            .and_then(|()| UnixListener::from_std(listener))
            .map_err(ApiServerError::Register)
    };
    let listener = match listener {
        Ok(listener) => listener,
        Err(e) => {
            socket.remove();
            return Err(e);
        }
    };
    let state = Arc::new(ServerState {
        control,
        metrics,
        options,
        waiters: Arc::new(Semaphore::new(options.max_waiters)),
    });
    let (stop, stopped) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("vmm_api".into())
        .spawn(move || {
            crate::seccomp::enter(crate::seccomp::ThreadClass::Api);
            runtime.block_on(connection::serve(listener, state, stopped))
        });
    let thread = match thread {
        Ok(thread) => thread,
        Err(e) => {
            socket.remove();
            return Err(ApiServerError::Spawn(e));
        }
    };
    log::info!("API listening on {}", socket.path().display());
    Ok(ApiServerHandle {
        stop: Some(stop),
        thread: Some(thread),
        socket,
    })
}
