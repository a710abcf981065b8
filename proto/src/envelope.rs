//! The one response envelope every API answer uses (DESIGN §4).

use serde::{Deserialize, Serialize};

use crate::ErrorCode;

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
    /// An [`ErrorCode`]'s wire string. Kept as text: an answer from an older or newer
    /// peer may carry a code this build does not know and must still decode;
    /// [`ErrorCode::parse`] reads it.
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
    pub fn err(code: ErrorCode, message: impl Into<String>, meta: Meta) -> Self {
        Envelope {
            success: false,
            data: None,
            error: Some(ErrorBody {
                code: code.as_str().to_owned(),
                message: message.into(),
            }),
            meta,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_envelope_has_no_data_field() {
        let e = Envelope::err(ErrorCode::Forbidden, "nope", Meta::default());
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["success"], false);
        assert_eq!(v["error"]["code"], "FORBIDDEN");
        assert!(v.get("data").is_none());
        assert_eq!(v["meta"]["duration_ms"], 0);
    }

    #[test]
    fn an_unknown_code_still_decodes() {
        let body = r#"{"success":false,"error":{"code":"FROM_A_NEWER_PEER","message":"m"},"meta":{"duration_ms":1}}"#;
        let e: Envelope<()> = serde_json::from_str(body).unwrap();
        let err = e.error.unwrap();
        assert_eq!(err.code, "FROM_A_NEWER_PEER");
        assert_eq!(ErrorCode::parse(&err.code), None);
    }
}
