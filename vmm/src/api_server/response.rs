//! Building responses: JSON bodies, error bodies, Prometheus text, and the
//! answer to a mutation (which may wait for the guest).

use std::time::Duration;

use api::{ApiError, ErrorBody, ErrorCode, Operation};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE, LOCATION};
use hyper::{Response, StatusCode};
use serde::Serialize;

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

/// The answer to a mutation: `200` unchanged, `202` started, or with
/// `wait`: `200` once finished (either way) or `504` with the operation
/// as it is when the wait runs out.
pub(super) async fn mutation(mutation: Mutation, wait: Option<Duration>) -> Response<Body> {
    let (first, mut progress) = match mutation {
        Mutation::Unchanged(op) => return operation(200, &op),
        Mutation::Started {
            operation,
            progress,
        } => (operation, progress),
    };
    let Some(wait) = wait else {
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
    use api::{OperationKind, OperationStatus};
    use http_body_util::BodyExt;
    use tokio::sync::watch;

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

    #[tokio::test]
    async fn wait_outcomes() {
        let (tx, rx) = watch::channel(op(OperationStatus::Running));
        let started = || Mutation::Started {
            operation: op(OperationStatus::Running),
            progress: rx.clone(),
        };
        let response = mutation(started(), None).await;
        assert_eq!(response.status(), 202);
        assert_eq!(response.headers()[LOCATION], "/api/v1/operations/5");

        let response = mutation(started(), Some(Duration::from_millis(10))).await;
        assert_eq!(response.status(), 504);
        assert_eq!(body(response).await.status, OperationStatus::Running);

        tx.send_modify(|o| o.status = OperationStatus::Failed);
        let response = mutation(started(), Some(Duration::from_secs(5))).await;
        assert_eq!(response.status(), 200);
        assert_eq!(body(response).await.status, OperationStatus::Failed);

        // Finished, then the sender went away: still truthful.
        drop(tx);
        let response = mutation(started(), Some(Duration::from_secs(5))).await;
        assert_eq!(response.status(), 200);

        let (tx, rx) = watch::channel(op(OperationStatus::Running));
        drop(tx);
        let response = mutation(
            Mutation::Started {
                operation: op(OperationStatus::Running),
                progress: rx,
            },
            Some(Duration::from_secs(5)),
        )
        .await;
        assert_eq!(response.status(), 503);
    }

    #[test]
    fn allow_header() {
        let e = ApiError::new(ErrorCode::MethodNotAllowed, "no");
        let response = not_allowed(&e, &["GET", "PUT"]);
        assert_eq!(response.status(), 405);
        assert_eq!(response.headers()[ALLOW], "GET, PUT");
    }
}
