//! Forwarding a router operation: session and ownership checks, a slot among the
//! router's calls in flight, then one h2 stream on the router's link, bounded by the
//! command timeout. The agent's answer is read under its route's cap and the relay's
//! answer budget and passed back only if it is an envelope the agent may send
//! (`answer`); the CSV export streams through under its own cap and deadline.
//! On the node the call entered, the answers that list devices get their MAC
//! vendors (`vendors`, issue 17): the one change the relay makes to what a router
//! answers.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use h2::RecvStream;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use netpilot_proto::link::{HEADER_REQUEST_ID, HEADER_SESSION_ID, HEADER_USER_ID};
use netpilot_proto::routes::RouteMatch;
use serde_json::Value;
use uuid::Uuid;

use crate::answer::{self, Expect};
use crate::cluster::directory::Holder;
use crate::cluster::peers::{self, PeerError};
use crate::cluster::Cluster;
use crate::error::ApiError;
use crate::http::{self, Args, Body, Ctx};
use crate::inflight::{CallSlot, Charge};
use crate::link_registry::LinkSender;
use crate::state::AppState;
use crate::vendors::{self, enrich, Vendors};

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
    let lists_devices = vendors::lists_devices(route.route.method, route.route.pattern);
    let span = tracing::Span::current();
    span.record("session_id", tracing::field::display(session_id));
    span.record("router_id", tracing::field::display(router_id));

    let user = state
        .sessions
        .touch(session_id)
        .await
        .map_err(|e| e.into_api_error(session_id))?;
    check_owner(state, router_id, &user).await?;
    state
        .sessions
        .attach(session_id, router_id)
        .await
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
    let delivery = Delivery {
        method,
        target,
        pattern: route.route.pattern,
        query,
        body: body_bytes,
        session_id,
        user,
        deadline,
    };
    let resp = deliver(state, router_id, delivery, ctx).await?;
    // Here, on the node the call entered, and only here: a node delivering a call
    // a peer forwarded (`peer_api`) passes its answer on as it is, so vendors are
    // added once.
    match &state.vendors {
        Some(v) if lists_devices => add_vendors(state, v, resp, deadline).await,
        _ => Ok(resp),
    }
}

/// MAC vendor enrichment (issue 17) of a device route's answer: a success envelope
/// gets `vendor` in its device objects (read whole: it is bounded already), the
/// CSV export a `vendor` column as it streams. Error envelopes, and anything else,
/// pass untouched.
async fn add_vendors(
    state: &Arc<AppState>,
    vendors: &Arc<Vendors>,
    resp: Response<Body>,
    deadline: tokio::time::Instant,
) -> Result<Response<Body>, ApiError> {
    if resp.status() != StatusCode::OK {
        return Ok(resp);
    }
    let content_type = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let csv = answer::is_csv(200, content_type);
    if !csv && !answer::is_json(content_type) {
        return Ok(resp);
    }
    let (mut parts, body) = resp.into_parts();
    // The length changes; a peer's answer came with its own.
    parts.headers.remove(CONTENT_LENGTH);
    if csv {
        let body = VendorColumn {
            inner: body,
            csv: enrich::Csv::new(),
            vendors: vendors.clone(),
            state: state.clone(),
            done: false,
            counted: false,
        };
        return Ok(Response::from_parts(parts, http::fallible_stream(body)));
    }
    let bytes = match body {
        http_body_util::Either::Left(full) => match full.collect().await {
            Ok(c) => c.to_bytes(),
            Err(never) => match never {},
        },
        http_body_util::Either::Right(stream) => read_peer_answer(state, stream, deadline).await?,
    };
    let (enriched, counts) = enrich::json(&bytes, vendors);
    state.metrics.record_vendors(&counts);
    let enriched = match enriched {
        Cow::Owned(v) => Some(Bytes::from(v)),
        Cow::Borrowed(_) => None,
    };
    Ok(Response::from_parts(
        parts,
        http::full(enriched.unwrap_or(bytes)),
    ))
}

/// A peer's JSON answer, read whole to be enriched. The peer read the router's
/// answer under its cap and checked it; here it is still held to the list cap,
/// charged to this node's answer budget while it arrives, and due by the call's
/// deadline (and the hop's margin).
async fn read_peer_answer(
    state: &AppState,
    mut body: http_body_util::combinators::BoxBody<Bytes, http::BoxError>,
    deadline: tokio::time::Instant,
) -> Result<Bytes, ApiError> {
    let cap = state.config.forwarding.list_answer_max_bytes;
    let mut charge = state.answer_budget.charge();
    let mut buf = BytesMut::new();
    loop {
        let frame = match tokio::time::timeout_at(deadline + PEER_MARGIN, body.frame()).await {
            Err(_) => {
                return Err(ApiError::CommandTimeout(
                    state.config.timeouts.command.as_millis(),
                ))
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(ApiError::BadGateway(format!("peer's answer: {e}"))),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if buf.len() + data.len() > cap {
            return Err(ApiError::BadAgentResponse(format!(
                "answer larger than {cap} bytes"
            )));
        }
        if !charge.add(data.len()) {
            return Err(ApiError::RelayBusy);
        }
        buf.extend_from_slice(&data);
    }
    Ok(buf.freeze())
}

/// The CSV export with its `vendor` column (issue 17): each chunk transformed as
/// it passes (what is held is one chunk and the state of one record), what it
/// looked up counted when it ends (before its last bytes go), or when it is cut.
struct VendorColumn {
    inner: Body,
    csv: enrich::Csv,
    vendors: Arc<Vendors>,
    state: Arc<AppState>,
    done: bool,
    counted: bool,
}

impl VendorColumn {
    fn count(&mut self) {
        if !std::mem::replace(&mut self.counted, true) {
            self.state.metrics.record_vendors(&self.csv.counts());
        }
    }
}

impl hyper::body::Body for VendorColumn {
    type Data = Bytes;
    type Error = http::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, http::BoxError>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            let mut out = Vec::new();
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => {
                    this.done = true;
                    this.csv.finish(&this.vendors, &mut out);
                    this.count();
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => this.csv.push(&data, &this.vendors, &mut out),
                    Err(other) => return Poll::Ready(Some(Ok(other))),
                },
            }
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

impl Drop for VendorColumn {
    fn drop(&mut self) {
        self.count();
    }
}

/// Delivers a checked call wherever the router's link is: here, or (cluster mode)
/// on the node the directory names.
async fn deliver(
    state: &Arc<AppState>,
    router_id: Uuid,
    delivery: Delivery,
    ctx: &Ctx,
) -> Result<Response<Body>, ApiError> {
    match &state.cluster {
        // Cluster mode: a link here is used as on a single node; else the directory
        // says which node has it. A link that refused the call unprocessed (its
        // agent moved to another node) sends it after the router.
        Some(cluster) if state.links.sender(router_id).is_none() => {
            deliver_elsewhere(state, cluster, router_id, delivery, ctx).await
        }
        Some(cluster) => match deliver_local(state, router_id, delivery.clone(), ctx).await {
            Err(ApiError::LinkRefused(_)) => {
                deliver_elsewhere(state, cluster, router_id, delivery, ctx).await
            }
            r => r,
        },
        None => deliver_local(state, router_id, delivery, ctx).await,
    }
}

/// A router call as it goes to the router, once the node it entered has checked the
/// session and ownership; the same whether this node holds the router's link or a
/// peer does (`peer_api` rebuilds it from a forwarded call).
#[derive(Clone)]
pub struct Delivery {
    pub method: Method,
    /// Path and query as the agent gets them (without the relay's ids).
    pub target: String,
    /// The route's pattern: which answers to expect, and the metrics label.
    pub pattern: &'static str,
    pub query: Vec<(String, String)>,
    pub body: Option<Bytes>,
    pub session_id: Uuid,
    pub user: String,
    /// When the router's answer must be in (the command timeout from the start).
    pub deadline: tokio::time::Instant,
}

/// Delivers a call over this node's link to the router.
pub async fn deliver_local(
    state: &Arc<AppState>,
    router_id: Uuid,
    d: Delivery,
    ctx: &Ctx,
) -> Result<Response<Body>, ApiError> {
    let slot = take_slot(state, router_id, d.deadline).await?;
    // Looked up once a slot is ours: the link may have been replaced while waiting.
    // Nothing was sent, so (in a cluster) the call may follow the router.
    let sender = state
        .links
        .sender(router_id)
        .ok_or_else(|| ApiError::LinkRefused(router_id.to_string()))?;
    let expect = answer::expect(d.pattern, &d.query, &state.config.forwarding);
    let pattern = d.pattern;
    let fwd = Forward {
        method: d.method,
        target: d.target,
        body: d.body,
        session_id: d.session_id,
        user: &d.user,
        request_id: &ctx.request_id,
        deadline: d.deadline,
    };
    // From here the call goes to the router: only these count as forwarded, on the
    // node whose link carries them (a call another node sent here counts once).
    let result = forward(state, sender, router_id, fwd, expect, slot, ctx).await;
    let status = match &result {
        Ok(r) => r.status(),
        Err(e) => e.status(),
    };
    state
        .metrics
        .record_forward(pattern, status.as_u16(), ctx.started.elapsed());
    result
}

/// How long a call waits for a router that is moving between nodes (its old link
/// refused the call, or the directory names a node whose link just closed) to show
/// up on its new node, before it answers offline.
const HANDOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// How often the directory is read again meanwhile.
const HANDOVER_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// Cluster mode: delivers a call to the node the directory says holds the
/// router's link, and passes its answer through as it comes.
async fn deliver_elsewhere(
    state: &Arc<AppState>,
    cluster: &Cluster,
    router_id: Uuid,
    d: Delivery,
    ctx: &Ctx,
) -> Result<Response<Body>, ApiError> {
    let wait_until = (tokio::time::Instant::now() + HANDOVER_WAIT).min(d.deadline);
    let offline = || ApiError::RouterOffline(router_id.to_string());
    loop {
        let waiting = tokio::time::Instant::now() < wait_until;
        let holder = cluster
            .lookup(router_id)
            .await
            .map_err(|e| ApiError::ClusterUnavailable(e.to_string()))?;
        match holder {
            Holder::Nobody => return Err(offline()),
            // Its node is gone (killed, cut off from Redis): the agent comes back
            // through another node within its retry window.
            Holder::Gone { id } => {
                tracing::debug!(%router_id, node = %id, "router's node is gone");
                return Err(offline());
            }
            Holder::Here => {
                if state.links.sender(router_id).is_some() {
                    return match deliver_local(state, router_id, d.clone(), ctx).await {
                        Err(ApiError::LinkRefused(_)) if waiting => {
                            tokio::time::sleep(HANDOVER_POLL).await;
                            continue;
                        }
                        r => r,
                    };
                }
                if !waiting {
                    return Err(offline());
                }
            }
            Holder::Node { id, addr } => {
                match peer_call(cluster, &addr, router_id, &d, ctx).await {
                    Ok(resp) if resp.headers().contains_key(peers::HEADER_NOT_HERE) && waiting => {}
                    Ok(resp) => return Ok(pass_through(resp)),
                    // Nothing reached the peer, or it refused the call unprocessed (it
                    // is shutting down): the router moved or is moving; look again.
                    // A node really gone fails every try until the wait is over.
                    Err(PeerError::Refused { .. } | PeerError::Connect { .. }) if waiting => {}
                    // The connection failed with the call on it: whether the peer ran
                    // it is unknown. An idempotent call (GET, PUT, DELETE) may go
                    // again if the router has moved since; any other is not repeated.
                    Err(PeerError::Lost { .. })
                        if waiting
                            && d.method.is_idempotent()
                            && moved_from(cluster, router_id, &id).await =>
                    {
                        continue;
                    }
                    Err(e) => {
                        cluster
                            .metrics
                            .forwards_out_failed
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::warn!(%router_id, node = %id, error = %e, "peer unreachable");
                        return Err(match e {
                            PeerError::Timeout => {
                                ApiError::CommandTimeout(state.config.timeouts.command.as_millis())
                            }
                            e => ApiError::RouterUnreachable(
                                router_id.to_string(),
                                id,
                                e.to_string(),
                            ),
                        });
                    }
                }
            }
        }
        tokio::time::sleep(HANDOVER_POLL).await;
    }
}

/// Whether the directory names another holder than `node` for the router now.
async fn moved_from(cluster: &Cluster, router_id: Uuid, node: &str) -> bool {
    match cluster.lookup(router_id).await {
        Ok(Holder::Node { id, .. }) => id != node,
        Ok(Holder::Here) => true,
        _ => false,
    }
}

/// The peer answers 408 at the deadline itself; a little longer here covers the hop.
const PEER_MARGIN: std::time::Duration = std::time::Duration::from_secs(1);

/// Sends one call to the peer at `addr` (its internal listener).
async fn peer_call(
    cluster: &Cluster,
    addr: &str,
    router_id: Uuid,
    d: &Delivery,
    ctx: &Ctx,
) -> Result<Response<Incoming>, PeerError> {
    let left = d
        .deadline
        .saturating_duration_since(tokio::time::Instant::now());
    let mut b = Request::builder()
        .method(Method::POST)
        .uri(format!("https://{addr}{}", peers::CALL_PATH))
        .header(
            hyper::header::AUTHORIZATION,
            format!("Bearer {}", cluster.secret.expose()),
        )
        .header(peers::HEADER_METHOD, d.method.as_str())
        .header(peers::HEADER_TARGET, &d.target)
        .header(peers::HEADER_ROUTER, router_id.to_string())
        .header(peers::HEADER_FROM, &cluster.node_id)
        .header(peers::HEADER_DEADLINE_MS, left.as_millis().to_string())
        .header(HEADER_REQUEST_ID, &ctx.request_id)
        .header(HEADER_SESSION_ID, d.session_id.to_string())
        .header(
            HEADER_USER_ID,
            form_urlencoded::byte_serialize(d.user.as_bytes()).collect::<String>(),
        );
    let body = d.body.clone().unwrap_or_default();
    if !body.is_empty() {
        b = b.header(CONTENT_TYPE, "application/json");
    }
    let req = b
        .body(http_body_util::Full::new(body))
        .map_err(|e| PeerError::Connect {
            addr: addr.to_owned(),
            why: e.to_string(),
        })?;
    cluster
        .metrics
        .forwards_out
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tokio::time::timeout_at(d.deadline + PEER_MARGIN, cluster.peers.send(addr, req))
        .await
        .unwrap_or(Err(PeerError::Timeout))
}

/// A peer's answer, passed on as it comes (the peer already checked the router's).
fn pass_through(resp: Response<Incoming>) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    parts.headers.remove(peers::HEADER_NOT_HERE);
    Response::from_parts(parts, http::fallible_stream(body))
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
/// (Cluster mode: a router this node has not cached yet — created through another
/// node since its last poll — is read from the registry.)
pub async fn check_owner(state: &AppState, router_id: Uuid, user: &str) -> Result<(), ApiError> {
    let meta = state
        .router_meta_or_load(router_id)
        .await?
        .filter(|m| !m.revoked)
        .ok_or_else(|| ApiError::RouterNotFound(router_id.to_string()))?;
    if meta.owner_user_id != user {
        return Err(ApiError::Forbidden(format!(
            "router {router_id} does not belong to this session's user"
        )));
    }
    Ok(())
}

/// The agent's health route (asked at session start).
const HEALTH_ROUTE: &str = "/api/agent/health";

/// Asks the agent for its health (used by session start).
pub async fn agent_health(
    state: &Arc<AppState>,
    router_id: Uuid,
    session_id: Uuid,
    user: &str,
    ctx: &Ctx,
) -> Result<Value, ApiError> {
    let d = Delivery {
        method: Method::GET,
        target: HEALTH_ROUTE.to_owned(),
        pattern: HEALTH_ROUTE,
        query: Vec::new(),
        body: None,
        session_id,
        user: user.to_owned(),
        deadline: tokio::time::Instant::now() + state.config.timeouts.command,
    };
    // Wherever the link is; the answer was checked on the way (`answer::check`).
    let resp = deliver(state, router_id, d, ctx).await?;
    let status = resp.status();
    // Bounded already: a local answer was read under its cap, a peer's was on
    // the peer. Matched by side so no error conversion is generic over lifetimes
    // (which a spawned connection task cannot prove Send).
    let bytes = match resp.into_body() {
        http_body_util::Either::Left(full) => match full.collect().await {
            Ok(c) => c.to_bytes(),
            Err(never) => match never {},
        },
        http_body_util::Either::Right(stream) => stream
            .collect()
            .await
            .map_err(|e| ApiError::BadGateway(e.to_string()))?
            .to_bytes(),
    };
    if !status.is_success() {
        return Err(ApiError::BadGateway(format!(
            "health check answered {status}"
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
        let mut send = sender.send.clone().ready().await.map_err(Failed::Unsent)?;
        let (resp, mut stream) = send
            .send_request(req, body.is_empty())
            .map_err(Failed::Unsent)?;
        if !body.is_empty() {
            // Bounded by the relay's body limit; h2 sends it as the window opens.
            stream.send_data(body, true).map_err(Failed::Sent)?;
        }
        let resp = resp.await.map_err(|e| {
            if refused(&e) {
                Failed::Unsent(e)
            } else {
                Failed::Sent(e)
            }
        })?;
        Ok::<_, Failed>(Some(resp.into_parts()))
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
        Ok(Err(Failed::Unsent(e))) => {
            tracing::debug!(error = %e, "link refused the call; nothing ran");
            Err(ApiError::LinkRefused(router_id.to_string()))
        }
        Ok(Err(Failed::Sent(e))) => {
            tracing::debug!(error = %e, "link failed during the call");
            Err(ApiError::RouterOffline(router_id.to_string()))
        }
        Ok(Ok(Some((parts, stream)))) => {
            let declared = declared_length(&parts.headers);
            Ok((parts, AnswerBody { stream, declared }))
        }
    }
}

/// How a call failed on the link: before the agent took it (safe to send again,
/// elsewhere) or after (it may have run).
enum Failed {
    Unsent(h2::Error),
    Sent(h2::Error),
}

/// The agent refused the stream without processing it: `REFUSED_STREAM`, or its
/// graceful GOAWAY (sent when it moves to another node) left this stream out.
fn refused(e: &h2::Error) -> bool {
    e.reason() == Some(h2::Reason::REFUSED_STREAM)
        || (e.is_go_away() && e.is_remote() && e.reason() == Some(h2::Reason::NO_ERROR))
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
