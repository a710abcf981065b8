//! What the benches share: routers created and enrolled in memory, many at once, and
//! a fleet of in-process agents serving them.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, ensure};
use netpilot_agent::app::{App, Backends};
use netpilot_agent::link::backoff::BackoffConfig;
use netpilot_agent::link::identity::Identity;
use netpilot_agent::link::tls::Trust;
use netpilot_agent::store::Location;
use netpilot_agent::RunConfig;
use netpilot_tests::{Client, Relay};
use serde_json::json;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

/// Creates `n` routers and trades each one's token for its secret, as
/// `netpilot-agent enroll` would, but in memory and over one HTTP/2 connection.
pub async fn enroll_many(
    relay: &Relay,
    admin: &Client,
    n: usize,
    owner: &'static str,
    concurrency: usize,
) -> anyhow::Result<Vec<Identity>> {
    let slots = Arc::new(Semaphore::new(concurrency));
    let anonymous = admin.with_key(None);
    let mut tasks = JoinSet::new();
    for i in 0..n {
        let slot = slots.clone().acquire_owned().await?;
        let (admin, anonymous) = (admin.clone(), anonymous.clone());
        let (relay_url, fingerprint) = (relay.url(), relay.fingerprint.clone());
        tasks.spawn(async move {
            let _slot = slot;
            let r = admin
                .post(
                    "/api/admin/routers",
                    json!({"ownerUserId": owner, "name": format!("{owner} {i}")}),
                )
                .await?;
            ensure!(r.status == 201, "create router: {} {}", r.status, r.body);
            let token = r.body["data"]["enrollment_token"]
                .as_str()
                .unwrap_or_default();
            let r = anonymous
                .post("/agent/v1/enroll", json!({"token": token}))
                .await?;
            ensure!(r.status == 200, "enroll: {} {}", r.status, r.body);
            let field = |name: &str| {
                r.body["data"][name]
                    .as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| anyhow!("enroll answer without {name}: {}", r.body))
            };
            Ok(Identity {
                router_id: field("router_id")?,
                router_secret: field("router_secret")?,
                relay_url,
                trust: Trust::Fingerprint(fingerprint),
                name: field("name")?,
            })
        });
    }
    let mut identities = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        identities.push(r??);
    }
    Ok(identities)
}

/// One simulated router per identity, each a whole agent keeping its state in memory,
/// all dialling at once (no start delay) until `stopped` turns true. A task ends early
/// only when its agent cannot start.
#[allow(dead_code)] // not every bench uses both
pub fn start_agents(
    identities: Vec<Identity>,
    stopped: &watch::Receiver<bool>,
) -> JoinSet<netpilot_agent::error::Result<()>> {
    let spread = BackoffConfig::default().reconnect_spread;
    start_agents_with(identities, Vec::new(), spread, stopped)
}

/// [`start_agents`] with a relay list (tried in order, as `--relay` repeated; empty:
/// each identity's own) and the spread of the first retry after a lost link.
pub fn start_agents_with(
    identities: Vec<Identity>,
    relays: Vec<String>,
    reconnect_spread: Duration,
    stopped: &watch::Receiver<bool>,
) -> JoinSet<netpilot_agent::error::Result<()>> {
    let config = RunConfig {
        relay_urls: relays,
        simulate: true,
        // Thousands of agents in one process: none serves the router's socket.
        control: None,
        backoff: BackoffConfig {
            start_delay_max: Duration::ZERO,
            reconnect_spread,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut agents = JoinSet::new();
    for identity in identities {
        let config = config.clone();
        let mut stopped = stopped.clone();
        agents.spawn(async move {
            let app = Arc::new(App::build(
                Backends::simulated(&config)?,
                &config,
                &identity,
                &Location::Memory,
                1,
            )?);
            let shutdown = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            netpilot_agent::serve(app, &identity, &config, |_| {}, shutdown).await
        });
    }
    agents
}
