//! `netpilot-agent`: parse the command line, set up logging, run a subcommand.

use std::path::PathBuf;
use std::time::Duration;

use netpilot_agent::bail;
use netpilot_agent::cleanup::Outcome;
use netpilot_agent::enroll::{enroll, EnrollArgs};
use netpilot_agent::error::Context;
use netpilot_agent::settings::Settings;
use netpilot_agent::tls::{parse_fingerprint, Trust};
use netpilot_agent::RunConfig;

const USAGE: &str = "\
usage: netpilot-agent enroll --relay URL --token TOKEN [--ca FILE | --fingerprint SHA256]
                             [--state-dir DIR] [--force]
       netpilot-agent run [--state-dir DIR] [--simulate] [--api-listen ADDR:PORT]
                          [--relay URL] [--ca FILE | --fingerprint SHA256]
                          [--log FILTER] [--root DIR] [--identity-poll DUR]
                          [--ping-interval DUR] [--dead-after DUR] [--connect-timeout DUR]
                          [--backoff-base DUR] [--backoff-cap DUR] [--healthy-after DUR]
                          [--start-delay-max DUR] [--lan-if IF] [--wan-if IF]
                          [--timezone POSIX-TZ] [--check-interval DUR]
                          [--nft PROGRAM] [--tc PROGRAM] [--ip PROGRAM] [--ubus PROGRAM]
                          [--uci PROGRAM] [--uci-confdir DIR] [--uci-savedir DIR]
                          [--wifi PROGRAM] [--wifi-grace DUR] [--wifi-settle DUR]
                          [--wifi-retry DUR]
                          [--nlbw PROGRAM] [--nlbw-init PROGRAM] [--usage-cache DUR]
                          [--usage-sample DUR] [--usage-flush DUR] [--usage-retention-days N]
                          [--dnsmasq PROGRAM] [--dns-dir DIR] [--dns-upstream ADDR[#PORT]]...
                          [--dns-port-base PORT] [--doh-list FILE]
       netpilot-agent cleanup [--lan-if IF] [--wan-if IF] [--dns-dir DIR]
       netpilot-agent --version

Every command also takes --config FILE (UCI, default /etc/config/netpilot); the
command line wins over it. DIR defaults to /etc/netpilot. DUR is like 20s, 250ms, 1m.
--lan-if/--wan-if default to UCI network.lan/network.wan devices (br-lan, wan).
--timezone defaults to UCI system.timezone, then /etc/TZ, then UTC.
--fingerprint is the SHA-256 of the relay certificate's DER, hex, colons optional.
A Wi-Fi change is rolled back unless a report reaches the relay within --wifi-grace
(default 90s); reports start --wifi-settle after the reload (10s) and repeat every
--wifi-retry (5s). --uci-confdir/--uci-savedir are uci's -c/-t (default uci's own).
Filtered groups get their own dnsmasq on --dns-port-base (5400) + slot, forwarding
to --dns-upstream (127.0.0.1, the router's dnsmasq); state in --dns-dir
(/var/run/netpilot/dns). --doh-list replaces the shipped DoH names and addresses.
cleanup removes everything the agent put into the kernel and the system.";

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netpilot-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> netpilot_agent::error::Result<()> {
    use lexopt::prelude::*;
    let mut args = lexopt::Parser::from_env();
    let mut command: Option<String> = None;
    let mut run = RunConfig::default();
    let mut log: Option<String> = None;
    let mut state_dir: Option<PathBuf> = None;
    let mut start_delay: Option<Duration> = None;
    // The first --dns-upstream replaces the default; more add to it.
    let mut dns_upstream_given = false;
    let mut config_path = PathBuf::from(netpilot_agent::settings::DEFAULT_PATH);
    let (mut relay, mut token, mut ca, mut fingerprint, mut force) =
        (None, None, None, None, false);
    while let Some(arg) = args.next()? {
        match arg {
            Long("version") | Short('V') => {
                println!("netpilot-agent {}", env!("CARGO_PKG_VERSION"));
                return Ok(());
            }
            Long("help") | Short('h') => {
                println!("{USAGE}");
                return Ok(());
            }
            Long("config") => config_path = PathBuf::from(args.value()?),
            Long("state-dir") => state_dir = Some(PathBuf::from(args.value()?)),
            Long("relay") => relay = Some(args.value()?.string()?),
            Long("token") => token = Some(args.value()?.string()?),
            Long("ca") => ca = Some(PathBuf::from(args.value()?)),
            Long("fingerprint") => fingerprint = Some(args.value()?.string()?),
            Long("force") => force = true,
            Long("simulate") => run.simulate = true,
            Long("api-listen") => {
                let v = args.value()?.string()?;
                run.api_listen = Some(
                    v.parse()
                        .with_context(|| format!("--api-listen {v:?} is not ADDR:PORT"))?,
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
            Long("lan-if") => run.lan_if = Some(args.value()?.string()?),
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
                    .with_context(|| format!("--dns-port-base {v:?} is not a port number"))?;
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
                    .with_context(|| format!("--usage-retention-days {v:?} is not a number"))?;
            }
            Long("start-delay-max") => start_delay = Some(duration(&mut args, "start-delay-max")?),
            Value(v) if command.is_none() => command = Some(v.string()?),
            _ => bail!("{}\n\n{USAGE}", arg.unexpected()),
        }
    }

    // A broken config file is reported, and the command line can still run the agent.
    let settings = match Settings::load(&config_path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("netpilot-agent: ignoring {}: {e}", config_path.display());
            Settings::default()
        }
    };
    init_logging(
        log.as_deref()
            .or(settings.log_level.as_deref())
            .unwrap_or("info"),
    )?;
    if !settings.unknown.is_empty() {
        tracing::warn!(config = %config_path.display(), unknown = ?settings.unknown, "ignoring unknown options");
    }
    if let Some(dir) = state_dir.or(settings.state_dir) {
        run.state_dir = dir;
    }
    if let Some(d) = start_delay.or(settings.start_delay) {
        run.backoff.start_delay_max = d;
    }
    // Trust and relay URL: the command line, then UCI; both override enrollment's.
    let (ca, fingerprint) = match (ca, fingerprint) {
        (None, None) => (settings.ca_file, settings.fingerprint),
        given => given,
    };
    run.trust = match (ca, fingerprint) {
        (Some(_), Some(_)) => bail!("pass --ca or --fingerprint, not both"),
        (Some(path), None) => Some(Trust::CaFile(path)),
        (None, Some(fp)) => {
            parse_fingerprint(&fp)?;
            Some(Trust::Fingerprint(fp))
        }
        (None, None) => None,
    };
    run.relay_url = relay.or(settings.relay_url);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match command.as_deref() {
        Some("enroll") => {
            let relay = run
                .relay_url
                .as_deref()
                .context("enroll needs --relay URL (or relay_url in the config)")?;
            let token = token.context("enroll needs --token TOKEN")?;
            let identity = rt.block_on(enroll(EnrollArgs {
                relay_url: relay,
                token: &token,
                trust: run.trust.clone().unwrap_or(Trust::System),
                state_dir: &run.state_dir,
                force,
            }))?;
            println!(
                "enrolled as router {} ({}); identity stored in {}",
                identity.router_id,
                identity.name,
                netpilot_agent::identity::Identity::path(&run.state_dir).display()
            );
            Ok(())
        }
        Some("cleanup") => {
            let (done, failed) = rt.block_on(netpilot_agent::cleanup::run(&run));
            for d in &done {
                match d {
                    Outcome::Removed(what) => println!("removed {what}"),
                    Outcome::Absent(what) => println!("absent {what}"),
                }
            }
            for e in &failed {
                eprintln!("netpilot-agent: cleanup: {e}");
            }
            if failed.is_empty() {
                Ok(())
            } else {
                bail!("{} cleanup step(s) failed", failed.len())
            }
        }
        Some("run") => rt.block_on(netpilot_agent::run(
            run,
            |ready| {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "agent running router {}", ready.router_id);
                if let Some(addr) = ready.api_addr {
                    let _ = writeln!(out, "api listening {addr}");
                }
                let _ = out.flush();
            },
            shutdown_signal(),
        )),
        _ => bail!("{USAGE}"),
    }
}

fn duration(args: &mut lexopt::Parser, name: &str) -> netpilot_agent::error::Result<Duration> {
    use lexopt::ValueExt;
    let v = args.value()?.string()?;
    let d = netpilot_agent::duration::parse(&v)
        .with_context(|| format!("--{name} {v:?} is not a duration"))?;
    if d.is_zero() && !matches!(name, "start-delay-max" | "wifi-settle") {
        bail!("--{name} must be positive");
    }
    Ok(d)
}

/// Logging to stderr (procd hands it to logd). `Targets` takes `info` or
/// `warn,netpilot_agent=debug`; unlike EnvFilter it needs no regex engine, which
/// keeps a few hundred KB off the router's flash.
fn init_logging(filter: &str) -> netpilot_agent::error::Result<()> {
    use tracing_subscriber::prelude::*;
    let targets: tracing_subscriber::filter::Targets = filter
        .parse()
        .with_context(|| format!("invalid log filter {filter:?}"))?;
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false),
        )
        .with(targets)
        .init();
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
