//! The agent's reports to the relay outside the link: one fresh TLS round trip to
//! `POST /agent/v1/report`, authenticated with the router secret. A delivered report
//! both tells the relay what happened and proves the relay is reachable right now,
//! which is what a change that can cut the router off needs to confirm itself.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::header::CONTENT_TYPE;
pub use netpilot_proto::link::AgentEvent;
use netpilot_proto::link::REPORT_PATH;

use crate::link::dial::{Exchange, RelayBody, RelayEndpoint};
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
/// `timeout`. It does not log: the caller knows what the report was for and logs
/// the outcome.
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
            .http1()
            .await
            .map_err(|e| ReportError::Unreachable(e.to_string()))?;
        let req = self
            .endpoint
            .request(http::Method::POST, REPORT_PATH)
            .header(CONTENT_TYPE, "application/json")
            .body(RelayBody::full(body))
            .expect("static request parts");
        match RelayEndpoint::exchange(&mut sender, req).await {
            Ok(_) => Ok(()),
            Err(Exchange::Unreachable(m)) => Err(ReportError::Unreachable(m)),
            Err(Exchange::Refused { status, message }) => {
                Err(ReportError::Refused { status, message })
            }
        }
    }
}

impl Reporter for RelayReporter {
    fn report<'a>(&'a self, event: &'a AgentEvent) -> Fut<'a, Result<(), ReportError>> {
        Box::pin(async move {
            match tokio::time::timeout(self.timeout, self.deliver(event)).await {
                Ok(r) => r,
                Err(_) => Err(ReportError::Unreachable("no answer in time".into())),
            }
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
