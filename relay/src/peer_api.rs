//! The internal listener of a cluster node (`cluster.internal_listen`): peers send
//! it the calls that entered them for routers linked here. HTTP/2 over TLS with
//! the cluster's certificate; each call carries the cluster secret, and what the
//! entering node checked (session, ownership) and decided (the target as the agent
//! gets it). The call is then delivered exactly as a local one (`forward`), and the
//! answer goes back as it is. A router whose link is not here answers
//! `ROUTER_OFFLINE` marked "not here", so the entering node can look again.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::AUTHORIZATION;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use netpilot_proto::link::{HEADER_REQUEST_ID, HEADER_SESSION_ID, HEADER_USER_ID};
use netpilot_proto::routes::match_route;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;
use uuid::Uuid;

use crate::cluster::peers::{self, HEADER_NOT_HERE};
use crate::error::ApiError;
use crate::forward::{self, Delivery};
use crate::http::{self, Body, BoxError, Ctx};
use crate::state::AppState;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves peers until `peers_stop` turns true (after this node's drain), then closes
/// each peer connection gracefully: a GOAWAY, so the peer sends new calls after
/// the router elsewhere, while the calls in flight finish. Returns once they did.
pub async fn serve(state: Arc<AppState>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
    let Some(cluster) = state.cluster.clone() else {
        return;
    };
    let mut stop = cluster.peers_stop.subscribe();
    let acceptor = TlsAcceptor::from(tls);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "internal listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = async { drop(stop.wait_for(|s| *s).await) } => break,
        };
        let _ = tcp.set_nodelay(true);
        let state = state.clone();
        let acceptor = acceptor.clone();
        let mut stop = stop.clone();
        conns.spawn(async move {
            let handshake = state.config.timeouts.handshake;
            let tls = match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
                Ok(Ok(t)) if t.get_ref().1.alpn_protocol() == Some(b"h2") => t,
                _ => {
                    tracing::debug!(%peer, "internal listener: not a peer (TLS or ALPN)");
                    return;
                }
            };
            let svc_state = state.clone();
            let service = service_fn(move |req: Request<Incoming>| {
                let state = svc_state.clone();
                async move {
                    // Boxed to one concrete body type: hyper's bound on the body's
                    // error is proven for it in a spawned task.
                    let resp = handle(state, req).await;
                    Ok::<_, Infallible>(resp.map(|b| -> UnsyncBoxBody<bytes::Bytes, BoxError> {
                        b.map_err(|e| -> BoxError { e }).boxed_unsync()
                    }))
                }
            });
            let t = &state.config.timeouts;
            let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            b.timer(TokioTimer::new())
                .keep_alive_interval(Some(t.ping_interval))
                .keep_alive_timeout(t.dead_after - t.ping_interval)
                .max_concurrent_streams(4096)
                .initial_stream_window_size(2 * 1024 * 1024)
                .initial_connection_window_size(8 * 1024 * 1024);
            let conn = b.serve_connection(TokioIo::new(tls), service);
            tokio::pin!(conn);
            let r = tokio::select! {
                r = conn.as_mut() => r,
                // The watch's guard is dropped inside, not held across the wait below.
                _ = async { drop(stop.wait_for(|s| *s).await) } => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "peer connection ended");
            }
        });
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> Response<Body> {
    let ctx = Ctx::new(req.headers().get(HEADER_REQUEST_ID));
    let from = required(&req, peers::HEADER_FROM).unwrap_or_default();
    let span = tracing::info_span!(
        "peer_call",
        request_id = %ctx.request_id,
        from_node = %from,
        router_id = tracing::field::Empty,
        session_id = tracing::field::Empty,
    );
    async move {
        match call(&state, req, &ctx).await {
            Ok(resp) => resp,
            Err(err) => {
                // Only when nothing reached the router: the entering node may then
                // send the call after it, and it must never run twice.
                let not_here = matches!(err, ApiError::LinkRefused(_));
                let mut resp = http::error(&err, &ctx);
                if not_here {
                    resp.headers_mut().insert(
                        HEADER_NOT_HERE,
                        hyper::header::HeaderValue::from_static("1"),
                    );
                }
                resp
            }
        }
    }
    .instrument(span)
    .await
}

async fn call(
    state: &Arc<AppState>,
    req: Request<Incoming>,
    ctx: &Ctx,
) -> Result<Response<Body>, ApiError> {
    let Some(cluster) = &state.cluster else {
        return Err(ApiError::NotFound(req.uri().path().to_owned()));
    };
    if req.uri().path() != peers::CALL_PATH || req.method() != Method::POST {
        return Err(ApiError::NotFound(req.uri().path().to_owned()));
    }
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !crate::auth::ct_eq(
        &crate::auth::sha256(given.as_bytes()),
        &crate::auth::sha256(cluster.secret.expose().as_bytes()),
    ) {
        tracing::warn!("internal listener: call without the cluster secret refused");
        return Err(ApiError::Unauthorized);
    }
    let method = Method::from_bytes(required(&req, peers::HEADER_METHOD)?.as_bytes())
        .map_err(|e| ApiError::InvalidParameter(e.to_string()))?;
    let target = required(&req, peers::HEADER_TARGET)?;
    let router_id = Uuid::parse_str(&required(&req, peers::HEADER_ROUTER)?)
        .map_err(|e| ApiError::InvalidParameter(e.to_string()))?;
    let session_id = Uuid::parse_str(&required(&req, HEADER_SESSION_ID)?)
        .map_err(|e| ApiError::InvalidParameter(e.to_string()))?;
    let user: String =
        form_urlencoded::parse(format!("u={}", required(&req, HEADER_USER_ID)?).as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
    let left = required(&req, peers::HEADER_DEADLINE_MS)?
        .parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|e| ApiError::InvalidParameter(e.to_string()))?
        .min(state.config.timeouts.command);
    let span = tracing::Span::current();
    span.record("router_id", tracing::field::display(router_id));
    span.record("session_id", tracing::field::display(session_id));
    cluster.metrics.forwards_in.fetch_add(1, Ordering::Relaxed);
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (target.clone(), None),
    };
    let route =
        match_route(method.as_str(), &path).map_err(|_| ApiError::NotFound(path.clone()))?;
    let body = if method.as_str() == "GET" || method.as_str() == "DELETE" {
        None
    } else {
        let (bytes, _) =
            http::read_json(req, state.config.max_body_bytes, state.config.timeouts.body).await?;
        Some(bytes)
    };
    if state.links.sender(router_id).is_none() {
        return Err(ApiError::LinkRefused(router_id.to_string()));
    }
    let d = Delivery {
        method,
        target,
        pattern: route.route.pattern,
        query: http::query_pairs(query.as_deref()),
        body,
        session_id,
        user,
        deadline: tokio::time::Instant::now() + left,
    };
    forward::deliver_local(state, router_id, d, ctx).await
}

fn required(req: &Request<Incoming>, name: &'static str) -> Result<String, ApiError> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| ApiError::InvalidParameter(format!("forwarded call without {name}")))
}
