//! The relay's TLS identity: configured PEM files, or a self-signed certificate made on
//! first start and kept in the data directory, plus its SHA-256 fingerprint that
//! agents pin.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ring::digest;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read or parsed.
    #[error("cannot load {path}: {message}")]
    Load { path: PathBuf, message: String },
    /// Writing the generated certificate failed.
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Generating the self-signed certificate failed.
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
    /// rustls refused the certificate and key.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

pub struct TlsIdentity {
    pub config: Arc<ServerConfig>,
    /// SHA-256 of the leaf certificate's DER, upper-case hex with colons ...
    pub fingerprint: String,
    /// ... and as bytes (what cluster nodes pin when they call each other).
    pub digest: [u8; 32],
    pub cert_path: PathBuf,
    /// True when this start created the self-signed pair.
    pub generated: bool,
}

/// The key the relay generates for itself, under the data directory.
pub const GENERATED_KEY: &str = "tls/relay-key.pem";

/// Loads the configured pair, or the self-signed pair in `data_dir/tls/`, creating it
/// when missing.
pub fn load_or_create(
    cert: Option<&Path>,
    key: Option<&Path>,
    data_dir: &Path,
    names: &[String],
) -> Result<TlsIdentity, TlsError> {
    let (cert_path, key_path, generated) = match (cert, key) {
        (Some(c), Some(k)) => (c.to_owned(), k.to_owned(), false),
        _ => {
            let dir = data_dir.join("tls");
            let c = dir.join("relay-cert.pem");
            let k = data_dir.join(GENERATED_KEY);
            let generated = if c.exists() && k.exists() {
                false
            } else {
                generate(&dir, &c, &k, names)?;
                true
            };
            (c, k, generated)
        }
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| TlsError::Load {
            path: cert_path.clone(),
            message: e.to_string(),
        })?;
    let leaf = chain.first().ok_or_else(|| TlsError::Load {
        path: cert_path.clone(),
        message: "no certificate in file".into(),
    })?;
    let fingerprint = fingerprint(leaf.as_ref());
    let digest = sha256(leaf.as_ref());
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| TlsError::Load {
        path: key_path.clone(),
        message: e.to_string(),
    })?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
    // Web clients may speak h2; agents offer only http/1.1 so their upgrade works.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsIdentity {
        config: Arc::new(config),
        fingerprint,
        digest,
        cert_path,
        generated,
    })
}

fn sha256(der: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, der).as_ref());
    out
}

/// SHA-256 of a DER certificate as `AB:CD:…`, the form operators compare by eye.
pub fn fingerprint(der: &[u8]) -> String {
    let d = sha256(der);
    let mut out = String::with_capacity(95);
    for (i, b) in d.iter().enumerate() {
        if i > 0 {
            out.push(':');
        }
        out.push_str(&format!("{b:02X}"));
    }
    out
}

fn generate(dir: &Path, cert: &Path, key: &Path, names: &[String]) -> Result<(), TlsError> {
    let mut sans = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim();
        if !h.is_empty() && !sans.iter().any(|s| s == h) {
            sans.push(h.to_owned());
        }
    }
    sans.extend(names.iter().cloned());
    let ck =
        rcgen::generate_simple_self_signed(sans).map_err(|e| TlsError::Generate(e.to_string()))?;
    crate::private::dir(dir).map_err(|source| TlsError::Write {
        path: dir.to_owned(),
        source,
    })?;
    write_file(key, ck.signing_key.serialize_pem().as_bytes(), 0o600)?;
    write_file(cert, ck.cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

/// Writes through a temporary file and a rename so a crash never leaves half a key.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let err = |source| TlsError::Write {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_pair_is_created_once_and_kept() {
        let dir = std::env::temp_dir().join(format!("np-tls-{}", uuid::Uuid::new_v4()));
        let a = load_or_create(None, None, &dir, &[]).unwrap();
        assert!(a.generated);
        let b = load_or_create(None, None, &dir, &[]).unwrap();
        assert!(!b.generated);
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_eq!(a.fingerprint.len(), 95);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("tls/relay-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fingerprint_format() {
        let f = fingerprint(b"abc");
        assert!(f.starts_with("BA:78:16:BF"), "{f}");
    }
}
