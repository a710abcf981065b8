//! The agent's reports to the relay outside the link: one fresh TLS round trip to
//! `POST /agent/v1/report`, authenticated with the router secret. A delivered report
//! both tells the relay what happened and proves the relay is reachable right now,
//! which is what a change that can cut the router off needs to confirm itself.

use std::sync::{Arc, Mutex};

pub use netpilot_proto::link::AgentEvent;

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
