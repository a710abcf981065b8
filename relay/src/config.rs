//! Relay configuration: one constructor merges defaults, the optional config file,
//! the environment and the command line, validates it all and rejects unknown keys.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The web-app backend's API key. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has unknown keys.
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value is out of range or missing.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone)]
pub struct Timeouts {
    /// A session with no call for this long is removed; its calls then get 401.
    pub session_idle: Duration,
    /// A router attached to a session is detached after this long without a call.
    pub router_idle: Duration,
    /// How often the background sweeper removes expired sessions and attachments.
    pub sweep_interval: Duration,
    /// How long a forwarded call may wait for the router's answer (then 408).
    pub command: Duration,
    /// Interval of h2 PINGs on an agent link.
    pub ping_interval: Duration,
    /// A link whose PINGs go unanswered this long (counted from the last one sent on
    /// time) is dead.
    pub dead_after: Duration,
    /// TLS handshake and HTTP header deadline for every client; cuts slow-loris.
    pub handshake: Duration,
    /// How long to wait for in-flight calls on shutdown.
    pub shutdown_grace: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            session_idle: Duration::from_secs(30 * 60),
            router_idle: Duration::from_secs(5 * 60),
            sweep_interval: Duration::from_secs(15),
            command: Duration::from_secs(30),
            ping_interval: Duration::from_secs(20),
            dead_after: Duration::from_secs(60),
            handshake: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// What the speed-test endpoints may cost the relay (`[limits]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpeedtestLimits {
    /// Transfers (download or upload) served at once, all routers together; one
    /// more is refused with 429 `SPEEDTEST_BUSY`. Each router gets one at a time.
    pub concurrent: usize,
    /// The most one download or upload may move.
    pub max_bytes: u64,
    /// The longest one download or upload may last.
    pub max_duration: Duration,
}

impl Default for SpeedtestLimits {
    fn default() -> Self {
        SpeedtestLimits {
            concurrent: 4,
            max_bytes: 256 * 1024 * 1024,
            max_duration: Duration::from_secs(20),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub api_key: Secret,
    /// PEM certificate chain and key; when absent a self-signed pair is created in
    /// the data directory on first start.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Extra DNS names for the self-signed certificate (localhost is always there).
    pub tls_names: Vec<String>,
    pub timeouts: Timeouts,
    pub enrollment_token_ttl: Duration,
    /// Enrollment attempts allowed per client address per minute.
    pub enroll_per_minute: u32,
    pub max_body_bytes: usize,
    pub max_connections: usize,
    pub speedtest: SpeedtestLimits,
    /// What router answers may cost the relay (`[forwarding]`).
    pub forwarding: ForwardLimits,
    /// `tracing` filter, e.g. `info` or `netpilot_relay=debug`.
    pub log: String,
}

/// What the command line says; `None` leaves the file's or the default value.
#[derive(Debug, Default, Clone)]
pub struct CliOverrides {
    pub config_file: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub api_key: Option<Secret>,
    pub log: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    api_key: Option<String>,
    api_key_file: Option<PathBuf>,
    log: Option<String>,
    #[serde(default)]
    tls: FileTls,
    #[serde(default)]
    timeouts: FileTimeouts,
    #[serde(default)]
    enrollment: FileEnrollment,
    #[serde(default)]
    limits: FileLimits,
    #[serde(default)]
    forwarding: FileForwarding,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    #[serde(default)]
    names: Vec<String>,
}

/// Durations in humantime notation: `"30m"`, `"250ms"`, `"1h 30m"`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTimeouts {
    session_idle: Option<String>,
    router_idle: Option<String>,
    sweep_interval: Option<String>,
    command: Option<String>,
    ping_interval: Option<String>,
    dead_after: Option<String>,
    handshake: Option<String>,
    shutdown_grace: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEnrollment {
    token_ttl: Option<String>,
    per_minute: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    max_body_bytes: Option<usize>,
    max_connections: Option<usize>,
    speedtest_concurrent: Option<usize>,
    speedtest_max_bytes: Option<u64>,
    speedtest_max_duration: Option<String>,
}

pub const DEFAULT_LISTEN: &str = "0.0.0.0:8443";
pub const DEFAULT_DATA_DIR: &str = "netpilot-relay-data";
pub const API_KEY_ENV: &str = "NETPILOT_API_KEY";

impl Config {
    /// Builds the configuration: defaults, then the file, then `NETPILOT_API_KEY`,
    /// then the command line.
    pub fn load(cli: CliOverrides, env_api_key: Option<String>) -> Result<Config, ConfigError> {
        let file = match &cli.config_file {
            Some(path) => parse_file(path)?,
            None => FileConfig::default(),
        };
        Self::from_parts(file, cli, env_api_key)
    }

    /// Parses a config file on its own (used by the example-config test too).
    pub fn parse_str(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        Self::from_parts(file, CliOverrides::default(), None)
    }

    fn from_parts(
        file: FileConfig,
        cli: CliOverrides,
        env_api_key: Option<String>,
    ) -> Result<Config, ConfigError> {
        let listen_text = cli
            .listen
            .map(|a| a.to_string())
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            ConfigError::Invalid(format!("listen address {listen_text:?} is not ADDR:PORT"))
        })?;

        let api_key = match (
            cli.api_key,
            env_api_key.filter(|k| !k.is_empty()),
            file.api_key,
            file.api_key_file,
        ) {
            (Some(k), _, _, _) => k,
            (None, Some(k), _, _) => Secret::new(k),
            (None, None, Some(k), None) => Secret::new(k),
            (None, None, None, Some(path)) => {
                let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                Secret::new(text.trim())
            }
            (None, None, Some(_), Some(_)) => {
                return Err(ConfigError::Invalid(
                    "set api_key or api_key_file, not both".into(),
                ))
            }
            (None, None, None, None) => {
                return Err(ConfigError::Invalid(format!(
                    "no API key: pass --api-key, set {API_KEY_ENV} or api_key in the config file"
                )))
            }
        };
        if api_key.expose().len() < 16 {
            return Err(ConfigError::Invalid(
                "the API key must be at least 16 characters".into(),
            ));
        }

        if file.tls.cert.is_some() != file.tls.key.is_some() {
            return Err(ConfigError::Invalid(
                "tls.cert and tls.key go together".into(),
            ));
        }

        let d = Timeouts::default();
        let t = file.timeouts;
        let timeouts = Timeouts {
            session_idle: duration("timeouts.session_idle", t.session_idle, d.session_idle)?,
            router_idle: duration("timeouts.router_idle", t.router_idle, d.router_idle)?,
            sweep_interval: duration(
                "timeouts.sweep_interval",
                t.sweep_interval,
                d.sweep_interval,
            )?,
            command: duration("timeouts.command", t.command, d.command)?,
            ping_interval: duration("timeouts.ping_interval", t.ping_interval, d.ping_interval)?,
            dead_after: duration("timeouts.dead_after", t.dead_after, d.dead_after)?,
            handshake: duration("timeouts.handshake", t.handshake, d.handshake)?,
            shutdown_grace: duration(
                "timeouts.shutdown_grace",
                t.shutdown_grace,
                d.shutdown_grace,
            )?,
        };
        if timeouts.dead_after <= timeouts.ping_interval {
            return Err(ConfigError::Invalid(
                "timeouts.dead_after must be longer than timeouts.ping_interval".into(),
            ));
        }

        let max_body_bytes = file.limits.max_body_bytes.unwrap_or(2 * 1024 * 1024);
        if !(1024..=64 * 1024 * 1024).contains(&max_body_bytes) {
            return Err(ConfigError::Invalid(
                "limits.max_body_bytes must be 1 KiB..64 MiB".into(),
            ));
        }
        let max_connections = file.limits.max_connections.unwrap_or(50_000);
        if max_connections == 0 {
            return Err(ConfigError::Invalid(
                "limits.max_connections must be positive".into(),
            ));
        }

        let d = SpeedtestLimits::default();
        let speedtest = SpeedtestLimits {
            concurrent: file.limits.speedtest_concurrent.unwrap_or(d.concurrent),
            max_bytes: file.limits.speedtest_max_bytes.unwrap_or(d.max_bytes),
            max_duration: duration(
                "limits.speedtest_max_duration",
                file.limits.speedtest_max_duration,
                d.max_duration,
            )?,
        };
        if speedtest.concurrent > 1024 {
            return Err(ConfigError::Invalid(
                "limits.speedtest_concurrent must be 0..1024 (0 turns speed tests off)".into(),
            ));
        }
        if !(64 * 1024..=4 * 1024 * 1024 * 1024).contains(&speedtest.max_bytes) {
            return Err(ConfigError::Invalid(
                "limits.speedtest_max_bytes must be 64 KiB..4 GiB".into(),
            ));
        }
        if speedtest.max_duration > Duration::from_secs(120) {
            return Err(ConfigError::Invalid(
                "limits.speedtest_max_duration must be at most 2m".into(),
            ));
        }

        Ok(Config {
            listen,
            data_dir: cli
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            api_key,
            tls_cert: file.tls.cert,
            tls_key: file.tls.key,
            tls_names: file.tls.names,
            timeouts,
            enrollment_token_ttl: duration(
                "enrollment.token_ttl",
                file.enrollment.token_ttl,
                Duration::from_secs(24 * 3600),
            )?,
            enroll_per_minute: file.enrollment.per_minute.unwrap_or(30),
            max_body_bytes,
            max_connections,
            speedtest,
            forwarding: ForwardLimits::from_file(file.forwarding)?,
            log: cli.log.or(file.log).unwrap_or_else(|| "info".to_owned()),
        })
    }
}

// ---- [forwarding]: what a router's answers may cost the relay (issue 15, items 3-4).

/// What one router's answers, and all of them together, may cost the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardLimits {
    /// The most a JSON answer may hold; it is read whole to be checked.
    pub answer_max_bytes: usize,
    /// The same for the routes that list devices or usage history.
    pub list_answer_max_bytes: usize,
    /// The most the usage-history CSV export may stream through.
    pub export_max_bytes: u64,
    /// The longest the CSV export may take, from the call's start to its last byte.
    pub export_deadline: Duration,
    /// Calls in flight to one router; more wait for a slot.
    pub calls_per_router: usize,
    /// Calls that may wait for one of a router's slots (within the command
    /// timeout); one more is refused with 429 `ROUTER_BUSY`.
    pub calls_queued_per_router: usize,
    /// Answer bytes held at once, all routers together; a call that would go over
    /// is answered 503 `RELAY_BUSY`.
    pub answer_budget_bytes: usize,
}

impl Default for ForwardLimits {
    fn default() -> Self {
        ForwardLimits {
            answer_max_bytes: 1024 * 1024,
            list_answer_max_bytes: 8 * 1024 * 1024,
            export_max_bytes: 32 * 1024 * 1024,
            export_deadline: Duration::from_secs(120),
            calls_per_router: 16,
            calls_queued_per_router: 256,
            answer_budget_bytes: 64 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileForwarding {
    answer_max_bytes: Option<usize>,
    list_answer_max_bytes: Option<usize>,
    export_max_bytes: Option<u64>,
    export_deadline: Option<String>,
    calls_per_router: Option<usize>,
    calls_queued_per_router: Option<usize>,
    answer_budget_bytes: Option<usize>,
}

impl ForwardLimits {
    fn from_file(f: FileForwarding) -> Result<ForwardLimits, ConfigError> {
        let d = ForwardLimits::default();
        let l = ForwardLimits {
            answer_max_bytes: f.answer_max_bytes.unwrap_or(d.answer_max_bytes),
            list_answer_max_bytes: f.list_answer_max_bytes.unwrap_or(d.list_answer_max_bytes),
            export_max_bytes: f.export_max_bytes.unwrap_or(d.export_max_bytes),
            export_deadline: duration(
                "forwarding.export_deadline",
                f.export_deadline,
                d.export_deadline,
            )?,
            calls_per_router: f.calls_per_router.unwrap_or(d.calls_per_router),
            calls_queued_per_router: f
                .calls_queued_per_router
                .unwrap_or(d.calls_queued_per_router),
            answer_budget_bytes: f.answer_budget_bytes.unwrap_or(d.answer_budget_bytes),
        };
        const MIB: usize = 1024 * 1024;
        if !(16 * 1024..=64 * MIB).contains(&l.answer_max_bytes) {
            return Err(ConfigError::Invalid(
                "forwarding.answer_max_bytes must be 16 KiB..64 MiB".into(),
            ));
        }
        if !(l.answer_max_bytes..=64 * MIB).contains(&l.list_answer_max_bytes) {
            return Err(ConfigError::Invalid(
                "forwarding.list_answer_max_bytes must be answer_max_bytes..64 MiB".into(),
            ));
        }
        if !(64 * 1024..=1024 * MIB as u64).contains(&l.export_max_bytes) {
            return Err(ConfigError::Invalid(
                "forwarding.export_max_bytes must be 64 KiB..1 GiB".into(),
            ));
        }
        if l.export_deadline > Duration::from_secs(3600) {
            return Err(ConfigError::Invalid(
                "forwarding.export_deadline must be at most 1h".into(),
            ));
        }
        if !(1..=1024).contains(&l.calls_per_router) {
            return Err(ConfigError::Invalid(
                "forwarding.calls_per_router must be 1..1024".into(),
            ));
        }
        if l.calls_queued_per_router > 65_536 {
            return Err(ConfigError::Invalid(
                "forwarding.calls_queued_per_router must be 0..65536".into(),
            ));
        }
        // A budget below one answer would refuse every call of that size.
        if !(l.list_answer_max_bytes..=16 * 1024 * MIB).contains(&l.answer_budget_bytes) {
            return Err(ConfigError::Invalid(
                "forwarding.answer_budget_bytes must be list_answer_max_bytes..16 GiB".into(),
            ));
        }
        Ok(l)
    }
}

#[cfg(test)]
mod forwarding_tests {
    use super::*;

    #[test]
    fn forwarding_limits_default_and_validate() {
        let base = "api_key = \"0123456789abcdef\"\n[forwarding]\n";
        let c = Config::parse_str(base, Path::new("x")).unwrap();
        assert_eq!(c.forwarding, ForwardLimits::default());
        let c = Config::parse_str(
            &format!("{base}answer_max_bytes = 65536\nlist_answer_max_bytes = 131072\nexport_max_bytes = 1048576\nexport_deadline = \"5s\"\ncalls_per_router = 2\nanswer_budget_bytes = 262144\n"),
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(c.forwarding.calls_per_router, 2);
        assert_eq!(c.forwarding.export_deadline, Duration::from_secs(5));
        for bad in [
            "answer_max_bytes = 10",
            "list_answer_max_bytes = 1024",
            "export_max_bytes = 10",
            "export_deadline = \"2h\"",
            "calls_per_router = 0",
            "calls_queued_per_router = 100000",
            "answer_budget_bytes = 1024",
        ] {
            let err = Config::parse_str(&format!("{base}{bad}\n"), Path::new("x")).unwrap_err();
            assert!(err.to_string().contains("forwarding."), "{bad}: {err}");
        }
    }
}

// ---- end of [forwarding]

fn parse_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

fn duration(key: &str, value: Option<String>, default: Duration) -> Result<Duration, ConfigError> {
    let Some(text) = value else {
        return Ok(default);
    };
    let d = humantime::parse_duration(&text)
        .map_err(|e| ConfigError::Invalid(format!("{key} = {text:?}: {e}")))?;
    if d.is_zero() {
        return Err(ConfigError::Invalid(format!("{key} must be positive")));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli_with_key() -> CliOverrides {
        CliOverrides {
            api_key: Some(Secret::new("0123456789abcdef")),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_match_the_design() {
        let c = Config::from_parts(FileConfig::default(), cli_with_key(), None).unwrap();
        assert_eq!(c.timeouts.session_idle, Duration::from_secs(1800));
        assert_eq!(c.timeouts.router_idle, Duration::from_secs(300));
        assert_eq!(c.timeouts.ping_interval, Duration::from_secs(20));
        assert_eq!(c.timeouts.dead_after, Duration::from_secs(60));
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.speedtest, SpeedtestLimits::default());
    }

    #[test]
    fn speedtest_limits_are_validated() {
        let base = "api_key = \"0123456789abcdef\"\n[limits]\n";
        let c = Config::parse_str(
            &format!("{base}speedtest_concurrent = 2\nspeedtest_max_bytes = 1048576\nspeedtest_max_duration = \"5s\"\n"),
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(
            c.speedtest,
            SpeedtestLimits {
                concurrent: 2,
                max_bytes: 1 << 20,
                max_duration: Duration::from_secs(5)
            }
        );
        for bad in [
            "speedtest_max_bytes = 10",
            "speedtest_max_duration = \"10m\"",
            "speedtest_concurrent = 5000",
        ] {
            let err = Config::parse_str(&format!("{base}{bad}\n"), Path::new("x")).unwrap_err();
            assert!(err.to_string().contains("speedtest"), "{bad}: {err}");
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Config::parse_str(
            "api_key = \"0123456789abcdef\"\nlisten_port = 3\n",
            Path::new("x.toml"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("listen_port"), "{err}");
        let err = Config::parse_str(
            "api_key = \"0123456789abcdef\"\n[timeouts]\nsession = \"1s\"\n",
            Path::new("x.toml"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("session"), "{err}");
    }

    #[test]
    fn command_line_beats_environment_beats_file() {
        let file: FileConfig = toml::from_str("api_key = \"from-file-0123456789\"").unwrap();
        let c = Config::from_parts(
            file,
            CliOverrides::default(),
            Some("from-env-0123456789".into()),
        )
        .unwrap();
        assert_eq!(c.api_key.expose(), "from-env-0123456789");
        let file: FileConfig = toml::from_str("api_key = \"from-file-0123456789\"").unwrap();
        let c =
            Config::from_parts(file, cli_with_key(), Some("from-env-0123456789".into())).unwrap();
        assert_eq!(c.api_key.expose(), "0123456789abcdef");
    }

    #[test]
    fn bad_values_are_explained() {
        let err =
            Config::from_parts(FileConfig::default(), CliOverrides::default(), None).unwrap_err();
        assert!(err.to_string().contains("no API key"));
        let err = Config::parse_str("api_key = \"short\"", Path::new("x")).unwrap_err();
        assert!(err.to_string().contains("at least 16"));
        let err = Config::parse_str(
            "api_key = \"0123456789abcdef\"\n[timeouts]\nping_interval = \"30s\"\ndead_after = \"10s\"\n",
            Path::new("x"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("dead_after"));
        let err = Config::parse_str(
            "api_key = \"0123456789abcdef\"\n[timeouts]\ncommand = \"soon\"\n",
            Path::new("x"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("timeouts.command"));
    }

    #[test]
    fn the_example_config_parses() {
        // The key comes from the environment in deployments; the test supplies one.
        let text = format!(
            "api_key = \"example-key-0123456789\"\n{}",
            include_str!("../netpilot-relay.example.toml")
        );
        let c = Config::parse_str(&text, Path::new("netpilot-relay.example.toml")).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:443");
        assert_eq!(c.timeouts.session_idle, Duration::from_secs(1800));
        assert_eq!(c.tls_names, vec!["relay.example.com".to_owned()]);
        assert_eq!(c.forwarding, ForwardLimits::default());
    }

    #[test]
    fn api_key_is_never_printed() {
        let c = Config::from_parts(FileConfig::default(), cli_with_key(), None).unwrap();
        assert!(!format!("{c:?}").contains("0123456789abcdef"));
    }
}
