//! `POST /agent/v1/report`: an agent tells the relay something about itself (a Wi-Fi
//! change confirmed or rolled back, …) over a fresh TLS connection, authenticated like
//! the link. The relay logs it, counts it by kind and state, and keeps the latest few
//! per router in memory for the admin router view ([`crate::recent_reports`]).
//! Memory is bounded: reports come only from enrolled routers, a bounded number
//! each, every field capped.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use netpilot_proto::link::AgentEvent;
use serde::Serialize;

use crate::error::ApiError;
use crate::http::{self, Body, Ctx};
use crate::recent_reports::StoredReport;
use crate::state::AppState;

/// A report is a handful of short fields; anything bigger is not a report.
pub const MAX_REPORT_BYTES: usize = 4 * 1024;
/// Longest `kind`, `id` and `state` accepted.
const MAX_FIELD: usize = 64;
/// Longest `detail` accepted.
const MAX_DETAIL: usize = 1024;

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
    let router_id = state.authenticate_agent(&req).await?;
    let (bytes, _) = http::read_json(req, MAX_REPORT_BYTES, state.config.timeouts.body).await?;
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
    crate::cluster_sync::store_report(
        state,
        router_id,
        StoredReport {
            event,
            received_at: received_at.clone(),
        },
    )
    .await;
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
