//! The agent's TLS client: trust by pinned SHA-256 fingerprint, by a CA file, or by
//! the system bundle; a clock that never goes below the build time so a router that
//! boots at 1970 can still validate certificates; ALPN `http/1.1` only, because the
//! link starts as an HTTP/1.1 upgrade (DESIGN §2).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use netpilot_proto::pin::Pinned;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use serde::{Deserialize, Serialize};

/// Seconds since the epoch when this binary was built.
pub const BUILD_UNIX: u64 = parse_u64(env!("NETPILOT_BUILD_UNIX"));

const fn parse_u64(s: &str) -> u64 {
    let b = s.as_bytes();
    let mut i = 0;
    let mut n = 0u64;
    while i < b.len() {
        n = n * 10 + (b[i] - b'0') as u64;
        i += 1;
    }
    n
}

/// Where the bundle of public CAs lives on OpenWrt (ca-bundle) and on Debian.
const SYSTEM_BUNDLES: &[&str] = &["/etc/ssl/certs/ca-certificates.crt", "/etc/ssl/cert.pem"];

/// How the agent decides to trust the relay, chosen at enrollment and stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trust {
    /// SHA-256 of the relay certificate's DER, 64 hex digits.
    Fingerprint(String),
    /// A PEM file of CA certificates.
    CaFile(PathBuf),
    /// The system's CA bundle.
    System,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A fingerprint that is not 32 bytes of hex.
    #[error("fingerprint must be 64 hex digits (colons allowed), got {0:?}")]
    BadFingerprint(String),
    /// The CA file could not be read or holds no certificate.
    #[error("cannot load CA certificates from {path}: {message}")]
    Ca { path: PathBuf, message: String },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Parses `AB:CD:…` or `abcd…` into the 32 digest bytes.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], TlsError> {
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TlsError::BadFingerprint(s.to_owned()));
    }
    let mut out = [0u8; 32];
    for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).map_err(|_| TlsError::BadFingerprint(s.to_owned()))?;
        out[i] = u8::from_str_radix(s, 16).map_err(|_| TlsError::BadFingerprint(s.to_owned()))?;
    }
    Ok(out)
}

pub fn client_config(trust: &Trust) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_details(provider.clone(), Arc::new(NotBeforeBuild))
        .with_safe_default_protocol_versions()?;
    let mut config = match trust {
        Trust::Fingerprint(hex) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned::new(
                parse_fingerprint(hex)?,
                provider,
            )))
            .with_no_client_auth(),
        Trust::CaFile(path) => builder
            .with_root_certificates(load_roots(path)?)
            .with_no_client_auth(),
        Trust::System => {
            let path = SYSTEM_BUNDLES
                .iter()
                .map(Path::new)
                .find(|p| p.exists())
                .ok_or_else(|| TlsError::Ca {
                    path: PathBuf::from(SYSTEM_BUNDLES[0]),
                    message: "no system CA bundle; pass --ca FILE or --fingerprint SHA256".into(),
                })?;
            builder
                .with_root_certificates(load_roots(path)?)
                .with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let err = |message: String| TlsError::Ca {
        path: path.to_owned(),
        message,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| err(e.to_string()))?;
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(err("no usable certificate in file".into()));
    }
    Ok(roots)
}

/// The current time, but never earlier than the build: before NTP has run the
/// router's clock may say 1970, which would make every certificate "not yet valid".
#[derive(Debug)]
struct NotBeforeBuild;

impl rustls::time_provider::TimeProvider for NotBeforeBuild {
    fn current_time(&self) -> Option<UnixTime> {
        Some(UnixTime::since_unix_epoch(Duration::from_secs(
            effective_now(SystemTime::now()),
        )))
    }
}

/// Seconds since the epoch, clamped to the build time.
pub fn effective_now(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .max(BUILD_UNIX)
}

/// True when the system clock is before the build time, i.e. not yet set.
pub fn clock_unset(now: SystemTime) -> bool {
    now.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        < BUILD_UNIX
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_with_and_without_colons() {
        let plain = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let colons = "BA:78:16:BF:8F:01:CF:EA:41:41:40:DE:5D:AE:22:23:B0:03:61:A3:96:17:7A:9C:B4:10:FF:61:F2:00:15:AD";
        assert_eq!(
            parse_fingerprint(plain).unwrap(),
            parse_fingerprint(colons).unwrap()
        );
        assert_eq!(parse_fingerprint(plain).unwrap()[0], 0xba);
        assert!(parse_fingerprint("abc").is_err());
        assert!(parse_fingerprint(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn a_1970_clock_is_raised_to_the_build_time() {
        assert_eq!(BUILD_UNIX.to_string(), env!("NETPILOT_BUILD_UNIX"));
        // Recorded at build time, so never in the future of a set clock.
        assert!(effective_now(SystemTime::now()) >= BUILD_UNIX);
        assert!(!clock_unset(SystemTime::now()));
        assert_eq!(effective_now(UNIX_EPOCH), BUILD_UNIX);
        assert!(clock_unset(UNIX_EPOCH));
        let later = UNIX_EPOCH + Duration::from_secs(BUILD_UNIX + 100);
        assert_eq!(effective_now(later), BUILD_UNIX + 100);
        assert!(!clock_unset(later));
    }

    #[test]
    fn missing_ca_file_is_explained() {
        let err = client_config(&Trust::CaFile("/nonexistent/ca.pem".into())).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"));
    }
}
