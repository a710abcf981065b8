//! The agent's settings from `/etc/config/netpilot` (UCI), layered under the command
//! line. Unknown options are reported, not fatal: an older agent must keep running
//! with a newer package's config.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::uci_format;

/// Default location on OpenWrt.
pub const DEFAULT_PATH: &str = "/etc/config/netpilot";

/// What `/etc/config/netpilot` may set (section `config agent`, usually `'main'`).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Settings {
    /// `enabled '0'` stops the init script from starting the agent.
    pub enabled: Option<bool>,
    /// Override the relay URL stored at enrollment (e.g. the relay moved): every
    /// `relay_url` and `relay` (option or list), in the file's order.
    pub relay_urls: Vec<String>,
    /// Overrides how the relay is trusted: a pinned SHA-256 or a CA file.
    pub fingerprint: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub log_level: Option<String>,
    pub state_dir: Option<PathBuf>,
    /// Upper bound of the random delay before the first connection.
    pub start_delay: Option<Duration>,
    /// Upper bound of the random delay before the first retry after a lost link.
    pub reconnect_spread: Option<Duration>,
    /// `keep` (report only) or `disable` (the owner's consent to turn fw4's flow
    /// offloading off while policies need the forward path).
    pub flow_offloading: Option<crate::offload::Mode>,
    /// `list lan_if`: the LAN-side bridges, as `--lan-if`.
    pub lan_ifs: Vec<String>,
    /// `option dns_user`: as `--dns-user`.
    pub dns_user: Option<String>,
    /// Options this agent does not know, for a warning.
    pub unknown: Vec<String>,
}

const KNOWN: &[&str] = &[
    "enabled",
    "relay_url",
    "relay",
    "reconnect_spread",
    "fingerprint",
    "ca_file",
    "log_level",
    "state_dir",
    "start_delay",
    "flow_offloading",
    "lan_if",
    "dns_user",
];

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: uci_format::ParseError,
    },
    #[error("{path}: option {option}: {message}")]
    Invalid {
        path: PathBuf,
        option: &'static str,
        message: String,
    },
}

impl Settings {
    /// Reads the file; a missing file is no settings at all.
    pub fn load(path: &Path) -> Result<Settings, SettingsError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Settings::default()),
            Err(source) => Err(SettingsError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    pub fn parse(text: &str, path: &Path) -> Result<Settings, SettingsError> {
        let sections = uci_format::parse(text).map_err(|source| SettingsError::Parse {
            path: path.to_owned(),
            source,
        })?;
        let mut s = Settings::default();
        let Some(section) = sections.iter().find(|s| s.kind == "agent") else {
            return Ok(s);
        };
        let invalid = |option: &'static str, message: String| SettingsError::Invalid {
            path: path.to_owned(),
            option,
            message,
        };
        let text = |key: &str| {
            section
                .get(key)
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        s.enabled = match section.get("enabled") {
            None => None,
            Some("1" | "on" | "true" | "yes" | "enabled") => Some(true),
            Some("0" | "off" | "false" | "no" | "disabled") => Some(false),
            Some(other) => {
                return Err(invalid(
                    "enabled",
                    format!("expected 0 or 1, got {other:?}"),
                ))
            }
        };
        s.relay_urls = section
            .values
            .iter()
            .filter(|(k, _)| k == "relay_url" || k == "relay")
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
            .collect();
        s.fingerprint = text("fingerprint");
        s.ca_file = text("ca_file").map(PathBuf::from);
        if s.fingerprint.is_some() && s.ca_file.is_some() {
            return Err(invalid(
                "fingerprint",
                "set fingerprint or ca_file, not both".into(),
            ));
        }
        if let Some(fp) = &s.fingerprint {
            crate::link::tls::parse_fingerprint(fp)
                .map_err(|e| invalid("fingerprint", e.to_string()))?;
        }
        s.log_level = text("log_level");
        s.state_dir = text("state_dir").map(PathBuf::from);
        s.start_delay = match text("start_delay") {
            None => None,
            Some(v) => Some(
                super::duration::parse(&v)
                    .map_err(|e| invalid("start_delay", format!("{v:?}: {e}")))?,
            ),
        };
        s.reconnect_spread = match text("reconnect_spread") {
            None => None,
            Some(v) => Some(
                super::duration::parse(&v)
                    .map_err(|e| invalid("reconnect_spread", format!("{v:?}: {e}")))?,
            ),
        };
        s.flow_offloading = match text("flow_offloading") {
            None => None,
            Some(v) => Some(crate::offload::Mode::parse(&v).ok_or_else(|| {
                invalid(
                    "flow_offloading",
                    format!("expected keep or disable, got {v:?}"),
                )
            })?),
        };
        s.lan_ifs = section
            .all("lan_if")
            .iter()
            .flat_map(|v| v.split_whitespace())
            .map(str::to_owned)
            .collect();
        s.dns_user = text("dns_user");
        s.unknown = section
            .values
            .iter()
            .map(|(k, _)| k)
            .filter(|k| !KNOWN.contains(&k.as_str()))
            .cloned()
            .collect();
        s.unknown.dedup();
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_config_parses() {
        let text = include_str!("../../../openwrt-package/files/netpilot.config");
        let s = Settings::parse(text, Path::new("netpilot.config")).unwrap();
        assert_eq!(s.enabled, Some(true));
        assert_eq!(s.log_level.as_deref(), Some("info"));
        assert_eq!(s.flow_offloading, Some(crate::offload::Mode::Keep));
        assert!(s.unknown.is_empty(), "{:?}", s.unknown);
        let consent = Settings::parse(
            "config agent\n\toption flow_offloading 'disable'\n",
            Path::new("netpilot"),
        )
        .unwrap();
        assert_eq!(consent.flow_offloading, Some(crate::offload::Mode::Disable));
    }

    #[test]
    fn unknown_options_are_kept_for_a_warning() {
        let s = Settings::parse(
            "config agent 'main'\n\toption enabled '1'\n\toption future_thing 'x'\n",
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(s.unknown, ["future_thing"]);
    }

    #[test]
    fn bad_values_name_the_option() {
        for (text, option) in [
            ("config agent\n\toption enabled 'maybe'\n", "enabled"),
            ("config agent\n\toption fingerprint 'zz'\n", "fingerprint"),
            ("config agent\n\toption start_delay 'soon'\n", "start_delay"),
            (
                "config agent\n\toption reconnect_spread 'soon'\n",
                "reconnect_spread",
            ),
            (
                "config agent\n\toption flow_offloading 'off'\n",
                "flow_offloading",
            ),
            (
                "config agent\n\toption fingerprint 'aa'\n\toption ca_file '/x'\n",
                "fingerprint",
            ),
        ] {
            let err = Settings::parse(text, Path::new("/etc/config/netpilot")).unwrap_err();
            assert!(err.to_string().contains(option), "{err}");
        }
    }

    #[test]
    fn missing_file_is_empty_settings() {
        assert_eq!(
            Settings::load(Path::new("/nonexistent/netpilot")).unwrap(),
            Settings::default()
        );
    }
}
