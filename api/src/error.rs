//! The error body every failed request answers with:
//! `{"error": {"code": "...", "message": "..."}}`.

use serde::{Deserialize, Serialize};

/// Machine-readable error codes. Each maps to exactly one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the body is not valid JSON, has wrong types or unknown fields,
    /// or a path or query value is malformed.
    MalformedRequest,
    /// 404: no such path.
    NotFound,
    /// 404: the vCPU id is beyond the VM's maximum.
    VcpuNotFound,
    /// 404: no such operation (never existed or forgotten).
    OperationNotFound,
    /// 405: the path exists but not with this method.
    MethodNotAllowed,
    /// 408: the request (headers and body) was not received within the
    /// server's request timeout; the connection is closed.
    RequestTimeout,
    /// 409: vCPU 0 cannot be removed.
    Vcpu0NotRemovable,
    /// 409: a conflicting operation on the same vCPU is in flight.
    Conflict,
    /// 409: the request needs the guest agent and none is connected.
    AgentUnavailable,
    /// 413: the body is larger than the server accepts.
    PayloadTooLarge,
    /// 415: the body is not `application/json`.
    UnsupportedMediaType,
    /// 422: the requested vCPU count is 0 or above the maximum.
    InvalidVcpuCount,
    /// 500: the VMM failed in a way the client cannot fix.
    Internal,
    /// 503: the VMM is not answering (shutting down or stuck), or the API
    /// server is at its connection limit.
    Unavailable,
    /// A code this client does not know (sent by a newer server).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// Every code a server sends (all but [`ErrorCode::Unknown`]).
    pub const ALL: [ErrorCode; 14] = [
        Self::MalformedRequest,
        Self::NotFound,
        Self::VcpuNotFound,
        Self::OperationNotFound,
        Self::MethodNotAllowed,
        Self::RequestTimeout,
        Self::Vcpu0NotRemovable,
        Self::Conflict,
        Self::AgentUnavailable,
        Self::PayloadTooLarge,
        Self::UnsupportedMediaType,
        Self::InvalidVcpuCount,
        Self::Internal,
        Self::Unavailable,
    ];

    /// The HTTP status this code is sent with.
    pub fn status(self) -> u16 {
        match self {
            Self::MalformedRequest => 400,
            Self::NotFound | Self::VcpuNotFound | Self::OperationNotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::RequestTimeout => 408,
            Self::Vcpu0NotRemovable | Self::Conflict | Self::AgentUnavailable => 409,
            Self::PayloadTooLarge => 413,
            Self::UnsupportedMediaType => 415,
            Self::InvalidVcpuCount => 422,
            Self::Internal | Self::Unknown => 500,
            Self::Unavailable => 503,
        }
    }

    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MalformedRequest => "malformed_request",
            Self::NotFound => "not_found",
            Self::VcpuNotFound => "vcpu_not_found",
            Self::OperationNotFound => "operation_not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::RequestTimeout => "request_timeout",
            Self::Vcpu0NotRemovable => "vcpu0_not_removable",
            Self::Conflict => "conflict",
            Self::AgentUnavailable => "agent_unavailable",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::InvalidVcpuCount => "invalid_vcpu_count",
            Self::Internal => "internal",
            Self::Unavailable => "unavailable",
            Self::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One API error: a code for programs and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// What went wrong, machine-readable.
    pub code: ErrorCode,
    /// What went wrong, for a person.
    pub message: String,
}

impl ApiError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The HTTP status this error is sent with.
    pub fn status(&self) -> u16 {
        self.code.status()
    }
}

/// The JSON body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ApiError,
}

impl From<ApiError> for ErrorBody {
    fn from(error: ApiError) -> Self {
        Self { error }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_shape() {
        let body = ErrorBody::from(ApiError::new(ErrorCode::Vcpu0NotRemovable, "no"));
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"error": {"code": "vcpu0_not_removable", "message": "no"}})
        );
        assert_eq!(body.error.status(), 409);
    }

    #[test]
    fn as_str_matches_serde() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_value(code).unwrap();
            assert_eq!(json, serde_json::Value::from(code.as_str()));
        }
    }

    #[test]
    fn unknown_code_from_newer_server() {
        let body: ErrorBody =
            serde_json::from_str(r#"{"error":{"code":"brand_new","message":"m"}}"#).unwrap();
        assert_eq!(body.error.code, ErrorCode::Unknown);
        assert_eq!(body.error.status(), 500);
    }
}
