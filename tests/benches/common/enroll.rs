//! What the benches share: routers created and enrolled in memory, many at once.

use std::sync::Arc;

use anyhow::{anyhow, ensure};
use netpilot_agent::link::identity::Identity;
use netpilot_agent::link::tls::Trust;
use netpilot_tests::{Client, Relay};
use serde_json::json;
use tokio::sync::Semaphore;
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
