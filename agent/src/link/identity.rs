//! The router's identity after enrollment: router id, secret, relay URL and how to
//! trust the relay. Stored as `identity.json` in the state directory (0700), mode
//! 0600, written through a temporary file and a rename so a crash never leaves half
//! of it. Checked when the relay hands it out and whenever it is loaded: a value
//! that cannot be sent (a secret with a line break, say) would otherwise fail deep
//! in the link, again at every restart.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::link::tls::Trust;
use crate::runtime::private;

pub const FILE_NAME: &str = "identity.json";

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub router_id: String,
    pub router_secret: String,
    pub relay_url: String,
    pub trust: Trust,
    pub name: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("router_id", &self.router_id)
            .field("router_secret", &"<redacted>")
            .field("relay_url", &self.relay_url)
            .field("trust", &self.trust)
            .field("name", &self.name)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// No identity file: the router was never enrolled (or the state dir is wrong).
    #[error("not enrolled: {0} does not exist; run `netpilot-agent enroll` first")]
    Missing(PathBuf),
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file exists but is not a valid identity.
    #[error("{path} is unusable ({message}); enroll again with a new token: netpilot-agent enroll --force --relay URL --token TOKEN")]
    Corrupt { path: PathBuf, message: String },
}

impl Identity {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(FILE_NAME)
    }

    pub fn load(state_dir: &Path) -> Result<Identity, IdentityError> {
        let path = Self::path(state_dir);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(IdentityError::Missing(path))
            }
            Err(source) => return Err(IdentityError::Io { path, source }),
        };
        let id: Identity = serde_json::from_slice(&bytes).map_err(|e| IdentityError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        id.check().map_err(|message| IdentityError::Corrupt {
            path: path.clone(),
            message,
        })?;
        // Saved 0600 always; a file someone loosened since is tightened here.
        match private::restrict(&path, private::FILE_MODE) {
            Ok(Some(t)) => {
                tracing::warn!(path = %path.display(), mode = %t, "tightened permissions: the agent's state is private")
            }
            Ok(None) => {}
            Err(source) => return Err(IdentityError::Io { path, source }),
        }
        Ok(id)
    }

    /// What the relay issues: a UUID router id and a secret of 64 lowercase hex
    /// digits; a relay URL and a pinned fingerprint the link can use.
    pub fn check(&self) -> Result<(), String> {
        if !is_uuid(&self.router_id) {
            return Err(format!("router_id {:?} is not a UUID", self.router_id));
        }
        if !is_secret(&self.router_secret) {
            // Never the value: it may be most of the real secret.
            return Err(format!(
                "router_secret is not 64 lowercase hex digits ({} characters)",
                self.router_secret.chars().count()
            ));
        }
        crate::link::dial::RelayAddr::parse(&self.relay_url).map_err(|e| e.to_string())?;
        if let Trust::Fingerprint(f) = &self.trust {
            crate::link::tls::parse_fingerprint(f).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Proves the state directory can take the identity (exists or can be made, and a
    /// file can be written and synced) before a one-time token is spent on it.
    pub fn check_writable(state_dir: &Path) -> Result<(), IdentityError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| IdentityError::Io { path, source }
        };
        private::dir(state_dir).map_err(io(state_dir))?;
        let probe = state_dir.join(format!(".{FILE_NAME}.probe"));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&probe)?;
            // About the size of a real identity, so a nearly full flash shows up here.
            f.write_all(&[b' '; 512])?;
            f.sync_all()
        })();
        let _ = fs::remove_file(&probe);
        result.map_err(io(&probe))
    }

    pub fn save(&self, state_dir: &Path) -> Result<(), IdentityError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| IdentityError::Io { path, source }
        };
        private::dir(state_dir).map_err(io(state_dir))?;
        let path = Self::path(state_dir);
        let tmp = state_dir.join(format!(".{FILE_NAME}.tmp"));
        let bytes = serde_json::to_vec_pretty(self).expect("identity serialises");
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(&bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(io(&path))?;
        // The rename is durable only once the directory entry is.
        if let Ok(dir) = fs::File::open(state_dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

/// The canonical text form, `8-4-4-4-12` hex digits.
fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

fn is_secret(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp_dir() -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("np-id-{}-{}", std::process::id(), rand_suffix()));
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    fn sample() -> Identity {
        Identity {
            router_id: "0b7c3a5e-0000-4000-8000-000000000001".into(),
            router_secret: "5ec7e7".repeat(10) + "abcd",
            relay_url: "https://relay.example:8443".into(),
            trust: Trust::Fingerprint("ab".repeat(32)),
            name: "home".into(),
        }
    }

    #[test]
    fn round_trip_with_private_mode() {
        let dir = temp_dir();
        sample().save(&dir).unwrap();
        let back = Identity::load(&dir).unwrap();
        assert_eq!(back.router_id, sample().router_id);
        assert_eq!(back.trust, sample().trust);
        let mode = fs::metadata(Identity::path(&dir))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!format!("{back:?}").contains("5ec7e7"));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_and_corrupt_files_are_told_apart() {
        let dir = temp_dir();
        assert!(matches!(
            Identity::load(&dir),
            Err(IdentityError::Missing(_))
        ));
        fs::write(Identity::path(&dir), b"{\"router_id\": ").unwrap();
        let err = Identity::load(&dir).unwrap_err();
        assert!(matches!(err, IdentityError::Corrupt { .. }), "{err}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn values_the_relay_never_issues_are_refused() {
        assert!(sample().check().is_ok());
        let bad = |f: fn(&mut Identity)| {
            let mut id = sample();
            f(&mut id);
            id.check().unwrap_err()
        };
        assert!(bad(|i| i.router_id = "router-1".into()).contains("router_id"));
        assert!(bad(|i| i.router_id.push('\n')).contains("router_id"));
        assert!(bad(|i| i.router_id = i.router_id.replace('-', "x")).contains("UUID"));
        let e = bad(|i| i.router_secret = "AB".repeat(32));
        assert!(e.contains("64 lowercase hex") && !e.contains("ABAB"), "{e}");
        assert!(bad(|i| i.router_secret.push('\n')).contains("router_secret"));
        assert!(bad(|i| i.router_secret = String::new()).contains("router_secret"));
        assert!(bad(|i| i.relay_url = "relay:443".into()).contains("relay URL"));
        assert!(bad(|i| i.trust = Trust::Fingerprint("zz".into())).contains("fingerprint"));
        // Loading such a file says which value and how to recover, no panic.
        let dir = temp_dir();
        let mut id = sample();
        id.router_secret = "not\nhex".into();
        id.save(&dir).unwrap();
        let err = Identity::load(&dir).unwrap_err().to_string();
        assert!(
            err.contains("router_secret") && err.contains("enroll --force"),
            "{err}"
        );
        fs::remove_dir_all(dir).unwrap();
    }
}
