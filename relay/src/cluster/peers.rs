//! Connections from this node to its peers' internal listeners: HTTP/2 over TLS,
//! one pooled connection per peer, trusting exactly the cluster's certificate (all
//! nodes present the same one, which agents pin too) and carrying the cluster
//! secret on every call. A peer that cannot be dialed within
//! `cluster.peer_connect_timeout`, or whose connection stops answering PINGs, is
//! unreachable: the call answers `ROUTER_UNREACHABLE` rather than waiting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use netpilot_proto::pin::Pinned;
use rustls::pki_types::ServerName;

use crate::sync::Locked;

/// The path a forwarded call takes on the internal listener.
pub const CALL_PATH: &str = "/internal/v1/call";
/// Headers of a forwarded call: what the entering node checked and decided.
pub const HEADER_METHOD: &str = "x-netpilot-method";
pub const HEADER_TARGET: &str = "x-netpilot-target";
pub const HEADER_ROUTER: &str = "x-netpilot-router";
pub const HEADER_FROM: &str = "x-netpilot-from-node";
/// What is left of the call's command timeout, in milliseconds.
pub const HEADER_DEADLINE_MS: &str = "x-netpilot-deadline-ms";
/// On an answer: the router's link is not on this node (any more).
pub const HEADER_NOT_HERE: &str = "x-netpilot-not-here";

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// Nothing was sent: the peer could not be dialed (or the TLS/h2 setup failed).
    #[error("cannot connect to {addr}: {why}")]
    Connect { addr: String, why: String },
    /// The peer refused the call without processing it (it is shutting down): the
    /// call may go where the router is now.
    #[error("{addr} refused the call unprocessed")]
    Refused { addr: String },
    /// No answer within the call's deadline.
    #[error("no answer within the command timeout")]
    Timeout,
    /// The connection failed with the call on it.
    #[error("connection to {addr} failed: {why}")]
    Lost { addr: String, why: String },
}

pub struct Peers {
    tls: Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
    pool: Mutex<HashMap<String, SendRequest<Full<Bytes>>>>,
}

impl Peers {
    /// `digest`: the SHA-256 of the cluster's certificate (every node's own).
    pub fn new(digest: [u8; 32], connect_timeout: Duration) -> Peers {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned::new(digest, provider)))
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        Peers {
            tls: Arc::new(tls),
            connect_timeout,
            pool: Mutex::new(HashMap::new()),
        }
    }

    /// Sends one call to the peer at `addr`, over its pooled connection or a new one.
    pub async fn send(
        &self,
        addr: &str,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, PeerError> {
        let mut sender = self.connection(addr).await?;
        let lost = |why: String| PeerError::Lost {
            addr: addr.to_owned(),
            why,
        };
        if sender.ready().await.is_err() {
            // The pooled connection died since its last call: one fresh dial.
            self.pool.locked().remove(addr);
            sender = self.connection(addr).await?;
        }
        sender.send_request(req).await.map_err(|e| {
            self.pool.locked().remove(addr);
            if unprocessed(&e) {
                PeerError::Refused {
                    addr: addr.to_owned(),
                }
            } else {
                lost(e.to_string())
            }
        })
    }

    async fn connection(&self, addr: &str) -> Result<SendRequest<Full<Bytes>>, PeerError> {
        if let Some(s) = self.pool.locked().get(addr).filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        let fail = |why: String| PeerError::Connect {
            addr: addr.to_owned(),
            why,
        };
        let dial = async {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| fail(e.to_string()))?;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from("netpilot-peer").expect("a valid DNS name");
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| fail(format!("TLS: {e}")))?;
            let mut b = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
            // A peer cut off without a FIN fails its calls after ~2 s of silence.
            b.timer(TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(1))
                .keep_alive_timeout(Duration::from_secs(1))
                .keep_alive_while_idle(true)
                .initial_stream_window_size(2 * 1024 * 1024)
                .initial_connection_window_size(8 * 1024 * 1024);
            let (send, conn) = b
                .handshake(TokioIo::new(tls))
                .await
                .map_err(|e| fail(format!("HTTP/2: {e}")))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "peer connection ended");
                }
            });
            Ok::<_, PeerError>(send)
        };
        let send = tokio::time::timeout(self.connect_timeout, dial)
            .await
            .map_err(|_| {
                fail(format!(
                    "no connection within {} ms",
                    self.connect_timeout.as_millis()
                ))
            })??;
        self.pool.locked().insert(addr.to_owned(), send.clone());
        Ok(send)
    }

    /// Peers with a pooled connection now.
    pub fn connected(&self) -> usize {
        self.pool
            .locked()
            .values()
            .filter(|s| !s.is_closed())
            .count()
    }
}

/// A call the peer never processed: never sent (the connection closed first), or
/// refused by the peer's GOAWAY or `REFUSED_STREAM`.
fn unprocessed(e: &hyper::Error) -> bool {
    if e.is_canceled() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away()
                    && h2.is_remote()
                    && h2.reason() == Some(h2::Reason::NO_ERROR));
        }
        source = s.source();
    }
    false
}
