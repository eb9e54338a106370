//! The API server through real HTTP over a real Unix socket, with the api
//! crate's client, against a fake VMM (`fake`): every status code, `?wait`,
//! idempotency, concurrency, the socket rules, the route table, the guest's
//! view and the test hooks, the server's bounds (connections, deadlines,
//! waiters, connection lifetime), `vmmctl`'s output (guest text escaped),
//! and schemathesis against `api/openapi.yaml`.

mod bounds;
mod concurrency;
mod errors;
mod fake;
mod guest;
mod mutations;
mod raw;
mod routes;
mod schemathesis;
mod socket;
mod vmmctl;

use api::client::RawResponse;
use api::{ErrorBody, ErrorCode};

/// The error code of an error answer, checking the body's shape and type.
pub fn error_code(response: &RawResponse) -> ErrorCode {
    assert_eq!(
        response.header("content-type"),
        Some("application/json"),
        "{}",
        response.text()
    );
    let value: serde_json::Value = response.json().unwrap();
    let error = value["error"].as_object().expect("an error object");
    assert_eq!(error.len(), 2, "{value}");
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    let body: ErrorBody = response.json().unwrap();
    assert_eq!(body.error.code.status(), response.status, "{value}");
    body.error.code
}
