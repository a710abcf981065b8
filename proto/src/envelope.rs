//! The one response envelope every API answer uses (DESIGN §4) and the error codes.

use serde::{Deserialize, Serialize};

/// `{"success": …, "data" | "error": …, "meta": {"duration_ms": …}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub success: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    pub meta: Meta,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Meta {
    pub duration_ms: u64,
    /// Set by the relay on forwarded calls and by the agent when the relay passed one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl<T> Envelope<T> {
    pub fn ok(data: T, meta: Meta) -> Self {
        Envelope {
            success: true,
            data: Some(data),
            error: None,
            meta,
        }
    }
}

impl Envelope<()> {
    pub fn err(code: &str, message: impl Into<String>, meta: Meta) -> Self {
        Envelope {
            success: false,
            data: None,
            error: Some(ErrorBody {
                code: code.to_owned(),
                message: message.into(),
            }),
            meta,
        }
    }
}

/// Error codes carried in `error.code`. The HTTP status for each is decided in one
/// place on each side (the relay's and the agent's error modules).
pub mod code {
    pub const INVALID_PARAMETER: &str = "INVALID_PARAMETER";
    pub const UNAUTHORIZED: &str = "UNAUTHORIZED";
    pub const SESSION_INVALID: &str = "SESSION_INVALID";
    pub const FORBIDDEN: &str = "FORBIDDEN";
    pub const ROUTER_NOT_FOUND: &str = "ROUTER_NOT_FOUND";
    pub const COMMAND_TIMEOUT: &str = "COMMAND_TIMEOUT";
    pub const ROUTER_OFFLINE: &str = "ROUTER_OFFLINE";
    pub const NOT_IMPLEMENTED: &str = "NOT_IMPLEMENTED";
    pub const NOT_FOUND: &str = "NOT_FOUND";
    pub const METHOD_NOT_ALLOWED: &str = "METHOD_NOT_ALLOWED";
    pub const PAYLOAD_TOO_LARGE: &str = "PAYLOAD_TOO_LARGE";
    pub const UNSUPPORTED_MEDIA_TYPE: &str = "UNSUPPORTED_MEDIA_TYPE";
    pub const RATE_LIMITED: &str = "RATE_LIMITED";
    pub const TOKEN_INVALID: &str = "TOKEN_INVALID";
    pub const TOKEN_EXPIRED: &str = "TOKEN_EXPIRED";
    pub const TOKEN_USED: &str = "TOKEN_USED";
    pub const ROUTER_REVOKED: &str = "ROUTER_REVOKED";
    pub const BAD_GATEWAY: &str = "BAD_GATEWAY";
    pub const SERVICE_UNAVAILABLE: &str = "SERVICE_UNAVAILABLE";
    pub const INTERNAL: &str = "INTERNAL";
    /// A speed test is already running for this router (agent and relay).
    pub const SPEEDTEST_RUNNING: &str = "SPEEDTEST_RUNNING";
    /// The relay serves its maximum of speed-test transfers; try again later.
    pub const SPEEDTEST_BUSY: &str = "SPEEDTEST_BUSY";
    /// A speed-test transfer went past the relay's time limit.
    pub const SPEEDTEST_TIMEOUT: &str = "SPEEDTEST_TIMEOUT";
    /// The agent could not measure against the relay (unreachable, refused).
    pub const SPEEDTEST_FAILED: &str = "SPEEDTEST_FAILED";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_envelope_has_no_data_field() {
        let e = Envelope::err(code::FORBIDDEN, "nope", Meta::default());
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["success"], false);
        assert_eq!(v["error"]["code"], "FORBIDDEN");
        assert!(v.get("data").is_none());
        assert_eq!(v["meta"]["duration_ms"], 0);
    }
}
