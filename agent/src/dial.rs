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
    pub async fn http1<B>(&self) -> Result<hyper::client::conn::http1::SendRequest<B>, DialError>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream = dial(&self.relay, self.tls.clone(), self.connect_timeout).await?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake::<_, B>(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| DialError::Connect {
                    addr: self.relay.authority.clone(),
                    message: e.to_string(),
                })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "relay connection ended");
            }
        });
        Ok(sender)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_debug_hides_the_secret() {
        let tls =
            crate::tls::client_config(&crate::tls::Trust::Fingerprint("ab".repeat(32))).unwrap();
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
