//! Opening a TLS connection to the relay: parse the relay URL, connect TCP within a
//! deadline, then TLS. Shared by enrollment, the link, reports and the speed test;
//! [`RelayEndpoint`] adds the router's credentials for the calls made outside the link.

use std::sync::Arc;
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

pub async fn dial(
    addr: &RelayAddr,
    tls: Arc<ClientConfig>,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, DialError> {
    let target = format!("{}:{}", addr.host, addr.port);
    let tcp =
        match tokio::time::timeout(timeout, TcpStream::connect((addr.host.as_str(), addr.port)))
            .await
        {
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

/// A fresh TLS connection with an HTTP/1.1 client on it; the connection runs in a
/// task that ends when the returned sender is dropped (or the peer closes).
/// Enrollment, reports and the speed test all come through here, so hyper's client
/// exists once in the binary.
pub async fn http1(
    addr: &RelayAddr,
    tls: Arc<ClientConfig>,
    timeout: Duration,
) -> Result<hyper::client::conn::http1::SendRequest<RelayBody>, DialError> {
    let stream = dial(addr, tls, timeout).await?;
    let (sender, conn) =
        hyper::client::conn::http1::handshake::<_, RelayBody>(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| DialError::Connect {
                addr: addr.authority.clone(),
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
    pub relay: RelayAddr,
    pub tls: Arc<ClientConfig>,
    pub router_id: String,
    secret: String,
    /// TCP connect and TLS handshake deadline, each.
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for RelayEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayEndpoint")
            .field("relay", &self.relay.authority)
            .field("router_id", &self.router_id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl RelayEndpoint {
    pub fn new(
        relay: RelayAddr,
        tls: Arc<ClientConfig>,
        router_id: String,
        secret: String,
        connect_timeout: Duration,
    ) -> Self {
        RelayEndpoint {
            relay,
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
        http1(&self.relay, self.tls.clone(), self.connect_timeout).await
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
            .header(http::header::HOST, &self.relay.authority)
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
            RelayAddr::parse("https://relay:1").unwrap(),
            tls,
            "r".into(),
            "s3cr3t-value".into(),
            Duration::from_secs(1),
        );
        assert!(!format!("{e:?}").contains("s3cr3t"));
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
