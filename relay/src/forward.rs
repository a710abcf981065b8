//! Forwarding a router operation: session and ownership checks, then one h2 stream
//! on the router's link, bounded by the command timeout. The agent's answer is
//! passed back as it is; the relay never makes one up.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, Response};
use netpilot_proto::link::{HEADER_REQUEST_ID, HEADER_SESSION_ID, HEADER_USER_ID};
use netpilot_proto::routes::RouteMatch;
use serde_json::Value;
use uuid::Uuid;

use crate::error::ApiError;
use crate::http::{self, Args, Body, Ctx};
use crate::link_registry::LinkSender;
use crate::state::AppState;

/// The most a router's answer may hold (CSV exports are the largest).
const MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;

pub async fn router_call(
    state: &Arc<AppState>,
    req: Request<Incoming>,
    route: RouteMatch,
    ctx: &Ctx,
) -> Result<Response<Body>, ApiError> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = http::query_pairs(req.uri().query());
    let (body_bytes, body) = if route.route.method.has_body() {
        let (b, m) =
            http::read_json(req, state.config.max_body_bytes, state.config.timeouts.body).await?;
        (Some(b), Some(m))
    } else {
        (None, None)
    };
    let args = Args {
        body: body.as_ref(),
        query: &query,
    };
    let session_id = args.uuid("sessionId")?;
    let router_id = args.uuid("routerId")?;
    let span = tracing::Span::current();
    span.record("session_id", tracing::field::display(session_id));
    span.record("router_id", tracing::field::display(router_id));

    let now = state.clock.instant();
    let user = state
        .sessions
        .lock()
        .expect("sessions lock")
        .touch(session_id, now)
        .map_err(|e| e.into_api_error(session_id))?;
    check_owner(state, router_id, &user)?;
    state
        .sessions
        .lock()
        .expect("sessions lock")
        .attach(session_id, router_id, now)
        .map_err(|e| e.into_api_error(session_id))?;

    // The agent does not need the relay's ids; everything else passes as it came.
    let kept: Vec<&(String, String)> = query
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "sessionId" | "session_id" | "routerId" | "router_id"
            )
        })
        .collect();
    let mut target = path;
    if !kept.is_empty() {
        let mut ser = form_urlencoded::Serializer::new(String::new());
        for (k, v) in kept {
            ser.append_pair(k, v);
        }
        target.push('?');
        target.push_str(&ser.finish());
    }
    let sender = state
        .links
        .sender(router_id)
        .ok_or_else(|| ApiError::RouterOffline(router_id.to_string()))?;
    let fwd = Forward {
        method,
        target,
        body: body_bytes,
        session_id,
        user: &user,
        request_id: &ctx.request_id,
    };
    let (parts, bytes) = send(state, sender, router_id, fwd).await?;
    let mut resp = Response::builder().status(parts.status);
    if let Some(ct) = parts.headers.get(CONTENT_TYPE) {
        resp = resp.header(CONTENT_TYPE, ct);
    }
    resp.header(HEADER_REQUEST_ID, &ctx.request_id)
        .body(http::full(bytes))
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// 404 for unknown or revoked routers, 403 when another user owns it.
pub fn check_owner(state: &AppState, router_id: Uuid, user: &str) -> Result<(), ApiError> {
    let meta = state
        .router_meta(router_id)
        .filter(|m| !m.revoked)
        .ok_or_else(|| ApiError::RouterNotFound(router_id.to_string()))?;
    if meta.owner_user_id != user {
        return Err(ApiError::Forbidden(format!(
            "router {router_id} does not belong to this session's user"
        )));
    }
    Ok(())
}

/// Asks the agent for its health (used by session start).
pub async fn agent_health(
    state: &Arc<AppState>,
    router_id: Uuid,
    session_id: Uuid,
    user: &str,
    ctx: &Ctx,
) -> Result<Value, ApiError> {
    let sender = state
        .links
        .sender(router_id)
        .ok_or_else(|| ApiError::RouterOffline(router_id.to_string()))?;
    let fwd = Forward {
        method: Method::GET,
        target: "/api/agent/health".to_owned(),
        body: None,
        session_id,
        user,
        request_id: &ctx.request_id,
    };
    let (parts, bytes) = send(state, sender, router_id, fwd).await?;
    if !parts.status.is_success() {
        return Err(ApiError::BadGateway(format!(
            "health check answered {}",
            parts.status
        )));
    }
    let v: Value =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::BadGateway(e.to_string()))?;
    Ok(v.get("data").cloned().unwrap_or(Value::Null))
}

struct Forward<'a> {
    method: Method,
    target: String,
    body: Option<Bytes>,
    session_id: Uuid,
    user: &'a str,
    request_id: &'a str,
}

async fn send(
    state: &AppState,
    mut sender: LinkSender,
    router_id: Uuid,
    fwd: Forward<'_>,
) -> Result<(http::Parts, Bytes), ApiError> {
    // Ids may come in the query with no body at all; then nothing is claimed JSON.
    let has_body = fwd.body.as_ref().is_some_and(|b| !b.is_empty());
    let mut builder = Request::builder()
        .method(fwd.method)
        .uri(format!("http://agent{}", fwd.target))
        .header(HEADER_REQUEST_ID, fwd.request_id)
        .header(HEADER_SESSION_ID, fwd.session_id.to_string())
        // Percent-encoded: user ids are arbitrary text, header values are not.
        .header(
            HEADER_USER_ID,
            form_urlencoded::byte_serialize(fwd.user.as_bytes()).collect::<String>(),
        );
    if has_body {
        builder = builder.header(CONTENT_TYPE, "application/json");
    }
    let req = builder
        .body(Full::new(fwd.body.unwrap_or_default()))
        .map_err(|e| ApiError::InvalidParameter(format!("cannot forward: {e}")))?;
    let timeout = state.config.timeouts.command;
    let call = async {
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        Ok::<_, hyper::Error>((parts, body))
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let (parts, body) = match tokio::time::timeout_at(deadline, call).await {
        Err(_) => return Err(ApiError::CommandTimeout(timeout.as_millis())),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "link failed during the call");
            return Err(ApiError::RouterOffline(router_id.to_string()));
        }
        Ok(Ok(r)) => r,
    };
    let bytes =
        match tokio::time::timeout_at(deadline, Limited::new(body, MAX_RESPONSE_BYTES).collect())
            .await
        {
            Err(_) => return Err(ApiError::CommandTimeout(timeout.as_millis())),
            Ok(Err(e)) => {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    return Err(ApiError::BadGateway(format!(
                        "answer larger than {MAX_RESPONSE_BYTES} bytes"
                    )));
                }
                return Err(ApiError::RouterOffline(router_id.to_string()));
            }
            Ok(Ok(c)) => c.to_bytes(),
        };
    Ok((parts, bytes))
}
