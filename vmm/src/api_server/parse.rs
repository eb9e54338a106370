//! What every request has in common before a resource looks at it: the
//! query (only `wait`), the body (capped, JSON only, read by a deadline)
//! and the errors that parsing can give.

use std::time::Duration;

use api::routes::{MAX_BODY_BYTES, MAX_WAIT_SECONDS};
use api::{ApiError, ErrorCode};
use http_body_util::BodyExt;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderMap, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::Method;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::control::Action;

/// Why a request was refused before reaching the VMM.
#[derive(Debug, thiserror::Error)]
pub(super) enum RequestError {
    /// No such path.
    #[error("no such path: {0}")]
    UnknownPath(String),
    /// The path does not take this method.
    #[error("{method} is not allowed here; allowed: {}", allow.join(", "))]
    MethodNotAllowed {
        /// The method used.
        method: Method,
        /// The methods the path takes.
        allow: &'static [&'static str],
    },
    /// The body is over the cap.
    #[error("the body is larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    /// The body is not JSON.
    #[error("the body must be application/json, not {0}")]
    UnsupportedMediaType(String),
    /// The body could not be read.
    #[error("the body could not be read")]
    ReadBody,
    /// The body did not arrive by the request deadline.
    #[error("the request was not received within {} s", .0.as_secs_f64())]
    Timeout(Duration),
    /// The body is not the expected JSON.
    #[error("invalid body: {0}")]
    InvalidJson(serde_json::Error),
    /// A body is required.
    #[error("a JSON body is required")]
    MissingBody,
    /// A body was sent where none is taken.
    #[error("this request takes no body")]
    UnexpectedBody,
    /// A query parameter is unknown or malformed.
    #[error("{0}")]
    InvalidQuery(String),
    /// A path id is not a number.
    #[error("invalid {what} id `{id}`: expected a non-negative integer")]
    InvalidId {
        /// `vCPU` or `operation`.
        what: &'static str,
        /// What was given.
        id: String,
    },
}

impl RequestError {
    /// The API error sent for this.
    pub(super) fn to_api_error(&self) -> ApiError {
        let code = match self {
            Self::UnknownPath(_) => ErrorCode::NotFound,
            Self::MethodNotAllowed { .. } => ErrorCode::MethodNotAllowed,
            Self::TooLarge => ErrorCode::PayloadTooLarge,
            Self::UnsupportedMediaType(_) => ErrorCode::UnsupportedMediaType,
            Self::Timeout(_) => ErrorCode::RequestTimeout,
            Self::ReadBody
            | Self::InvalidJson(_)
            | Self::MissingBody
            | Self::UnexpectedBody
            | Self::InvalidQuery(_)
            | Self::InvalidId { .. } => ErrorCode::MalformedRequest,
        };
        ApiError::new(code, self.to_string())
    }
}

/// A request turned into a control action.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Parsed {
    /// What to ask the VMM.
    pub action: Action,
    /// For mutations: how long to wait for the guest.
    pub wait: Option<Duration>,
}

impl Parsed {
    /// `action`, not waiting.
    pub(super) fn new(action: Action) -> Self {
        Self { action, wait: None }
    }
}

/// The parts of a request a resource parser looks at.
#[derive(Debug, Clone, Default)]
pub(super) struct RequestParts {
    /// The raw query string, if any.
    pub query: Option<String>,
    /// The `Content-Type` header, if any.
    pub content_type: Option<String>,
    /// The whole body.
    pub body: Bytes,
}

impl RequestParts {
    /// Refuse any query parameter.
    pub(super) fn no_query(&self) -> Result<(), RequestError> {
        match self.query.as_deref() {
            None | Some("") => Ok(()),
            Some(q) => Err(RequestError::InvalidQuery(format!(
                "unexpected query `{q}`: this request takes no parameters"
            ))),
        }
    }

    /// The `wait` parameter in seconds (0 to [`MAX_WAIT_SECONDS`]); refuse
    /// anything else.
    pub(super) fn wait(&self) -> Result<Option<Duration>, RequestError> {
        let mut wait = None;
        for pair in self.query.as_deref().unwrap_or("").split('&') {
            if pair.is_empty() {
                continue;
            }
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if key != "wait" {
                return Err(RequestError::InvalidQuery(format!(
                    "unknown query parameter `{key}`: only `wait` is accepted"
                )));
            }
            if wait.is_some() {
                return Err(RequestError::InvalidQuery("`wait` given twice".into()));
            }
            let seconds = value
                .parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && (0.0..=MAX_WAIT_SECONDS).contains(s))
                .ok_or_else(|| {
                    RequestError::InvalidQuery(format!(
                        "invalid wait `{value}`: expected seconds from 0 to {MAX_WAIT_SECONDS}"
                    ))
                })?;
            wait = Some(Duration::from_secs_f64(seconds));
        }
        Ok(wait)
    }

    /// Refuse a non-empty body.
    pub(super) fn no_body(&self) -> Result<(), RequestError> {
        if self.body.is_empty() {
            Ok(())
        } else {
            Err(RequestError::UnexpectedBody)
        }
    }

    /// The body as JSON of type `T` (unknown fields are refused by `T`).
    pub(super) fn json<T: DeserializeOwned>(&self) -> Result<T, RequestError> {
        if let Some(content_type) = &self.content_type {
            let media = content_type.split(';').next().unwrap_or("").trim();
            if !media.eq_ignore_ascii_case("application/json") {
                return Err(RequestError::UnsupportedMediaType(content_type.clone()));
            }
        }
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Err(RequestError::MissingBody);
        }
        serde_json::from_slice(&self.body).map_err(RequestError::InvalidJson)
    }
}

/// Parse a path id.
pub(super) fn id<T: std::str::FromStr>(what: &'static str, text: &str) -> Result<T, RequestError> {
    // `FromStr` for integers accepts a leading `+`; the API does not.
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(id) = text.parse() {
            return Ok(id);
        }
    }
    Err(RequestError::InvalidId {
        what,
        id: text.to_owned(),
    })
}

/// How much of an over-cap body is read and thrown away before answering
/// 413, so that a client still writing it sees the answer rather than a
/// broken pipe. Bigger bodies are cut off (the connection closes).
const DRAIN_BYTES: u64 = 1 << 20;

/// How long draining an over-cap body may take.
const DRAIN_TIME: Duration = Duration::from_secs(1);

/// Read the whole body by `deadline`, refusing more than
/// [`MAX_BODY_BYTES`]; `timeout` is what the deadline allowed in all (for
/// the message). A body over the cap is answered `413` whatever the
/// deadline (what is drained of it is bounded apart).
pub(super) async fn read_body(
    headers: &HeaderMap,
    body: Incoming,
    deadline: Instant,
    timeout: Duration,
) -> Result<Bytes, RequestError> {
    match tokio::time::timeout_at(deadline, read_capped(headers, body)).await {
        Err(_elapsed) => Err(RequestError::Timeout(timeout)),
        Ok(Err(e)) => Err(e),
        Ok(Ok(Capped::Whole(bytes))) => Ok(bytes),
        Ok(Ok(Capped::Over(body, seen))) => {
            if let Some(body) = body {
                drain(body, seen).await;
            }
            Err(RequestError::TooLarge)
        }
    }
}

/// A body read up to the cap.
enum Capped {
    /// All of it.
    Whole(Bytes),
    /// Over the cap: the rest to drain (none if it is too big to bother),
    /// and how much was seen.
    Over(Option<Incoming>, u64),
}

/// Read the whole body, stopping at [`MAX_BODY_BYTES`].
async fn read_capped(headers: &HeaderMap, mut body: Incoming) -> Result<Capped, RequestError> {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let cap = MAX_BODY_BYTES as u64;
    if let Some(declared) = declared.filter(|n| *n > cap) {
        return Ok(Capped::Over((declared <= DRAIN_BYTES).then_some(body), 0));
    }
    let mut data = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| RequestError::ReadBody)?;
        if let Ok(chunk) = frame.into_data() {
            data.extend_from_slice(&chunk);
            if data.len() > MAX_BODY_BYTES {
                return Ok(Capped::Over(Some(body), data.len() as u64));
            }
        }
    }
    Ok(Capped::Whole(Bytes::from(data)))
}

/// Read and discard the rest of `body`, up to [`DRAIN_BYTES`] in all and
/// [`DRAIN_TIME`].
async fn drain(mut body: Incoming, mut seen: u64) {
    let reading = async {
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(chunk) = frame.into_data() {
                seen += chunk.len() as u64;
                if seen > DRAIN_BYTES {
                    break;
                }
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, reading).await;
}

/// Read and discard a body the request is refused with anyway: wholly
/// when within [`MAX_BODY_BYTES`], else up to [`DRAIN_BYTES`]; at most
/// [`DRAIN_TIME`] in all, and not past `deadline`.
pub(super) async fn discard_body(headers: &HeaderMap, body: Incoming, deadline: Instant) {
    let deadline = deadline.min(Instant::now() + DRAIN_TIME);
    let discard = async {
        if let Ok(Capped::Over(Some(body), seen)) = read_capped(headers, body).await {
            drain(body, seen).await;
        }
    };
    let _ = tokio::time::timeout_at(deadline, discard).await;
}

/// The `Content-Type` header as text (lossy when not visible ASCII).
pub(super) fn content_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_query(q: &str) -> RequestParts {
        RequestParts {
            query: Some(q.to_owned()),
            ..Default::default()
        }
    }

    #[test]
    fn wait_values() {
        assert_eq!(
            with_query("wait=2").wait().unwrap(),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            with_query("wait=0.25").wait().unwrap(),
            Some(Duration::from_millis(250))
        );
        assert_eq!(with_query("").wait().unwrap(), None);
        assert_eq!(RequestParts::default().wait().unwrap(), None);
        for bad in [
            "wait=",
            "wait=-1",
            "wait=abc",
            "wait=NaN",
            "wait=inf",
            "wait=3601",
            "wait=1&wait=2",
            "other=1",
            "wait",
        ] {
            assert!(with_query(bad).wait().is_err(), "{bad}");
        }
        assert!(with_query("x=1").no_query().is_err());
        assert!(with_query("").no_query().is_ok());
    }

    #[test]
    fn json_body_rules() {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Body {
            n: u32,
        }
        let parts = |ct: Option<&str>, body: &'static str| RequestParts {
            query: None,
            content_type: ct.map(str::to_owned),
            body: Bytes::from_static(body.as_bytes()),
        };
        assert!(parts(Some("application/json"), r#"{"n":1}"#)
            .json::<Body>()
            .is_ok());
        assert!(parts(Some("Application/JSON; charset=utf-8"), r#"{"n":1}"#)
            .json::<Body>()
            .is_ok());
        assert!(parts(None, r#"{"n":1}"#).json::<Body>().is_ok());
        let code = |e: RequestError| e.to_api_error().code;
        assert_eq!(
            code(
                parts(Some("text/plain"), r#"{"n":1}"#)
                    .json::<Body>()
                    .unwrap_err()
            ),
            ErrorCode::UnsupportedMediaType
        );
        for bad in ["", "  ", "{", r#"{"n":"1"}"#, r#"{"n":1,"m":2}"#] {
            assert_eq!(
                code(parts(None, bad).json::<Body>().unwrap_err()),
                ErrorCode::MalformedRequest,
                "{bad}"
            );
        }
        assert!(parts(None, "x").no_body().is_err());
        assert!(parts(None, "").no_body().is_ok());
    }

    #[test]
    fn ids() {
        assert_eq!(id::<u32>("vCPU", "7").unwrap(), 7);
        for bad in ["", "+7", "-1", "a", "4294967296", "1.0", " 1"] {
            assert!(id::<u32>("vCPU", bad).is_err(), "{bad}");
        }
        assert_eq!(id::<u64>("operation", "4294967296").unwrap(), 4_294_967_296);
    }
}
