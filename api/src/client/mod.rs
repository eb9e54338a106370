//! An async client for the API over its Unix socket (hyper 1 on tokio),
//! and [`BlockingClient`], the same with its own runtime, for the CLI and
//! for tests that are not async.
//!
//! Each call opens one connection, sends one request and reads the whole
//! answer; the API is small and local, so there is no pool.
//!
//! A mutation with a wait that the server answers `202` (it already had as
//! many requests waiting as it allows) is waited for here instead, by
//! polling the operation every [`POLL_INTERVAL`] until it finishes or the
//! wait runs out: the caller sees the same outcomes either way.

mod blocking;

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{HeaderMap, CONTENT_TYPE, HOST};
use hyper::Method;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use crate::{
    routes, ApiError, ErrorBody, FaultInjected, FaultKind, FaultRequest, GuestWorkers, Operation,
    ResizeRequest, VcpuList, VmInfo,
};

pub use blocking::BlockingClient;

/// How long a call may take beyond its `?wait`, by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How often an operation is polled when the server did not take on a wait.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nobody answers on the socket.
    #[error("cannot connect to {}", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange broke off.
    #[error("HTTP exchange failed")]
    Http(#[source] hyper::Error),
    /// The request could not be built (a bad path).
    #[error("invalid request")]
    Request(#[source] hyper::http::Error),
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The server refused the request.
    #[error("{} ({}, HTTP {status})", error.message, error.code)]
    Api {
        /// HTTP status.
        status: u16,
        /// The server's error.
        error: ApiError,
    },
    /// `?wait` ran out (HTTP 504); the operation is still running.
    #[error("operation {} still {} when the wait ran out", .0.id, .0.status)]
    WaitTimedOut(Operation),
    /// An answer this client does not understand.
    #[error("unexpected answer (HTTP {status}): {body}")]
    Unexpected {
        /// HTTP status.
        status: u16,
        /// The body, as text.
        body: String,
    },
    /// A body that does not match the expected type.
    #[error("invalid JSON in the answer")]
    Decode(#[source] serde_json::Error),
    /// The blocking client could not start its runtime.
    #[error("cannot start the client runtime")]
    Runtime(#[source] std::io::Error),
}

/// A whole HTTP answer.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// HTTP status.
    pub status: u16,
    /// Headers.
    pub headers: HeaderMap,
    /// Body bytes.
    pub body: Bytes,
}

impl RawResponse {
    /// The body decoded as `T`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ClientError> {
        serde_json::from_slice(&self.body).map_err(ClientError::Decode)
    }

    /// A header as text, if present and valid.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// `Ok(T)` on a 2xx answer, the server's error otherwise.
    fn into_result<T: DeserializeOwned>(self) -> Result<T, ClientError> {
        if (200..300).contains(&self.status) {
            self.json()
        } else {
            Err(self.into_error())
        }
    }

    fn into_error(self) -> ClientError {
        match serde_json::from_slice::<ErrorBody>(&self.body) {
            Ok(body) => ClientError::Api {
                status: self.status,
                error: body.error,
            },
            Err(_) => ClientError::Unexpected {
                status: self.status,
                body: self.text(),
            },
        }
    }
}

/// What a mutation (resize, add, remove) led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MutationOutcome {
    /// `200`: nothing had to change.
    Unchanged(Operation),
    /// `202`: the VMM started it; poll [`Client::operation`] or pass a wait.
    Accepted(Operation),
    /// `200` after `?wait`: it finished, successfully or not (check
    /// `status`).
    Finished(Operation),
}

impl MutationOutcome {
    /// The operation, whatever happened.
    pub fn operation(&self) -> &Operation {
        match self {
            Self::Unchanged(op) | Self::Accepted(op) | Self::Finished(op) => op,
        }
    }
}

/// Async client for one API socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    /// A client for the API served at `socket_path`.
    pub fn new(socket_path: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket_path.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Set how long a call may take beyond its `?wait`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The socket path.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// `GET /api/v1/vm`.
    pub async fn vm(&self) -> Result<VmInfo, ClientError> {
        self.get(routes::VM).await?.into_result()
    }

    /// `GET /api/v1/vcpus`.
    pub async fn vcpus(&self) -> Result<VcpuList, ClientError> {
        self.get(routes::VCPUS).await?.into_result()
    }

    /// `PUT /api/v1/vcpus` with `{"desired": desired}`.
    pub async fn resize(
        &self,
        desired: u32,
        wait: Option<Duration>,
    ) -> Result<MutationOutcome, ClientError> {
        let body = serde_json::to_vec(&ResizeRequest { desired }).map_err(ClientError::Decode)?;
        self.mutate(Method::PUT, routes::VCPUS, wait, Some(body))
            .await
    }

    /// `PUT /api/v1/vcpus/{id}`: hot-add one vCPU.
    pub async fn add_vcpu(
        &self,
        id: u32,
        wait: Option<Duration>,
    ) -> Result<MutationOutcome, ClientError> {
        self.mutate(Method::PUT, &routes::vcpu(id), wait, None)
            .await
    }

    /// `DELETE /api/v1/vcpus/{id}`: hot-remove one vCPU.
    pub async fn remove_vcpu(
        &self,
        id: u32,
        wait: Option<Duration>,
    ) -> Result<MutationOutcome, ClientError> {
        self.mutate(Method::DELETE, &routes::vcpu(id), wait, None)
            .await
    }

    /// `GET /api/v1/operations/{id}`.
    pub async fn operation(&self, id: u64) -> Result<Operation, ClientError> {
        self.get(&routes::operation(id)).await?.into_result()
    }

    /// `GET /api/v1/metrics`, as Prometheus text.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let response = self.get(routes::METRICS).await?;
        if response.status == 200 {
            Ok(response.text())
        } else {
            Err(response.into_error())
        }
    }

    /// `GET /api/v1/guest/workers`.
    pub async fn guest_workers(&self) -> Result<GuestWorkers, ClientError> {
        self.get(routes::GUEST_WORKERS).await?.into_result()
    }

    /// `POST /api/v1/test/faults` (test hook: a VMM without `--test-hooks`
    /// answers `404`).
    pub async fn inject_fault(
        &self,
        fault: FaultKind,
        cpu: Option<u32>,
    ) -> Result<FaultInjected, ClientError> {
        let body = serde_json::to_vec(&FaultRequest { fault, cpu }).map_err(ClientError::Decode)?;
        self.request(
            Method::POST,
            routes::TEST_FAULTS,
            Some(("application/json", body)),
        )
        .await?
        .into_result()
    }

    /// Send any request and return the whole answer, whatever its status.
    /// `body` is `(content type, bytes)`.
    pub async fn request(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<RawResponse, ClientError> {
        self.request_within(method, path_and_query, body, self.timeout)
            .await
    }

    async fn get(&self, path: &str) -> Result<RawResponse, ClientError> {
        self.request(Method::GET, path, None).await
    }

    async fn mutate(
        &self,
        method: Method,
        path: &str,
        wait: Option<Duration>,
        body: Option<Vec<u8>>,
    ) -> Result<MutationOutcome, ClientError> {
        let started = tokio::time::Instant::now();
        let (path, limit) = match wait {
            Some(wait) => (
                format!("{path}?wait={}", wait.as_secs_f64()),
                self.timeout.saturating_add(wait),
            ),
            None => (path.to_owned(), self.timeout),
        };
        let body = body.map(|b| ("application/json", b));
        let response = self.request_within(method, &path, body, limit).await?;
        match response.status {
            202 => {
                let op: Operation = response.json()?;
                match wait {
                    // The server had too many requests waiting: wait here.
                    Some(wait) => self.poll_until(op, started + wait).await,
                    None => Ok(MutationOutcome::Accepted(op)),
                }
            }
            200 => {
                let op: Operation = response.json()?;
                if op.is_noop() {
                    Ok(MutationOutcome::Unchanged(op))
                } else {
                    Ok(MutationOutcome::Finished(op))
                }
            }
            504 => match response.json::<Operation>() {
                Ok(op) => Err(ClientError::WaitTimedOut(op)),
                Err(_) => Err(response.into_error()),
            },
            _ => Err(response.into_error()),
        }
    }

    /// Poll `op` until it finishes (`Finished`) or `deadline` passes
    /// (`WaitTimedOut`).
    async fn poll_until(
        &self,
        mut op: Operation,
        deadline: tokio::time::Instant,
    ) -> Result<MutationOutcome, ClientError> {
        loop {
            if op.status.is_finished() {
                return Ok(MutationOutcome::Finished(op));
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(ClientError::WaitTimedOut(op));
            }
            tokio::time::sleep(POLL_INTERVAL.min(deadline - now)).await;
            op = self.operation(op.id).await?;
        }
    }

    async fn request_within(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<(&str, Vec<u8>)>,
        limit: Duration,
    ) -> Result<RawResponse, ClientError> {
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(HOST, "localhost");
        let bytes = match body {
            Some((content_type, bytes)) => {
                builder = builder.header(CONTENT_TYPE, content_type);
                Bytes::from(bytes)
            }
            None => Bytes::new(),
        };
        let request = builder
            .body(Full::new(bytes))
            .map_err(ClientError::Request)?;
        tokio::time::timeout(limit, self.exchange(request))
            .await
            .map_err(|_| ClientError::Timeout(limit))?
    }

    async fn exchange(
        &self,
        request: hyper::Request<Full<Bytes>>,
    ) -> Result<RawResponse, ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect {
                path: self.socket.clone(),
                source,
            })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(ClientError::Http)?;
        // The exchange owns the sender and drops it when done, which lets the
        // connection future finish; both are driven together.
        let exchange = async move {
            let response = sender.send_request(request).await?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, hyper::Error>(RawResponse {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
            })
        };
        let (result, _) = tokio::join!(exchange, connection);
        result.map_err(ClientError::Http)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;

    fn raw(status: u16, body: &str) -> RawResponse {
        RawResponse {
            status,
            headers: HeaderMap::new(),
            body: Bytes::from(body.to_owned()),
        }
    }

    #[test]
    fn error_bodies_become_api_errors() {
        let err = raw(409, r#"{"error":{"code":"conflict","message":"busy"}}"#).into_error();
        match err {
            ClientError::Api { status, error } => {
                assert_eq!(status, 409);
                assert_eq!(error.code, ErrorCode::Conflict);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            raw(502, "oops").into_error(),
            ClientError::Unexpected { status: 502, .. }
        ));
    }

    #[tokio::test]
    async fn connect_error_names_the_socket() {
        let client = Client::new("/nonexistent/vmm.sock");
        let err = client.vm().await.unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmm.sock"), "{err}");
    }
}
