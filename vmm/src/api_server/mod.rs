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
//! # Layout
//! `router` matches paths and methods; `vm`, `vcpus`, `operations`,
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

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

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

/// Tunables; [`ServerOptions::default`] is what [`start`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerOptions {
    /// How long to wait for the VMM thread's reply before answering 503.
    pub reply_timeout: Duration,
    /// How long a client may take to send its request headers.
    pub header_timeout: Duration,
    /// Connections served at once; more wait to be accepted.
    pub max_connections: usize,
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
            header_timeout: Duration::from_secs(10),
            max_connections: 64,
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
    });
    let (stop, stopped) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("vmm_api".into())
        .spawn(move || {
            crate::seccomp::enter(crate::seccomp::ThreadClass::Api);
            runtime.block_on(serve(listener, state, stopped))
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

/// Accept until told to stop, then drain the connections (bounded).
async fn serve(listener: UnixListener, state: Arc<ServerState>, mut stop: oneshot::Receiver<()>) {
    let (closing, closing_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    loop {
        let room = connections.len() < state.options.max_connections;
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept(), if room => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(connection(stream, Arc::clone(&state), closing_rx.clone()));
                }
                Err(e) => {
                    // Out of descriptors, typically: back off instead of spinning.
                    log::warn!("API socket accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let _ = closing.send(true);
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(state.options.grace, drained)
        .await
        .is_err()
    {
        log::warn!("API shutdown: aborting {} connection(s)", connections.len());
        connections.abort_all();
    }
}

/// Serve one connection until it closes or the server shuts down.
async fn connection(
    stream: UnixStream,
    state: Arc<ServerState>,
    mut closing: watch::Receiver<bool>,
) {
    let header_timeout = state.options.header_timeout;
    let service = service_fn(move |request| {
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(router::handle(&state, request).await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut shutting_down = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    log::debug!("API connection ended: {e}");
                }
                break;
            }
            _ = closing.wait_for(|c| *c), if !shutting_down => {
                shutting_down = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}
