//! What a cluster node does in the background and around each link: renews its
//! presence, listens to the change broadcast and acts on it (closes a revoked
//! router's link, lets go of a link the router replaced on another node, re-reads a
//! changed router), puts its links back into the directory when Redis lost it, and
//! claims and releases each link as it comes and goes.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use uuid::Uuid;

use crate::cluster::directory::Holder;
use crate::cluster::events::Event;
use crate::cluster::Cluster;
use crate::error::ApiError;
use crate::recent_reports::{StoredReport, KEEP_PER_ROUTER};
use crate::state::AppState;
use crate::sync::{Locked, ReadWrite};

/// Claims `router` for this node as its link is accepted, before the agent hears
/// so; `None` when Redis did not answer (then [`link_up`] claims again).
pub async fn claim_early(state: &AppState, router: Uuid) -> Option<u64> {
    let cluster = state.cluster.as_ref()?;
    match cluster.claim(router).await {
        Ok(g) => Some(g),
        Err(e) => {
            tracing::warn!(%router, error = %e, "cannot enter the link in the directory yet");
            None
        }
    }
}

/// Takes back an early claim whose link never came up.
pub async fn unclaim(state: &AppState, router: Uuid, claim: Option<u64>) {
    if let (Some(cluster), Some(g)) = (&state.cluster, claim) {
        if let Err(e) = cluster.release(router, g).await {
            tracing::warn!(%router, error = %e, "cannot take a failed link out of the directory");
        }
    }
}

/// Records the link's claim once it is registered (claiming now if the early
/// claim failed), for releasing it when the link ends.
pub async fn link_up(state: &AppState, router: Uuid, link_generation: u64, claim: Option<u64>) {
    let Some(cluster) = &state.cluster else {
        return;
    };
    let claims = &cluster.claims;
    if let Some(g) = claim {
        claims.map.locked().insert(router, (link_generation, g));
        return;
    }
    // Claim 0 until Redis answers: "ours, generation not known yet".
    claims.map.locked().insert(router, (link_generation, 0));
    match cluster.claim(router).await {
        Ok(g) => {
            let mut map = claims.map.locked();
            if let Some(e) = map.get_mut(&router).filter(|e| e.0 == link_generation) {
                e.1 = g;
            }
        }
        // Kept with claim 0: the next heartbeat claims it again.
        Err(e) => {
            tracing::warn!(%router, error = %e, "cannot enter the link in the directory; retrying")
        }
    }
}

/// Releases this node's claim when the link ends (unless a newer link replaced it).
pub async fn link_down(state: &AppState, router: Uuid, link_generation: u64) {
    let Some(cluster) = &state.cluster else {
        return;
    };
    let claims = &cluster.claims;
    let claim = {
        let mut map = claims.map.locked();
        match map.get(&router) {
            Some(&(lg, g)) if lg == link_generation => {
                map.remove(&router);
                Some(g)
            }
            _ => None,
        }
    };
    if let Some(g) = claim.filter(|g| *g > 0) {
        if let Err(e) = cluster.release(router, g).await {
            tracing::warn!(%router, error = %e, "cannot take the link out of the directory");
        }
    }
}

/// Cluster mode: tells every node a router changed in the registry (enrolled,
/// created), so their caches do not wait for the poll.
pub async fn announce_changed(state: &AppState, router: Uuid) {
    if let Some(c) = &state.cluster {
        if let Err(e) = c.publish(&Event::Changed { router }).await {
            tracing::warn!(%router, error = %e, "cannot announce a changed router; peers catch up at their next poll");
        }
    }
}

/// Cluster mode: tells every node to close a revoked router's link. Returns
/// whether another node held it, as the directory says.
pub async fn announce_revoked(state: &AppState, router: Uuid) -> bool {
    let Some(c) = &state.cluster else {
        return false;
    };
    let elsewhere = matches!(c.lookup(router).await, Ok(Holder::Node { .. }));
    if let Err(e) = c.publish(&Event::Revoked { router }).await {
        tracing::warn!(%router, error = %e, "cannot announce a revocation; peers catch up at their next poll");
    }
    elsewhere
}

/// The cluster part of `/health`: this node, the nodes present, and whether Redis
/// answers (and how fast). A node that cannot reach Redis still answers 200: it
/// is alive and says what is wrong; calls needing Redis answer 503 meanwhile.
pub async fn health(state: &AppState) -> serde_json::Value {
    let Some(c) = &state.cluster else {
        return serde_json::Value::Null;
    };
    let started = std::time::Instant::now();
    let nodes = c.nodes().await;
    let redis_ms = started.elapsed().as_secs_f64() * 1000.0;
    match nodes {
        Ok(nodes) => serde_json::json!({
            "node_id": c.node_id,
            "redis": "ok",
            "redis_ms": (redis_ms * 1000.0).round() / 1000.0,
            "nodes": nodes.iter().map(|(id, addr)| serde_json::json!({"node_id": id, "internal_address": addr})).collect::<Vec<_>>(),
            "peers_connected": c.peers.connected(),
        }),
        Err(e) => serde_json::json!({
            "node_id": c.node_id,
            "redis": "unreachable",
            "redis_error": e.to_string(),
            "peers_connected": c.peers.connected(),
        }),
    }
}

/// Keeps an agent report where every node's admin view finds it: in Redis in a
/// cluster (this node's memory when Redis does not answer), in memory otherwise.
pub async fn store_report(state: &AppState, router: Uuid, report: StoredReport) {
    if let Some(c) = &state.cluster {
        match serde_json::to_string(&report) {
            Ok(json) => match c.push_report(router, json, KEEP_PER_ROUTER).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(%router, error = %e, "cannot keep a report in Redis; kept on this node only")
                }
            },
            Err(e) => tracing::warn!(%router, error = %e, "cannot serialise a report"),
        }
    }
    state.reports.push(router, report);
}

/// A router's latest reports, newest first (see [`store_report`]).
pub async fn recent_reports(state: &AppState, router: Uuid) -> Result<Vec<StoredReport>, ApiError> {
    let Some(c) = &state.cluster else {
        return Ok(state.reports.recent(router));
    };
    let stored = c
        .recent_reports(router)
        .await
        .map_err(|e| ApiError::ClusterUnavailable(e.to_string()))?;
    Ok(stored
        .iter()
        .filter_map(|j| serde_json::from_str(j).ok())
        .collect())
}

/// Runs the node's background work until the process ends.
pub async fn run(state: Arc<AppState>) {
    let Some(cluster) = state.cluster.clone() else {
        return;
    };
    tokio::join!(heartbeat(&state, &cluster), listen(&state, &cluster));
}

async fn heartbeat(state: &AppState, cluster: &Cluster) {
    let claims = &cluster.claims;
    let mut tick = tokio::time::interval(cluster.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut epoch: Option<String> = None;
    loop {
        tick.tick().await;
        if let Err(e) = cluster.heartbeat_once(state.clock.now_ms()).await {
            tracing::warn!(error = %e, "cluster heartbeat failed");
            continue;
        }
        // Redis restarted without its data: every claim is gone; put ours back.
        match cluster.epoch().await {
            Ok(now) => {
                let lost = epoch.as_ref().is_some_and(|before| *before != now);
                epoch = Some(now);
                let pending: Vec<(Uuid, u64, u64)> = claims
                    .map
                    .locked()
                    .iter()
                    .filter(|(_, (_, g))| lost || *g == 0)
                    .map(|(r, (lg, g))| (*r, *lg, *g))
                    .collect();
                if lost && !pending.is_empty() {
                    tracing::warn!(
                        links = pending.len(),
                        "Redis lost the link directory; entering this node's links again"
                    );
                }
                for (router, lg, g) in pending {
                    if state.links.generation(router) != Some(lg) {
                        continue;
                    }
                    let r = if g == 0 {
                        cluster.claim(router).await.map(Some)
                    } else {
                        cluster.reassert(router, g).await.map(|_| None)
                    };
                    match r {
                        Ok(Some(new)) => {
                            claims.map.locked().insert(router, (lg, new));
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot enter links in the directory");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the cluster epoch"),
        }
    }
}

async fn listen(state: &AppState, cluster: &Cluster) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut pubsub = match cluster.subscribe().await {
            Ok(p) => {
                backoff = Duration::from_millis(100);
                p
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to cluster events; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let mut messages = pubsub.on_message();
        while let Some(msg) = messages.next().await {
            let Ok(text) = msg.get_payload::<String>() else {
                continue;
            };
            cluster
                .metrics
                .events_received
                .fetch_add(1, Ordering::Relaxed);
            match Event::parse(&text) {
                Some(e) => apply(state, cluster, e).await,
                None => tracing::debug!(%text, "unknown cluster event ignored"),
            }
        }
        tracing::warn!("cluster event subscription ended; subscribing again");
    }
}

async fn apply(state: &AppState, cluster: &Cluster, event: Event) {
    match event {
        Event::Linked {
            router,
            generation,
            node,
        } if node != cluster.node_id => {
            // The router's agent linked to another node: calls go there now; the
            // ones in flight on our link get the command timeout to finish. Unless
            // our own claim is the newer one (messages and claims cross).
            let ours = cluster.claims.map.locked().get(&router).copied();
            let newer_here = match ours {
                Some((_, g)) if g > 0 => g > generation,
                // Our claim is on its way: the directory has the last word.
                Some(_) => matches!(cluster.lookup(router).await, Ok(Holder::Here) | Err(_)),
                None => false,
            };
            if newer_here {
                return;
            }
            if let Some((_, close)) = state.links.supersede(router) {
                cluster
                    .metrics
                    .links_superseded
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(%router, %node, "router linked to another node; letting go here");
                let grace = state.config.timeouts.command;
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    let _ = close.send(());
                });
            }
        }
        Event::Linked { .. } => {}
        Event::Revoked { router } => {
            // Closed at once, whatever the registry says now: the broadcast comes
            // after the revocation committed, and PostgreSQL may be slow or down.
            if let Some(meta) = state.routers.write_locked().get_mut(&router) {
                meta.revoked = true;
            }
            if state.links.close(router) {
                tracing::info!(%router, "revoked on another node: link closed");
            }
            reload_router(state, router).await;
        }
        Event::Changed { router } => reload_router(state, router).await,
    }
}

/// Re-reads one router from the registry into the auth cache.
async fn reload_router(state: &AppState, router: Uuid) {
    if let Err(e) = state.refresh_router(router).await {
        tracing::warn!(%router, error = %e, "cannot re-read a changed router; the registry poll catches up");
    }
}
