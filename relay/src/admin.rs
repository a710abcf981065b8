//! `/api/admin/routers`: create a router with a one-time enrollment token, list
//! routers with their online state, show one, revoke one (its link closes at once),
//! and issue a fresh token for a router that must enroll again.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

use crate::auth;
use crate::error::ApiError;
use crate::http::{self, only, Args, Body, Ctx};
use crate::recent_reports::StoredReport;
use crate::state::AppState;
use crate::store::RouterRow;

pub async fn dispatch(
    state: &Arc<AppState>,
    req: Request<Incoming>,
    rest: &str,
    ctx: &Ctx,
) -> Result<Response<Body>, ApiError> {
    let segments: Vec<&str> = rest.split('/').skip(1).collect();
    match segments.as_slice() {
        [] | [""] => match *req.method() {
            Method::POST => create(state, req, ctx).await,
            Method::GET => list(state, &req, ctx),
            _ => Err(ApiError::MethodNotAllowed("GET, POST".into())),
        },
        [id] => {
            let id = parse_id(id)?;
            match *req.method() {
                Method::GET => {
                    let row = state
                        .with_store(|s| s.router(id))?
                        .ok_or_else(|| ApiError::RouterNotFound(id.to_string()))?;
                    let mut one = view(state, &row);
                    one.recent_reports = Some(state.reports.recent(id));
                    Ok(http::ok(StatusCode::OK, one, ctx))
                }
                Method::DELETE => revoke(state, id, ctx),
                _ => Err(ApiError::MethodNotAllowed("GET, DELETE".into())),
            }
        }
        [id, "token"] => {
            only(&req, &[Method::POST])?;
            let id = parse_id(id)?;
            new_token(state, id, ctx)
        }
        _ => Err(ApiError::NotFound(format!("/api/admin/routers{rest}"))),
    }
}

fn parse_id(s: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(s)
        .map_err(|_| ApiError::InvalidParameter(format!("router id must be a UUID, got {s:?}")))
}

async fn create(
    state: &Arc<AppState>,
    req: Request<Incoming>,
    ctx: &Ctx,
) -> Result<Response<Body>, ApiError> {
    let (_, body) =
        http::read_json(req, state.config.max_body_bytes, state.config.timeouts.body).await?;
    let args = Args {
        body: Some(&body),
        query: &[],
    };
    let owner = args.label("ownerUserId", 128)?;
    let name = args.label("name", 64)?;
    let id = Uuid::new_v4();
    let token = auth::random_hex32()?;
    let now = state.clock.now_ms();
    let expires_at = now + state.config.enrollment_token_ttl.as_millis() as i64;
    let row = state.with_store(|s| {
        s.create_router(
            id,
            &name,
            &owner,
            &auth::sha256(token.as_bytes()),
            expires_at,
            now,
        )
    })?;
    state.cache_router(&row);
    tracing::info!(router_id = %id, owner_user_id = %owner, "router created");
    let created = Created {
        router: view(state, &row),
        enrollment_token: token,
        token_expires_at: http::rfc3339_ms(expires_at),
        relay_fingerprint: &state.fingerprint,
    };
    Ok(http::ok(StatusCode::CREATED, created, ctx))
}

fn list(
    state: &Arc<AppState>,
    req: &Request<Incoming>,
    ctx: &Ctx,
) -> Result<Response<Body>, ApiError> {
    let query = http::query_pairs(req.uri().query());
    let args = Args {
        body: None,
        query: &query,
    };
    let owner = match args.get("ownerUserId") {
        Some(_) => Some(args.label("ownerUserId", 128)?),
        None => None,
    };
    let rows = state.with_store(|s| s.routers())?;
    let routers: Vec<RouterView> = rows
        .iter()
        .filter(|r| owner.as_ref().is_none_or(|o| &r.owner_user_id == o))
        .map(|r| view(state, r))
        .collect();
    let online = routers.iter().filter(|r| r.online).count();
    let total = routers.len();
    Ok(http::ok(
        StatusCode::OK,
        RouterList {
            routers,
            total,
            online,
        },
        ctx,
    ))
}

fn revoke(state: &Arc<AppState>, id: Uuid, ctx: &Ctx) -> Result<Response<Body>, ApiError> {
    let now = state.clock.now_ms();
    let row = state
        .with_store(|s| s.revoke(id, now))
        .map_err(|e| match e {
            ApiError::RouterNotFound(_) => ApiError::RouterNotFound(id.to_string()),
            other => other,
        })?;
    state.cache_router(&row);
    let was_connected = state.links.close(id);
    tracing::info!(router_id = %id, was_connected, "router revoked");
    Ok(http::ok(
        StatusCode::OK,
        json!({"router_id": id, "revoked": true, "link_closed": was_connected}),
        ctx,
    ))
}

fn new_token(state: &Arc<AppState>, id: Uuid, ctx: &Ctx) -> Result<Response<Body>, ApiError> {
    let token = auth::random_hex32()?;
    let now = state.clock.now_ms();
    let expires_at = now + state.config.enrollment_token_ttl.as_millis() as i64;
    state
        .with_store(|s| s.add_token(id, &auth::sha256(token.as_bytes()), expires_at))
        .map_err(|e| match e {
            ApiError::RouterNotFound(_) => ApiError::RouterNotFound(id.to_string()),
            other => other,
        })?;
    Ok(http::ok(
        StatusCode::CREATED,
        json!({
            "router_id": id,
            "enrollment_token": token,
            "token_expires_at": http::rfc3339_ms(expires_at),
            "relay_fingerprint": state.fingerprint,
        }),
        ctx,
    ))
}

/// A router as the admin API shows it. Typed and borrowed so a list of many
/// routers serialises straight into the response without a tree per row.
#[derive(Serialize)]
struct RouterView<'a> {
    router_id: Uuid,
    name: &'a str,
    owner_user_id: &'a str,
    online: bool,
    connected_since: Option<String>,
    agent_version: Option<String>,
    last_seen: Option<String>,
    created_at: String,
    enrolled: bool,
    enrolled_at: Option<String>,
    revoked: bool,
    revoked_at: Option<String>,
    /// How often the router's live link was replaced by a new one in the last
    /// minute; from three on, two agents probably share its identity.
    link_replacements: usize,
    duplicate_identity_suspected: bool,
    /// The latest agent reports (`POST /agent/v1/report`), newest first; in memory,
    /// so empty after a relay restart. Only in the one-router view: a list of many
    /// routers stays small.
    #[serde(skip_serializing_if = "Option::is_none")]
    recent_reports: Option<Vec<StoredReport>>,
}

#[derive(Serialize)]
struct Created<'a> {
    #[serde(flatten)]
    router: RouterView<'a>,
    enrollment_token: String,
    token_expires_at: String,
    relay_fingerprint: &'a str,
}

#[derive(Serialize)]
struct RouterList<'a> {
    routers: Vec<RouterView<'a>>,
    total: usize,
    online: usize,
}

fn view<'a>(state: &AppState, r: &'a RouterRow) -> RouterView<'a> {
    let link = state.links.info(r.id);
    let replaced = state.links.replacements(r.id, state.clock.instant());
    RouterView {
        router_id: r.id,
        name: &r.name,
        owner_user_id: &r.owner_user_id,
        online: link.is_some(),
        connected_since: link.as_ref().map(|l| {
            http::rfc3339_ms(
                l.connected_at
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(0),
            )
        }),
        agent_version: link
            .map(|l| l.agent_version)
            .or_else(|| r.agent_version.clone()),
        last_seen: r.last_seen.map(http::rfc3339_ms),
        created_at: http::rfc3339_ms(r.created_at),
        enrolled: r.enrolled_at.is_some(),
        enrolled_at: r.enrolled_at.map(http::rfc3339_ms),
        revoked: r.revoked_at.is_some(),
        revoked_at: r.revoked_at.map(http::rfc3339_ms),
        link_replacements: replaced.recent,
        duplicate_identity_suspected: replaced.duplicate_identity_suspected,
        recent_reports: None,
    }
}
