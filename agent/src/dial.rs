//! Opening a TLS connection to the relay: parse the relay URL, connect TCP within a
//! deadline, then TLS. Shared by enrollment and the link.

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

#[cfg(test)]
mod tests {
    use super::*;

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
