//! The command line as given. Options that the UCI file can also set stay `None`
//! when left out, so [`super::AgentConfig::load`] can let the file or the default
//! decide; the others go straight onto the defaults. Everything that can be wrong
//! with the command line alone is found here, before the file is read.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use lexopt::prelude::*;

use super::{ConfigError, RunConfig};
use crate::link::tls::{parse_fingerprint, Trust};

pub const USAGE: &str = "\
usage: netpilot-agent enroll --relay URL --token TOKEN [--ca FILE | --fingerprint SHA256]
                             [--state-dir DIR] [--force]
       netpilot-agent run [--state-dir DIR] [--simulate] [--api-listen ADDR:PORT]
                          [--relay URL]... [--ca FILE | --fingerprint SHA256]
                          [--log FILTER] [--root DIR] [--identity-poll DUR]
                          [--ping-interval DUR] [--dead-after DUR] [--connect-timeout DUR]
                          [--backoff-base DUR] [--backoff-cap DUR] [--healthy-after DUR]
                          [--start-delay-max DUR] [--reconnect-spread DUR]
                          [--lan-if IF]... [--wan-if IF]
                          [--timezone POSIX-TZ] [--check-interval DUR]
                          [--nft PROGRAM] [--tc PROGRAM] [--ip PROGRAM] [--ubus PROGRAM]
                          [--uci PROGRAM] [--uci-confdir DIR] [--uci-savedir DIR]
                          [--wifi PROGRAM] [--wifi-grace DUR] [--wifi-settle DUR]
                          [--wifi-retry DUR]
                          [--nlbw PROGRAM] [--nlbw-init PROGRAM] [--usage-cache DUR]
                          [--usage-sample DUR] [--usage-flush DUR] [--usage-retention-days N]
                          [--dnsmasq PROGRAM] [--dns-dir DIR] [--dns-upstream ADDR[#PORT]]...
                          [--dns-port-base PORT] [--doh-list FILE] [--dns-user USER]
                          [--fw4-include-dir DIR] [--firewall-reload PROGRAM]
                          [--fw4-dir DIR] [--fw4-include FILE] [--boot-copy FILE]
                          [--control SOCKET]
       netpilot-agent boot [--state-dir DIR] [--fw4-dir DIR] [--fw4-include FILE]
                           [--boot-copy FILE] [--nft PROGRAM]
       netpilot-agent status [--json] [--control SOCKET]
       netpilot-agent reconnect|reapply [--control SOCKET]
       netpilot-agent cleanup [--lan-if IF]... [--wan-if IF] [--dns-dir DIR]
                              [--fw4-include-dir DIR] [--firewall-reload PROGRAM]
                              [--fw4-dir DIR] [--fw4-include FILE] [--boot-copy FILE]
       netpilot-agent --version

Every command also takes --config FILE (UCI, default /etc/config/netpilot); the
command line wins over it. DIR defaults to /etc/netpilot. DUR is like 20s, 250ms, 1m.
--lan-if (repeatable) defaults to the devices of every LAN-side UCI firewall zone
(not masquerading), network.lan's first; --wan-if to network.wan's (br-lan, wan).
--timezone defaults to UCI system.timezone, then /etc/TZ, then UTC.
--fingerprint is the SHA-256 of the relay certificate's DER, hex, colons optional.
--relay (repeatable) lists the relays in the order tried; the agent stays on one that
works and moves to the next when it fails. After a lost link the first retry waits a
random delay up to --reconnect-spread (30s) so a fleet does not return in one second.
A Wi-Fi change is rolled back unless a report reaches the relay within --wifi-grace
(default 90s); reports start --wifi-settle after the reload (10s) and repeat every
--wifi-retry (5s). --uci-confdir/--uci-savedir are uci's -c/-t (default uci's own).
Filtered groups get their own dnsmasq on --dns-port-base (5400) + slot, forwarding
to --dns-upstream (127.0.0.1, the router's dnsmasq); state in --dns-dir
(/var/run/netpilot/dns), run as --dns-user (default: dnsmasq when that user exists,
else dnsmasq's own default; \"-\" for that). --doh-list replaces the shipped DoH names
and addresses. Zones that reject input get an fw4 include in --fw4-include-dir
(/usr/share/nftables.d) accepting redirected DNS; --firewall-reload
(/etc/init.d/firewall, \"\" for never) is run with `reload` when it changed.
The rules survive fw4: a live copy in --fw4-dir (/var/run/netpilot/fw4), included
by --fw4-include (/usr/share/nftables.d/ruleset-post/netpilot.nft), and a boot copy
(--boot-copy, default DIR/boot.nft) that `boot` puts in place before fw4 starts.
status, reconnect and reapply talk to the running agent on --control
(/var/run/netpilot/ctl/agent.sock); status --json prints the raw answer.
cleanup removes everything the agent put into the kernel and the system.";

/// What the command line asks for. `--version` and `--help` end the parsing where
/// they stand, as they always have.
pub(super) enum Parsed {
    Version,
    Help,
    Line(Box<CommandLine>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verb {
    Enroll,
    Run,
    Cleanup,
    Boot,
    Control(super::ControlVerb),
}

/// A command line that parsed; `None` where the UCI file or the default decides.
pub(super) struct CommandLine {
    pub verb: Verb,
    pub config: Option<PathBuf>,
    /// The defaults with every option applied that the UCI file has no say in.
    pub run: RunConfig,
    pub log: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub start_delay: Option<Duration>,
    pub reconnect_spread: Option<Duration>,
    /// `--relay`, repeatable, in order.
    pub relays: Vec<String>,
    /// `--ca` or `--fingerprint` (checked), never both.
    pub trust: Option<Trust>,
    pub token: Option<String>,
    pub force: bool,
    /// `status --json`.
    pub json: bool,
}

pub(super) fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Parsed, ConfigError> {
    let mut args = lexopt::Parser::from_args(args);
    let mut command: Option<String> = None;
    let mut run = RunConfig::default();
    let mut log = None;
    let mut state_dir = None;
    let mut start_delay = None;
    let mut reconnect_spread = None;
    let mut relays = Vec::new();
    // The first --dns-upstream replaces the default; more add to it.
    let mut dns_upstream_given = false;
    let mut config = None;
    let (mut token, mut ca, mut fingerprint, mut force) = (None, None, None, false);
    let mut json = false;
    while let Some(arg) = args.next()? {
        match arg {
            Long("version") | Short('V') => return Ok(Parsed::Version),
            Long("help") | Short('h') => return Ok(Parsed::Help),
            Long("config") => config = Some(PathBuf::from(args.value()?)),
            Long("state-dir") => state_dir = Some(PathBuf::from(args.value()?)),
            Long("relay") => relays.push(args.value()?.string()?),
            Long("token") => token = Some(args.value()?.string()?),
            Long("ca") => ca = Some(PathBuf::from(args.value()?)),
            Long("fingerprint") => fingerprint = Some(args.value()?.string()?),
            Long("force") => force = true,
            Long("json") => json = true,
            Long("fw4-dir") => run.fw4_dir = PathBuf::from(args.value()?),
            Long("fw4-include") => run.fw4_include = PathBuf::from(args.value()?),
            Long("boot-copy") => run.boot_copy = Some(PathBuf::from(args.value()?)),
            Long("control") => run.control = Some(PathBuf::from(args.value()?)),
            Long("simulate") => run.simulate = true,
            Long("api-listen") => {
                let v = args.value()?.string()?;
                run.api_listen = Some(
                    v.parse()
                        .map_err(|e| ConfigError::invalid("api-listen", v, "ADDR:PORT", e))?,
                );
            }
            Long("root") => run.root = PathBuf::from(args.value()?),
            Long("log") => log = Some(args.value()?.string()?),
            Long("identity-poll") => run.identity_poll = duration(&mut args, "identity-poll")?,
            Long("ping-interval") => run.ping_interval = duration(&mut args, "ping-interval")?,
            Long("dead-after") => run.dead_after = duration(&mut args, "dead-after")?,
            Long("connect-timeout") => {
                run.connect_timeout = duration(&mut args, "connect-timeout")?
            }
            Long("backoff-base") => run.backoff.base = duration(&mut args, "backoff-base")?,
            Long("backoff-cap") => run.backoff.cap = duration(&mut args, "backoff-cap")?,
            Long("healthy-after") => {
                run.backoff.healthy_after = duration(&mut args, "healthy-after")?
            }
            Long("lan-if") => run.lan_ifs.push(args.value()?.string()?),
            Long("wan-if") => run.wan_if = Some(args.value()?.string()?),
            Long("timezone") => run.timezone = Some(args.value()?.string()?),
            Long("check-interval") => run.check_interval = duration(&mut args, "check-interval")?,
            Long("nft") => run.nft = args.value()?.string()?,
            Long("tc") => run.tc = args.value()?.string()?,
            Long("ip") => run.ip = args.value()?.string()?,
            Long("ubus") => run.ubus = args.value()?.string()?,
            Long("uci") => run.uci = args.value()?.string()?,
            Long("uci-confdir") => run.uci_confdir = Some(PathBuf::from(args.value()?)),
            Long("uci-savedir") => run.uci_savedir = Some(PathBuf::from(args.value()?)),
            Long("wifi") => run.wifi = args.value()?.string()?,
            Long("wifi-grace") => run.wifi_safe.grace = duration(&mut args, "wifi-grace")?,
            Long("wifi-settle") => run.wifi_safe.settle = duration(&mut args, "wifi-settle")?,
            Long("wifi-retry") => run.wifi_safe.retry = duration(&mut args, "wifi-retry")?,
            Long("nlbw") => run.nlbw = Some(args.value()?.string()?),
            Long("nlbw-init") => run.nlbw_init = args.value()?.string()?,
            Long("dnsmasq") => run.dnsmasq = args.value()?.string()?,
            Long("dns-dir") => run.dns_dir = PathBuf::from(args.value()?),
            Long("dns-user") => run.dns_user = Some(args.value()?.string()?),
            Long("fw4-include-dir") => run.fw4_includes = PathBuf::from(args.value()?),
            Long("firewall-reload") => run.firewall_reload = args.value()?.string()?,
            Long("dns-upstream") => {
                let v = args.value()?.string()?;
                if !dns_upstream_given {
                    run.dns_upstreams.clear();
                    dns_upstream_given = true;
                }
                run.dns_upstreams.push(v);
            }
            Long("dns-port-base") => {
                let v = args.value()?.string()?;
                run.dns_port_base = v
                    .parse()
                    .map_err(|e| ConfigError::invalid("dns-port-base", v, "a port number", e))?;
            }
            Long("doh-list") => run.doh_list = Some(PathBuf::from(args.value()?)),
            Long("usage-cache") => run.usage.cache_ttl = duration(&mut args, "usage-cache")?,
            Long("usage-sample") => {
                run.usage.sample_interval = duration(&mut args, "usage-sample")?
            }
            Long("usage-flush") => run.usage.flush_interval = duration(&mut args, "usage-flush")?,
            Long("usage-retention-days") => {
                let v = args.value()?.string()?;
                run.usage.retention_days = v
                    .parse()
                    .map_err(|e| ConfigError::invalid("usage-retention-days", v, "a number", e))?;
            }
            Long("start-delay-max") => start_delay = Some(duration(&mut args, "start-delay-max")?),
            Long("reconnect-spread") => {
                reconnect_spread = Some(duration(&mut args, "reconnect-spread")?)
            }
            Value(v) if command.is_none() => command = Some(v.string()?),
            _ => return Err(ConfigError::Unexpected(arg.unexpected())),
        }
    }
    // The trust options are checked before the command, as they always were.
    let trust = match (ca, fingerprint) {
        (Some(_), Some(_)) => return Err(ConfigError::CaAndFingerprint),
        (Some(path), None) => Some(Trust::CaFile(path)),
        (None, Some(fp)) => {
            parse_fingerprint(&fp)?;
            Some(Trust::Fingerprint(fp))
        }
        (None, None) => None,
    };
    let verb = match command.as_deref() {
        Some("enroll") => Verb::Enroll,
        Some("run") => Verb::Run,
        Some("cleanup") => Verb::Cleanup,
        Some("boot") => Verb::Boot,
        Some("status") => Verb::Control(super::ControlVerb::Status),
        Some("reconnect") => Verb::Control(super::ControlVerb::Reconnect),
        Some("reapply") => Verb::Control(super::ControlVerb::Reapply),
        _ => return Err(ConfigError::Usage),
    };
    Ok(Parsed::Line(Box::new(CommandLine {
        verb,
        config,
        run,
        log,
        state_dir,
        start_delay,
        reconnect_spread,
        relays,
        trust,
        token,
        force,
        json,
    })))
}

/// A duration option's value. Zero is refused except where it means "none": no
/// start delay or spread, reports right after a Wi-Fi reload.
fn duration(args: &mut lexopt::Parser, option: &'static str) -> Result<Duration, ConfigError> {
    let v = args.value()?.string()?;
    let d =
        super::duration::parse(&v).map_err(|e| ConfigError::invalid(option, v, "a duration", e))?;
    if d.is_zero()
        && !matches!(
            option,
            "start-delay-max" | "reconnect-spread" | "wifi-settle"
        )
    {
        return Err(ConfigError::NotPositive(option));
    }
    Ok(d)
}
