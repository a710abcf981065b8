//! What `netpilot-agent run` (and `cleanup`) work with once the command line, the UCI
//! file and the defaults are merged: [`RunConfig`], with its defaults and the checks
//! `run` makes before it starts anything.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::link::backoff::BackoffConfig;
use crate::link::tls::Trust;
use crate::policy;
use crate::usage::UsageConfig;
use crate::wifi::WifiConfig;

/// Said when `--simulate` reaches a router build, which leaves the simulated router
/// out (it is dead weight on 16 MB of flash).
pub const NO_SIMULATED_ROUTER: &str =
    "this build has no simulated router (built without the `simulate` feature)";

/// Everything `run` needs besides the stored identity.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub state_dir: PathBuf,
    /// Override the relay URL stored at enrollment (from UCI or the command line):
    /// the relays in the order tried. Empty: the one enrollment stored.
    pub relay_urls: Vec<String>,
    /// Override how the relay is trusted.
    pub trust: Option<Trust>,
    /// How often to look for an identity while not enrolled.
    pub identity_poll: Duration,
    /// Back the agent with the in-memory simulated router instead of this system.
    pub simulate: bool,
    /// Also serve the API, unauthenticated, on this local address (debugging,
    /// benchmarks). Keep it on loopback.
    pub api_listen: Option<SocketAddr>,
    /// Prefix for every system file the agent reads (default `/`).
    pub root: PathBuf,
    pub ping_interval: Duration,
    pub dead_after: Duration,
    pub connect_timeout: Duration,
    pub backoff: BackoffConfig,
    /// Streams the link serves at once (the relay queues the rest). With the
    /// link's 64 KiB stream window, 16 make a 1 MiB connection window.
    pub max_concurrent_calls: u32,
    /// The LAN-side bridges (empty: every LAN-side zone's, from UCI `firewall`
    /// and `network`) and the WAN device (`None`: UCI `network.wan`'s).
    pub lan_ifs: Vec<String>,
    pub wan_if: Option<String>,
    /// POSIX TZ overriding the router's own.
    pub timezone: Option<String>,
    /// How often the policy engine compares the kernel with the desired state.
    pub check_interval: Duration,
    /// What the agent does about fw4's flow offloading (UCI `flow_offloading`).
    pub flow_offloading: crate::offload::Mode,
    /// The `nft` and `tc` programs (name or path).
    pub nft: String,
    pub tc: String,
    /// The `ip` program (neighbour table) and the `ubus` CLI.
    pub ip: String,
    pub ubus: String,
    /// The `uci` program, and its `-c` config and `-t` save directories (`None`:
    /// uci's own defaults, `/etc/config` and `/tmp/.uci`, as on the router).
    pub uci: String,
    pub uci_confdir: Option<PathBuf>,
    pub uci_savedir: Option<PathBuf>,
    /// The `wifi` program (OpenWrt's `/sbin/wifi`).
    pub wifi: String,
    /// Safe apply of Wi-Fi changes: grace period, settle delay, retry interval.
    pub wifi_safe: WifiConfig,
    /// The `nlbw` client and nlbwmon's init script. `None`: `nlbw`, or the simulated
    /// nlbwmon when simulating (a given program is used even then: tests).
    pub nlbw: Option<String>,
    pub nlbw_init: String,
    /// Device-usage cache, sampling, flush and retention.
    pub usage: UsageConfig,
    /// The `dnsmasq` program the filtering resolvers run, and their state directory
    /// (configuration, block lists, pid files; tmpfs on a router).
    pub dnsmasq: String,
    pub dns_dir: PathBuf,
    /// Where filtering resolvers forward what they do not block (dnsmasq `server=`
    /// syntax, `addr` or `addr#port`); the router's own dnsmasq by default.
    pub dns_upstreams: Vec<String>,
    pub dns_port_base: u16,
    /// dnsmasq's `--user` for the resolvers: `None` picks `dnsmasq` when that user
    /// exists, else leaves dnsmasq's default (`nobody`); `-` leaves the default.
    pub dns_user: Option<String>,
    /// fw4's include directory (`chain-pre/input_<zone>/` lives under it) and the
    /// program run with `reload` after an include changed (empty: never).
    pub fw4_includes: PathBuf,
    pub firewall_reload: String,
    /// A file replacing the shipped list of DoH names and addresses.
    pub doh_list: Option<PathBuf>,
    /// The live copy's directory (tmpfs) and fw4's include of it (see
    /// `policy::fw4`).
    pub fw4_dir: PathBuf,
    pub fw4_include: PathBuf,
    /// The boot copy on flash; `None`: `boot.nft` in the state directory.
    pub boot_copy: Option<PathBuf>,
    /// The control socket (`status`, `reconnect`, `reapply`). Its directory is
    /// the agent's alone (0700): not `/var/run/netpilot` itself, which the
    /// filtering resolvers, running unprivileged, must traverse.
    /// `None`: no control socket (in-process agents of the benches and the tour).
    pub control: Option<PathBuf>,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            state_dir: PathBuf::from("/etc/netpilot"),
            relay_urls: Vec::new(),
            trust: None,
            identity_poll: Duration::from_secs(30),
            simulate: false,
            api_listen: None,
            root: PathBuf::from("/"),
            ping_interval: Duration::from_secs(20),
            dead_after: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(15),
            backoff: BackoffConfig::default(),
            max_concurrent_calls: 16,
            lan_ifs: Vec::new(),
            wan_if: None,
            timezone: None,
            check_interval: Duration::from_secs(60),
            flow_offloading: crate::offload::Mode::Keep,
            nft: "nft".into(),
            tc: "tc".into(),
            ip: "ip".into(),
            ubus: "ubus".into(),
            uci: "uci".into(),
            uci_confdir: None,
            uci_savedir: None,
            wifi: "wifi".into(),
            wifi_safe: WifiConfig::default(),
            nlbw: None,
            nlbw_init: "/etc/init.d/nlbwmon".into(),
            usage: UsageConfig::default(),
            dnsmasq: "dnsmasq".into(),
            dns_dir: PathBuf::from("/var/run/netpilot/dns"),
            dns_upstreams: policy::compile::DnsConfig::default().upstreams,
            dns_port_base: policy::compile::DnsConfig::default().port_base,
            doh_list: None,
            dns_user: None,
            fw4_includes: PathBuf::from("/usr/share/nftables.d"),
            firewall_reload: "/etc/init.d/firewall".into(),
            fw4_dir: PathBuf::from(policy::fw4::LIVE_DIR),
            fw4_include: PathBuf::from(policy::fw4::INCLUDE),
            boot_copy: None,
            control: Some(PathBuf::from(CONTROL_SOCKET)),
        }
    }
}

/// Where the running agent answers `status`, `reconnect` and `reapply`.
pub const CONTROL_SOCKET: &str = "/var/run/netpilot/ctl/agent.sock";

impl RunConfig {
    /// The fw4 includes that let redirected DNS through zones rejecting input, as
    /// configured (the agent installs them, `cleanup` removes them).
    pub fn dns_includes(&self) -> crate::system::fw4::Includes {
        crate::system::fw4::Includes {
            dir: self.fw4_includes.clone(),
            nft: self.nft.clone(),
            reload: self.firewall_reload.clone(),
            timeout: Duration::from_secs(30),
        }
    }

    /// The copies of the rules fw4 loads, as configured.
    pub fn fw4_paths(&self) -> policy::fw4::Fw4Paths {
        policy::fw4::Fw4Paths {
            live_dir: self.fw4_dir.clone(),
            include: self.fw4_include.clone(),
            boot: self
                .boot_copy
                .clone()
                .unwrap_or_else(|| self.state_dir.join(policy::fw4::BOOT_NAME)),
        }
    }
}

impl RunConfig {
    pub fn validate(&self) -> crate::error::Result<()> {
        if self.simulate && !cfg!(feature = "simulate") {
            // Said at once, not after waiting for an enrollment.
            crate::bail!("{NO_SIMULATED_ROUTER}");
        }
        if self.dead_after <= self.ping_interval {
            crate::bail!("dead-after must be longer than ping-interval");
        }
        if let Some(addr) = self.api_listen {
            // The local listener has no authentication: never expose it.
            if !addr.ip().is_loopback() {
                crate::bail!("--api-listen must be a loopback address, got {addr}");
            }
        }
        for name in self.lan_ifs.iter().chain(&self.wan_if) {
            policy::interfaces::validate(name)?;
        }
        if let Some(tz) = &self.timezone {
            policy::tz::Zone::parse(tz)
                .map_err(|e| crate::error::Error::msg(format!("--timezone {tz:?}: {e}")))?;
        }
        if self.check_interval < Duration::from_millis(100) {
            crate::bail!("check-interval must be at least 100ms");
        }
        let w = &self.wifi_safe;
        if w.settle >= w.grace {
            crate::bail!("wifi-settle must be shorter than wifi-grace");
        }
        if w.retry < Duration::from_millis(100) {
            crate::bail!("wifi-retry must be at least 100ms");
        }
        if !(1..=3650).contains(&self.usage.retention_days) {
            crate::bail!("usage-retention-days must be from 1 to 3650");
        }
        if self.usage.sample_interval < Duration::from_secs(1)
            || self.usage.flush_interval < Duration::from_secs(1)
        {
            crate::bail!("usage-sample and usage-flush must be at least 1s");
        }
        if self.backoff.cap < self.backoff.base {
            crate::bail!("backoff-cap must not be shorter than backoff-base");
        }
        Ok(())
    }
}
