//! `GET /api/agent/health`: version, mode, uptime and link state of the agent.

use std::time::UNIX_EPOCH;

use serde::Serialize;

use crate::app::App;

#[derive(Debug, Serialize)]
pub struct Health {
    pub agent_version: &'static str,
    pub router_id: String,
    pub mode: &'static str,
    pub agent_uptime_s: u64,
    /// How often the agent has started on this router, from its state database.
    pub agent_starts: u64,
    /// Whether the policy engine's kernel state matches the stored policy (checked
    /// at start-up, after every change and periodically).
    pub infrastructure_ready: bool,
    pub link_connected_since_unix: Option<u64>,
    pub link_connects: u64,
    pub clock_unset: bool,
}

pub fn health(app: &App) -> Health {
    let link = app.link.get();
    Health {
        agent_version: env!("CARGO_PKG_VERSION"),
        router_id: app.router_id.clone(),
        mode: app.mode.as_str(),
        agent_uptime_s: app.started.elapsed().as_secs(),
        agent_starts: app.starts,
        infrastructure_ready: {
            let s = app.policy.status();
            s.in_sync && s.last_error.is_none()
        },
        link_connected_since_unix: link
            .connected_since
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs()),
        link_connects: link.connects,
        clock_unset: crate::link::tls::clock_unset(std::time::SystemTime::now()),
    }
}
