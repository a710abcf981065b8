//! The shared port: accept TCP, refuse what the connection caps do not allow, finish
//! TLS and read the first request head within one deadline, then serve HTTP/2 (web
//! clients, chosen by ALPN `h2`) or HTTP/1.1 with upgrades (agent links, everything
//! else) through one dispatcher. Shutdown first drains (`drain`: the port stays
//! open, `/health` says draining, links are told to go elsewhere) until the links
//! that can move are gone or `timeouts.drain` passes; then it stops accepting,
//! closes the links left and waits for in-flight calls up to the grace period.
//!
//! The protocol comes from ALPN, never from sniffing the first bytes, so no phase
//! of a connection waits for a byte without a deadline.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::api::HTTP_HEADER_HARD_LIMIT;
use crate::capacity::{ConnRefusal, ACCEPT_ERROR_PAUSE};
use crate::conn_activity::{Activity, ActivityWatch, Tracked};
use crate::peer_limits::{ConnAuth, LogThrottle, UnauthenticatedPerAddress};
use crate::state::AppState;

/// How often the shutdown looks whether forwarded calls are done (no event tells).
const CALLS_POLL: Duration = Duration::from_millis(20);

/// At most one "limit reached" line per reason and period, however hard the flood.
const LIMIT_LOG_EVERY: Duration = Duration::from_secs(1);

pub async fn serve(
    state: Arc<AppState>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let per_address = UnauthenticatedPerAddress::new(state.config.max_unauthenticated_per_address);
    let global_log = LogThrottle::new(LIMIT_LOG_EVERY);
    let per_address_log = LogThrottle::new(LIMIT_LOG_EVERY);
    let accept_log = LogThrottle::new(LIMIT_LOG_EVERY);
    let (stop_tx, stop_rx) = watch::channel(false);
    // Every connection task holds a clone; when all are dropped, the drain is done.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    // Polled beside `accept`: while it drains, the node still takes connections
    // (API calls, and link upgrades to refuse with RELAY_DRAINING).
    let drained = async {
        shutdown.await;
        state.drain.start();
        tracing::info!("shutdown requested: draining");
        crate::drain::links(&state.links, &state.drain, state.config.timeouts.drain).await;
        // Cluster mode: peers stop forwarding here (their next calls follow the
        // routers, which moved), while the calls they sent finish below.
        if let Some(c) = &state.cluster {
            c.peers_stop.send_replace(true);
        }
    };
    tokio::pin!(drained);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning, and
                    // say so once a second, not on every retry.
                    state.metrics.connections.accept_errors.fetch_add(1, Ordering::Relaxed);
                    if let Some(suppressed) = accept_log.hit(std::time::Instant::now()) {
                        tracing::warn!(error = %e, suppressed, "accept failed");
                    }
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            _ = &mut drained => break,
        };
        // The deadline counts from here: TLS and the first request share it.
        let deadline = Instant::now() + state.config.timeouts.handshake;
        let metrics = &state.metrics.connections;
        let Some(unauth) = per_address.try_acquire(peer.ip()) else {
            metrics.refused_per_address.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = per_address_log.hit(std::time::Instant::now()) {
                tracing::warn!(
                    %peer,
                    limit = state.config.max_unauthenticated_per_address,
                    suppressed,
                    "per-address limit of unauthenticated connections reached; dropping connection"
                );
            }
            continue;
        };
        let permit = match state.capacity.try_connection() {
            Ok(slot) => slot,
            Err(why) => {
                let (counter, limit) = match why {
                    ConnRefusal::MaxConnections => {
                        (&metrics.refused_max_connections, "max_connections")
                    }
                    ConnRefusal::FdBudget => (&metrics.refused_fd_budget, "open-file budget"),
                };
                counter.fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = global_log.hit(std::time::Instant::now()) {
                    tracing::warn!(%peer, limit, suppressed, "connection limit reached; dropping connection");
                }
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let state = state.clone();
        let acceptor = acceptor.clone();
        let stop_rx = stop_rx.clone();
        let done_tx = done_tx.clone();
        let span = tracing::debug_span!("conn", %peer);
        tokio::spawn(
            async move {
                let _permit = permit;
                let _done = done_tx;
                let tls = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        state
                            .metrics
                            .connections
                            .closed_first_request
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::debug!("TLS handshake timed out");
                        return;
                    }
                };
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                let (activity, watch) = Activity::new();
                let conn_auth = ConnAuth::new(unauth);
                let svc_state = state.clone();
                let service = service_fn(move |mut req: Request<Incoming>| {
                    // The call counts from its head until its answer's body is done.
                    let call = activity.begin();
                    req.extensions_mut().insert(conn_auth.clone());
                    let state = svc_state.clone();
                    async move {
                        let resp = crate::api::handle(state, req, peer).await?;
                        Ok::<_, Infallible>(resp.map(|body| Tracked::new(body, call)))
                    }
                });
                let io = TokioIo::new(tls);
                let t = &state.config.timeouts;
                let phases = Phases {
                    deadline,
                    h2_idle: h2.then_some(t.h2_idle),
                    close_within: t.handshake,
                    watch,
                    stop_rx,
                };
                let outcome = if h2 {
                    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                    b.timer(TokioTimer::new())
                        .keep_alive_interval(Some(t.ping_interval))
                        .keep_alive_timeout(t.dead_after - t.ping_interval)
                        .max_concurrent_streams(1024)
                        .max_header_list_size(HTTP_HEADER_HARD_LIMIT as u32);
                    let conn = b.serve_connection(io, service);
                    tokio::pin!(conn);
                    phases.drive(conn, |c| c.graceful_shutdown()).await
                } else {
                    let mut b = hyper::server::conn::http1::Builder::new();
                    b.timer(TokioTimer::new())
                        .header_read_timeout(t.handshake)
                        .keep_alive(true)
                        .max_buf_size(HTTP_HEADER_HARD_LIMIT);
                    let conn = b.serve_connection(io, service).with_upgrades();
                    tokio::pin!(conn);
                    phases.drive(conn, |c| c.graceful_shutdown()).await
                };
                let counters = &state.metrics.connections;
                match outcome {
                    Outcome::Ended => {}
                    Outcome::Silent => {
                        counters
                            .closed_first_request
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::debug!("no request within the first-request deadline");
                    }
                    Outcome::H2Idle => {
                        counters.closed_h2_idle.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!("HTTP/2 connection idle; closed");
                    }
                }
            }
            .instrument(span),
        );
    }
    // Links that stayed (no other relay, an old agent, the deadline) may still
    // carry calls: they get the grace period before their links close.
    let grace = state.config.timeouts.shutdown_grace;
    let waiting = std::time::Instant::now();
    let had_calls = !state.call_slots.is_idle();
    let calls_done = async {
        while !state.call_slots.is_idle() {
            tokio::time::sleep(CALLS_POLL).await;
        }
    };
    if tokio::time::timeout(grace, calls_done).await.is_err() {
        tracing::warn!(
            ?grace,
            "forwarded calls still in flight after the grace period; cut"
        );
    } else if had_calls {
        tracing::info!(
            waited_ms = waiting.elapsed().as_millis() as u64,
            "forwarded calls in flight have finished"
        );
    }
    tracing::info!("shutting down: no new connections");
    drop(listener);
    state.links.close_all();
    let _ = stop_tx.send(true);
    drop(done_tx);
    if tokio::time::timeout(grace, done_rx.recv()).await.is_err() {
        tracing::warn!(?grace, "connections still open after the grace period");
    }
}

/// How a served connection ended.
enum Outcome {
    /// The client closed it, it failed, it was upgraded, or the relay shut down.
    Ended,
    /// No request head within the first-request deadline; dropped.
    Silent,
    /// HTTP/2 without a call in flight for `h2_idle`; GOAWAY sent.
    H2Idle,
}

/// The deadlines one connection lives under after TLS.
struct Phases {
    /// The first request's head must have arrived by then.
    deadline: Instant,
    /// For HTTP/2: close after this long with no call in flight.
    h2_idle: Option<Duration>,
    /// How long a graceful close may take before the connection is dropped.
    close_within: Duration,
    watch: ActivityWatch,
    stop_rx: watch::Receiver<bool>,
}

impl Phases {
    /// Runs `conn` (either protocol's connection future) through both phases.
    async fn drive<C>(mut self, mut conn: Pin<&mut C>, graceful: impl Fn(Pin<&mut C>)) -> Outcome
    where
        C: Future<Output = Result<(), hyper::Error>>,
    {
        // Phase one: nothing but the first request head ends the wait.
        tokio::select! {
            r = conn.as_mut() => {
                log_end(r);
                // HTTP/1.1's own header timer may fire in the same instant.
                return if Instant::now() >= self.deadline {
                    Outcome::Silent
                } else {
                    Outcome::Ended
                };
            }
            r = tokio::time::timeout_at(self.deadline, self.watch.first_call()) => {
                if r.is_err() {
                    // Dropping the connection closes the socket; a silent client
                    // gets no goodbye.
                    return Outcome::Silent;
                }
            }
            _ = stopping(&mut self.stop_rx) => {
                // Nothing in flight: no reason to wait for anything.
                return Outcome::Ended;
            }
        }
        // Phase two: served, until closed, idle (HTTP/2) or shutdown.
        let idle = async {
            match self.h2_idle {
                Some(idle) => self.watch.idle_for(idle).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = conn.as_mut() => {
                log_end(r);
                Outcome::Ended
            }
            _ = idle => {
                graceful(conn.as_mut());
                // A client that ignores the GOAWAY is dropped all the same.
                if let Ok(r) = tokio::time::timeout(self.close_within, conn.as_mut()).await {
                    log_end(r);
                }
                Outcome::H2Idle
            }
            _ = stopping(&mut self.stop_rx) => {
                graceful(conn.as_mut());
                log_end(conn.await);
                Outcome::Ended
            }
        }
    }
}

/// Resolves when the server shuts down; the watch's guard is not held past it.
async fn stopping(stop_rx: &mut watch::Receiver<bool>) {
    let _ = stop_rx.wait_for(|stop| *stop).await;
}

fn log_end(r: Result<(), hyper::Error>) {
    if let Err(e) = r {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
