//! The agent's half of the link: dial the relay, ask to upgrade
//! `GET /agent/v1/connect` with the router secret, and on `101` be the HTTP/2 server
//! on the upgraded stream, handing every call to the handler it was given (the
//! agent API). Reconnects forever until shutdown, over the relay list as
//! `backoff::Retry` decides (next relay at once on a failure or a refusal, sticky on
//! success, the first retry after a lost link spread out, backoff with full jitter
//! per round, at least the relays' `Retry-After` after a round of refusals).
//!
//! A draining relay sends `POST` [`DRAIN_PATH`] on the link: the agent makes before
//! it breaks, dialling its other relays at once while the old link keeps serving,
//! and closes the old link gracefully (calls in flight finish) only once a new one
//! is up. When none answers it stays until the draining relay closes the link.

use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONNECTION, HOST, UPGRADE};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use netpilot_proto::link::{
    CONNECT_PATH, DRAIN_PATH, HEADER_AGENT_VERSION, HEADER_ROUTER_ID, UPGRADE_PROTOCOL,
};
use rustls::ClientConfig;

use super::backoff::{random_unit, Attempt, Backoff, BackoffConfig, Retry};
use super::dial::{DialError, RelayBody, Relays};
use crate::runtime::shutdown::{self, Shutdown};

/// What the link is doing, for the health endpoint.
#[derive(Debug, Default, Clone)]
pub struct LinkState {
    pub connected_since: Option<SystemTime>,
    /// Links established since the agent started.
    pub connects: u64,
    pub last_error: Option<String>,
}

/// The link's state, written by the link task and read by whoever reports it, and
/// the way to ask the link task to redial at once.
#[derive(Debug, Default)]
pub struct LinkStatus {
    state: Mutex<LinkState>,
    redial: tokio::sync::Notify,
}

impl LinkStatus {
    pub fn get(&self) -> LinkState {
        self.state.lock().expect("link state lock").clone()
    }

    fn update(&self, f: impl FnOnce(&mut LinkState)) {
        f(&mut self.state.lock().expect("link state lock"));
    }

    /// Drops the link if there is one and dials now, skipping any backoff wait (the
    /// WAN came up again: the old link is probably dead but not yet noticed). A
    /// dial under way is left to finish: nothing is stored for later.
    pub fn redial(&self) {
        self.redial.notify_waiters();
    }
}

/// What answers the calls that come over the link: the agent API.
pub trait Handler<B>:
    Fn(Request<Incoming>) -> Self::Answer + Clone + Send + Sync + 'static
{
    type Answer: Future<Output = Result<Response<B>, Infallible>> + Send + 'static;
}

impl<B, F, A> Handler<B> for F
where
    F: Fn(Request<Incoming>) -> A + Clone + Send + Sync + 'static,
    A: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
{
    type Answer = A;
}

#[derive(Clone)]
pub struct LinkConfig {
    /// Shared with reports and the speed test, which follow the relay in use.
    pub relays: Arc<Relays>,
    pub router_id: String,
    pub secret: String,
    pub tls: Arc<ClientConfig>,
    pub ping_interval: Duration,
    pub dead_after: Duration,
    pub connect_timeout: Duration,
    pub backoff: BackoffConfig,
    pub max_concurrent_calls: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// TCP or TLS failed.
    #[error(transparent)]
    Dial(#[from] DialError),
    /// The HTTP/1.1 exchange before the upgrade failed.
    #[error("connect request failed: {0}")]
    Http(#[source] hyper::Error),
    /// The relay answered something other than `101`.
    #[error("relay refused the link: {status} {code}: {message}")]
    Refused {
        status: StatusCode,
        code: String,
        message: String,
        /// The answer's `Retry-After`, in seconds.
        retry_after: u64,
    },
    /// The upgrade itself failed after `101`.
    #[error("upgrade failed: {0}")]
    Upgrade(#[source] hyper::Error),
}

/// Runs the link until `shutdown` turns true, serving every call with `handler`.
pub async fn run<B>(
    config: LinkConfig,
    handler: impl Handler<B>,
    status: Arc<LinkStatus>,
    mut shutdown: Shutdown,
) where
    B: hyper::body::Body + Default + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let start_delay = Backoff::new(config.backoff.clone()).start_delay(random_unit());
    if !start_delay.is_zero() {
        tracing::info!(
            delay_ms = start_delay.as_millis() as u64,
            "waiting before the first connection"
        );
        if wait_or_shutdown(start_delay, &mut shutdown, &status).await {
            return;
        }
    }
    let mut retry = Retry::new(config.backoff.clone(), config.relays.len());
    loop {
        let relay = retry.current();
        config.relays.set_current(relay);
        let attempt = match connect_and_serve(
            &config,
            relay,
            handler.clone(),
            &status,
            &mut shutdown,
        )
        .await
        {
            Ok((ended, up, now)) => {
                if now != relay {
                    retry.moved_to(now);
                }
                match ended {
                    Ended::Redial => Attempt::Redial,
                    Ended::Drained => Attempt::GoElsewhere,
                    Ended::Closed => {
                        tracing::info!("link ended");
                        Attempt::Lost {
                            lasted: up.elapsed(),
                        }
                    }
                }
            }
            Err(e) => {
                if crate::link::tls::clock_unset(SystemTime::now()) {
                    tracing::warn!(error = %e, "link failed; the system clock is before this build, so it is probably not set yet (NTP)");
                } else {
                    tracing::warn!(error = %e, "link failed");
                }
                status.update(|l| l.last_error = Some(e.to_string()));
                match e {
                    LinkError::Refused {
                        code, retry_after, ..
                    } if code == "LINKS_BUSY" || code == "RELAY_DRAINING" => Attempt::Refused {
                        retry_after: Duration::from_secs(retry_after),
                    },
                    _ => Attempt::Failed,
                }
            }
        };
        status.update(|l| l.connected_since = None);
        if *shutdown.borrow() {
            return;
        }
        let delay = retry.after(attempt, random_unit());
        if delay.is_zero() {
            continue;
        }
        tracing::info!(delay_ms = delay.as_millis() as u64, "reconnecting");
        if wait_or_shutdown(delay, &mut shutdown, &status).await {
            return;
        }
    }
}

/// Sleeps, or less when a redial is asked for; true when shutdown came first.
async fn wait_or_shutdown(d: Duration, shutdown: &mut Shutdown, status: &LinkStatus) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = status.redial.notified() => tracing::info!("redial asked for; not waiting"),
        _ = shutdown::stopped(shutdown) => return true,
    }
    *shutdown.borrow()
}

/// How a link that was up ended.
enum Ended {
    /// Lost, closed by the relay, or shut down.
    Closed,
    /// Dropped because a redial was asked for: dial again at once.
    Redial,
    /// Its relay drained and no other relay took the link meanwhile.
    Drained,
}

/// Links from relay `relay` on, from the first dial to the end of the last (lost,
/// redial, shutdown, drained), when that one came up and the relay it was on: a
/// drain moves the link to another relay of the list without leaving this.
async fn connect_and_serve<B>(
    config: &LinkConfig,
    mut relay: usize,
    handler: impl Handler<B>,
    status: &LinkStatus,
    shutdown: &mut Shutdown,
) -> Result<(Ended, Instant, usize), LinkError>
where
    B: hyper::body::Body + Default + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let others = config.relays.len() > 1;
    let builder = h2_server(config);
    // One link: its connection runs in a task (the old one serves on beside the new
    // one during a move) that closes it gracefully, calls in flight finishing, when
    // `close` is dropped; `drain` wakes when its relay sends the drain message. An
    // agent with one relay answers that it stays, and is not woken: it has nowhere
    // to go.
    let serve = |upgraded| {
        let drain = Arc::new(tokio::sync::Notify::new());
        let wake = drain.clone();
        let handler = handler.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            let handler = handler.clone();
            let wake = wake.clone();
            async move {
                if req.uri().path() != DRAIN_PATH {
                    return handler(req).await;
                }
                let mut resp = Response::new(B::default());
                *resp.status_mut() = if others {
                    wake.notify_one();
                    StatusCode::ACCEPTED
                } else {
                    StatusCode::CONFLICT
                };
                Ok(resp)
            }
        });
        let conn = builder.serve_connection(upgraded, svc);
        let (close, closed) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let r = tokio::select! {
                r = conn.as_mut() => r,
                _ = closed => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = r {
                tracing::info!(error = %e, "link lost");
            }
        });
        (task, close, drain)
    };
    let (mut task, mut close, mut drain) = serve(open(config, relay).await?);
    loop {
        status.update(|l| {
            l.connected_since = Some(SystemTime::now());
            l.connects += 1;
            l.last_error = None;
        });
        tracing::info!(relay = %config.relays.get(relay).authority, "link up");
        let up = Instant::now();
        tokio::select! {
            _ = &mut task => return Ok((Ended::Closed, up, relay)),
            // Dropped without a goodbye: the link this is asked on is likely dead.
            _ = status.redial.notified() => {
                tracing::info!("redial asked for; dropping the link");
                task.abort();
                return Ok((Ended::Redial, up, relay));
            }
            _ = shutdown::stopped(shutdown) => {
                drop(close);
                let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
                return Ok((Ended::Closed, up, relay));
            }
            _ = drain.notified() => {}
        }
        tracing::info!("relay draining: dialling the next relay before leaving this one");
        let moved = tokio::select! {
            m = open_elsewhere(config, relay) => m,
            _ = shutdown::stopped(shutdown) => None,
        };
        let Some((next, upgraded)) = moved else {
            tracing::warn!("no other relay took the link; staying on the draining one");
            tokio::select! {
                _ = &mut task => {}
                _ = status.redial.notified() => task.abort(),
                _ = shutdown::stopped(shutdown) => {
                    drop(close);
                    let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
                }
            }
            return Ok((Ended::Drained, up, relay));
        };
        // The new link is up: the old one closes gracefully in its task.
        relay = next;
        config.relays.set_current(relay);
        (task, close, drain) = serve(upgraded);
    }
}

/// A link to the first relay after `from` in the list that takes one.
async fn open_elsewhere(
    config: &LinkConfig,
    from: usize,
) -> Option<(usize, hyper::upgrade::Upgraded)> {
    let n = config.relays.len();
    for k in 1..n {
        let i = (from + k) % n;
        match open(config, i).await {
            Ok(u) => return Some((i, u)),
            Err(e) => tracing::warn!(error = %e, "the next relay did not take the link"),
        }
    }
    None
}

/// Dials relay `relay` and upgrades to the link protocol.
async fn open(config: &LinkConfig, relay: usize) -> Result<hyper::upgrade::Upgraded, LinkError> {
    let addr = config.relays.get(relay);
    let tls = config
        .relays
        .dial(relay, config.tls.clone(), config.connect_timeout)
        .await?;
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, RelayBody>(TokioIo::new(tls))
        .await
        .map_err(LinkError::Http)?;
    let conn_task = tokio::spawn(conn.with_upgrades());
    let req = Request::builder()
        .method("GET")
        .uri(CONNECT_PATH)
        .header(HOST, &addr.authority)
        .header(CONNECTION, "upgrade")
        .header(UPGRADE, UPGRADE_PROTOCOL)
        .header(AUTHORIZATION, format!("Bearer {}", config.secret))
        .header(HEADER_ROUTER_ID, &config.router_id)
        .header(HEADER_AGENT_VERSION, env!("CARGO_PKG_VERSION"))
        .body(RelayBody::empty())
        .expect("static request parts");
    let resp = match tokio::time::timeout(config.connect_timeout, sender.send_request(req)).await {
        Ok(r) => r.map_err(LinkError::Http)?,
        Err(_) => {
            conn_task.abort();
            return Err(LinkError::Refused {
                status: StatusCode::REQUEST_TIMEOUT,
                code: "TIMEOUT".into(),
                message: "no answer to the connect request".into(),
                retry_after: 0,
            });
        }
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let body = Limited::new(resp.into_body(), 16 * 1024)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        conn_task.abort();
        let (code, message) = super::dial::parse_error(&body);
        return Err(LinkError::Refused {
            status,
            code,
            message,
            retry_after,
        });
    }
    hyper::upgrade::on(resp).await.map_err(LinkError::Upgrade)
}

/// What the relay may send on one stream before the agent reads it. Small, so the
/// calls waiting for the body budget (`api::intake`) hold little each.
pub const STREAM_WINDOW: u32 = 64 * 1024;

/// The agent's end of every link: the HTTP/2 server. At most
/// `max_concurrent_calls` streams (the relay queues the rest under its command
/// timeout); what the relay sends is bounded by flow control: `STREAM_WINDOW` per
/// stream, and the connection window is exactly room for every stream's window.
/// That product is the most unread request bodies can hold, and it never deadlocks:
/// calls waiting for the body budget cannot fill the connection window, so the call
/// holding the budget always gets its data. Public so the speed-test bench measures
/// this very configuration.
pub fn h2_server(config: &LinkConfig) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .keep_alive_interval(Some(config.ping_interval))
        .keep_alive_timeout(config.dead_after.saturating_sub(config.ping_interval))
        .max_concurrent_streams(config.max_concurrent_calls)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(connection_window(config.max_concurrent_calls))
        // Headers from the relay are a few hundred bytes.
        .max_header_list_size(16 * 1024);
    b
}

/// Room for every stream's full window (h2's largest window is 2^31-1).
pub fn connection_window(max_streams: u32) -> u32 {
    (max_streams.max(1) as u64 * STREAM_WINDOW as u64).min(i32::MAX as u64) as u32
}
