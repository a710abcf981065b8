//! NetPilot agent: runs on the router, dials out to the relay and serves the router
//! API over the link. `run` wires the system backends (real or simulated), the link
//! and the optional local listener, and stops them all on shutdown.

pub mod api;
pub mod app;
pub mod backoff;
pub mod cleanup;
pub mod config;
pub mod dial;
pub mod dns;
pub mod duration;
pub mod enroll;
pub mod error;
pub mod identity;
pub mod link;
pub mod policy;
pub mod report;
pub mod runtime;
pub mod scan;
#[cfg(feature = "simulate")]
pub mod sim;
pub mod speedtest;
pub mod store;
pub mod system;
pub mod tls;
pub mod uci_format;
pub mod usage;
pub mod wifi;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Context;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::app::{App, Mode};
use crate::dial::RelayAddr;
use crate::identity::Identity;
use crate::system::files::{Files, RealFiles};

pub use crate::config::RunConfig;

/// Announced once the agent is running, for whoever started it.
#[derive(Debug, Clone)]
pub struct Ready {
    pub router_id: String,
    pub api_addr: Option<SocketAddr>,
}

pub async fn run(
    config: RunConfig,
    on_ready: impl FnOnce(Ready),
    shutdown: impl Future<Output = ()>,
) -> crate::error::Result<()> {
    config.validate()?;
    tokio::pin!(shutdown);
    let Some(mut identity) = wait_for_identity(&config, &mut shutdown).await else {
        return Ok(());
    };
    if let Some(url) = &config.relay_url {
        identity.relay_url = url.clone();
    }
    if let Some(trust) = &config.trust {
        identity.trust = trust.clone();
    }
    let backends = if config.simulate {
        simulated_backends(&config)?
    } else {
        real_backends(&config)
    };
    let Some(starts) = open_state(&config, &mut shutdown).await else {
        return Ok(());
    };
    let Backends {
        mode,
        files,
        ubus,
        uci,
        wifi,
        nft,
        tc,
        nlbw,
        dns,
        neighbours,
        kernel_minutes_west,
    } = backends;
    let (lan_if, wan_if) = policy::interfaces::resolve(
        files.as_ref(),
        config.lan_if.as_deref(),
        config.wan_if.as_deref(),
    );
    let endpoint = relay_endpoint(&identity, &config)?;
    let reporter: Arc<dyn report::Reporter> =
        Arc::new(report::RelayReporter::new(endpoint.clone(), REPORT_TIMEOUT));
    let tester = speedtest::SpeedTester::new(endpoint, speedtest::Limits::default());
    let wifi = Arc::new(wifi::WifiService::new(
        uci,
        wifi,
        ubus.clone(),
        reporter.clone(),
        store::Store::open(&config.state_dir)?,
        config.wifi_safe.clone(),
        runtime::clock::system_clock(),
    ));
    let scanner = scan::Scanner::new(
        files.clone(),
        ubus.clone(),
        neighbours,
        Some(wan_if.clone()),
        runtime::clock::system_clock(),
    );
    let engine_config = policy::engine::EngineConfig {
        lan_if,
        wan_if,
        timezone: config.timezone.clone(),
        check_interval: config.check_interval,
        kernel_minutes_west,
        dns: dns_config(&config)?,
    };
    let engine = Arc::new(policy::engine::Engine::new(
        store::Store::open(&config.state_dir)?,
        policy::execute::Enforcers { nft, tc, dns },
        files.clone(),
        engine_config,
        runtime::clock::system_clock(),
    )?);
    let usage = usage_service(&config, nlbw, files.clone())?;
    let app = Arc::new(
        App::new(mode, identity.router_id.clone(), files)
            .with_starts(starts)
            .with_policy(engine)
            .with_reporter(reporter)
            .with_speedtest(Arc::new(tester))
            .with_usage(usage)
            .with_ubus(ubus)
            .with_scanner(scanner)
            .with_wifi(wifi),
    );
    serve(app, &identity, &config, on_ready, shutdown).await
}

/// A report's whole exchange (connect, TLS, request, answer) must fit in this.
const REPORT_TIMEOUT: Duration = Duration::from_secs(15);

/// The relay and the router's credentials, for calls made outside the link.
pub fn relay_endpoint(
    identity: &Identity,
    config: &RunConfig,
) -> crate::error::Result<dial::RelayEndpoint> {
    Ok(dial::RelayEndpoint::new(
        RelayAddr::parse(&identity.relay_url)?,
        tls::client_config(&identity.trust)?,
        identity.router_id.clone(),
        identity.router_secret.clone(),
        config.connect_timeout,
    ))
}

/// Everything the agent drives on the router, chosen once: the router's own tools,
/// or the simulated router (`--simulate`). The rest of the agent runs the same code
/// over either.
pub struct Backends {
    pub mode: Mode,
    pub files: Arc<dyn Files>,
    pub ubus: Arc<dyn system::ubus::Ubus>,
    pub uci: Arc<dyn system::uci::Uci>,
    pub wifi: Arc<dyn system::wifi::WifiControl>,
    pub nft: Arc<dyn system::nft::Firewall>,
    pub tc: Arc<dyn system::tc::Shaper>,
    pub nlbw: Arc<dyn system::nlbw::Nlbw>,
    pub dns: Arc<dyn system::dnsmasq::Resolver>,
    pub neighbours: scan::NeighbourSource,
    pub kernel_minutes_west: Arc<dyn Fn() -> i32 + Send + Sync>,
}

/// The router's own programs and files, named by the configuration.
pub(crate) fn real_backends(config: &RunConfig) -> Backends {
    use system::{nft, tc, ubus, uci, wifi};
    Backends {
        mode: Mode::Real,
        files: Arc::new(RealFiles::new(&config.root)),
        ubus: Arc::new(ubus::RealUbus {
            program: config.ubus.clone(),
            ..Default::default()
        }),
        uci: Arc::new(uci::RealUci {
            program: config.uci.clone(),
            confdir: config.uci_confdir.clone(),
            savedir: config.uci_savedir.clone(),
            ..Default::default()
        }),
        wifi: Arc::new(wifi::RealWifi {
            program: config.wifi.clone(),
            ..Default::default()
        }),
        nft: Arc::new(nft::RealNft {
            program: config.nft.clone(),
            ..Default::default()
        }),
        tc: Arc::new(tc::RealTc {
            program: config.tc.clone(),
            ..Default::default()
        }),
        nlbw: real_nlbw(config),
        dns: Arc::new(system::dnsmasq::RealDnsmasq {
            program: config.dnsmasq.clone(),
            dir: config.dns_dir.clone(),
            ..Default::default()
        }),
        neighbours: scan::NeighbourSource::Ip {
            program: config.ip.clone(),
        },
        kernel_minutes_west: Arc::new(system::clock::kernel_minutes_west),
    }
}

fn real_nlbw(config: &RunConfig) -> Arc<dyn system::nlbw::Nlbw> {
    Arc::new(system::nlbw::RealNlbw::new(
        config.nlbw.as_deref().unwrap_or("nlbw"),
        config.nlbw_init.clone(),
        config.root.clone(),
    ))
}

/// The simulated router (see [`sim`]): in-memory files, uci, wifi, ubus, nft, tc and
/// nlbwmon. A given `--nlbw` is used even then (tests drive a failing nlbwmon).
#[cfg(feature = "simulate")]
fn simulated_backends(config: &RunConfig) -> crate::error::Result<Backends> {
    let bus = system::ubus::FakeUbus::default();
    let (uci, wifi) = sim::wireless(&bus);
    let nlbw: Arc<dyn system::nlbw::Nlbw> = match config.nlbw {
        None => Arc::new(sim::SimNlbw::default()),
        Some(_) => real_nlbw(config),
    };
    Ok(Backends {
        mode: Mode::Simulated,
        files: Arc::new(sim::SimRouter::default()),
        ubus: Arc::new(bus),
        uci: Arc::new(uci),
        wifi: Arc::new(wifi),
        nft: Arc::new(system::nft::FakeNft::default()),
        tc: Arc::new(system::tc::FakeTc::default()),
        nlbw,
        dns: Arc::new(system::dnsmasq::FakeResolver::default()),
        neighbours: scan::NeighbourSource::ProcArp,
        kernel_minutes_west: Arc::new(|| 0),
    })
}

/// Router builds leave the simulated router out (it is dead weight on 16 MB of flash);
/// `RunConfig::validate` refuses `--simulate` there before this is reached.
#[cfg(not(feature = "simulate"))]
fn simulated_backends(_: &RunConfig) -> crate::error::Result<Backends> {
    crate::bail!("{}", config::NO_SIMULATED_ROUTER)
}

/// The filtering resolvers' settings; a bad upstream or DoH list stops the start
/// with the reason rather than producing resolvers that cannot work.
fn dns_config(config: &RunConfig) -> crate::error::Result<policy::compile::resolvers::DnsConfig> {
    let mut dns = policy::compile::resolvers::DnsConfig {
        port_base: config.dns_port_base,
        upstreams: config.dns_upstreams.clone(),
        ..Default::default()
    };
    for u in &dns.upstreams {
        policy::compile::resolvers::validate_upstream(u)?;
    }
    if let Some(path) = &config.doh_list {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the DoH list {}", path.display()))?;
        dns.doh = dns::categories::parse_doh(&text)
            .map_err(|e| crate::error::Error::msg(format!("DoH list {}: {e}", path.display())))?;
    }
    Ok(dns)
}

/// Device usage over `nlbw`, with local days in the router's zone.
fn usage_service(
    config: &RunConfig,
    nlbw: Arc<dyn system::nlbw::Nlbw>,
    files: Arc<dyn Files>,
) -> crate::error::Result<Arc<usage::Usage>> {
    // An invalid zone is the policy engine's error to report; usage days fall back
    // to UTC rather than stopping the agent.
    let zone = policy::tz::router_zone(files.as_ref(), config.timezone.as_deref())
        .unwrap_or_else(|_| policy::tz::Zone::utc());
    let service = usage::Usage::new(
        nlbw,
        files,
        runtime::clock::system_clock(),
        Arc::new(move |t| zone.offset_at(t)),
        store::Store::open(&config.state_dir)?,
        config.usage.clone(),
    )?;
    Ok(Arc::new(service))
}

/// Loads the identity; while the router is not enrolled (or the file is corrupt),
/// says so and looks again every `identity_poll`, so a service started before
/// enrollment neither crash-loops nor needs a restart afterwards. `None` on shutdown.
async fn wait_for_identity(
    config: &RunConfig,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Option<Identity> {
    let mut last_error = String::new();
    loop {
        match Identity::load(&config.state_dir) {
            Ok(identity) => return Some(identity),
            Err(e) => {
                let message = e.to_string();
                if message != last_error {
                    tracing::warn!(error = %message, poll = ?config.identity_poll, "waiting for enrollment");
                    last_error = message;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(config.identity_poll) => {}
            _ = shutdown.as_mut() => return None,
        }
    }
}

/// Opens the state database and counts this start. A full or failing flash is
/// reported and retried every `identity_poll` rather than crash-looping. `None` on
/// shutdown.
async fn open_state(
    config: &RunConfig,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Option<u64> {
    let mut last_error = String::new();
    loop {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        match store::Store::open(&config.state_dir).and_then(|mut s| s.record_start(now)) {
            Ok(starts) => return Some(starts),
            Err(e) => {
                let message = e.to_string();
                if message != last_error {
                    tracing::error!(error = %message, poll = ?config.identity_poll, "cannot use the state database; retrying");
                    last_error = message;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(config.identity_poll) => {}
            _ = shutdown.as_mut() => return None,
        }
    }
}

/// Runs the link and the optional local listener for an already built [`App`].
pub async fn serve(
    app: Arc<App>,
    identity: &Identity,
    config: &RunConfig,
    on_ready: impl FnOnce(Ready),
    shutdown: impl Future<Output = ()>,
) -> crate::error::Result<()> {
    config.validate()?;
    let link_config = link::LinkConfig {
        relay: RelayAddr::parse(&identity.relay_url)?,
        router_id: identity.router_id.clone(),
        secret: identity.router_secret.clone(),
        tls: tls::client_config(&identity.trust)?,
        ping_interval: config.ping_interval,
        dead_after: config.dead_after,
        connect_timeout: config.connect_timeout,
        backoff: config.backoff.clone(),
        max_concurrent_calls: config.max_concurrent_calls,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();

    let mut api_addr = None;
    if let Some(addr) = config.api_listen {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        api_addr = Some(listener.local_addr()?);
        tasks.spawn(local_api(listener, app.clone(), stop_rx.clone()));
    }
    tracing::info!(router_id = %identity.router_id, mode = app.mode.as_str(), relay = %identity.relay_url, "agent started");
    if let Some(engine) = app.policy.clone() {
        // Start-up reconcile first thing: the kernel converges to the stored state
        // whether or not the relay is reachable.
        tasks.spawn(engine.run(stop_rx.clone()));
    }
    if let Some(wifi) = app.wifi.clone() {
        // Resumes a change left pending by a restart, then confirms, rolls back
        // and reports.
        tasks.spawn(wifi.run(stop_rx.clone()));
    }
    if let Some(usage) = app.usage.clone() {
        tasks.spawn(usage.run(stop_rx.clone()));
    }
    tasks.spawn(link::run(link_config, app.clone(), stop_rx));
    on_ready(Ready {
        router_id: identity.router_id.clone(),
        api_addr,
    });

    shutdown.await;
    tracing::info!("stopping");
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tasks.abort_all();
    }
    Ok(())
}

/// The API on a local TCP listener, HTTP/1.1 without authentication.
async fn local_api(listener: TcpListener, app: Arc<App>, mut stop: watch::Receiver<bool>) {
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "local API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = runtime::shutdown::stopped(&mut stop) => return,
        };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| api::handle(app.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}
