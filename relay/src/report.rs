//! `POST /agent/v1/report`: an agent tells the relay something about itself (a Wi-Fi
//! change confirmed or rolled back, …) over a fresh TLS connection, authenticated like
//! the link. The relay logs it, counts it by kind and state, and keeps the latest few
//! per router in memory for the admin router view. Memory is bounded: reports come
//! only from enrolled routers, at most [`KEEP_PER_ROUTER`] each, every field capped.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use netpilot_proto::link::AgentEvent;
use serde::Serialize;
use uuid::Uuid;

use crate::auth;
use crate::error::ApiError;
use crate::http::{self, Body, Ctx};
use crate::state::AppState;

/// A report is a handful of short fields; anything bigger is not a report.
pub const MAX_REPORT_BYTES: usize = 4 * 1024;
/// Reports kept per router, newest first in the admin view.
pub const KEEP_PER_ROUTER: usize = 16;
/// Longest `kind`, `id` and `state` accepted.
const MAX_FIELD: usize = 64;
/// Longest `detail` accepted.
const MAX_DETAIL: usize = 1024;

/// A report as the relay keeps and shows it: the agent's event and when the relay
/// received it (the agent's clock may be unset, so both are kept).
#[derive(Debug, Clone, Serialize)]
pub struct StoredReport {
    #[serde(flatten)]
    pub event: AgentEvent,
    pub received_at: String,
}

/// The latest reports of every router, in memory only: a relay restart forgets them,
/// like sessions.
#[derive(Default)]
pub struct Reports {
    by_router: Mutex<HashMap<Uuid, VecDeque<StoredReport>>>,
}

impl Reports {
    pub fn push(&self, router: Uuid, report: StoredReport) {
        let mut map = self.by_router.lock().expect("reports lock");
        let list = map.entry(router).or_default();
        if list.len() == KEEP_PER_ROUTER {
            list.pop_back();
        }
        list.push_front(report);
    }

    /// Newest first.
    pub fn recent(&self, router: Uuid) -> Vec<StoredReport> {
        self.by_router
            .lock()
            .expect("reports lock")
            .get(&router)
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default()
    }
}

#[derive(Serialize)]
struct Accepted {
    accepted: bool,
    received_at: String,
}

pub async fn report(
    state: &AppState,
    req: Request<Incoming>,
    ctx: &Ctx,
) -> Result<Response<Body>, ApiError> {
    let router_id = auth::authenticate_router(&req, |id| state.router_meta(id))?;
    let (bytes, _) = http::read_json(req, MAX_REPORT_BYTES).await?;
    let event: AgentEvent = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::InvalidParameter(format!("not a report: {e}")))?;
    validate(&event)?;
    state.metrics.record_report(&event.kind, &event.state);
    tracing::info!(
        %router_id,
        kind = %event.kind,
        id = %event.id,
        state = %event.state,
        detail = event.detail.as_deref().unwrap_or(""),
        at = event.at,
        "agent report"
    );
    let received_at = http::rfc3339_ms(state.clock.now_ms());
    state.reports.push(
        router_id,
        StoredReport {
            event,
            received_at: received_at.clone(),
        },
    );
    Ok(http::ok(
        StatusCode::OK,
        Accepted {
            accepted: true,
            received_at,
        },
        ctx,
    ))
}

fn validate(e: &AgentEvent) -> Result<(), ApiError> {
    for (name, value) in [("kind", &e.kind), ("id", &e.id), ("state", &e.state)] {
        if value.is_empty() || value.chars().count() > MAX_FIELD {
            return Err(ApiError::InvalidParameter(format!(
                "{name} must be 1 to {MAX_FIELD} characters"
            )));
        }
        if value.chars().any(char::is_control) {
            return Err(ApiError::InvalidParameter(format!(
                "{name} must not contain control characters"
            )));
        }
    }
    if e.detail
        .as_ref()
        .is_some_and(|d| d.chars().count() > MAX_DETAIL)
    {
        return Err(ApiError::InvalidParameter(format!(
            "detail must be at most {MAX_DETAIL} characters"
        )));
    }
    Ok(())
}

/// A metric label value from agent-chosen text: lower-case letters, digits and `_`,
/// at most 32 of them; anything else counts as `other`, so an agent cannot inject
/// label syntax or blow up the number of series with long or odd values.
pub fn label(value: &str) -> &str {
    let ok = !value.is_empty()
        && value.len() <= 32
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        value
    } else {
        "other"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, state: &str) -> AgentEvent {
        AgentEvent {
            kind: kind.into(),
            id: "c1".into(),
            state: state.into(),
            detail: None,
            at: 1,
        }
    }

    #[test]
    fn labels_are_a_safe_charset_or_other() {
        assert_eq!(label("wifi_change"), "wifi_change");
        assert_eq!(label("rolled_back"), "rolled_back");
        assert_eq!(label("Wifi"), "other");
        assert_eq!(label("a\"} 1\nx{"), "other");
        assert_eq!(label(&"a".repeat(33)), "other");
        assert_eq!(label(""), "other");
    }

    #[test]
    fn keeps_the_newest_per_router() {
        let reports = Reports::default();
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        for i in 0..KEEP_PER_ROUTER + 4 {
            let mut e = event("wifi_change", "confirmed");
            e.at = i as u64;
            reports.push(
                a,
                StoredReport {
                    event: e,
                    received_at: String::new(),
                },
            );
        }
        let recent = reports.recent(a);
        assert_eq!(recent.len(), KEEP_PER_ROUTER);
        assert_eq!(recent[0].event.at, (KEEP_PER_ROUTER + 3) as u64);
        assert!(reports.recent(b).is_empty());
    }

    #[test]
    fn fields_are_bounded() {
        assert!(validate(&event("wifi_change", "confirmed")).is_ok());
        assert!(validate(&event("", "confirmed")).is_err());
        assert!(validate(&event("wifi_change", &"x".repeat(65))).is_err());
        assert!(validate(&event("wifi\nchange", "confirmed")).is_err());
        let mut e = event("k", "s");
        e.detail = Some("d".repeat(1025));
        assert!(validate(&e).is_err());
    }
}
