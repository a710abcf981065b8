//! `/api/session/*`: start, end, refresh and status of web-app sessions.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use uuid::Uuid;

use crate::error::ApiError;
use crate::forward;
use crate::http::{self, only, Args, Body, Ctx};
use crate::state::AppState;

pub async fn dispatch(
    state: &Arc<AppState>,
    req: Request<Incoming>,
    action: &str,
    ctx: &Ctx,
) -> Result<Response<Body>, ApiError> {
    match action {
        "start" | "end" | "refresh" => only(&req, &[Method::POST])?,
        "status" => only(&req, &[Method::GET])?,
        _ => return Err(ApiError::NotFound(format!("/api/session/{action}"))),
    }
    let query = http::query_pairs(req.uri().query());
    let body = if req.method() == Method::POST {
        Some(
            http::read_json(req, state.config.max_body_bytes, state.config.timeouts.body)
                .await?
                .1,
        )
    } else {
        None
    };
    let args = Args {
        body: body.as_ref(),
        query: &query,
    };
    let session_id = args.uuid("sessionId")?;
    tracing::Span::current().record("session_id", tracing::field::display(session_id));
    match action {
        "start" => start(state, &args, session_id, ctx).await,
        "end" => end(state, &args, session_id, ctx).await,
        "refresh" => {
            state
                .sessions
                .touch(session_id)
                .await
                .map_err(|e| e.into_api_error(session_id))?;
            Ok(http::ok(
                StatusCode::OK,
                json!({"message": format!("Session {session_id} refreshed")}),
                ctx,
            ))
        }
        _ => status(state, session_id, ctx).await,
    }
}

async fn start(
    state: &Arc<AppState>,
    args: &Args<'_>,
    session_id: Uuid,
    ctx: &Ctx,
) -> Result<Response<Body>, ApiError> {
    let user_id = args.label("userId", 128)?;
    let router_id = args.opt_uuid("routerId")?;
    let restart = args.opt_bool("restart")?.unwrap_or(false);
    if let Some(r) = router_id {
        tracing::Span::current().record("router_id", tracing::field::display(r));
        forward::check_owner(state, r, &user_id).await?;
    }
    state
        .sessions
        .start(session_id, &user_id, restart, router_id)
        .await
        .map_err(|e| e.into_api_error(session_id))?;
    let (reachable, ready, message) = match router_id {
        None => (false, false, "Session started".to_owned()),
        Some(r) => match forward::agent_health(state, r, session_id, &user_id, ctx).await {
            Ok(health) => {
                let ready = health
                    .get("infrastructure_ready")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false);
                (true, ready, "Session started; router connected".to_owned())
            }
            Err(ApiError::RouterOffline(_) | ApiError::LinkRefused(_)) => (
                false,
                false,
                "Session started; router is offline".to_owned(),
            ),
            Err(ApiError::CommandTimeout(_)) => (
                false,
                false,
                "Session started; router did not answer in time".to_owned(),
            ),
            Err(e) => (
                false,
                false,
                format!("Session started; router health check failed: {e}"),
            ),
        },
    };
    tracing::info!(%user_id, restart, "session started");
    Ok(http::ok(
        StatusCode::OK,
        json!({
            "session_id": session_id,
            "router_reachable": reachable,
            "infrastructure_ready": ready,
            "message": message,
        }),
        ctx,
    ))
}

async fn end(
    state: &Arc<AppState>,
    args: &Args<'_>,
    session_id: Uuid,
    ctx: &Ctx,
) -> Result<Response<Body>, ApiError> {
    // Without routerId the whole session ends: a `null` there is a client bug (an
    // unset variable), never a request to end everything.
    if args.is_null("routerId") {
        return Err(ApiError::InvalidParameter(
            "routerId must be a UUID string; leave it out to end the whole session".into(),
        ));
    }
    let router_id = args.opt_uuid("routerId")?;
    state
        .sessions
        .end(session_id, router_id)
        .await
        .map_err(|e| e.into_api_error(session_id))?;
    let message = match router_id {
        None => "Session ended".to_owned(),
        Some(r) => format!("Router {r} detached from session"),
    };
    Ok(http::ok(StatusCode::OK, json!({ "message": message }), ctx))
}

async fn status(
    state: &Arc<AppState>,
    session_id: Uuid,
    ctx: &Ctx,
) -> Result<Response<Body>, ApiError> {
    let view = state
        .sessions
        .status(session_id)
        .await
        .map_err(|e| e.into_api_error(session_id))?;
    // Cluster mode: online anywhere in the cluster, as the directory says.
    let online: Vec<bool> = match &state.cluster {
        None => view
            .routers
            .iter()
            .map(|a| state.links.sender(a.router_id).is_some())
            .collect(),
        Some(c) => {
            let ids: Vec<Uuid> = view.routers.iter().map(|a| a.router_id).collect();
            c.holders(&ids)
                .await
                .map_err(|e| ApiError::ClusterUnavailable(e.to_string()))?
                .iter()
                .map(Option::is_some)
                .collect()
        }
    };
    let routers: Vec<_> = view
        .routers
        .iter()
        .zip(online)
        .map(|(a, online)| {
            json!({
                "router_id": a.router_id,
                "online": online,
                "attached_for_s": a.attached_for.as_secs(),
                "idle_s": a.idle.as_secs(),
                "detaches_in_s": a.detaches_in.as_secs(),
            })
        })
        .collect();
    Ok(http::ok(
        StatusCode::OK,
        json!({
            "session_id": session_id,
            "user_id": view.user_id,
            "active": true,
            "age_s": view.age.as_secs(),
            "idle_s": view.idle.as_secs(),
            "expires_in_s": view.expires_in.as_secs(),
            "routers": routers,
        }),
        ctx,
    ))
}
