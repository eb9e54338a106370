//! Accepting connections and serving each one within its bounds
//! ([`ServerOptions`](super::ServerOptions)).
//!
//! The accept loop never stops accepting: a connection beyond
//! `max_connections` is *refused*, i.e. answered `503` (the JSON error,
//! code `unavailable`, `Retry-After: 1`) and closed. A refusal reads the
//! client's request first (with hyper, for at most [`REFUSAL_TIME`]) so
//! that the client sees the answer rather than a broken pipe; at most
//! [`MAX_REFUSALS`] are in progress, and beyond those the answer is written
//! at once without reading anything.
//!
//! A served connection counts the time from its start, or from its
//! previous answer, for the request deadline (`request_timeout`: hyper's
//! header timeout, then the body deadline the router applies); it answers
//! at most `max_requests_per_connection` requests and starts none after
//! `max_connection_age`. Once it winds down (age, or the server shutting
//! down), an answer it cannot deliver within `request_timeout` of being
//! ready (a client that does not read) ends it.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::response::{self, Body};
use super::{router, ServerState};

/// How long a refused connection may take to send its request before it
/// is closed without the answer.
pub(super) const REFUSAL_TIME: Duration = Duration::from_secs(1);

/// Refusals in progress at once; more are answered without reading.
pub(super) const MAX_REFUSALS: usize = 64;

/// Accept until told to stop, then drain the connections (bounded).
pub(super) async fn serve(
    listener: UnixListener,
    state: Arc<ServerState>,
    mut stop: oneshot::Receiver<()>,
) {
    let (closing, closing_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut refusals = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // Count only connections still open.
                    while connections.try_join_next().is_some() {}
                    while refusals.try_join_next().is_some() {}
                    if connections.len() < state.options.max_connections {
                        connections.spawn(connection(stream, Arc::clone(&state), closing_rx.clone()));
                    } else {
                        state.metrics.count_refused_connection();
                        if refusals.len() < MAX_REFUSALS {
                            refusals.spawn(refuse(stream, Arc::clone(&state)));
                        } else {
                            refuse_at_once(&stream, &state);
                        }
                    }
                }
                Err(e) => {
                    // Out of descriptors, typically: back off instead of spinning.
                    log::warn!("API socket accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            Some(_) = refusals.join_next(), if !refusals.is_empty() => {}
        }
    }
    drop(listener);
    refusals.abort_all();
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

/// The `503` of a server at its connection limit.
fn at_capacity(state: &ServerState) -> Response<Body> {
    state.metrics.count(503);
    response::at_capacity(state.options.max_connections)
}

/// Answer a connection beyond the limit `503`: read its request (bounded
/// by [`REFUSAL_TIME`] and the request timeout), answer, close.
async fn refuse(stream: UnixStream, state: Arc<ServerState>) {
    let limit = state.options.request_timeout.min(REFUSAL_TIME);
    let service = service_fn(move |request: Request<Incoming>| {
        let state = Arc::clone(&state);
        async move {
            // Take in what a small body the client sends, so that closing
            // does not cut its write short (bounded by the outer timeout).
            let _ = http_body_util::Limited::new(request.into_body(), 64 * 1024)
                .collect()
                .await;
            Ok::<_, Infallible>(at_capacity(&state))
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limit)
        .keep_alive(false);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    if let Ok(Err(e)) = tokio::time::timeout(limit, conn).await {
        log::debug!("API refused connection ended: {e}");
    }
}

/// Answer `503` without reading: as much as the socket takes now, then
/// close.
fn refuse_at_once(stream: &UnixStream, state: &ServerState) {
    state.metrics.count(503);
    let bytes = response::at_capacity_raw(state.options.max_connections);
    let _ = stream.try_write(&bytes);
}

/// What one connection's requests share.
#[derive(Debug)]
struct ConnState {
    /// When the current request began: the connection's start, then each
    /// previous answer.
    reading_since: Mutex<Instant>,
    /// Requests answered or being answered.
    served: AtomicU32,
    /// Requests being answered now (0 or 1: HTTP/1 is sequential).
    busy: watch::Sender<usize>,
}

/// Decrements [`ConnState::busy`] when the request ends (or is dropped).
struct Busy<'a>(&'a watch::Sender<usize>);

impl<'a> Busy<'a> {
    fn new(busy: &'a watch::Sender<usize>) -> Self {
        busy.send_modify(|n| *n += 1);
        Self(busy)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl ConnState {
    /// Answer one request of this connection.
    async fn serve(&self, state: &ServerState, request: Request<Incoming>) -> Response<Body> {
        let _busy = Busy::new(&self.busy);
        let served = self
            .served
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let since = *self
            .reading_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let deadline = since + state.options.request_timeout;
        let mut response = router::handle(state, request, deadline).await;
        if served >= state.options.max_requests_per_connection {
            response::close_after(&mut response);
        }
        *self
            .reading_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        response
    }
}

/// Resolves once no request has been in progress for `quiet`.
async fn quiet_for(busy: &mut watch::Receiver<usize>, quiet: Duration) {
    loop {
        if busy.wait_for(|n| *n == 0).await.is_err() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(quiet) => return,
            changed = busy.changed() => if changed.is_err() { return },
        }
    }
}

/// Serve one connection until it closes, its bounds end it, or the server
/// shuts down.
pub(super) async fn connection(
    stream: UnixStream,
    state: Arc<ServerState>,
    mut closing: watch::Receiver<bool>,
) {
    let options = state.options;
    let (busy, mut busy_rx) = watch::channel(0);
    let shared = Arc::new(ConnState {
        reading_since: Mutex::new(Instant::now()),
        served: AtomicU32::new(0),
        busy,
    });
    let service = service_fn(move |request| {
        let (state, shared) = (Arc::clone(&state), Arc::clone(&shared));
        async move { Ok::<_, Infallible>(shared.serve(&state, request).await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(options.request_timeout);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let aged = tokio::time::sleep(options.max_connection_age);
    tokio::pin!(aged);
    let mut winding_down = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    log::debug!("API connection ended: {e}");
                }
                break;
            }
            _ = closing.wait_for(|c| *c), if !winding_down => {
                winding_down = true;
                conn.as_mut().graceful_shutdown();
            }
            () = &mut aged, if !winding_down => {
                winding_down = true;
                conn.as_mut().graceful_shutdown();
            }
            () = quiet_for(&mut busy_rx, options.request_timeout), if winding_down => {
                log::debug!("API connection closed: its answer was not taken in time");
                break;
            }
        }
    }
}
