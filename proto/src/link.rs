//! The link protocol's fixed names (DESIGN §2) and the enrollment messages (DESIGN §3).

use serde::{Deserialize, Serialize};

/// HTTP/1.1 upgrade path the agent calls to open its link.
pub const CONNECT_PATH: &str = "/agent/v1/connect";
/// Enrollment: trades a one-time token for the router id and secret.
pub const ENROLL_PATH: &str = "/agent/v1/enroll";
/// An agent's report to the relay over a fresh TLS connection (not the link):
/// proves the relay is reachable right now and carries an [`AgentEvent`].
pub const REPORT_PATH: &str = "/agent/v1/report";
/// Speed-test endpoints the agent measures against (authenticated like the link).
pub const SPEEDTEST_DOWNLOAD_PATH: &str = "/agent/v1/speedtest/download";
pub const SPEEDTEST_UPLOAD_PATH: &str = "/agent/v1/speedtest/upload";
pub const SPEEDTEST_PING_PATH: &str = "/agent/v1/speedtest/ping";
/// Sent by the relay to the agent on the link (never forwarded from the public
/// API, which forwards `/api/` routes only): this relay is draining; dial the next
/// relay now and leave this link once the new one is up. The agent answers `202`
/// when it will try to move, `409` when it has no other relay (it stays until the
/// relay closes the link, and the relay does not wait for it).
pub const DRAIN_PATH: &str = "/link/v1/drain";
/// Value of the `Upgrade` header on the connect request.
pub const UPGRADE_PROTOCOL: &str = "netpilot-link/1";

pub const HEADER_ROUTER_ID: &str = "x-netpilot-router-id";
pub const HEADER_AGENT_VERSION: &str = "x-netpilot-agent-version";
/// Forwarded by the relay on every call so the agent can log and audit who asked.
/// The user id is percent-encoded (form encoding), as user ids are arbitrary text.
pub const HEADER_SESSION_ID: &str = "x-netpilot-session-id";
pub const HEADER_USER_ID: &str = "x-netpilot-user-id";
pub const HEADER_REQUEST_ID: &str = "x-request-id";

/// Something the agent tells the relay about itself, e.g. that a Wi-Fi change was
/// confirmed or rolled back. Small and self-describing; the relay logs it, counts it
/// and keeps the latest per router.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentEvent {
    /// What it is about: `wifi_change`, …
    pub kind: String,
    /// The agent's id for the thing (a change id).
    pub id: String,
    /// `confirmed`, `rolled_back`, …
    pub state: String,
    /// Human-readable detail; never a secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Unix seconds on the agent's clock when it happened.
    pub at: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub token: String,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub agent_version: Option<String>,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct EnrollResponse {
    pub router_id: String,
    pub router_secret: String,
    pub name: String,
}

impl std::fmt::Debug for EnrollResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollResponse")
            .field("router_id", &self.router_id)
            .field("router_secret", &"<redacted>")
            .field("name", &self.name)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enroll_response_debug_hides_secret() {
        let r = EnrollResponse {
            router_id: "r".into(),
            router_secret: "s3cr3t".into(),
            name: "n".into(),
        };
        assert!(!format!("{r:?}").contains("s3cr3t"));
    }
}
