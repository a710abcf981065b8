//! The relay's request dispatcher: one entry point for every HTTP request on the
//! shared port. It authenticates, picks the handler and turns errors into envelopes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use netpilot_proto::link::{
    CONNECT_PATH, ENROLL_PATH, HEADER_REQUEST_ID, REPORT_PATH, SPEEDTEST_DOWNLOAD_PATH,
    SPEEDTEST_PING_PATH, SPEEDTEST_UPLOAD_PATH,
};
use netpilot_proto::routes::{match_route, RouteError};
use tracing::{field, Instrument};

use crate::error::ApiError;
use crate::http::{self, only, Body, Ctx};
use crate::state::AppState;
use crate::{
    admin, agent_link, auth, enroll, forward, metrics_http, report, session_api, speedtest,
};

pub async fn handle(
    state: Arc<AppState>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Body>, Infallible> {
    let ctx = Ctx::new(req.headers().get(HEADER_REQUEST_ID));
    let span = tracing::info_span!(
        "request",
        request_id = %ctx.request_id,
        method = %req.method(),
        path = %req.uri().path(),
        session_id = field::Empty,
        router_id = field::Empty,
    );
    async move {
        let result = dispatch(&state, req, peer, &ctx).await;
        let mut resp = match result {
            Ok(resp) => resp,
            Err(err) => {
                let code = err.code();
                let status = err.status();
                state.metrics.record_error(code);
                match &err {
                    ApiError::Internal(detail) => tracing::error!(%detail, "internal error"),
                    ApiError::RegistryUnavailable(detail) => {
                        tracing::warn!(%detail, "registry unavailable")
                    }
                    _ if status.is_server_error() => {
                        tracing::warn!(%code, error = %err, "call failed")
                    }
                    _ => tracing::debug!(%code, error = %err, "call refused"),
                }
                http::error(&err, &ctx)
            }
        };
        // Every answer, the relay's own and the routers' it passes on: browsers take
        // the content type as given, never guess HTML from a body.
        resp.headers_mut().insert(
            hyper::header::X_CONTENT_TYPE_OPTIONS,
            hyper::header::HeaderValue::from_static("nosniff"),
        );
        Ok(resp)
    }
    .instrument(span)
    .await
}

async fn dispatch(
    state: &Arc<AppState>,
    req: Request<Incoming>,
    peer: SocketAddr,
    ctx: &Ctx,
) -> Result<Response<Body>, ApiError> {
    check_head_size(&req)?;
    let path = req.uri().path().to_owned();
    match path.as_str() {
        "/health" => {
            only(&req, &[Method::GET])?;
            if state.drain.is_draining() {
                return Ok(draining_health(ctx));
            }
            let mut health = serde_json::json!({
                "status": "ok",
                "version": env!("CARGO_PKG_VERSION"),
                "connected_agents": state.links.len(),
            });
            if state.cluster.is_some() {
                health["cluster"] = crate::cluster_sync::health(state).await;
            }
            return Ok(http::ok(StatusCode::OK, health, ctx));
        }
        // Behind the key here; `metrics_listen` serves scrapers without it.
        "/metrics" => {
            only(&req, &[Method::GET])?;
            auth::check_api_key(&req, &state.config.api_key)?;
            return Ok(http::text(
                StatusCode::OK,
                metrics_http::CONTENT_TYPE_TEXT,
                metrics_http::scrape(state).await,
            ));
        }
        CONNECT_PATH => return agent_link::connect(state, req, peer).await,
        ENROLL_PATH => {
            only(&req, &[Method::POST])?;
            return enroll::enroll(state, req, peer, ctx).await;
        }
        REPORT_PATH => {
            only(&req, &[Method::POST])?;
            return report::report(state, req, ctx).await;
        }
        SPEEDTEST_PING_PATH => {
            only(&req, &[Method::GET])?;
            return speedtest::ping(state, &req, ctx).await;
        }
        SPEEDTEST_DOWNLOAD_PATH => {
            only(&req, &[Method::GET])?;
            return speedtest::download(state, &req).await;
        }
        SPEEDTEST_UPLOAD_PATH => {
            only(&req, &[Method::POST])?;
            return speedtest::upload(state, req, ctx).await;
        }
        _ => {}
    }
    if !path.starts_with("/api/") {
        return Err(ApiError::NotFound(path));
    }
    auth::check_api_key(&req, &state.config.api_key)?;
    // `/api/admin/routers` itself or below it; `/api/admin/routersXYZ` is not it.
    if let Some(rest) = path
        .strip_prefix("/api/admin/routers")
        .filter(|r| r.is_empty() || r.starts_with('/'))
    {
        return admin::dispatch(state, req, rest, ctx).await;
    }
    if let Some(rest) = path.strip_prefix("/api/session/") {
        return session_api::dispatch(state, req, rest, ctx).await;
    }
    let route = match match_route(req.method().as_str(), &path) {
        Ok(m) => m,
        Err(RouteError::NotFound) => return Err(ApiError::NotFound(path)),
        Err(RouteError::MethodNotAllowed(m)) => {
            let allowed: Vec<&str> = m.iter().map(|m| m.as_str()).collect();
            return Err(ApiError::MethodNotAllowed(allowed.join(", ")));
        }
        Err(RouteError::InvalidParam { name, reason }) => {
            return Err(ApiError::InvalidParameter(format!(
                "path parameter {name}: {reason}"
            )))
        }
    };
    // Counted in the forwarded-call metrics only once sent to the router.
    forward::router_call(state, req, route, ctx).await
}

/// `/health` of a draining node: 503, so load balancers send new connections
/// elsewhere, as an error envelope that also says `"status": "draining"` where the
/// healthy answer says `"ok"`.
fn draining_health(ctx: &Ctx) -> Response<Body> {
    let err = ApiError::RelayDraining;
    let mut v = serde_json::to_value(netpilot_proto::envelope::Envelope::<()>::err(
        err.code(),
        err.to_string(),
        ctx.meta(),
    ))
    .unwrap_or_default();
    v["status"] = serde_json::Value::from("draining");
    http::json_response(err.status(), &v, ctx)
}

/// Most header bytes a request may carry, counted as HTTP/2 counts a header list
/// (name, value and 32 bytes per field) for both protocols. The HTTP layer itself
/// stops at [`HTTP_HEADER_HARD_LIMIT`]; between the two the client gets an envelope.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Where hyper refuses a request head itself (HTTP/1.1 read buffer, HTTP/2
/// `SETTINGS_MAX_HEADER_LIST_SIZE`), with a bare status or a closed connection.
pub const HTTP_HEADER_HARD_LIMIT: usize = 64 * 1024;
/// Longest request target (path and query).
pub const MAX_TARGET_BYTES: usize = 8 * 1024;

/// Refuses request heads over the caps before any handler sees them: no route
/// needs more, and a huge query would otherwise be parsed into pairs.
fn check_head_size(req: &Request<Incoming>) -> Result<(), ApiError> {
    let target = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if target > MAX_TARGET_BYTES {
        return Err(ApiError::UriTooLong(MAX_TARGET_BYTES));
    }
    let headers: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 32)
        .sum();
    if headers > MAX_HEADER_BYTES {
        return Err(ApiError::HeadersTooLarge(MAX_HEADER_BYTES));
    }
    Ok(())
}
