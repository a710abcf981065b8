//! The agent side of the shared port: authenticate `GET /agent/v1/connect`, answer
//! `101`, and run the link — the relay becomes the HTTP/2 client on the upgraded
//! stream — until it dies, goes silent (`link_health`), is replaced by a newer
//! link, or is revoked. The running link is entered in the link registry, where
//! calls find it.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{CONNECTION, UPGRADE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use netpilot_proto::link::{HEADER_AGENT_VERSION, UPGRADE_PROTOCOL};
use tracing::Instrument;
use uuid::Uuid;

use crate::capacity::LinkSlot;
use crate::error::ApiError;
use crate::http::{self, Body};
use crate::link_health::{LinkHealth, PingRules, Silence, Watched};
use crate::link_registry::LinkSender;
use crate::state::AppState;

pub async fn connect(
    state: &Arc<AppState>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Body>, ApiError> {
    if req.method() != Method::GET {
        return Err(ApiError::MethodNotAllowed("GET".into()));
    }
    let upgrade_ok = req
        .headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(UPGRADE_PROTOCOL));
    if !upgrade_ok || req.version() != hyper::Version::HTTP_11 {
        return Err(ApiError::InvalidParameter(format!(
            "expected an HTTP/1.1 upgrade to {UPGRADE_PROTOCOL}"
        )));
    }
    let version: String = req
        .headers()
        .get(HEADER_AGENT_VERSION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("unknown")
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(64)
        .collect();
    let router_id = match state.authenticate_agent(&req).await {
        Ok(id) => id,
        Err(e) => {
            state.metrics.link_rejects.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, error = %e, "agent link refused");
            return Err(e);
        }
    };
    if state.drain.is_draining() {
        state.metrics.link_rejects.fetch_add(1, Ordering::Relaxed);
        return Err(ApiError::RelayDraining);
    }
    // After authentication: a flood of bad credentials spends none of the rate
    // that real routers coming back need.
    let slot = match state.capacity.try_link(state.clock.instant()) {
        Ok(slot) => slot,
        Err(why) => {
            if let Some(suppressed) = state.link_refusal_log.hit(std::time::Instant::now()) {
                tracing::warn!(
                    reason = why.reason(),
                    suppressed,
                    "agent link refused: the node keeps its capacity for the web app"
                );
            }
            return Err(ApiError::LinksBusy {
                reason: why.reason(),
                retry_after_secs: why.retry_after_secs(),
            });
        }
    };
    // Cluster mode: in the directory before the agent hears 101. An agent moving
    // here from a draining node lets go of its old link once it has our answer,
    // so the entry must already name this node then (calls that come before the
    // link is ready wait for it: `forward`'s handover).
    let claim = crate::cluster_sync::claim_early(state, router_id).await;
    let on_upgrade = hyper::upgrade::on(&mut req);
    let span =
        tracing::info_span!(parent: None, "link", %router_id, %peer, agent_version = %version);
    tokio::spawn(
        run_link(state.clone(), router_id, version, on_upgrade, slot, claim).instrument(span),
    );
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(UPGRADE, UPGRADE_PROTOCOL)
        .header(CONNECTION, "upgrade")
        .body(http::full(Bytes::new()))
        .expect("static response parts"))
}

async fn run_link(
    state: Arc<AppState>,
    router_id: Uuid,
    version: String,
    on_upgrade: hyper::upgrade::OnUpgrade,
    // Held for the link's life: it counts against `capacity.max_links`.
    _slot: LinkSlot,
    // The directory claim made before the upgrade (cluster mode).
    claim: Option<u64>,
) {
    let upgraded = match on_upgrade.await {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!(error = %e, "upgrade failed");
            crate::cluster_sync::unclaim(&state, router_id, claim).await;
            return;
        }
    };
    let health = LinkHealth::new();
    let io = Watched::new(TokioIo::new(upgraded), health.clone());
    let (send, mut conn) = match h2_client().handshake::<_, Bytes>(io).await {
        Ok(pair) => pair,
        Err(e) => {
            tracing::warn!(error = %e, "h2 handshake on the link failed");
            crate::cluster_sync::unclaim(&state, router_id, claim).await;
            return;
        }
    };
    let pinger = conn
        .ping_pong()
        .expect("a new connection's PING handle is untaken");
    let sender = LinkSender {
        send,
        health: health.clone(),
    };
    let (generation, closed_by_relay, replaced) =
        state
            .links
            .register(router_id, sender, version.clone(), state.clock.instant());
    state.metrics.link_connects.fetch_add(1, Ordering::Relaxed);
    if let Some(r) = replaced {
        state
            .metrics
            .link_replacements
            .fetch_add(1, Ordering::Relaxed);
        if r.warn {
            tracing::warn!(
                replacements = r.recent,
                "this router's link keeps replacing a live one: two agents probably use one identity (a copied state directory?)"
            );
        }
    }
    // Cluster mode: peers route this router's calls here from now on.
    crate::cluster_sync::link_up(&state, router_id, generation, claim).await;
    touch(&state, router_id, Some(&version)).await;
    tracing::info!("agent link up");
    // Upgraded just before the drain began, registered just after it told every
    // link: told here (the flag is set before the drain reads the registry).
    if state.drain.is_draining() {
        if let Some(sender) = state.links.sender(router_id) {
            tokio::spawn(crate::drain::tell(sender));
        }
    }
    // Boxed: the connection future is large and lives as long as the link.
    let conn = Box::pin(conn);
    let rules = PingRules::from_timeouts(&state.config.timeouts);
    // Biased: a replaced or revoked link also loses its last sender, which ends the
    // connection future too; the relay's own close is the cause worth logging.
    tokio::select! {
        biased;
        _ = closed_by_relay => tracing::info!("agent link closed by the relay"),
        r = conn => match r {
            Ok(()) => tracing::info!("agent link closed"),
            Err(e) => tracing::info!(error = %e, "agent link lost"),
        },
        silence = health.ping_loop(pinger, rules) => match silence {
            Silence::Unanswered(waited) => {
                state.metrics.link_silent.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    waited_ms = waited.as_millis() as u64,
                    "agent link silent: PING unanswered; closed"
                );
            }
            Silence::Lost(e) => tracing::info!(error = %e, "agent link lost"),
        },
    }
    // Out of the registry before calls hear the link is gone, so whoever is told
    // "offline" finds the router offline everywhere.
    state.links.remove(router_id, generation);
    health.mark_gone();
    crate::cluster_sync::link_down(&state, router_id, generation).await;
    touch(&state, router_id, None).await;
}

/// The relay's end of every link: the HTTP/2 client. Flow-control windows are
/// hyper's client defaults (a 2 MiB stream and 5 MiB connection window for what the
/// agent sends); PINGs are the link's own (`link_health`). Public so the speed-test
/// bench measures this very configuration.
pub fn h2_client() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_max_send_streams(100)
        .initial_window_size(2 * 1024 * 1024)
        .initial_connection_window_size(5 * 1024 * 1024)
        .max_frame_size(16 * 1024)
        .max_header_list_size(16 * 1024)
        .max_send_buffer_size(1024 * 1024)
        .max_local_error_reset_streams(Some(1024))
        .enable_push(false);
    b
}

/// Records last-seen (and the agent's version). In a cluster the write goes to
/// PostgreSQL, so it runs beside the link: the link's connection future is polled
/// only once this returns, and a slow database must not hold up its calls.
async fn touch(state: &Arc<AppState>, router_id: Uuid, version: Option<&str>) {
    let now = state.clock.now_ms();
    if state.registry.is_shared() {
        let (state, version) = (state.clone(), version.map(str::to_owned));
        tokio::spawn(
            async move { record_last_seen(&state, router_id, now, version.as_deref()).await }
                .in_current_span(),
        );
    } else {
        record_last_seen(state, router_id, now, version).await;
    }
}

async fn record_last_seen(state: &AppState, router_id: Uuid, now: i64, version: Option<&str>) {
    if let Err(e) = state.registry.touch(router_id, now, version).await {
        tracing::warn!(error = %e, "cannot record last-seen");
    }
}
