//! The error that crosses the wire: a small code enum plus a human sentence.

use serde::{Deserialize, Serialize};

/// What went wrong, as a machine-readable code (`"not_found"` on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed request: bad JSON, missing or unknown fields, bad query parameters.
    BadRequest,
    InvalidName,
    InvalidSize,
    NotFound,
    AlreadyExists,
    /// The volume is attached or has open connections (message names the holder).
    InUse,
    /// A concurrent change won; retrying may succeed.
    Conflict,
    NoSpace,
    /// A dependency (catalog, etcd, a peer) is unreachable, or the agent is shutting down.
    Unavailable,
    Internal,
}

impl ErrorCode {
    /// The HTTP status for each code; exhaustive so a new code cannot go unmapped.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::InvalidName => 400,
            ErrorCode::InvalidSize => 400,
            ErrorCode::NotFound => 404,
            ErrorCode::AlreadyExists => 409,
            ErrorCode::InUse => 409,
            ErrorCode::Conflict => 409,
            ErrorCode::NoSpace => 507,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }
}

/// An error answer of the API: `{"error":{"code":"not_found","message":"…"}}` on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: ErrorCode,
    /// A full sentence for humans, naming the thing concerned (`volume "db1" not found`).
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::BadRequest, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::NotFound, message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Internal, message)
    }
}

/// The JSON envelope of an error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ApiError,
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the wire spelling of the envelope is what SPEC §4 and openapi.json promise.
    #[test]
    fn envelope_wire_format() {
        let body = ErrorBody {
            error: ApiError::not_found("volume \"x\" not found"),
        };
        let json = serde_json::to_string(&body).unwrap();
        assert_eq!(
            json,
            r#"{"error":{"code":"not_found","message":"volume \"x\" not found"}}"#
        );
        assert_eq!(serde_json::from_str::<ErrorBody>(&json).unwrap(), body);
        assert_eq!(ErrorCode::NoSpace.http_status(), 507);
    }
}
