//! Opening a TLS connection to the relay: parse the relay URL, connect TCP within a
//! deadline, then TLS, address by address when the name has several. Shared by
//! enrollment, the link, reports and the speed test; [`Relays`] is the configured
//! list and the one that works now; [`RelayEndpoint`] adds the router's credentials
//! for the calls made outside the link.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayAddr {
    pub host: String,
    pub port: u16,
    /// `host:port` for the Host header.
    pub authority: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The URL is not `https://host[:port]`.
    #[error("relay URL {0:?} must look like https://host[:port]")]
    BadUrl(String),
    /// TCP connect failed or timed out.
    #[error("cannot reach {addr}: {message}")]
    Connect { addr: String, message: String },
    /// The TLS handshake failed (wrong fingerprint, untrusted certificate, …).
    #[error("TLS handshake with {addr} failed: {source}")]
    Tls {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

impl RelayAddr {
    pub fn parse(url: &str) -> Result<RelayAddr, DialError> {
        let bad = || DialError::BadUrl(url.to_owned());
        let uri: http::Uri = url.parse().map_err(|_| bad())?;
        if uri.scheme_str() != Some("https") {
            return Err(bad());
        }
        let auth = uri.authority().ok_or_else(bad)?;
        if auth.as_str().contains('@') {
            return Err(bad());
        }
        let host = auth
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err(bad());
        }
        let port = auth.port_u16().unwrap_or(443);
        Ok(RelayAddr {
            host,
            port,
            authority: auth.as_str().to_owned(),
        })
    }
}

/// The relays this router may link to, in the configured order, and the one in use:
/// the link moves `current` (see `backoff::Retry`), reports and the speed test follow
/// it. Each relay remembers the address of its name that last answered, dialled first.
#[derive(Debug)]
pub struct Relays {
    relays: Vec<(RelayAddr, Mutex<Option<SocketAddr>>)>,
    current: AtomicUsize,
}

impl Relays {
    /// At least one relay.
    pub fn new(first: RelayAddr, more: impl IntoIterator<Item = RelayAddr>) -> Self {
        Relays {
            relays: std::iter::once(first)
                .chain(more)
                .map(|r| (r, Mutex::new(None)))
                .collect(),
            current: AtomicUsize::new(0),
        }
    }

    pub fn len(&self) -> usize {
        self.relays.len()
    }

    pub fn is_empty(&self) -> bool {
        self.relays.is_empty()
    }

    pub fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed)
    }

    pub fn set_current(&self, i: usize) {
        self.current.store(i % self.relays.len(), Ordering::Relaxed);
    }

    pub fn get(&self, i: usize) -> &RelayAddr {
        &self.relays[i % self.relays.len()].0
    }

    /// TLS to relay `i`, its last good address first.
    pub async fn dial(
        &self,
        i: usize,
        tls: Arc<ClientConfig>,
        timeout: Duration,
    ) -> Result<TlsStream<TcpStream>, DialError> {
        let (addr, last_good) = &self.relays[i % self.relays.len()];
        dial_sticky(addr, tls, timeout, last_good).await
    }
}

pub async fn dial(
    addr: &RelayAddr,
    tls: Arc<ClientConfig>,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, DialError> {
    dial_sticky(addr, tls, timeout, &Mutex::new(None)).await
}

/// Tries every address the name resolves to, `last_good` first, each with its own
/// deadline for TCP and for TLS, so one dead or black-holed node of a round-robin
/// name does not fail the dial; the address that answers is remembered. Every
/// address must pass the same name or pin check: the relays of one deployment share
/// the certificate (or the CA).
async fn dial_sticky(
    addr: &RelayAddr,
    tls: Arc<ClientConfig>,
    timeout: Duration,
    last_good: &Mutex<Option<SocketAddr>>,
) -> Result<TlsStream<TcpStream>, DialError> {
    let target = format!("{}:{}", addr.host, addr.port);
    let lookup = tokio::net::lookup_host((addr.host.as_str(), addr.port));
    let resolved: Vec<SocketAddr> = match tokio::time::timeout(timeout, lookup).await {
        Ok(Ok(a)) => a.collect(),
        Ok(Err(e)) => {
            return Err(DialError::Connect {
                addr: target,
                message: e.to_string(),
            })
        }
        Err(_) => {
            return Err(DialError::Connect {
                addr: target,
                message: format!("no name resolution within {timeout:?}"),
            })
        }
    };
    let preferred = *last_good.lock().expect("last good address lock");
    let mut error = DialError::Connect {
        addr: target.clone(),
        message: "the name has no address".into(),
    };
    for a in sticky_order(resolved, preferred) {
        match dial_one(addr, a, tls.clone(), timeout).await {
            Ok(s) => {
                *last_good.lock().expect("last good address lock") = Some(a);
                return Ok(s);
            }
            // The last address's error is the dial's: each names its address.
            Err(e) => error = e,
        }
    }
    Err(error)
}

/// The resolver's order with the address that last worked moved to the front.
fn sticky_order(mut addrs: Vec<SocketAddr>, preferred: Option<SocketAddr>) -> Vec<SocketAddr> {
    if let Some(i) = preferred.and_then(|p| addrs.iter().position(|a| *a == p)) {
        let a = addrs.remove(i);
        addrs.insert(0, a);
    }
    addrs
}

async fn dial_one(
    addr: &RelayAddr,
    to: SocketAddr,
    tls: Arc<ClientConfig>,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, DialError> {
    let target = to.to_string();
    let tcp = match tokio::time::timeout(timeout, TcpStream::connect(to)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Err(DialError::Connect {
                addr: target,
                message: e.to_string(),
            })
        }
        Err(_) => {
            return Err(DialError::Connect {
                addr: target,
                message: format!("no answer within {timeout:?}"),
            })
        }
    };
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(addr.host.clone())
        .map_err(|_| DialError::BadUrl(addr.host.clone()))?;
    match tokio::time::timeout(timeout, TlsConnector::from(tls).connect(name, tcp)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(source)) => Err(DialError::Tls {
            addr: target,
            source,
        }),
        Err(_) => Err(DialError::Tls {
            addr: target,
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out"),
        }),
    }
}

/// A fresh TLS connection to relay `i` of `relays` with an HTTP/1.1 client on it;
/// the connection runs in a task that ends when the returned sender is dropped (or
/// the peer closes). Enrollment, reports and the speed test all come through here,
/// so hyper's client (and the dial) exists once in the binary.
pub async fn http1(
    relays: &Relays,
    i: usize,
    tls: Arc<ClientConfig>,
    timeout: Duration,
) -> Result<hyper::client::conn::http1::SendRequest<RelayBody>, DialError> {
    let stream = relays.dial(i, tls, timeout).await?;
    let (sender, conn) =
        hyper::client::conn::http1::handshake::<_, RelayBody>(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| DialError::Connect {
                addr: relays.get(i).authority.clone(),
                message: e.to_string(),
            })?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Why a call to the relay outside the link did not get a 2xx answer.
#[derive(Debug)]
pub enum Exchange {
    /// The connection failed or broke.
    Unreachable(String),
    /// The relay answered with an error (`CODE: message`).
    Refused { status: u16, message: String },
}

/// Where the relay is and how this router proves who it is: what every call to the
/// relay outside the link needs (reports, the speed test). Built once from the
/// identity in `lib.rs::run`. The secret never appears in `Debug`.
#[derive(Clone)]
pub struct RelayEndpoint {
    /// The link's relays: calls go to the one the link uses now.
    pub relays: Arc<Relays>,
    pub tls: Arc<ClientConfig>,
    pub router_id: String,
    secret: String,
    /// TCP connect and TLS handshake deadline, each.
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for RelayEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayEndpoint")
            .field("relay", &self.relay().authority)
            .field("router_id", &self.router_id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl RelayEndpoint {
    pub fn new(
        relays: Arc<Relays>,
        tls: Arc<ClientConfig>,
        router_id: String,
        secret: String,
        connect_timeout: Duration,
    ) -> Self {
        RelayEndpoint {
            relays,
            tls,
            router_id,
            secret,
            connect_timeout,
        }
    }

    /// A fresh TLS connection with an HTTP/1.1 client on it; the connection runs in
    /// a task that ends when the returned sender is dropped (or the peer closes).
    pub async fn http1(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<RelayBody>, DialError> {
        http1(
            &self.relays,
            self.relays.current(),
            self.tls.clone(),
            self.connect_timeout,
        )
        .await
    }

    /// The relay calls go to now.
    pub fn relay(&self) -> &RelayAddr {
        self.relays.get(self.relays.current())
    }

    /// Sends `req` on `sender`: the answer if it is 2xx, otherwise the relay's
    /// refusal with its error code and message. Shared by reports and the speed test.
    pub async fn exchange(
        sender: &mut hyper::client::conn::http1::SendRequest<RelayBody>,
        req: http::Request<RelayBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, Exchange> {
        use http_body_util::BodyExt;
        let unreachable = |e: hyper::Error| Exchange::Unreachable(e.to_string());
        sender.ready().await.map_err(unreachable)?;
        let resp = sender.send_request(req).await.map_err(unreachable)?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body = http_body_util::Limited::new(resp.into_body(), 16 * 1024)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let (code, message) = parse_error(&body);
        Err(Exchange::Refused {
            status,
            message: format!("{code}: {message}"),
        })
    }

    /// A request to the relay with the router's credentials on it.
    pub fn request(&self, method: http::Method, path_and_query: &str) -> http::request::Builder {
        http::Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(http::header::HOST, &self.relay().authority)
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.secret),
            )
            .header(netpilot_proto::link::HEADER_ROUTER_ID, &self.router_id)
            .header(
                netpilot_proto::link::HEADER_AGENT_VERSION,
                env!("CARGO_PKG_VERSION"),
            )
    }
}

/// The request body of every call the agent makes to the relay outside h2 (the link's
/// upgrade request, enrollment, reports, the speed test): empty, one buffer, or for
/// the speed-test upload the same random block again and again until a byte count
/// or a deadline. One type for all of them keeps a single copy of hyper's HTTP/1.1
/// client in the binary (every body type is another copy; the router's flash is
/// tight), and it never holds more than one block.
pub struct RelayBody {
    remaining: u64,
    deadline: Option<std::time::Instant>,
    block: bytes::Bytes,
}

/// The speed-test upload's block size (and frame size).
const UPLOAD_BLOCK: usize = 64 * 1024;

impl RelayBody {
    pub fn empty() -> Self {
        RelayBody {
            remaining: 0,
            deadline: None,
            block: bytes::Bytes::new(),
        }
    }

    /// One buffer, sent as it is.
    pub fn full(b: impl Into<bytes::Bytes>) -> Self {
        let block = b.into();
        RelayBody {
            remaining: block.len() as u64,
            deadline: None,
            block,
        }
    }

    /// Random data until `bytes` are sent or `deadline` passes.
    pub fn generated(bytes: u64, deadline: std::time::Instant) -> Self {
        use ring::rand::SecureRandom;
        let mut b = vec![0u8; UPLOAD_BLOCK];
        // Random so nothing on the path can compress it; if the RNG fails the
        // zeros still measure the line through TLS, which does not compress.
        let _ = ring::rand::SystemRandom::new().fill(&mut b);
        RelayBody {
            remaining: bytes,
            deadline: Some(deadline),
            block: bytes::Bytes::from(b),
        }
    }
}

impl hyper::body::Body for RelayBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        let expired = self
            .deadline
            .is_some_and(|d| std::time::Instant::now() >= d);
        if self.remaining == 0 || expired {
            return std::task::Poll::Ready(None);
        }
        let n = (self.block.len() as u64).min(self.remaining) as usize;
        self.remaining -= n as u64;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(self.block.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self.deadline {
            // May end early at the deadline: chunked, no promised length.
            Some(_) if self.remaining > 0 => {
                let mut h = hyper::body::SizeHint::new();
                h.set_upper(self.remaining);
                h
            }
            _ => hyper::body::SizeHint::with_exact(self.remaining),
        }
    }
}

/// `(error.code, error.message)` of a relay envelope, or the start of the raw body.
pub(crate) fn parse_error(body: &[u8]) -> (String, String) {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let code = v["error"]["code"].as_str().unwrap_or("UNKNOWN").to_owned();
    let message = v["error"]["message"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
    (code, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn upload_body_stops_at_bytes_or_deadline() {
        use http_body_util::BodyExt;
        use std::time::Instant;
        let far = Instant::now() + Duration::from_secs(60);
        let mut b = RelayBody::generated(150_000, far);
        let mut total = 0;
        while let Some(f) = b.frame().await {
            total += f.unwrap().into_data().unwrap().len();
        }
        assert_eq!(total, 150_000);
        let mut b = RelayBody::generated(u64::MAX, Instant::now());
        assert!(b.frame().await.is_none());
        let e = RelayBody::empty();
        assert_eq!(hyper::body::Body::size_hint(&e).exact(), Some(0));
    }

    #[tokio::test]
    async fn a_full_body_is_one_frame() {
        use http_body_util::BodyExt;
        let b = RelayBody::full(&b"{}"[..]);
        assert_eq!(hyper::body::Body::size_hint(&b).exact(), Some(2));
        assert_eq!(b.collect().await.unwrap().to_bytes(), &b"{}"[..]);
    }

    #[test]
    fn endpoint_debug_hides_the_secret() {
        let tls =
            crate::link::tls::client_config(&crate::link::tls::Trust::Fingerprint("ab".repeat(32)))
                .unwrap();
        let e = RelayEndpoint::new(
            Arc::new(Relays::new(
                RelayAddr::parse("https://relay:1").unwrap(),
                [],
            )),
            tls,
            "r".into(),
            "s3cr3t-value".into(),
            Duration::from_secs(1),
        );
        assert!(!format!("{e:?}").contains("s3cr3t"));
    }

    #[test]
    fn the_address_that_worked_is_dialled_first() {
        let a: Vec<SocketAddr> = ["10.0.0.1:443", "10.0.0.2:443", "10.0.0.3:443"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(sticky_order(a.clone(), None), a);
        assert_eq!(
            sticky_order(a.clone(), Some(a[2])),
            [a[2], a[0], a[1]],
            "sticky, then the rest in the resolver's order"
        );
        // Gone from the answer: the resolver's order.
        let gone = "10.9.9.9:443".parse().unwrap();
        assert_eq!(sticky_order(a.clone(), Some(gone)), a);
    }

    #[tokio::test]
    async fn a_failed_dial_keeps_the_last_good_address() {
        // Something that accepts TCP but is no relay: the handshake fails, the
        // error says TLS (not a refusal), and nothing is remembered as good.
        let up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = up.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (s, _) = up.accept().await.unwrap();
            drop(s);
        });
        let relay = RelayAddr::parse(&format!("https://127.0.0.1:{port}")).unwrap();
        let tls =
            crate::link::tls::client_config(&crate::link::tls::Trust::Fingerprint("ab".repeat(32)))
                .unwrap();
        let last_good = Mutex::new(None);
        let err = dial_sticky(&relay, tls, Duration::from_secs(5), &last_good)
            .await
            .unwrap_err();
        assert!(matches!(err, DialError::Tls { .. }), "{err}");
        assert_eq!(*last_good.lock().unwrap(), None);
    }

    #[test]
    fn parses_relay_urls() {
        let a = RelayAddr::parse("https://relay.example.com").unwrap();
        assert_eq!((a.host.as_str(), a.port), ("relay.example.com", 443));
        let a = RelayAddr::parse("https://127.0.0.1:8443/").unwrap();
        assert_eq!(
            (a.host.as_str(), a.port, a.authority.as_str()),
            ("127.0.0.1", 8443, "127.0.0.1:8443")
        );
        let a = RelayAddr::parse("https://[::1]:9000").unwrap();
        assert_eq!((a.host.as_str(), a.port), ("::1", 9000));
        for bad in [
            "http://relay",
            "relay:443",
            "https://",
            "https://user@relay",
            "ftp://x",
        ] {
            assert!(RelayAddr::parse(bad).is_err(), "{bad}");
        }
    }
}
