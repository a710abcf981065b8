//! A scripted agent for attacks on the relay: it authenticates exactly as the real
//! agent does (TLS pinned to the relay, `GET /agent/v1/connect` with the router's
//! id and secret, the upgrade to `netpilot-link/1`) and then, as the link's HTTP/2
//! server, answers every call the relay forwards with whatever the test's handler
//! returns — oversized, stalled, HTML, a status of its own. The router is enrolled
//! with the real agent binary ([`crate::Relay::enrolled_router`]); only the link is
//! played.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::header::{AUTHORIZATION, CONNECTION, CONTENT_TYPE, HOST, UPGRADE};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use netpilot_agent::link::identity::Identity;
use netpilot_agent::link::tls::{client_config, Trust};
use netpilot_proto::link::{CONNECT_PATH, HEADER_ROUTER_ID, UPGRADE_PROTOCOL};

use crate::{EnrolledRouter, Relay, Reply};

/// What the fake agent answers with.
pub type FakeBody = UnsyncBoxBody<Bytes, Infallible>;
pub type FakeFuture = Pin<Box<dyn Future<Output = Response<FakeBody>> + Send>>;

/// The test's answer to each forwarded call (the request's head: method, path, query).
pub trait Handler: Fn(hyper::http::request::Parts) -> FakeFuture + Send + Sync + 'static {}
impl<F> Handler for F where F: Fn(hyper::http::request::Parts) -> FakeFuture + Send + Sync + 'static {}

/// A running fake agent; its link ends when this drops.
pub struct FakeAgent {
    pub router_id: String,
    /// Calls the relay has forwarded so far.
    pub calls: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The router's id and secret from its enrolled state directory.
pub fn credentials(router: &EnrolledRouter) -> anyhow::Result<(String, String)> {
    let id = Identity::load(&router.state_dir).context("enrolled identity")?;
    Ok((id.router_id, id.router_secret))
}

/// The link's connect request as the agent sends it, over a fresh TLS connection.
/// `Ok(upgraded)` on `101`, `Err(reply)` with the relay's refusal otherwise.
pub async fn connect(
    relay: &Relay,
    router_id: &str,
    secret: &str,
) -> anyhow::Result<Result<hyper::upgrade::Upgraded, Reply>> {
    connect_to(relay.addr, &relay.fingerprint, router_id, secret).await
}

/// [`connect`] by the relay's address and fingerprint, for tasks that do not hold
/// the [`Relay`].
pub async fn connect_to(
    addr: std::net::SocketAddr,
    fingerprint: &str,
    router_id: &str,
    secret: &str,
) -> anyhow::Result<Result<hyper::upgrade::Upgraded, Reply>> {
    let tls = client_config(&Trust::Fingerprint(fingerprint.to_owned()))?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    // As the real agent dials: answers are not held back for ACKs (Nagle).
    tcp.set_nodelay(true)?;
    let name = rustls_pki_types::ServerName::try_from("localhost")?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await?;
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, Full<Bytes>>(TokioIo::new(stream))
        .await?;
    tokio::spawn(conn.with_upgrades());
    let req = Request::builder()
        .method("GET")
        .uri(CONNECT_PATH)
        .header(HOST, "localhost")
        .header(CONNECTION, "upgrade")
        .header(UPGRADE, UPGRADE_PROTOCOL)
        .header(AUTHORIZATION, format!("Bearer {secret}"))
        .header(HEADER_ROUTER_ID, router_id)
        .body(Full::new(Bytes::new()))?;
    let resp = sender.send_request(req).await?;
    if resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
        return Ok(Err(Reply::read(resp).await?));
    }
    Ok(Ok(hyper::upgrade::on(resp).await?))
}

impl FakeAgent {
    /// Opens the router's link and serves it with `handler`; returns once the
    /// relay shows the router online.
    pub async fn start(
        relay: &Relay,
        router: &EnrolledRouter,
        handler: impl Handler,
    ) -> anyhow::Result<FakeAgent> {
        let (router_id, secret) = credentials(router)?;
        let upgraded = match connect(relay, &router_id, &secret).await? {
            Ok(u) => u,
            Err(reply) => bail!("link refused: {} {}", reply.status, reply.body),
        };
        let calls = Arc::new(AtomicUsize::new(0));
        let handler = Arc::new(handler);
        let counted = calls.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            counted.fetch_add(1, Ordering::SeqCst);
            let (parts, body) = req.into_parts();
            // The relay's request body is not the attack; drop it unread.
            drop(body);
            let answer = handler(parts);
            async move { Ok::<_, Infallible>(answer.await) }
        });
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(1024)
            .serve_connection(upgraded, service);
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        relay
            .wait_online(&router_id, true, std::time::Duration::from_secs(10))
            .await?;
        Ok(FakeAgent {
            router_id,
            calls,
            task,
        })
    }
}

/// An answer with `status`, `content_type` (if any) and `body`.
pub fn answer(status: u16, content_type: Option<&str>, body: FakeBody) -> Response<FakeBody> {
    let mut b = Response::builder().status(status);
    if let Some(ct) = content_type {
        b = b.header(CONTENT_TYPE, ct);
    }
    b.body(body).expect("valid fake answer")
}

/// The envelope the real agent sends, as an answer with its status.
pub fn envelope(status: u16, json: serde_json::Value) -> Response<FakeBody> {
    answer(
        status,
        Some("application/json"),
        whole(Bytes::from(json.to_string())),
    )
}

/// The agent health answer the relay asks a new link for.
pub fn health() -> Response<FakeBody> {
    envelope(
        200,
        serde_json::json!({"success": true, "data": {"mode": "fake"}, "meta": {"duration_ms": 0}}),
    )
}

/// A relay with `config`, alice's router enrolled, a fake agent on its link with
/// `handler` (and the health answer), and alice's session on it.
pub async fn rig(
    config: &str,
    handler: impl Handler,
) -> (Relay, EnrolledRouter, FakeAgent, crate::Session) {
    let relay = Relay::start(crate::RelayOptions {
        config: config.into(),
    })
    .await
    .unwrap();
    linked(relay, handler).await
}

/// [`rig`] on a relay the test started itself.
pub async fn linked(
    relay: Relay,
    handler: impl Handler,
) -> (Relay, EnrolledRouter, FakeAgent, crate::Session) {
    let router = relay.enrolled_router("alice").await.unwrap();
    let agent = FakeAgent::start(&relay, &router, with_health(handler))
        .await
        .unwrap();
    let session = crate::Session::start(&relay.client().await.unwrap(), "alice", &router.router_id)
        .await
        .unwrap();
    (relay, router, agent, session)
}

/// `handler`, with the health answer for the relay's own health call.
pub fn with_health(handler: impl Handler) -> impl Handler {
    move |parts: hyper::http::request::Parts| {
        if parts.uri.path() == "/api/agent/health" {
            return Box::pin(async { health() }) as FakeFuture;
        }
        handler(parts)
    }
}

/// A whole body (with its length announced).
pub fn whole(bytes: impl Into<Bytes>) -> FakeBody {
    Full::new(bytes.into()).boxed_unsync()
}

/// A body sent chunk by chunk with no length announced: `chunk` repeated until
/// `total` bytes, then, if given, waiting for `hold` before the end of the stream
/// (a stalled answer).
pub fn streamed(
    chunk: Bytes,
    total: u64,
    hold: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
) -> FakeBody {
    Script {
        chunks: VecDeque::new(),
        repeat: chunk,
        left: total,
        hold,
    }
    .boxed_unsync()
}

/// Given chunks in order, then as [`streamed`].
pub fn chunks(
    list: Vec<Bytes>,
    hold: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
) -> FakeBody {
    Script {
        chunks: list.into(),
        repeat: Bytes::new(),
        left: 0,
        hold,
    }
    .boxed_unsync()
}

struct Script {
    chunks: VecDeque<Bytes>,
    repeat: Bytes,
    left: u64,
    hold: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl hyper::body::Body for Script {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(c) = this.chunks.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(c))));
        }
        if this.left > 0 && !this.repeat.is_empty() {
            let n = (this.repeat.len() as u64).min(this.left) as usize;
            this.left -= n as u64;
            return Poll::Ready(Some(Ok(Frame::data(this.repeat.slice(..n)))));
        }
        if let Some(hold) = this.hold.as_mut() {
            if hold.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.hold = None;
        }
        Poll::Ready(None)
    }
}

/// Resident and peak resident memory of a process, in KiB (`VmRSS`, `VmHWM`).
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}
