//! `POST /agent/v1/enroll`: an agent trades its one-time token for its router id and
//! secret. The token is the only credential, so attempts are rate-limited per address.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use netpilot_proto::link::EnrollResponse;

use crate::auth;
use crate::error::ApiError;
use crate::http::{self, Args, Body, Ctx};
use crate::state::AppState;
use crate::sync::Locked;

pub async fn enroll(
    state: &Arc<AppState>,
    req: Request<Incoming>,
    peer: SocketAddr,
    ctx: &Ctx,
) -> Result<Response<Body>, ApiError> {
    let allowed = state
        .enroll_limiter
        .locked()
        .allow(peer.ip(), state.clock.instant());
    if !allowed {
        return Err(ApiError::RateLimited);
    }
    let (_, body) = http::read_json(req, 16 * 1024, state.config.timeouts.body).await?;
    let args = Args {
        body: Some(&body),
        query: &[],
    };
    let token = args.label("token", 128)?;
    if token.len() != 64 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::TokenInvalid);
    }
    let secret = auth::random_hex32()?;
    let token_hash = auth::sha256(token.to_ascii_lowercase().as_bytes());
    let secret_hash = auth::sha256(secret.as_bytes());
    let now = state.clock.now_ms();
    let row = state
        .registry
        .redeem_token(&token_hash, &secret_hash, now)
        .await?;
    state.cache_router(&row);
    crate::cluster_sync::announce_changed(state, row.id).await;
    state.metrics.enrollments.fetch_add(1, Ordering::Relaxed);
    let hostname = args.label("hostname", 253).ok();
    tracing::info!(router_id = %row.id, %peer, ?hostname, "router enrolled");
    Ok(http::ok(
        StatusCode::OK,
        EnrollResponse {
            router_id: row.id.to_string(),
            router_secret: secret,
            name: row.name,
        },
        ctx,
    ))
}
