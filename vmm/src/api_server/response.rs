//! Building responses: JSON bodies, error bodies, Prometheus text, the
//! answer to a mutation (which may wait for the guest), and the `503` of a
//! server at its connection limit.

use std::time::Duration;

use api::{ApiError, ErrorBody, ErrorCode, Operation};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use hyper::{Response, StatusCode};
use serde::Serialize;
use tokio::sync::OwnedSemaphorePermit;

use crate::control::Mutation;

/// The body type of every response.
pub(super) type Body = Full<Bytes>;

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// `value` as JSON with `code`.
pub(super) fn json<T: Serialize>(code: u16, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(bytes) => with_body(code, "application/json", bytes),
        Err(e) => error(&ApiError::new(
            ErrorCode::Internal,
            format!("cannot encode the answer: {e}"),
        )),
    }
}

/// `text` with `code` and `content_type`.
pub(super) fn with_body(code: u16, content_type: &'static str, bytes: Vec<u8>) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status(code);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// The error body, with the status its code maps to.
pub(super) fn error(error: &ApiError) -> Response<Body> {
    json(error.status(), &ErrorBody::from(error.clone()))
}

/// Mark `response` as the connection's last: hyper closes it once sent.
pub(super) fn close_after(response: &mut Response<Body>) {
    response
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
}

/// The error of a server at its connection limit.
fn at_capacity_error(max_connections: usize) -> ApiError {
    ApiError::new(
        ErrorCode::Unavailable,
        format!(
            "the API server is at its connection limit ({max_connections} connections); \
             try again shortly"
        ),
    )
}

/// `503` for a connection beyond the limit: closes, `Retry-After: 1`.
pub(super) fn at_capacity(max_connections: usize) -> Response<Body> {
    let mut response = error(&at_capacity_error(max_connections));
    close_after(&mut response);
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// [`at_capacity`] as the bytes of a whole HTTP/1.1 answer, for writing
/// without hyper.
pub(super) fn at_capacity_raw(max_connections: usize) -> Vec<u8> {
    let body = serde_json::to_vec(&ErrorBody::from(at_capacity_error(max_connections)))
        .unwrap_or_default();
    let mut bytes = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(&body);
    bytes
}

/// `405` with an `Allow` header.
pub(super) fn not_allowed(error: &ApiError, allow: &[&str]) -> Response<Body> {
    let mut response = self::error(error);
    if let Ok(value) = HeaderValue::from_str(&allow.join(", ")) {
        response.headers_mut().insert(ALLOW, value);
    }
    response
}

/// An operation with `code`; `202` also points at it with `Location`.
fn operation(code: u16, op: &Operation) -> Response<Body> {
    let mut response = json(code, op);
    if code == 202 {
        if let Ok(value) = HeaderValue::from_str(&api::routes::operation(op.id)) {
            response.headers_mut().insert(LOCATION, value);
        }
    }
    response
}

/// Whether a mutation's answer waits for its operation.
#[derive(Debug)]
pub(super) enum Wait {
    /// No `?wait`, or one beyond the waiter limit: answer at once.
    No,
    /// Wait this long, holding one of the waiter permits meanwhile.
    For(Duration, OwnedSemaphorePermit),
}

/// The answer to a mutation: `200` unchanged, `202` started, or with
/// `wait`: `200` once finished (either way) or `504` with the operation
/// as it is when the wait runs out.
pub(super) async fn mutation(mutation: Mutation, wait: Wait) -> Response<Body> {
    let (first, mut progress) = match mutation {
        Mutation::Unchanged(op) => return operation(200, &op),
        Mutation::Started {
            operation,
            progress,
        } => (operation, progress),
    };
    let Wait::For(wait, _permit) = wait else {
        // The latest state, which may already be newer than `first`.
        let latest = progress.borrow().clone();
        let op = if latest.id == first.id { latest } else { first };
        return operation(202, &op);
    };
    let waited = tokio::time::timeout(wait, async {
        progress
            .wait_for(|op| op.status.is_finished())
            .await
            .map(|op| op.clone())
    })
    .await;
    match waited {
        Ok(Ok(done)) => operation(200, &done),
        Err(_elapsed) => {
            let now = progress.borrow().clone();
            operation(504, &now)
        }
        Ok(Err(_closed)) => {
            let last = progress.borrow().clone();
            if last.status.is_finished() {
                operation(200, &last)
            } else {
                error(&ApiError::new(
                    ErrorCode::Unavailable,
                    format!("the VMM stopped tracking operation {}", last.id),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use api::{OperationKind, OperationStatus};
    use http_body_util::BodyExt;
    use tokio::sync::{watch, Semaphore};

    use super::*;

    fn op(status: OperationStatus) -> Operation {
        Operation {
            id: 5,
            kind: OperationKind::Add,
            desired: None,
            vcpus: vec![1],
            status,
            reason: None,
            started_unix_ms: 1,
            duration_ms: None,
        }
    }

    async fn body(response: Response<Body>) -> Operation {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    fn wait(d: Duration) -> Wait {
        let permits = Arc::new(Semaphore::new(1));
        Wait::For(d, permits.try_acquire_owned().unwrap())
    }

    #[tokio::test]
    async fn wait_outcomes() {
        let (tx, rx) = watch::channel(op(OperationStatus::Running));
        let started = || Mutation::Started {
            operation: op(OperationStatus::Running),
            progress: rx.clone(),
        };
        let response = mutation(started(), Wait::No).await;
        assert_eq!(response.status(), 202);
        assert_eq!(response.headers()[LOCATION], "/api/v1/operations/5");

        let response = mutation(started(), wait(Duration::from_millis(10))).await;
        assert_eq!(response.status(), 504);
        assert_eq!(body(response).await.status, OperationStatus::Running);

        tx.send_modify(|o| o.status = OperationStatus::Failed);
        let response = mutation(started(), wait(Duration::from_secs(5))).await;
        assert_eq!(response.status(), 200);
        assert_eq!(body(response).await.status, OperationStatus::Failed);

        // Finished, then the sender went away: still truthful.
        drop(tx);
        let response = mutation(started(), wait(Duration::from_secs(5))).await;
        assert_eq!(response.status(), 200);

        let (tx, rx) = watch::channel(op(OperationStatus::Running));
        drop(tx);
        let response = mutation(
            Mutation::Started {
                operation: op(OperationStatus::Running),
                progress: rx,
            },
            wait(Duration::from_secs(5)),
        )
        .await;
        assert_eq!(response.status(), 503);
    }

    #[tokio::test]
    async fn at_capacity_answers() {
        let response = at_capacity(64);
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()[CONNECTION], "close");
        assert_eq!(response.headers()[RETRY_AFTER], "1");
        let raw = String::from_utf8(at_capacity_raw(64)).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let parsed: ErrorBody = serde_json::from_str(body).unwrap();
        assert_eq!(parsed.error.code, ErrorCode::Unavailable);
        assert!(parsed.error.message.contains("connection limit"));
    }

    #[test]
    fn allow_header() {
        let e = ApiError::new(ErrorCode::MethodNotAllowed, "no");
        let response = not_allowed(&e, &["GET", "PUT"]);
        assert_eq!(response.status(), 405);
        assert_eq!(response.headers()[ALLOW], "GET, PUT");
    }
}
