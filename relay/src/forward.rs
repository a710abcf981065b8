//! Forwarding a router operation: session and ownership checks, a slot among the
//! router's calls in flight, then one h2 stream on the router's link, bounded by the
//! command timeout. The agent's answer is read under its route's cap and the relay's
//! answer budget and passed back only if it is an envelope the agent may send
//! (`answer`); the CSV export streams through under its own cap and deadline.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use h2::RecvStream;
use hyper::body::{Frame, Incoming};
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, Response, StatusCode};
use netpilot_proto::link::{HEADER_REQUEST_ID, HEADER_SESSION_ID, HEADER_USER_ID};
use netpilot_proto::routes::RouteMatch;
use serde_json::Value;
use uuid::Uuid;

use crate::answer::{self, Expect};
use crate::error::ApiError;
use crate::http::{self, Args, Body, Ctx};
use crate::inflight::{CallSlot, Charge};
use crate::link_registry::LinkSender;
use crate::state::AppState;
use crate::sync::Locked;

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
        .locked()
        .touch(session_id, now)
        .map_err(|e| e.into_api_error(session_id))?;
    check_owner(state, router_id, &user)?;
    state
        .sessions
        .locked()
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
    let deadline = tokio::time::Instant::now() + state.config.timeouts.command;
    let slot = take_slot(state, router_id, deadline).await?;
    // Looked up once a slot is ours: the link may have been replaced while waiting.
    let sender = state
        .links
        .sender(router_id)
        .ok_or_else(|| ApiError::RouterOffline(router_id.to_string()))?;
    let expect = answer::expect(route.route.pattern, &query, &state.config.forwarding);
    let fwd = Forward {
        method,
        target,
        body: body_bytes,
        session_id,
        user: &user,
        request_id: &ctx.request_id,
        deadline,
    };
    // From here the call goes to the router: only these count as forwarded.
    let result = forward(state, sender, router_id, fwd, expect, slot, ctx).await;
    let status = match &result {
        Ok(r) => r.status(),
        Err(e) => e.status(),
    };
    state
        .metrics
        .record_forward(route.route.pattern, status.as_u16(), ctx.started.elapsed());
    result
}

/// One of the router's call slots, waited for until `deadline` (then 408), or 429
/// `ROUTER_BUSY` at once when its slots and its queue are full.
async fn take_slot(
    state: &AppState,
    router_id: Uuid,
    deadline: tokio::time::Instant,
) -> Result<CallSlot, ApiError> {
    let limits = &state.config.forwarding;
    let ticket = state.call_slots.enter(router_id).ok_or_else(|| {
        tracing::debug!(%router_id, "router busy; call refused");
        ApiError::RouterBusy(router_id.to_string(), limits.calls_per_router)
    })?;
    tokio::time::timeout_at(deadline, ticket.slot())
        .await
        .map_err(|_| ApiError::CommandTimeout(state.config.timeouts.command.as_millis()))
}

/// Sends the call and turns the router's answer into the relay's: a checked
/// envelope, or the CSV export streamed through.
async fn forward(
    state: &Arc<AppState>,
    sender: LinkSender,
    router_id: Uuid,
    fwd: Forward<'_>,
    expect: Expect,
    slot: CallSlot,
    ctx: &Ctx,
) -> Result<Response<Body>, ApiError> {
    let deadline = fwd.deadline;
    let (parts, body) = send(state, &sender, router_id, fwd).await?;
    let content_type = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let status = parts.status.as_u16();
    let resp = Response::builder().header(HEADER_REQUEST_ID, &ctx.request_id);
    let cap = match expect {
        Expect::Export {
            cap,
            deadline: export_deadline,
            ..
        } if answer::is_csv(status, content_type) => {
            let body = ExportBody {
                inner: body.stream,
                sent: 0,
                cap,
                deadline: Box::pin(tokio::time::sleep_until(ctx.started + export_deadline)),
                charge: state.answer_budget.charge(),
                router_id,
                _slot: slot,
            };
            return resp
                .status(StatusCode::OK)
                .header(CONTENT_TYPE, answer::CSV)
                .body(http::fallible_stream(body))
                .map_err(|e| ApiError::Internal(e.to_string()));
        }
        Expect::Export { error_cap, .. } => error_cap,
        Expect::Json { cap } => cap,
    };
    let mut charge = state.answer_budget.charge();
    let bytes = read_answer(state, &sender, body, cap, deadline, &mut charge, router_id).await?;
    answer::check(status, content_type, &bytes).map_err(|why| {
        tracing::warn!(%router_id, status, %why, "router answer not passed on");
        ApiError::BadAgentResponse(why)
    })?;
    // The budget counts an answer while the relay reads it; once checked it is
    // handed to hyper, which sends it at the web app's pace.
    drop(charge);
    drop(slot);
    resp.status(parts.status)
        .header(CONTENT_TYPE, "application/json")
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
    let deadline = tokio::time::Instant::now() + state.config.timeouts.command;
    let _slot = take_slot(state, router_id, deadline).await?;
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
        deadline,
    };
    let (parts, body) = send(state, &sender, router_id, fwd).await?;
    let cap = state.config.forwarding.answer_max_bytes;
    let mut charge = state.answer_budget.charge();
    let bytes = read_answer(state, &sender, body, cap, deadline, &mut charge, router_id).await?;
    let content_type = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    answer::check(parts.status.as_u16(), content_type, &bytes)
        .map_err(ApiError::BadAgentResponse)?;
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
    /// When the router's answer must be in (the command timeout from the start).
    deadline: tokio::time::Instant,
}

async fn send(
    state: &AppState,
    sender: &LinkSender,
    router_id: Uuid,
    fwd: Forward<'_>,
) -> Result<(http::Parts, AnswerBody), ApiError> {
    let deadline = fwd.deadline;
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
        .body(())
        .map_err(|e| ApiError::InvalidParameter(format!("cannot forward: {e}")))?;
    let body = fwd.body.unwrap_or_default();
    let t = &state.config.timeouts;
    let call = async {
        let mut send = sender.send.clone().ready().await?;
        let (resp, mut stream) = send.send_request(req, body.is_empty())?;
        if !body.is_empty() {
            // Bounded by the relay's body limit; h2 sends it as the window opens.
            stream.send_data(body, true)?;
        }
        Ok::<_, h2::Error>(Some(resp.await?.into_parts()))
    };
    // A silent WAN answers 503 once a PING goes unanswered, not 408 after the
    // command timeout.
    let call = async {
        // Biased: an answer that arrived before its link closed (an agent leaving
        // a draining relay closes the link right after its last answer) is read.
        tokio::select! {
            biased;
            r = call => r,
            _ = sender.health.until_silent(t.probe_after, t.probe_timeout) => Ok(None),
        }
    };
    match tokio::time::timeout_at(deadline, call).await {
        Err(_) => Err(ApiError::CommandTimeout(t.command.as_millis())),
        Ok(Ok(None)) => {
            tracing::info!(%router_id, "link went silent; call answered offline");
            Err(ApiError::RouterOffline(router_id.to_string()))
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "link failed during the call");
            Err(ApiError::RouterOffline(router_id.to_string()))
        }
        Ok(Ok(Some((parts, stream)))) => {
            let declared = declared_length(&parts.headers);
            Ok((parts, AnswerBody { stream, declared }))
        }
    }
}

/// The router's answer body as it starts to arrive.
struct AnswerBody {
    stream: RecvStream,
    /// Its `content-length`, if the agent declared one.
    declared: Option<u64>,
}

/// The length the agent declared for its answer, if any.
fn declared_length(headers: &hyper::HeaderMap) -> Option<u64> {
    headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Reads a router's answer whole, at most `cap` bytes by `deadline`, each chunk
/// charged to the relay's answer budget as it arrives.
async fn read_answer(
    state: &AppState,
    link: &LinkSender,
    body: AnswerBody,
    cap: usize,
    deadline: tokio::time::Instant,
    charge: &mut Charge,
    router_id: Uuid,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        tracing::warn!(%router_id, cap, "router answer over its cap; not passed on");
        ApiError::BadAgentResponse(format!("answer larger than {cap} bytes"))
    };
    // A declared length over the cap is refused before a byte is read; a fitting
    // one sizes the buffer (never above the cap, whatever is declared).
    let AnswerBody {
        stream: mut body,
        declared,
    } = body;
    if declared.is_some_and(|n| n > cap as u64) {
        return Err(too_large());
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0) as usize);
    loop {
        let t = &state.config.timeouts;
        // An answer that stops coming on a silent link ends as the call would.
        let next = async {
            // Biased, as for the head: data already here is read first.
            tokio::select! {
                biased;
                d = body.data() => Some(d),
                _ = link.health.until_silent(t.probe_after, t.probe_timeout) => None,
            }
        };
        let data = match tokio::time::timeout_at(deadline, next).await {
            Err(_) => {
                return Err(ApiError::CommandTimeout(
                    state.config.timeouts.command.as_millis(),
                ))
            }
            Ok(None) => {
                tracing::info!(%router_id, "link silent while reading the answer");
                return Err(ApiError::RouterOffline(router_id.to_string()));
            }
            Ok(Some(None)) => break,
            Ok(Some(Some(Err(e)))) => {
                tracing::debug!(error = %e, "link failed while reading the answer");
                return Err(ApiError::RouterOffline(router_id.to_string()));
            }
            Ok(Some(Some(Ok(data)))) => data,
        };
        // Read is taken: the agent may send more (trailers, if any, are ignored).
        let _ = body.flow_control().release_capacity(data.len());
        if buf.len() + data.len() > cap {
            return Err(too_large());
        }
        if !charge.add(data.len()) {
            tracing::warn!(%router_id, "answer budget exhausted; call refused");
            return Err(ApiError::RelayBusy);
        }
        buf.extend_from_slice(&data);
    }
    Ok(buf.freeze())
}

/// Why a streamed export was cut.
#[derive(Debug, thiserror::Error)]
enum ExportCut {
    #[error("export larger than {0} bytes")]
    TooLarge(u64),
    #[error("export past its deadline")]
    Deadline,
    #[error("the relay's answer budget is exhausted")]
    Budget,
    #[error("link failed during the export: {0}")]
    Link(String),
}

/// The CSV export as it streams from the router to the web app: the router's
/// body, cut (an error, so the client sees a reset, never a short file taken for
/// a whole one) past its cap or deadline. Holds the call's slot to its end, and
/// of the answer budget only the chunk being handed on: hyper asks for the next
/// chunk only as the web app's flow control lets it go.
struct ExportBody {
    inner: RecvStream,
    sent: u64,
    cap: u64,
    deadline: Pin<Box<tokio::time::Sleep>>,
    charge: Charge,
    router_id: Uuid,
    _slot: CallSlot,
}

impl hyper::body::Body for ExportBody {
    type Data = Bytes;
    type Error = ExportCut;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExportCut>>> {
        let this = self.get_mut();
        // Asked for the next chunk: the previous one has been handed on.
        this.charge.release();
        let cut = |this: &ExportBody, why: ExportCut| {
            tracing::warn!(router_id = %this.router_id, sent = this.sent, error = %why, "CSV export cut");
            Poll::Ready(Some(Err(why)))
        };
        if this.deadline.as_mut().poll(cx).is_ready() {
            return cut(this, ExportCut::Deadline);
        }
        loop {
            let data = match this.inner.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(Err(e))) => return cut(this, ExportCut::Link(e.to_string())),
                Poll::Ready(Some(Ok(data))) => data,
            };
            let _ = this.inner.flow_control().release_capacity(data.len());
            if data.is_empty() {
                continue;
            }
            this.sent += data.len() as u64;
            if this.sent > this.cap {
                return cut(this, ExportCut::TooLarge(this.cap));
            }
            if !this.charge.add(data.len()) {
                return cut(this, ExportCut::Budget);
            }
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
    }
}
