//! `/metrics` as served: the scrape text from the live state, and the optional
//! separate listener (`metrics_listen`) that serves only that text, without the API
//! key, over plain HTTP — what Prometheus scrapes by default, meant for loopback or
//! a private network. On the shared port `/metrics` needs the API key: it tells
//! anyone how many routers are online and which errors they hit.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::metrics::Gauges;
use crate::state::AppState;

pub const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4";

/// Scrapers served at once on the metrics listener; more wait in the backlog.
const MAX_SCRAPERS: usize = 16;
/// The longest one scrape connection may last, whatever the client does.
const SCRAPE_DEADLINE: Duration = Duration::from_secs(30);

/// The Prometheus text of the relay's counters and its gauges read now.
pub async fn scrape(state: &AppState) -> String {
    let (fds_in_use, fd_budget) = state.capacity.fds_in_use();
    let gauges = Gauges {
        connected_agents: state.links.len(),
        // Cluster mode: the cluster's, from Redis; 0 when Redis does not answer
        // (its errors show in netpilot_cluster_redis_errors_total).
        sessions: state.sessions.count().await.unwrap_or(0),
        speedtests: state.speedtests.active(),
        answer_bytes_in_flight: state.answer_budget.used(),
        fds_in_use,
        fd_budget,
        links_refused: state.capacity.refused().map(|(why, n)| (why.reason(), n)),
        vendor_entries: state
            .vendors
            .as_ref()
            .map_or((0, 0), |v| (v.embedded_entries(), v.file_entries())),
    };
    let mut out = state.metrics.render(&gauges);
    if let Some(c) = &state.cluster {
        c.metrics.render(&mut out, c.peers.connected());
    }
    crate::drain::render(&state.drain, &mut out);
    state.registry.render_metrics(&mut out);
    out
}

/// Serves `GET /metrics` on `listener` until the task is dropped (dropping it
/// drops every connection task with it). One request per connection, headers
/// within `header_deadline`, each connection cut after [`SCRAPE_DEADLINE`].
pub async fn serve(state: Arc<AppState>, listener: TcpListener, header_deadline: Duration) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPERS));
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        conns.spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| answer(state.clone(), req));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_deadline)
                .keep_alive(false)
                .serve_connection(TokioIo::new(tcp), service);
            match tokio::time::timeout(SCRAPE_DEADLINE, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics connection failed"),
                Err(_) => tracing::debug!(%peer, "metrics connection cut at its deadline"),
            }
        });
    }
}

async fn answer(
    state: Arc<AppState>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = match (req.uri().path(), req.method()) {
        ("/metrics", &Method::GET) => (StatusCode::OK, scrape(&state).await),
        ("/metrics", _) => (StatusCode::METHOD_NOT_ALLOWED, "GET only\n".to_owned()),
        _ => (StatusCode::NOT_FOUND, "only /metrics here\n".to_owned()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let content_type = if status == StatusCode::OK {
        CONTENT_TYPE_TEXT
    } else {
        "text/plain"
    };
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
    }
    Ok(resp)
}

/// Binds `metrics_listen`, saying in the log when the address is reachable from
/// other hosts (the listener has neither TLS nor a key).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    if !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "metrics_listen is plain HTTP without a key: keep it on loopback or a private network"
        );
    }
    Ok(listener)
}
