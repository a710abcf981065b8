//! The agent's reports to the relay outside the link: one fresh TLS round trip to
//! `POST /agent/v1/report`, authenticated with the router secret. A delivered report
//! both tells the relay what happened and proves the relay is reachable right now,
//! which is what a change that can cut the router off needs to confirm itself.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::CONTENT_TYPE;
pub use netpilot_proto::link::AgentEvent;
use netpilot_proto::link::REPORT_PATH;

use crate::dial::RelayEndpoint;
use crate::system::Fut;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The relay could not be reached (DNS, TCP, TLS).
    #[error("relay unreachable: {0}")]
    Unreachable(String),
    /// The relay answered but refused the report.
    #[error("relay refused the report: {status} {message}")]
    Refused { status: u16, message: String },
}

pub trait Reporter: Send + Sync {
    /// Delivers one event; `Ok` means the relay answered 2xx just now.
    fn report<'a>(&'a self, event: &'a AgentEvent) -> Fut<'a, Result<(), ReportError>>;
}

/// The real reporter: one fresh TLS connection per report (never the link: a
/// delivered report must prove that the relay can be reached *now*), HTTP/1.1
/// `POST /agent/v1/report` with the router secret, the whole exchange bounded by
/// `timeout`.
pub struct RelayReporter {
    endpoint: RelayEndpoint,
    timeout: Duration,
}

impl RelayReporter {
    pub fn new(endpoint: RelayEndpoint, timeout: Duration) -> Self {
        RelayReporter { endpoint, timeout }
    }

    async fn deliver(&self, event: &AgentEvent) -> Result<(), ReportError> {
        let body = serde_json::to_vec(event).expect("an event serialises");
        let mut sender = self
            .endpoint
            .http1::<Full<Bytes>>()
            .await
            .map_err(|e| ReportError::Unreachable(e.to_string()))?;
        let req = self
            .endpoint
            .request(http::Method::POST, REPORT_PATH)
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("static request parts");
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ReportError::Unreachable(e.to_string()))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let bytes = Limited::new(resp.into_body(), 16 * 1024)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        Err(ReportError::Refused {
            status: status.as_u16(),
            message: error_message(&bytes),
        })
    }
}

/// `error.code: error.message` from an envelope, or the start of the raw body.
pub(crate) fn error_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Env {
        error: Option<netpilot_proto::ErrorBody>,
    }
    match serde_json::from_slice::<Env>(body) {
        Ok(Env { error: Some(e) }) => format!("{}: {}", e.code, e.message),
        _ => String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
    }
}

impl Reporter for RelayReporter {
    fn report<'a>(&'a self, event: &'a AgentEvent) -> Fut<'a, Result<(), ReportError>> {
        Box::pin(async move {
            let result = match tokio::time::timeout(self.timeout, self.deliver(event)).await {
                Ok(r) => r,
                Err(_) => Err(ReportError::Unreachable(format!(
                    "no answer within {:?}",
                    self.timeout
                ))),
            };
            match &result {
                Ok(()) => {
                    tracing::info!(kind = %event.kind, id = %event.id, state = %event.state, "report delivered")
                }
                Err(e) => {
                    tracing::info!(kind = %event.kind, id = %event.id, error = %e, "report not delivered")
                }
            }
            result
        })
    }
}

/// The reporter of an agent that has no relay to report to (an `App` built without
/// one, e.g. in tests of other parts): every report fails as unreachable.
pub struct NoRelay;

impl Reporter for NoRelay {
    fn report<'a>(&'a self, _event: &'a AgentEvent) -> Fut<'a, Result<(), ReportError>> {
        Box::pin(async { Err(ReportError::Unreachable("no relay configured".into())) })
    }
}

/// In-memory reporter for tests: the relay is reachable or not, as the test says;
/// delivered events are kept in order.
#[derive(Clone, Default)]
pub struct FakeReporter {
    inner: Arc<Mutex<FakeState>>,
}

#[derive(Default)]
struct FakeState {
    unreachable: bool,
    delivered: Vec<AgentEvent>,
    attempts: usize,
}

impl FakeReporter {
    pub fn set_reachable(&self, reachable: bool) {
        self.inner.lock().expect("fake reporter").unreachable = !reachable;
    }

    pub fn delivered(&self) -> Vec<AgentEvent> {
        self.inner.lock().expect("fake reporter").delivered.clone()
    }

    pub fn attempts(&self) -> usize {
        self.inner.lock().expect("fake reporter").attempts
    }
}

impl Reporter for FakeReporter {
    fn report<'a>(&'a self, event: &'a AgentEvent) -> Fut<'a, Result<(), ReportError>> {
        let mut s = self.inner.lock().expect("fake reporter");
        s.attempts += 1;
        let result = if s.unreachable {
            Err(ReportError::Unreachable("fake relay is unreachable".into()))
        } else {
            s.delivered.push(event.clone());
            Ok(())
        };
        Box::pin(async move { result })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_carry_the_relays_error() {
        let body = br#"{"success":false,"error":{"code":"ROUTER_REVOKED","message":"router was revoked"},"meta":{"duration_ms":0}}"#;
        assert_eq!(error_message(body), "ROUTER_REVOKED: router was revoked");
        assert_eq!(error_message(b"plain text"), "plain text");
    }
}
