//! Relay configuration: one constructor merges defaults, the optional config file,
//! the environment and the command line, validates it all and rejects unknown keys.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub mod cluster;
pub mod vendors;

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
    /// From accept through TLS to the first request's parsed head, whatever the
    /// protocol; also the header deadline of every later HTTP/1.1 request and how
    /// long an idle HTTP/1.1 keep-alive connection stays. Cuts slow-loris and
    /// connections that never speak.
    pub handshake: Duration,
    /// How long to wait for in-flight calls on shutdown, once the drain is over.
    pub shutdown_grace: Duration,
    /// Drain on SIGTERM: how long the node keeps serving while it tells its agent
    /// links to go elsewhere, before it cuts the links left and shuts down.
    pub drain: Duration,
    // --- Hardening: connections (issue 15) ---
    /// An HTTP/2 client connection with no call in flight this long is closed
    /// (GOAWAY). Agent links are not client connections and keep their PING rule.
    pub h2_idle: Duration,
    /// A request body must arrive whole within this long of the request head
    /// (then 408 `BODY_TIMEOUT`).
    pub body: Duration,
    // --- Silent links (issue 16 item 8) ---
    /// A call on a link that has received nothing for this long first PINGs it.
    pub probe_after: Duration,
    /// A probe PING unanswered this long: the link is dead (503, router offline).
    pub probe_timeout: Duration,
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
            drain: Duration::from_secs(30),
            h2_idle: Duration::from_secs(60),
            body: Duration::from_secs(10),
            // Silent links (issue 16 item 8).
            probe_after: Duration::from_secs(3),
            probe_timeout: Duration::from_secs(2),
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
    /// Connections one address (IPv6: one /64) may hold before any of them has
    /// presented a valid credential; authenticated connections never count.
    pub max_unauthenticated_per_address: usize,
    pub speedtest: SpeedtestLimits,
    /// What router answers may cost the relay (`[forwarding]`).
    pub forwarding: ForwardLimits,
    /// Links, the API reserve and the link-accept rate (`[capacity]`, issue 16).
    pub capacity: CapacityLimits,
    /// `tracing` filter, e.g. `info` or `netpilot_relay=debug`.
    pub log: String,
    /// Where the API key came from; `serve` warns when it was the command line.
    pub api_key_source: ApiKeySource,
    /// A separate plain-HTTP listener serving only `GET /metrics`, without the key.
    pub metrics_listen: Option<SocketAddr>,
    /// Clients (IPv4 addresses, IPv6 /64s) the enrollment limiter tracks at once;
    /// when all are inside their minute, newcomers are refused.
    pub enroll_max_clients: usize,
    /// Relay failover (issue 16): the listen backlog (`limits.listen_backlog`).
    pub listen_backlog: u32,
    /// `[cluster]`: one node of many (issue 16); `None` is a single node.
    pub cluster: Option<cluster::ClusterConfig>,
    /// `[vendors]`: MAC vendor enrichment (issue 17).
    pub vendors: vendors::VendorsConfig,
}

/// What the command line says; `None` leaves the file's or the default value.
#[derive(Debug, Default, Clone)]
pub struct CliOverrides {
    pub config_file: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub api_key: Option<Secret>,
    pub api_key_file: Option<PathBuf>,
    pub log: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    api_key: Option<String>,
    api_key_file: Option<PathBuf>,
    metrics_listen: Option<String>,
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
    #[serde(default)]
    capacity: FileCapacity,
    cluster: Option<cluster::FileCluster>,
    #[serde(default)]
    vendors: vendors::FileVendors,
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
    drain: Option<String>,
    // Hardening: connections (issue 15).
    h2_idle: Option<String>,
    body: Option<String>,
    // Silent links (issue 16 item 8).
    probe_after: Option<String>,
    probe_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEnrollment {
    token_ttl: Option<String>,
    per_minute: Option<u32>,
    max_clients: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    max_body_bytes: Option<usize>,
    max_connections: Option<usize>,
    // Hardening: connections (issue 15).
    max_unauthenticated_per_address: Option<usize>,
    speedtest_concurrent: Option<usize>,
    speedtest_max_bytes: Option<u64>,
    speedtest_max_duration: Option<String>,
    // Relay failover (issue 16).
    listen_backlog: Option<u32>,
}

pub const DEFAULT_LISTEN: &str = "0.0.0.0:8443";
pub const DEFAULT_DATA_DIR: &str = "netpilot-relay-data";
pub const API_KEY_ENV: &str = "NETPILOT_API_KEY";
/// Relay failover (issue 16): tokio's own default is 1024.
pub const DEFAULT_LISTEN_BACKLOG: u32 = 4096;

impl Config {
    /// Builds the configuration: defaults, then the file, then the environment
    /// (`NETPILOT_API_KEY`, the cluster's and the vendors' `NETPILOT_*`), then the
    /// command line.
    /// `env` reads one variable (injected for tests).
    pub fn load(
        cli: CliOverrides,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let file = match &cli.config_file {
            Some(path) => parse_file(path)?,
            None => FileConfig::default(),
        };
        Self::from_parts(file, cli, env)
    }

    /// Parses a config file on its own (used by the example-config test too).
    pub fn parse_str(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        Self::from_parts(file, CliOverrides::default(), &|_| None)
    }

    fn from_parts(
        file: FileConfig,
        cli: CliOverrides,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let env_api_key = env(API_KEY_ENV);
        let listen_text = cli
            .listen
            .map(|a| a.to_string())
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            ConfigError::Invalid(format!("listen address {listen_text:?} is not ADDR:PORT"))
        })?;

        let (api_key, api_key_source) = resolve_api_key(
            ApiKeyInputs {
                cli: cli.api_key,
                cli_key_file: cli.api_key_file,
                env: env_api_key,
                file: file.api_key,
                file_key_file: file.api_key_file,
            },
            &read_key_file,
        )?;
        let metrics_listen = parse_metrics_listen(file.metrics_listen)?;
        let enroll_max_clients = enroll_max_clients(file.enrollment.max_clients)?;
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
        let cluster = cluster::ClusterConfig::resolve(file.cluster, env)?;
        let vendors = vendors::VendorsConfig::resolve(file.vendors, env)?;
        // Agents pin the relay's certificate: every node must present the same one,
        // so a node never makes up its own.
        if cluster.is_some() && file.tls.cert.is_none() {
            return Err(ConfigError::Invalid(
                "cluster mode needs tls.cert and tls.key, the same pair on every node \
                 (agents pin the relay's certificate)"
                    .into(),
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
            drain: duration("timeouts.drain", t.drain, d.drain)?,
            h2_idle: duration("timeouts.h2_idle", t.h2_idle, d.h2_idle)?,
            body: duration("timeouts.body", t.body, d.body)?,
            // Silent links (issue 16 item 8).
            probe_after: duration("timeouts.probe_after", t.probe_after, d.probe_after)?,
            probe_timeout: duration("timeouts.probe_timeout", t.probe_timeout, d.probe_timeout)?,
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
        let max_connections_set = file.limits.max_connections.is_some();
        let max_connections = file.limits.max_connections.unwrap_or(50_000);
        if max_connections == 0 {
            return Err(ConfigError::Invalid(
                "limits.max_connections must be positive".into(),
            ));
        }

        // --- Hardening: connections (issue 15) ---
        let max_unauthenticated_per_address =
            file.limits.max_unauthenticated_per_address.unwrap_or(64);
        if max_unauthenticated_per_address == 0 {
            return Err(ConfigError::Invalid(
                "limits.max_unauthenticated_per_address must be positive".into(),
            ));
        }
        // --- end of hardening: connections ---

        // --- Relay failover (issue 16): a reconnect storm's handshakes wait in the
        // kernel's accept queue rather than being dropped (and retried a second
        // later, or never) when it overflows. Linux caps it at net.core.somaxconn.
        let listen_backlog = file.limits.listen_backlog.unwrap_or(DEFAULT_LISTEN_BACKLOG);
        if !(1..=65_535).contains(&listen_backlog) {
            return Err(ConfigError::Invalid(
                "limits.listen_backlog must be 1..65535".into(),
            ));
        }
        // --- end of relay failover ---

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
            max_unauthenticated_per_address,
            speedtest,
            forwarding: ForwardLimits::from_file(file.forwarding)?,
            capacity: CapacityLimits::from_file(
                file.capacity,
                max_connections,
                max_connections_set,
            )?,
            log: cli.log.or(file.log).unwrap_or_else(|| "info".to_owned()),
            api_key_source,
            metrics_listen,
            enroll_max_clients,
            listen_backlog,
            cluster,
            vendors,
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

// ---- [capacity]: a node at its limits still serves the web app (issue 16, item 7).

/// Agent links and the share of the node kept for API connections. At start the
/// relay also fits these and `limits.max_connections` into its open-file limit
/// (`capacity::plan`), lowering them with a warning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapacityLimits {
    /// Agent links up at once; they count apart from `limits.max_connections`.
    pub max_links: usize,
    /// Descriptors a link upgrade may never take: when the node is down to these,
    /// new links are refused (503 `LINKS_BUSY`) and API connections still get in.
    pub reserved_api_connections: usize,
    /// Link upgrades accepted per second (burst: one second's worth); more are
    /// answered 503 `LINKS_BUSY` with `Retry-After`. 0: no limit.
    pub max_link_accepts_per_second: u32,
    /// Which caps the config file set: a default lowered to fit the open-file limit
    /// is logged as information, a setting lowered as a warning.
    pub set: SetByOperator,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetByOperator {
    pub max_connections: bool,
    pub max_links: bool,
    pub reserved_api_connections: bool,
}

impl Default for CapacityLimits {
    fn default() -> Self {
        CapacityLimits {
            max_links: 100_000,
            reserved_api_connections: 256,
            max_link_accepts_per_second: 500,
            set: SetByOperator::default(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCapacity {
    max_links: Option<usize>,
    reserved_api_connections: Option<usize>,
    max_link_accepts_per_second: Option<u32>,
}

impl CapacityLimits {
    fn from_file(
        f: FileCapacity,
        max_connections: usize,
        max_connections_set: bool,
    ) -> Result<CapacityLimits, ConfigError> {
        let d = CapacityLimits::default();
        let c = CapacityLimits {
            set: SetByOperator {
                max_connections: max_connections_set,
                max_links: f.max_links.is_some(),
                reserved_api_connections: f.reserved_api_connections.is_some(),
            },
            max_links: f.max_links.unwrap_or(d.max_links),
            reserved_api_connections: f
                .reserved_api_connections
                .unwrap_or(d.reserved_api_connections.min(max_connections / 2)),
            max_link_accepts_per_second: f
                .max_link_accepts_per_second
                .unwrap_or(d.max_link_accepts_per_second),
        };
        if !(1..=10_000_000).contains(&c.max_links) {
            return Err(ConfigError::Invalid(
                "capacity.max_links must be 1..10000000".into(),
            ));
        }
        if c.reserved_api_connections >= max_connections {
            return Err(ConfigError::Invalid(format!(
                "capacity.reserved_api_connections must be below limits.max_connections ({max_connections})"
            )));
        }
        if c.max_link_accepts_per_second > 1_000_000 {
            return Err(ConfigError::Invalid(
                "capacity.max_link_accepts_per_second must be 0..1000000 (0: no limit)".into(),
            ));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod capacity_tests {
    use super::*;

    #[test]
    fn capacity_defaults_and_validation() {
        let base = "api_key = \"0123456789abcdef\"\n";
        let c = Config::parse_str(base, Path::new("x")).unwrap();
        assert_eq!(c.capacity, CapacityLimits::default());
        let c = Config::parse_str(
            &format!("{base}[capacity]\nmax_links = 3\nreserved_api_connections = 0\nmax_link_accepts_per_second = 0\n"),
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(
            c.capacity,
            CapacityLimits {
                max_links: 3,
                reserved_api_connections: 0,
                max_link_accepts_per_second: 0,
                set: SetByOperator {
                    max_connections: false,
                    max_links: true,
                    reserved_api_connections: true,
                },
            }
        );
        // A small max_connections takes a default reserve it can hold.
        let c = Config::parse_str(
            &format!("{base}[limits]\nmax_connections = 10\n"),
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(c.capacity.reserved_api_connections, 5);
        for bad in [
            "[capacity]\nmax_links = 0\n",
            "[capacity]\nreserved_api_connections = 50000\n",
            "[capacity]\nmax_link_accepts_per_second = 2000000\n",
            "[capacity]\nmax_link = 1\n",
        ] {
            let err = Config::parse_str(&format!("{base}{bad}"), Path::new("x")).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains("capacity") || msg.contains("max_links"),
                "{bad}: {msg}"
            );
        }
    }
}

// ---- end of [capacity]

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

pub(crate) fn duration(
    key: &str,
    value: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
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

// ---------------------------------------------------------------------------
// Operator-facing hardening (issue 15): where the API key comes from, where
// `/metrics` is served, and the enrollment limiter's bound.
// ---------------------------------------------------------------------------

/// Where the API key was found, highest precedence first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiKeySource {
    /// `--api-key`: visible to every local user in `ps` and `/proc/PID/cmdline`.
    CommandLine,
    /// `--api-key-file`.
    CommandLineFile(PathBuf),
    /// `NETPILOT_API_KEY`.
    Environment,
    /// `api_key` in the config file.
    ConfigFile,
    /// `api_key_file` in the config file.
    ConfigKeyFile(PathBuf),
}

impl ApiKeySource {
    /// Said in the log at start, so the operator sees which source won.
    pub fn describe(&self) -> String {
        match self {
            ApiKeySource::CommandLine => "--api-key".into(),
            ApiKeySource::CommandLineFile(p) => format!("--api-key-file {}", p.display()),
            ApiKeySource::Environment => API_KEY_ENV.into(),
            ApiKeySource::ConfigFile => "api_key in the config file".into(),
            ApiKeySource::ConfigKeyFile(p) => format!("api_key_file {}", p.display()),
        }
    }
}

/// Every place an API key may be given; [`resolve_api_key`] picks one.
struct ApiKeyInputs {
    cli: Option<Secret>,
    cli_key_file: Option<PathBuf>,
    env: Option<String>,
    file: Option<String>,
    file_key_file: Option<PathBuf>,
}

/// Precedence: the command line (`--api-key` or `--api-key-file`, not both), then
/// `NETPILOT_API_KEY`, then the config file (`api_key` or `api_key_file`, not both).
/// `read` reads a key file (injected: the choice is tested without files).
fn resolve_api_key(
    i: ApiKeyInputs,
    read: &dyn Fn(&Path) -> Result<Secret, ConfigError>,
) -> Result<(Secret, ApiKeySource), ConfigError> {
    let env = i.env.filter(|k| !k.is_empty());
    match (i.cli, i.cli_key_file) {
        (Some(_), Some(_)) => Err(ConfigError::Invalid(
            "pass --api-key or --api-key-file, not both".into(),
        )),
        (Some(k), None) => Ok((k, ApiKeySource::CommandLine)),
        (None, Some(path)) => Ok((read(&path)?, ApiKeySource::CommandLineFile(path))),
        (None, None) => match (env, i.file, i.file_key_file) {
            (Some(k), _, _) => Ok((Secret::new(k), ApiKeySource::Environment)),
            (None, Some(_), Some(_)) => Err(ConfigError::Invalid(
                "set api_key or api_key_file, not both".into(),
            )),
            (None, Some(k), None) => Ok((Secret::new(k), ApiKeySource::ConfigFile)),
            (None, None, Some(path)) => Ok((read(&path)?, ApiKeySource::ConfigKeyFile(path))),
            (None, None, None) => Err(ConfigError::Invalid(format!(
                "no API key: pass --api-key-file, set {API_KEY_ENV}, or set api_key_file \
                 (or api_key) in the config file"
            ))),
        },
    }
}

/// Reads an API key file: refused when other users may read or write it (mode
/// `o+r` or `o+w`, as ssh refuses such a private key) — a key every local user can
/// read is no better than one on the command line. One line; its trailing newline
/// (and surrounding blanks) is not part of the key.
pub fn read_key_file(path: &Path) -> Result<Secret, ConfigError> {
    read_secret_file(path, "API key")
}

/// Reads any secret file (API key, cluster secret, database URLs) under the same
/// rules; `what` names it in errors.
pub(crate) fn read_secret_file(path: &Path, what: &str) -> Result<Secret, ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let read_err = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    // The mode of the file opened, not of whatever the path names a moment later.
    let mode = file.metadata().map_err(read_err)?.permissions().mode();
    if mode & 0o006 != 0 {
        return Err(ConfigError::Invalid(format!(
            "{what} file {} is accessible to every user (mode {:o}): chmod o-rwx it \
             (0600 or 0640)",
            path.display(),
            mode & 0o777
        )));
    }
    const MAX: u64 = 4096;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX + 1), &mut text)
        .map_err(read_err)?;
    if text.len() as u64 > MAX {
        return Err(ConfigError::Invalid(format!(
            "{what} file {} is larger than {MAX} bytes",
            path.display()
        )));
    }
    let key = text.trim();
    if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ConfigError::Invalid(format!(
            "{what} file {} must hold the value alone on one line",
            path.display()
        )));
    }
    Ok(Secret::new(key))
}

/// `metrics_listen`: plain HTTP (what Prometheus scrapes by default), so it is
/// meant for loopback or a private network; the main port keeps `/metrics` behind
/// the API key whether or not this is set.
fn parse_metrics_listen(text: Option<String>) -> Result<Option<SocketAddr>, ConfigError> {
    text.map(|t| {
        t.parse()
            .map_err(|_| ConfigError::Invalid(format!("metrics_listen {t:?} is not ADDR:PORT")))
    })
    .transpose()
}

/// `enrollment.max_clients`: the limiter's table bound (its memory: about 40 bytes
/// a client).
fn enroll_max_clients(value: Option<usize>) -> Result<usize, ConfigError> {
    let n = value.unwrap_or(crate::ratelimit::DEFAULT_MAX_KEYS);
    if !(1..=1_000_000).contains(&n) {
        return Err(ConfigError::Invalid(
            "enrollment.max_clients must be 1..1000000".into(),
        ));
    }
    Ok(n)
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
        let c = Config::from_parts(FileConfig::default(), cli_with_key(), &|_| None).unwrap();
        assert_eq!(c.timeouts.session_idle, Duration::from_secs(1800));
        assert_eq!(c.timeouts.router_idle, Duration::from_secs(300));
        assert_eq!(c.timeouts.ping_interval, Duration::from_secs(20));
        assert_eq!(c.timeouts.dead_after, Duration::from_secs(60));
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.speedtest, SpeedtestLimits::default());
    }

    // Silent links (issue 16 item 8).
    #[test]
    fn probe_settings_have_defaults_and_are_read() {
        let c = Config::parse_str("api_key = \"0123456789abcdef\"\n", Path::new("x")).unwrap();
        assert_eq!(c.timeouts.probe_after, Duration::from_secs(3));
        assert_eq!(c.timeouts.probe_timeout, Duration::from_secs(2));
        let c = Config::parse_str(
            "api_key = \"0123456789abcdef\"\n[timeouts]\nprobe_after = \"500ms\"\nprobe_timeout = \"1s\"\n",
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(c.timeouts.probe_after, Duration::from_millis(500));
        assert_eq!(c.timeouts.probe_timeout, Duration::from_secs(1));
        let err = Config::parse_str(
            "api_key = \"0123456789abcdef\"\n[timeouts]\nprobe_timeout = \"0s\"\n",
            Path::new("x"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("probe_timeout"), "{err}");
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
        let c = Config::from_parts(file, CliOverrides::default(), &|k| {
            (k == API_KEY_ENV).then(|| "from-env-0123456789".into())
        })
        .unwrap();
        assert_eq!(c.api_key.expose(), "from-env-0123456789");
        let file: FileConfig = toml::from_str("api_key = \"from-file-0123456789\"").unwrap();
        let c = Config::from_parts(file, cli_with_key(), &|k| {
            (k == API_KEY_ENV).then(|| "from-env-0123456789".into())
        })
        .unwrap();
        assert_eq!(c.api_key.expose(), "0123456789abcdef");
    }

    #[test]
    fn bad_values_are_explained() {
        let err = Config::from_parts(FileConfig::default(), CliOverrides::default(), &|_| None)
            .unwrap_err();
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
            include_str!("../../netpilot-relay.example.toml")
        );
        let c = Config::parse_str(&text, Path::new("netpilot-relay.example.toml")).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:443");
        assert_eq!(c.timeouts.session_idle, Duration::from_secs(1800));
        assert_eq!(c.tls_names, vec!["relay.example.com".to_owned()]);
        assert_eq!(c.forwarding, ForwardLimits::default());
        assert_eq!(c.timeouts.h2_idle, Duration::from_secs(60));
        assert_eq!(c.max_unauthenticated_per_address, 64);
        assert_eq!(c.capacity.max_links, CapacityLimits::default().max_links);
        assert_eq!(c.vendors, vendors::VendorsConfig::default());
    }

    #[test]
    fn connection_hardening_settings() {
        let c = Config::from_parts(FileConfig::default(), cli_with_key(), &|_| None).unwrap();
        assert_eq!(c.timeouts.handshake, Duration::from_secs(10));
        assert_eq!(c.timeouts.h2_idle, Duration::from_secs(60));
        assert_eq!(c.timeouts.body, Duration::from_secs(10));
        assert_eq!(c.max_unauthenticated_per_address, 64);
        let c = Config::parse_str(
            "api_key = \"0123456789abcdef\"\n[timeouts]\nh2_idle = \"2s\"\nbody = \"750ms\"\n[limits]\nmax_unauthenticated_per_address = 3\n",
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(c.timeouts.h2_idle, Duration::from_secs(2));
        assert_eq!(c.timeouts.body, Duration::from_millis(750));
        assert_eq!(c.max_unauthenticated_per_address, 3);
        let err = Config::parse_str(
            "api_key = \"0123456789abcdef\"\n[limits]\nmax_unauthenticated_per_address = 0\n",
            Path::new("x"),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("max_unauthenticated_per_address"),
            "{err}"
        );
        let err = Config::parse_str(
            "api_key = \"0123456789abcdef\"\n[timeouts]\nbody = \"0s\"\n",
            Path::new("x"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("timeouts.body"), "{err}");
    }

    fn inputs() -> ApiKeyInputs {
        ApiKeyInputs {
            cli: None,
            cli_key_file: None,
            env: None,
            file: None,
            file_key_file: None,
        }
    }

    /// Pretends every key file holds `file:<its path>`.
    fn fake_read(path: &Path) -> Result<Secret, ConfigError> {
        Ok(Secret::new(format!("file:{}", path.display())))
    }

    #[test]
    fn api_key_precedence_is_command_line_then_environment_then_config_file() {
        let all = || ApiKeyInputs {
            cli: Some(Secret::new("cli")),
            cli_key_file: None,
            env: Some("env".into()),
            file: Some("conf".into()),
            file_key_file: None,
        };
        let pick = |i| {
            let (k, src) = resolve_api_key(i, &fake_read).unwrap();
            (k.expose().to_owned(), src)
        };
        assert_eq!(pick(all()), ("cli".into(), ApiKeySource::CommandLine));
        let i = ApiKeyInputs {
            cli: None,
            cli_key_file: Some("/k".into()),
            ..all()
        };
        assert_eq!(
            pick(i),
            ("file:/k".into(), ApiKeySource::CommandLineFile("/k".into()))
        );
        let i = ApiKeyInputs { cli: None, ..all() };
        assert_eq!(pick(i), ("env".into(), ApiKeySource::Environment));
        // An empty variable is no key (systemd's `Environment=NETPILOT_API_KEY=`).
        let i = ApiKeyInputs {
            cli: None,
            env: Some(String::new()),
            ..all()
        };
        assert_eq!(pick(i), ("conf".into(), ApiKeySource::ConfigFile));
        let i = ApiKeyInputs {
            file_key_file: Some("/c".into()),
            ..inputs()
        };
        assert_eq!(
            pick(i),
            ("file:/c".into(), ApiKeySource::ConfigKeyFile("/c".into()))
        );
    }

    #[test]
    fn two_keys_in_one_place_are_refused() {
        let i = ApiKeyInputs {
            cli: Some(Secret::new("cli")),
            cli_key_file: Some("/k".into()),
            ..inputs()
        };
        let err = resolve_api_key(i, &fake_read).unwrap_err();
        assert!(err.to_string().contains("not both"), "{err}");
        let i = ApiKeyInputs {
            file: Some("conf".into()),
            file_key_file: Some("/c".into()),
            ..inputs()
        };
        let err = resolve_api_key(i, &fake_read).unwrap_err();
        assert!(err.to_string().contains("not both"), "{err}");
    }

    #[test]
    fn key_files_are_trimmed_and_refused_when_others_may_read_them() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("np-relay-keyfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        let write = |text: &str, mode: u32| {
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        write("key-from-file-0123456789\n", 0o600);
        assert_eq!(
            read_key_file(&path).unwrap().expose(),
            "key-from-file-0123456789"
        );
        write("key-from-file-0123456789\r\n", 0o640);
        assert_eq!(
            read_key_file(&path).unwrap().expose(),
            "key-from-file-0123456789"
        );
        for mode in [0o644, 0o602, 0o666] {
            write("key-from-file-0123456789\n", mode);
            let err = read_key_file(&path).unwrap_err().to_string();
            assert!(err.contains("every user"), "{mode:o}: {err}");
            assert!(!err.contains("key-from-file"), "{err}");
        }
        write("first-line-0123456789\nsecond-line\n", 0o600);
        let err = read_key_file(&path).unwrap_err().to_string();
        assert!(err.contains("one line"), "{err}");
        write(&"k".repeat(5000), 0o600);
        let err = read_key_file(&path).unwrap_err().to_string();
        assert!(err.contains("larger"), "{err}");
        let err = read_key_file(&dir.join("missing")).unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn metrics_listen_is_optional_and_checked() {
        let base = "api_key = \"0123456789abcdef\"\n";
        let c = Config::parse_str(base, Path::new("x")).unwrap();
        assert_eq!(c.metrics_listen, None);
        let c = Config::parse_str(
            &format!("{base}metrics_listen = \"127.0.0.1:9443\"\n"),
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9443".parse().unwrap()));
        let err = Config::parse_str(
            &format!("{base}metrics_listen = \"9443\"\n"),
            Path::new("x"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("metrics_listen"), "{err}");
    }

    #[test]
    fn enrollment_table_bound_is_checked() {
        let base = "api_key = \"0123456789abcdef\"\n[enrollment]\n";
        let c = Config::parse_str(base, Path::new("x")).unwrap();
        assert_eq!(c.enroll_max_clients, 10_000);
        let c = Config::parse_str(&format!("{base}max_clients = 5\n"), Path::new("x")).unwrap();
        assert_eq!(c.enroll_max_clients, 5);
        for bad in ["max_clients = 0", "max_clients = 2000000"] {
            let err = Config::parse_str(&format!("{base}{bad}\n"), Path::new("x")).unwrap_err();
            assert!(err.to_string().contains("max_clients"), "{bad}: {err}");
        }
    }

    #[test]
    fn listen_backlog_defaults_and_is_checked() {
        let base = "api_key = \"0123456789abcdef\"\n[limits]\n";
        let c = Config::parse_str(base, Path::new("x")).unwrap();
        assert_eq!(c.listen_backlog, 4096);
        let c =
            Config::parse_str(&format!("{base}listen_backlog = 128\n"), Path::new("x")).unwrap();
        assert_eq!(c.listen_backlog, 128);
        for bad in ["listen_backlog = 0", "listen_backlog = 70000"] {
            let err = Config::parse_str(&format!("{base}{bad}\n"), Path::new("x")).unwrap_err();
            assert!(err.to_string().contains("listen_backlog"), "{bad}: {err}");
        }
    }

    #[test]
    fn cluster_mode_needs_the_shared_certificate() {
        let file: FileConfig = toml::from_str(
            "[cluster]\nnode_id = \"a\"\npostgres_url = \"postgres://h/db\"\n\
             redis_url = \"redis://h\"\ninternal_listen = \"127.0.0.1:9\"\n\
             secret = \"0123456789abcdef0123456789abcdef\"\n",
        )
        .unwrap();
        let err = Config::from_parts(file, cli_with_key(), &|_| None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("tls.cert"), "{err}");
    }

    #[test]
    fn the_vendors_section_is_read_and_checked() {
        let base = "api_key = \"0123456789abcdef\"\n";
        let c = Config::parse_str(base, Path::new("x")).unwrap();
        assert!(c.vendors.enabled);
        let c = Config::parse_str(
            &format!(
                "{base}[vendors]\nenabled = false\nfiles = [\"/etc/netpilot-relay/oui.csv\"]\n"
            ),
            Path::new("x"),
        )
        .unwrap();
        assert!(!c.vendors.enabled);
        assert_eq!(
            c.vendors.files,
            [PathBuf::from("/etc/netpilot-relay/oui.csv")]
        );
        let err = Config::parse_str(&format!("{base}[vendors]\nfile = []\n"), Path::new("x"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("file"), "{err}");
        let file: FileConfig = toml::from_str("[vendors]\nenabled = true\n").unwrap();
        let c = Config::from_parts(file, cli_with_key(), &|k| {
            (k == vendors::ENV_VENDORS).then(|| "off".into())
        })
        .unwrap();
        assert!(!c.vendors.enabled);
    }

    #[test]
    fn api_key_is_never_printed() {
        let c = Config::from_parts(FileConfig::default(), cli_with_key(), &|_| None).unwrap();
        assert!(!format!("{c:?}").contains("0123456789abcdef"));
    }
}
