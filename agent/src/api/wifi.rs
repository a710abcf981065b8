//! The Wi-Fi endpoints: thin handlers that validate the call's arguments into a
//! [`Request`] and hand it to the [`WifiService`].

use netpilot_proto::ErrorCode;
use serde_json::Value;

use super::policy::Call;
use super::{AgentError, Reply};
use crate::policy::model::Invalid;
use crate::wifi::model::{Password, Request, Ssid};
use crate::wifi::{WifiError, WifiService};

impl From<WifiError> for AgentError {
    fn from(e: WifiError) -> Self {
        match e {
            WifiError::Invalid(i) => AgentError::Rejected(i),
            WifiError::Pending { .. } => AgentError::ChangePending(e.to_string()),
            WifiError::Apply { .. } => AgentError::ApplyFailed(e.to_string()),
            WifiError::Unavailable(_) => AgentError::WifiUnavailable(e.to_string()),
            WifiError::Store(m) => AgentError::Internal(format!("state database: {m}")),
        }
    }
}

fn bad(code: ErrorCode, message: impl Into<String>) -> AgentError {
    AgentError::Rejected(Invalid {
        code,
        message: message.into(),
    })
}

/// An optional string argument. A value of the wrong type is named by its type
/// only: the argument may be a password.
fn opt_str<'a>(call: &'a Call, name: &str) -> Result<Option<&'a str>, AgentError> {
    match call.args.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(AgentError::InvalidParameter(format!(
            "{name} must be a string, got {}",
            match other {
                Value::Bool(_) => "a boolean",
                Value::Number(_) => "a number",
                Value::Array(_) => "a list",
                _ => "an object",
            }
        ))),
    }
}

fn radio(call: &Call) -> Result<Option<String>, AgentError> {
    match opt_str(call, "radio")? {
        // An empty radio is "not given": forms send it that way.
        Some("") | None => Ok(None),
        Some(r) => Ok(Some(r.to_owned())),
    }
}

fn interface(call: &Call) -> Result<Option<String>, AgentError> {
    Ok(opt_str(call, "interface")?
        .filter(|s| !s.is_empty())
        .map(str::to_owned))
}

/// The request a POST asks for.
pub fn request(call: &Call) -> Result<Request, AgentError> {
    Ok(match call.pattern {
        "/api/wifi/enable" => Request::Enable {
            radio: radio(call)?,
        },
        "/api/wifi/disable" => Request::Disable {
            radio: radio(call)?,
        },
        "/api/wifi/ssid" => {
            let ssid = opt_str(call, "ssid")?
                .ok_or_else(|| bad(ErrorCode::InvalidSsid, "ssid is required"))?;
            Request::Ssid {
                ssid: Ssid::parse(ssid)?,
                radio: radio(call)?,
                interface: interface(call)?,
            }
        }
        "/api/wifi/password" => {
            let password = opt_str(call, "password")?
                .ok_or_else(|| bad(ErrorCode::InvalidPassword, "password is required"))?;
            Request::Password {
                password: Password::parse(password)?,
                radio: radio(call)?,
                interface: interface(call)?,
            }
        }
        other => return Err(AgentError::NotFound(other.to_owned())),
    })
}

pub async fn handle(service: &WifiService, call: Call) -> Result<Reply, AgentError> {
    match (call.method, call.pattern) {
        ("GET", "/api/wifi/status") => Reply::ok(service.status().await?),
        ("POST", _) => {
            let req = request(&call)?;
            Reply::ok(service.change(&call.actor, &req).await?)
        }
        (_, other) => Err(AgentError::NotFound(other.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn call(pattern: &'static str, args: Value) -> Call {
        Call {
            method: "POST",
            pattern,
            path_id: None,
            args: args.as_object().cloned().unwrap_or_default(),
            actor: Default::default(),
        }
    }

    fn code_of(pattern: &'static str, args: Value) -> &'static str {
        request(&call(pattern, args)).unwrap_err().code().as_str()
    }

    #[test]
    fn arguments_are_validated_with_precise_codes() {
        assert_eq!(code_of("/api/wifi/ssid", json!({})), "INVALID_SSID");
        assert_eq!(
            code_of("/api/wifi/ssid", json!({"ssid": "a\nb"})),
            "INVALID_SSID"
        );
        assert_eq!(
            code_of("/api/wifi/ssid", json!({"ssid": "x".repeat(33)})),
            "INVALID_SSID"
        );
        assert_eq!(
            code_of("/api/wifi/ssid", json!({"ssid": 5})),
            "INVALID_PARAMETER"
        );
        assert_eq!(
            code_of("/api/wifi/password", json!({"password": "seven77"})),
            "INVALID_PASSWORD"
        );
        assert_eq!(
            code_of("/api/wifi/password", json!({"password": "x".repeat(64)})),
            "INVALID_PASSWORD"
        );
        assert_eq!(
            code_of("/api/wifi/enable", json!({"radio": 0})),
            "INVALID_PARAMETER"
        );
        // A password of the wrong type is not echoed back.
        let e = request(&call(
            "/api/wifi/password",
            json!({"password": 1234567890123u64}),
        ))
        .unwrap_err();
        assert!(!e.to_string().contains("1234567890123"), "{e}");
        let ok = request(&call(
            "/api/wifi/ssid",
            json!({"ssid": "Café 🚀", "radio": "", "interface": "guest"}),
        ))
        .unwrap();
        assert_eq!(
            ok,
            Request::Ssid {
                ssid: Ssid::parse("Café 🚀").unwrap(),
                radio: None,
                interface: Some("guest".into())
            }
        );
        assert_eq!(
            request(&call("/api/wifi/disable", json!({"radio": "radio1"}))).unwrap(),
            Request::Disable {
                radio: Some("radio1".into())
            }
        );
    }
}
