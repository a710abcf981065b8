//! What every agent handler shares, built once at start-up: the services (policy
//! engine, Wi-Fi, device usage, discovery, speed test) over the system backends —
//! the router's own programs, or the simulated router — and the link's state.
//! `run` and the benches build it the same way, through [`App::build`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::RunConfig;
use crate::error::Context;
use crate::link::dial::{RelayAddr, RelayEndpoint, Relays};
use crate::link::identity::Identity;
use crate::link::report::{RelayReporter, Reporter};
use crate::link::serve::LinkStatus;
use crate::link::tls;
use crate::offload::Offload;
use crate::policy::compile::resolvers::{self, DnsConfig};
use crate::policy::engine::{Engine, EngineConfig};
use crate::policy::execute::Enforcers;
use crate::policy::fw4::Keeper;
use crate::policy::{interfaces, tz};
use crate::runtime::clock::{system_clock, Clock};
use crate::scan::seen::Seen;
use crate::scan::{NeighbourSource, Scanner};
use crate::speedtest::{Limits, SpeedTester};
use crate::store::{Location, Store};
use crate::system::files::{Files, RealFiles};
use crate::system::{dnsmasq, flowtable, fw4, nft, nlbw, tc, ubus, uci, wifi as wifi_control};
use crate::usage::Usage;
use crate::wifi::WifiService;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Real,
    Simulated,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Real => "real",
            Mode::Simulated => "simulated",
        }
    }
}

/// Everything the agent drives on the router, chosen once: the router's own tools,
/// or the simulated router (`--simulate`). The rest of the agent runs the same code
/// over either.
pub struct Backends {
    pub mode: Mode,
    pub files: Arc<dyn Files>,
    pub ubus: Arc<dyn ubus::Ubus>,
    pub uci: Arc<dyn uci::Uci>,
    pub wifi: Arc<dyn wifi_control::WifiControl>,
    pub nft: Arc<dyn nft::Firewall>,
    pub tc: Arc<dyn tc::Shaper>,
    pub nlbw: Arc<dyn nlbw::Nlbw>,
    pub dns: Arc<dyn dnsmasq::Resolver>,
    /// fw4's flowtables and the firewall reload.
    pub flowtables: Arc<dyn flowtable::Flowtables>,
    pub neighbours: NeighbourSource,
    pub kernel_minutes_west: Arc<dyn Fn() -> i32 + Send + Sync>,
}

impl Backends {
    /// The router's real programs, or the simulated router, as the configuration
    /// says.
    pub fn for_config(config: &RunConfig) -> crate::error::Result<Backends> {
        if config.simulate {
            Backends::simulated(config)
        } else {
            Ok(Backends::real(config))
        }
    }

    /// The router's own programs and files, named by the configuration.
    pub fn real(config: &RunConfig) -> Backends {
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
            wifi: Arc::new(wifi_control::RealWifi {
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
            dns: Arc::new(dnsmasq::RealDnsmasq {
                program: config.dnsmasq.clone(),
                dir: config.dns_dir.clone(),
                user: dnsmasq::pick_user(
                    config.dns_user.as_deref(),
                    &std::fs::read_to_string(config.root.join("etc/passwd")).unwrap_or_default(),
                ),
                ..Default::default()
            }),
            flowtables: Arc::new(flowtable::RealFlowtables {
                nft: config.nft.clone(),
                ..Default::default()
            }),
            neighbours: NeighbourSource::Ip {
                program: config.ip.clone(),
            },
            kernel_minutes_west: Arc::new(crate::system::clock::kernel_minutes_west),
        }
    }

    /// The simulated router (see [`crate::sim`]): in-memory files, uci, wifi, ubus,
    /// nft, tc and nlbwmon. A given `--nlbw` is used even then (tests drive a
    /// failing nlbwmon).
    #[cfg(feature = "simulate")]
    pub fn simulated(config: &RunConfig) -> crate::error::Result<Backends> {
        use crate::sim;
        let bus = ubus::FakeUbus::default();
        let (uci, wifi) = sim::wireless(&bus);
        let nlbw: Arc<dyn nlbw::Nlbw> = match config.nlbw {
            None => Arc::new(sim::SimNlbw::default()),
            Some(_) => real_nlbw(config),
        };
        Ok(Backends {
            mode: Mode::Simulated,
            files: Arc::new(sim::SimRouter::default()),
            ubus: Arc::new(bus),
            uci: Arc::new(uci),
            wifi: Arc::new(wifi),
            nft: Arc::new(nft::FakeNft::default()),
            tc: Arc::new(tc::FakeTc::default()),
            nlbw,
            dns: Arc::new(dnsmasq::FakeResolver::default()),
            flowtables: Arc::new(flowtable::FakeFlowtables::default()),
            neighbours: NeighbourSource::ProcArp,
            kernel_minutes_west: Arc::new(|| 0),
        })
    }

    /// Router builds leave the simulated router out (it is dead weight on 16 MB of
    /// flash); `RunConfig::validate` refuses `--simulate` there before this is
    /// reached.
    #[cfg(not(feature = "simulate"))]
    pub fn simulated(_: &RunConfig) -> crate::error::Result<Backends> {
        crate::bail!("{}", crate::config::NO_SIMULATED_ROUTER)
    }
}

fn real_nlbw(config: &RunConfig) -> Arc<dyn nlbw::Nlbw> {
    Arc::new(nlbw::RealNlbw::new(
        config.nlbw.as_deref().unwrap_or("nlbw"),
        config.nlbw_init.clone(),
        config.root.clone(),
    ))
}

/// A report's whole exchange (connect, TLS, request, answer) must fit in this.
const REPORT_TIMEOUT: Duration = Duration::from_secs(15);

/// The relays to dial, in order: the configured list, or the one enrollment stored.
pub fn relays(identity: &Identity, config: &RunConfig) -> crate::error::Result<Relays> {
    let mut urls = config.relay_urls.iter().map(String::as_str);
    let first = RelayAddr::parse(urls.next().unwrap_or(&identity.relay_url))?;
    Ok(Relays::new(
        first,
        urls.map(RelayAddr::parse).collect::<Result<Vec<_>, _>>()?,
    ))
}

/// The relays and the router's credentials, for calls made outside the link.
pub fn relay_endpoint(
    identity: &Identity,
    config: &RunConfig,
) -> crate::error::Result<RelayEndpoint> {
    Ok(RelayEndpoint::new(
        Arc::new(relays(identity, config)?),
        tls::client_config(&identity.trust)?,
        identity.router_id.clone(),
        identity.router_secret.clone(),
        config.connect_timeout,
    ))
}

pub struct App {
    pub mode: Mode,
    pub router_id: String,
    pub files: Arc<dyn Files>,
    pub started: Instant,
    /// The relays the link dials and reports follow (the link moves `current`).
    pub relays: Arc<Relays>,
    /// Written by the link, read by the health endpoint.
    pub link: Arc<LinkStatus>,
    /// Starts recorded in the state database, this one included.
    pub starts: u64,
    pub scanner: Arc<Scanner>,
    pub policy: Arc<Engine>,
    pub wifi: Arc<WifiService>,
    /// Measures the line against the relay.
    pub speedtest: Arc<SpeedTester>,
    /// Device usage from nlbwmon.
    pub usage: Arc<Usage>,
    /// fw4's flow offloading: detection and the consented remedy.
    pub offload: Arc<Offload>,
    /// fw4 includes letting redirected DNS through zones that reject input; `None`
    /// on a simulated router.
    pub guest_dns: Option<GuestDns>,
}

/// The LAN-side zones that reject input and the include they get (`system::fw4`).
#[derive(Debug, Clone)]
pub struct GuestDns {
    pub includes: fw4::Includes,
    pub zones: Vec<String>,
    pub body: String,
}

impl GuestDns {
    /// Puts the includes in place (and reloads fw4 when one changed); a failure is
    /// logged, and filtering in those zones then fails visibly (no answer), never
    /// silently unfiltered.
    pub async fn install(self) {
        match self.includes.install(&self.zones, &self.body).await {
            Ok(changed) if changed.is_empty() => {}
            Ok(changed) => {
                tracing::info!(zones = ?changed, "fw4 DNS includes changed; firewall reloaded")
            }
            Err(e) => tracing::error!(error = %e, "cannot install the fw4 DNS includes"),
        }
    }
}

impl App {
    /// Every service over `backends`, configured by `config`, reporting to and
    /// measuring against the relay of `identity`; their state in `state` (the
    /// state directory's database, or memory for a simulated router that keeps
    /// nothing). `starts` is how often the agent has started on this router.
    pub fn build(
        backends: Backends,
        config: &RunConfig,
        identity: &Identity,
        state: &Location,
        starts: u64,
    ) -> crate::error::Result<App> {
        let clock: Clock = system_clock();
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
            flowtables,
            neighbours,
            kernel_minutes_west,
        } = backends;
        let offload = Offload::new(
            uci.clone(),
            flowtables,
            Store::open_at(state)?,
            config.flow_offloading,
            clock.clone(),
        );
        let interfaces::Resolved {
            lan: lan_ifs,
            wan: wan_if,
            zones,
        } = interfaces::resolve(files.as_ref(), &config.lan_ifs, config.wan_if.as_deref());
        // Zones whose input policy would drop the redirected queries, on bridges
        // the engine filters.
        let rejecting: Vec<String> = zones
            .iter()
            .filter(|z| z.rejects_input() && z.devices.iter().any(|d| lan_ifs.contains(d)))
            .map(|z| z.name.clone())
            .collect();
        let guest_dns = (mode == Mode::Real).then(|| GuestDns {
            includes: config.dns_includes(),
            zones: rejecting,
            body: fw4::input_accept(config.dns_port_base),
        });
        let endpoint = relay_endpoint(identity, config)?;
        let reporter: Arc<dyn Reporter> =
            Arc::new(RelayReporter::new(endpoint.clone(), REPORT_TIMEOUT));
        let wifi = WifiService::new(
            uci,
            wifi,
            ubus.clone(),
            reporter,
            Store::open_at(state)?,
            config.wifi_safe.clone(),
            clock.clone(),
        );
        let now = u64::try_from(clock()).unwrap_or(0);
        let seen = Arc::new(Seen::open(Store::open_at(state)?, now)?);
        let scanner = Scanner::new(
            files.clone(),
            ubus,
            neighbours,
            Some(wan_if.clone()),
            clock.clone(),
            seen.clone(),
        );
        // The real router's rules are kept through fw4's life cycle; a simulated
        // router has no fw4 and must not write into this machine's.
        let keeper = (mode == Mode::Real).then(|| {
            let keeper = Keeper::new(config.fw4_paths(), nft.clone());
            if let Err(e) = keeper.ensure_include() {
                tracing::error!(error = %e, "cannot write fw4's include of the rules");
            }
            keeper
        });
        let engine = Engine::new(
            Store::open_at(state)?,
            Enforcers { nft, tc, dns },
            files.clone(),
            EngineConfig {
                lan_ifs,
                wan_if,
                timezone: config.timezone.clone(),
                check_interval: config.check_interval,
                kernel_minutes_west,
                dns: dns_config(config)?,
            },
            clock.clone(),
        )?;
        let engine = match keeper {
            Some(k) => engine.with_fw4(k),
            None => engine,
        };
        // An invalid zone is the policy engine's error to report; usage days fall
        // back to UTC rather than stopping the agent.
        let zone = tz::router_zone(files.as_ref(), config.timezone.as_deref())
            .unwrap_or_else(|_| tz::Zone::utc());
        let usage = Usage::new(
            nlbw,
            files.clone(),
            clock,
            Arc::new(move |t| zone.offset_at(t)),
            Store::open_at(state)?,
            config.usage.clone(),
            seen,
        )?;
        Ok(App {
            mode,
            router_id: identity.router_id.clone(),
            files,
            started: Instant::now(),
            link: Arc::default(),
            relays: endpoint.relays.clone(),
            starts,
            scanner: Arc::new(scanner),
            policy: Arc::new(engine),
            wifi: Arc::new(wifi),
            speedtest: Arc::new(SpeedTester::new(endpoint, Limits::default())),
            usage: Arc::new(usage),
            offload: Arc::new(offload),
            guest_dns,
        })
    }
}

/// The filtering resolvers' settings; a bad upstream or DoH list stops the start
/// with the reason rather than producing resolvers that cannot work.
fn dns_config(config: &RunConfig) -> crate::error::Result<DnsConfig> {
    let mut dns = DnsConfig {
        port_base: config.dns_port_base,
        upstreams: config.dns_upstreams.clone(),
        ..Default::default()
    };
    for u in &dns.upstreams {
        resolvers::validate_upstream(u)?;
    }
    if let Some(path) = &config.doh_list {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the DoH list {}", path.display()))?;
        dns.doh = crate::dns::categories::parse_doh(&text)
            .map_err(|e| crate::error::Error::msg(format!("DoH list {}: {e}", path.display())))?;
    }
    Ok(dns)
}
