//! `/api/admin/routers`: create a router with a one-time enrollment token, list
//! routers with their online state (in pages: one answer for 19,500 routers was
//! 6.3 MiB), show one, revoke one (its link closes at once),
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
use crate::registry::RouterRow;
use crate::state::AppState;
use crate::sync::ReadWrite;

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
            Method::GET => list(state, &req, ctx).await,
            _ => Err(ApiError::MethodNotAllowed("GET, POST".into())),
        },
        [id] => {
            let id = parse_id(id)?;
            match *req.method() {
                Method::GET => {
                    let row = state
                        .registry
                        .router(id)
                        .await?
                        .ok_or_else(|| ApiError::RouterNotFound(id.to_string()))?;
                    let mut one = view(state, &row);
                    one.recent_reports =
                        Some(crate::cluster_sync::recent_reports(state, id).await?);
                    place(state, std::slice::from_mut(&mut one)).await?;
                    Ok(http::ok(StatusCode::OK, one, ctx))
                }
                Method::DELETE => revoke(state, id, ctx).await,
                _ => Err(ApiError::MethodNotAllowed("GET, DELETE".into())),
            }
        }
        [id, "token"] => {
            only(&req, &[Method::POST])?;
            let id = parse_id(id)?;
            new_token(state, id, ctx).await
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
    let row = state
        .registry
        .create_router(
            id,
            &name,
            &owner,
            &auth::sha256(token.as_bytes()),
            expires_at,
            now,
        )
        .await?;
    state.cache_router(&row);
    crate::cluster_sync::announce_changed(state, row.id).await;
    tracing::info!(router_id = %id, owner_user_id = %owner, "router created");
    let created = Created {
        router: view(state, &row),
        enrollment_token: token,
        token_expires_at: http::rfc3339_ms(expires_at),
        relay_fingerprint: &state.fingerprint,
    };
    Ok(http::ok(StatusCode::CREATED, created, ctx))
}

/// Routers per page of the admin list when the client names no `limit`.
pub const DEFAULT_PAGE: usize = 500;
/// The most one page may hold: about 1.7 MiB of JSON.
pub const MAX_PAGE: usize = 5000;

/// One page of routers, oldest first. `limit` (1-5000, default 500) and `cursor`
/// (the `next_cursor` of the page before); `total` and `online` count every
/// router of the filter, not only this page's.
async fn list(
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
    let limit = page_limit(args.get("limit"))?;
    let after = match args.opt_uuid("cursor")? {
        Some(id) => {
            let row = state.registry.router(id).await?.ok_or_else(|| {
                ApiError::InvalidParameter(format!(
                    "cursor {id} is not a router: pass the next_cursor of the page before"
                ))
            })?;
            Some((row.created_at, row.id))
        }
        None => None,
    };
    // One more than the page, to know whether another page follows.
    let mut rows = state
        .registry
        .routers_page(owner.as_deref(), after, limit + 1)
        .await?;
    let next_cursor = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|r| r.id)
    } else {
        None
    };
    let mut routers: Vec<RouterView> = rows.iter().map(|r| view(state, r)).collect();
    place(state, &mut routers).await?;
    let (total, mut online) = counts(state, owner.as_deref());
    if let Some(c) = &state.cluster {
        online = cluster_online(state, c, owner.as_deref()).await?;
    }
    Ok(http::ok(
        StatusCode::OK,
        RouterList {
            routers,
            total,
            online,
            limit,
            next_cursor,
        },
        ctx,
    ))
}

fn page_limit(v: Option<serde_json::Value>) -> Result<usize, ApiError> {
    let bad = || ApiError::InvalidParameter(format!("limit must be an integer 1..{MAX_PAGE}"));
    match v {
        None => Ok(DEFAULT_PAGE),
        Some(serde_json::Value::String(s)) => {
            let s = s.trim();
            if s.is_empty() || s.len() > 6 || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            let n: usize = s.parse().map_err(|_| bad())?;
            if (1..=MAX_PAGE).contains(&n) {
                Ok(n)
            } else {
                Err(bad())
            }
        }
        Some(_) => Err(bad()),
    }
}

/// Cluster mode: which node holds each router's link, as the directory says; a
/// router is online when a present node holds it.
async fn place(state: &AppState, views: &mut [RouterView<'_>]) -> Result<(), ApiError> {
    let Some(c) = &state.cluster else {
        return Ok(());
    };
    let ids: Vec<Uuid> = views.iter().map(|v| v.router_id).collect();
    let holders = c
        .holders(&ids)
        .await
        .map_err(|e| ApiError::ClusterUnavailable(e.to_string()))?;
    for (v, h) in views.iter_mut().zip(holders) {
        v.online = h.is_some();
        v.node = Some(h);
    }
    Ok(())
}

/// Cluster mode: routers online in the whole cluster (of one owner, or all).
async fn cluster_online(
    state: &AppState,
    c: &crate::cluster::Cluster,
    owner: Option<&str>,
) -> Result<usize, ApiError> {
    let ids: Vec<Uuid> = state
        .routers
        .read_locked()
        .iter()
        .filter(|(_, m)| owner.is_none_or(|o| m.owner_user_id == o))
        .map(|(id, _)| *id)
        .collect();
    Ok(c.holders(&ids)
        .await
        .map_err(|e| ApiError::ClusterUnavailable(e.to_string()))?
        .iter()
        .filter(|h| h.is_some())
        .count())
}

/// Routers of the filter and how many are online, from memory: the router cache
/// holds every router, the link registry every live link.
fn counts(state: &AppState, owner: Option<&str>) -> (usize, usize) {
    let live = state.links.live_ids();
    let routers = state.routers.read_locked();
    let of_owner = |m: &crate::auth::RouterMeta| owner.is_none_or(|o| m.owner_user_id == o);
    let total = routers.values().filter(|m| of_owner(m)).count();
    let online = live
        .iter()
        .filter(|id| routers.get(id).is_some_and(of_owner))
        .count();
    (total, online)
}

async fn revoke(state: &Arc<AppState>, id: Uuid, ctx: &Ctx) -> Result<Response<Body>, ApiError> {
    let now = state.clock.now_ms();
    let row = state
        .registry
        .revoke(id, now)
        .await
        .map_err(|e| match ApiError::from(e) {
            ApiError::RouterNotFound(_) => ApiError::RouterNotFound(id.to_string()),
            other => other,
        })?;
    state.cache_router(&row);
    // Cluster mode: every node closes the link it may hold, at once.
    let elsewhere = crate::cluster_sync::announce_revoked(state, id).await;
    let was_connected = state.links.close(id) || elsewhere;
    tracing::info!(router_id = %id, was_connected, "router revoked");
    Ok(http::ok(
        StatusCode::OK,
        json!({"router_id": id, "revoked": true, "link_closed": was_connected}),
        ctx,
    ))
}

async fn new_token(state: &Arc<AppState>, id: Uuid, ctx: &Ctx) -> Result<Response<Body>, ApiError> {
    let token = auth::random_hex32()?;
    let now = state.clock.now_ms();
    let expires_at = now + state.config.enrollment_token_ttl.as_millis() as i64;
    state
        .registry
        .add_token(id, &auth::sha256(token.as_bytes()), expires_at)
        .await
        .map_err(|e| match ApiError::from(e) {
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
    /// Cluster mode: the node holding the router's link (null when offline).
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<Option<String>>,
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
    limit: usize,
    /// Pass as `cursor` for the next page; null on the last page.
    next_cursor: Option<Uuid>,
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
        node: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn page_limit_defaults_and_stays_in_range() {
        let s = |v: &str| Some(Value::String(v.into()));
        assert_eq!(page_limit(None).unwrap(), DEFAULT_PAGE);
        assert_eq!(page_limit(s("1")).unwrap(), 1);
        assert_eq!(page_limit(s(" 5000 ")).unwrap(), MAX_PAGE);
        for bad in [
            "0",
            "5001",
            "-1",
            "1.5",
            "",
            "abc",
            "99999999999999999999",
            "+3",
        ] {
            assert!(page_limit(s(bad)).is_err(), "{bad}");
        }
    }
}
