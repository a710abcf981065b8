//! The shared port: accept TCP, finish TLS within the handshake deadline, serve
//! HTTP/1.1 (with upgrades, for agent links) and HTTP/2 (for web clients) through
//! one dispatcher. Shutdown stops accepting, closes links and waits for in-flight
//! calls up to the grace period.

use std::future::Future;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::state::AppState;

pub async fn serve(
    state: Arc<AppState>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(state.config.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    // Every connection task holds a clone; when all are dropped, the drain is done.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection limit reached; dropping connection");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let state = state.clone();
        let acceptor = acceptor.clone();
        let mut stop_rx = stop_rx.clone();
        let done_tx = done_tx.clone();
        let span = tracing::debug_span!("conn", %peer);
        tokio::spawn(
            async move {
                let _permit = permit;
                let _done = done_tx;
                let handshake = state.config.timeouts.handshake;
                let tls = match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!("TLS handshake timed out");
                        return;
                    }
                };
                let svc_state = state.clone();
                let service =
                    service_fn(move |req| crate::api::handle(svc_state.clone(), req, peer));
                let mut builder = auto::Builder::new(TokioExecutor::new());
                builder
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(handshake)
                    .keep_alive(true);
                builder
                    .http2()
                    .timer(TokioTimer::new())
                    .keep_alive_interval(Some(state.config.timeouts.ping_interval))
                    .keep_alive_timeout(
                        state.config.timeouts.dead_after - state.config.timeouts.ping_interval,
                    )
                    .max_concurrent_streams(1024);
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                    }
                    _ = async { let _ = stop_rx.wait_for(|stop| *stop).await; } => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
            }
            .instrument(span),
        );
    }
    tracing::info!("shutting down: no new connections");
    drop(listener);
    state.links.close_all();
    let _ = stop_tx.send(true);
    drop(done_tx);
    let grace = state.config.timeouts.shutdown_grace;
    if tokio::time::timeout(grace, done_rx.recv()).await.is_err() {
        tracing::warn!(?grace, "connections still open after the grace period");
    }
}
