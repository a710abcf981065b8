//! Device discovery (`GET /api/scan`): who is on the network, merged by MAC from
//! dnsmasq's leases, the kernel's neighbour table and hostapd's client lists, with
//! each device's name ([`names`]), group and blocked state from the policy engine
//! and its traffic from the usage service's reading. The merge is pure ([`merge`]);
//! [`Scanner`] gathers the sources and marks who is online in [`seen`]. A missing
//! source degrades the answer, which says which sources it had.

pub mod names;
pub mod parse;
pub mod seen;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::policy::model::{Desired, GroupId, Mac, Target};
use crate::runtime::clock::Clock;
use crate::runtime::process;
use crate::system::files::Files;
use crate::system::ubus::Ubus;
use names::NameSource;
use parse::{Lease, Neighbour, Station};
use seen::Seen;

pub const LEASES_PATH: &str = "/tmp/dhcp.leases";
pub const ARP_PATH: &str = "/proc/net/arp";

/// How a source fared in one scan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum SourceState {
    Ok,
    /// Not present on this router (no hostapd, no lease file): not an error.
    Missing,
    /// Present but unreadable; the detail says why.
    Error(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct SourcesOut {
    pub leases: SourceState,
    pub neighbours: SourceState,
    pub wireless: SourceState,
    /// nlbwmon, for each device's traffic.
    pub usage: SourceState,
}

/// Bytes a device downloaded and uploaded.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct RxTx {
    pub bytes_rx: u64,
    pub bytes_tx: u64,
}

/// A device's traffic today (the router's local day) and in nlbwmon's period.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct DeviceBytes {
    pub today: RxTx,
    pub period: RxTx,
}

/// What the usage service's reading says of every device, for one scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanUsage {
    /// `Ok` when nlbwmon answered; otherwise no device carries usage.
    pub state: SourceState,
    /// nlbwmon's current period (its start date).
    pub period: Option<String>,
    pub devices: HashMap<Mac, DeviceBytes>,
}

/// One access-point interface's stations, as hostapd reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WirelessIf {
    pub ifname: String,
    pub band: Option<&'static str>,
    pub stations: Vec<Station>,
}

/// Everything a merge needs, gathered by the shell.
#[derive(Debug, Default)]
pub struct Inputs {
    pub leases: Vec<Lease>,
    pub neighbours: Vec<Neighbour>,
    pub wireless: Vec<WirelessIf>,
    /// Whether hostapd could be asked at all: without it, "wired" is unknowable.
    pub wireless_known: bool,
    /// Neighbours on these devices are not LAN devices (the upstream gateway).
    pub exclude_devs: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct WirelessOut {
    pub ifname: String,
    pub band: Option<&'static str>,
    pub signal_dbm: Option<i64>,
    pub connected_s: Option<u64>,
    pub authorized: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GroupRef {
    pub id: GroupId,
    pub name: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeviceOut {
    pub mac: Mac,
    /// The first IPv4 address, for clients that show one address.
    pub ip: Option<IpAddr>,
    /// Every address seen for the device (leases and neighbours), IPv4 first.
    pub ips: Vec<IpAddr>,
    /// The DHCP hostname.
    pub hostname: Option<String>,
    /// The owner's name for it (a group's), else the DHCP hostname.
    pub name: Option<String>,
    pub name_source: Option<NameSource>,
    /// A locally administered (random) MAC: no maker to name.
    pub randomized: bool,
    /// Where the router sees it: the hostapd interface, else the neighbour's device.
    pub interface: Option<String>,
    /// `wireless`, `wired`, or `unknown` when hostapd could not be asked.
    pub connection: &'static str,
    pub wireless: Option<WirelessOut>,
    pub online: bool,
    /// Unix seconds it was last seen online or its traffic grew (kept across
    /// restarts; `None`: never, within retention).
    pub last_seen: Option<u64>,
    /// The DHCP lease's end (Unix seconds; 0 is an infinite lease).
    pub lease_expires: Option<u64>,
    /// The device's group; unknown devices are guests (group 0).
    pub group: GroupRef,
    pub blocked: bool,
    /// Why it is kept from the internet (block list, blacklist, group, whitelist).
    pub blocked_by: Vec<String>,
    /// Today's and the period's traffic; `None` when nlbwmon did not answer.
    pub usage: Option<DeviceBytes>,
}

/// The policy's view of one device, given its MAC and addresses.
pub struct PolicyFacts {
    pub group: GroupRef,
    pub blocked_by: Vec<String>,
    /// The name its group gives it.
    pub owner_name: Option<String>,
}

/// Merges the sources by MAC. `seen` says when a device was last seen before this
/// scan (`now`, Unix seconds), when online now is `now`. Devices come out sorted:
/// online first, then by MAC, so repeated scans list them in a stable order.
pub fn merge(
    inputs: &Inputs,
    now: u64,
    seen: &dyn Fn(&Mac) -> Option<u64>,
    usage: &ScanUsage,
    policy: &dyn Fn(&Mac, &[IpAddr]) -> PolicyFacts,
) -> Vec<DeviceOut> {
    #[derive(Default)]
    struct Acc<'a> {
        ips: Vec<IpAddr>,
        lease: Option<&'a Lease>,
        neighbour_dev: Option<&'a str>,
        fresh: bool,
        station: Option<(&'a WirelessIf, &'a Station)>,
    }
    let mut by_mac: BTreeMap<Mac, Acc> = BTreeMap::new();
    for l in &inputs.leases {
        let a = by_mac.entry(l.mac).or_default();
        push_ip(&mut a.ips, l.ip);
        a.lease = Some(l);
    }
    for n in inputs
        .neighbours
        .iter()
        .filter(|n| !inputs.exclude_devs.contains(&n.dev))
    {
        let a = by_mac.entry(n.mac).or_default();
        push_ip(&mut a.ips, n.ip);
        a.neighbour_dev.get_or_insert(&n.dev);
        a.fresh |= n.is_fresh();
    }
    for w in &inputs.wireless {
        for s in &w.stations {
            by_mac.entry(s.mac).or_default().station = Some((w, s));
        }
    }
    let mut out: Vec<DeviceOut> = by_mac
        .into_iter()
        .map(|(mac, mut a)| {
            let online = a.fresh || a.station.is_some();
            // IPv4 first, each family in address order: stable for the web app.
            // IpAddr orders every IPv4 address before every IPv6 one, then by
            // address; one `sort` instance serves scan and usage.
            a.ips.sort();
            let facts = policy(&mac, &a.ips);
            let hostname = a.lease.and_then(|l| l.hostname.clone());
            let id = names::identity(&mac, facts.owner_name.as_deref(), hostname.as_deref());
            DeviceOut {
                mac,
                ip: a.ips.iter().find(|ip| ip.is_ipv4()).copied(),
                hostname,
                name: id.name,
                name_source: id.name_source,
                randomized: id.randomized,
                interface: a
                    .station
                    .map(|(w, _)| w.ifname.clone())
                    .or_else(|| a.neighbour_dev.map(str::to_owned)),
                connection: match (a.station.is_some(), inputs.wireless_known) {
                    (true, _) => "wireless",
                    (false, true) => "wired",
                    (false, false) => "unknown",
                },
                wireless: a.station.map(|(w, s)| WirelessOut {
                    ifname: w.ifname.clone(),
                    band: w.band,
                    signal_dbm: s.signal,
                    connected_s: s.connected_time,
                    authorized: s.authorized,
                }),
                online,
                last_seen: if online { Some(now) } else { seen(&mac) },
                lease_expires: a.lease.map(|l| l.expiry),
                blocked: !facts.blocked_by.is_empty(),
                blocked_by: facts.blocked_by,
                group: facts.group,
                ips: a.ips,
                usage: (usage.state == SourceState::Ok)
                    .then(|| usage.devices.get(&mac).copied().unwrap_or_default()),
            }
        })
        .collect();
    out.sort_by(|a, b| b.online.cmp(&a.online).then_with(|| a.mac.cmp(&b.mac)));
    out
}

fn push_ip(ips: &mut Vec<IpAddr>, ip: IpAddr) {
    if !ips.contains(&ip) {
        ips.push(ip);
    }
}

/// The policy facts of a device from the engine's desired state.
pub fn policy_facts(d: &Desired, mac: &Mac, ips: &[IpAddr]) -> PolicyFacts {
    let owner_name = d
        .groups
        .values()
        .flat_map(|g| &g.devices)
        .find(|x| x.mac == *mac)
        .and_then(|x| x.name.clone());
    let group = d
        .groups
        .values()
        .find(|g| g.id != 0 && g.devices.iter().any(|x| x.mac == *mac))
        .or_else(|| d.groups.get(&0));
    let group = GroupRef {
        id: group.map_or(0, |g| g.id),
        name: group.map_or_else(|| "Guests".to_owned(), |g| g.name.clone()),
    };
    let mut blocked_by = d.blocked_reasons(&Target::Mac(*mac));
    for ip in ips {
        for why in d.blocked_reasons(&Target::Ip(*ip)) {
            // The whitelist reason and group reasons repeat per address: keep one.
            if !blocked_by.contains(&why) {
                blocked_by.push(why);
            }
        }
    }
    // A device on the whitelist by MAC is not "not on the whitelist" by address.
    let listed = |t: Target| {
        d.lists
            .get(&crate::policy::model::ListKind::White)
            .is_some_and(|l| l.contains(&t))
    };
    if listed(Target::Mac(*mac)) || ips.iter().any(|ip| listed(Target::Ip(*ip))) {
        blocked_by.retain(|w| w != crate::policy::model::NOT_WHITELISTED);
    }
    PolicyFacts {
        group,
        blocked_by,
        owner_name,
    }
}

/// Where the neighbour table comes from.
pub enum NeighbourSource {
    /// `ip -j neigh show` (IPv4 and IPv6), falling back to `/proc/net/arp` when the
    /// program is missing or has no JSON output (a minimal `ip`).
    Ip { program: String },
    /// Only `/proc/net/arp` through the files seam (the simulated router).
    ProcArp,
}

/// The sources as one scan read them.
pub struct Gathered {
    inputs: Inputs,
    sources: SourcesOut,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScanOut {
    pub timestamp: u64,
    pub total: usize,
    pub online: usize,
    pub devices: Vec<DeviceOut>,
    pub sources: SourcesOut,
    /// nlbwmon's current period (its start date), which `usage.period` counts.
    pub usage_period: Option<String>,
}

/// The shell around [`merge`]: reads each source with a timeout, never failing the
/// scan for one source.
pub struct Scanner {
    pub files: Arc<dyn Files>,
    pub ubus: Arc<dyn Ubus>,
    pub neighbours: NeighbourSource,
    /// The WAN device, whose neighbours are upstream, not LAN devices.
    pub wan_if: Option<String>,
    pub timeout: Duration,
    /// "Now" for `timestamp` and `last_seen`.
    pub clock: Clock,
    /// Last-seen times, shared with the usage service.
    pub seen: Arc<Seen>,
}

impl Scanner {
    pub fn new(
        files: Arc<dyn Files>,
        ubus: Arc<dyn Ubus>,
        neighbours: NeighbourSource,
        wan_if: Option<String>,
        clock: Clock,
        seen: Arc<Seen>,
    ) -> Scanner {
        Scanner {
            files,
            ubus,
            neighbours,
            wan_if,
            timeout: Duration::from_secs(5),
            clock,
            seen,
        }
    }

    /// Unix seconds from the injected clock.
    pub fn now(&self) -> u64 {
        u64::try_from((self.clock)()).unwrap_or(0)
    }

    /// Reads every source. Separate from [`Scanner::finish`] so the policy state is
    /// only borrowed for the (synchronous) merge, never across the source reads.
    pub async fn gather(&self) -> Gathered {
        let (leases, leases_state) = self.leases();
        let (neighbours, neighbours_state) = self.neighbours().await;
        let (wireless, wireless_state) = self.wireless().await;
        Gathered {
            inputs: Inputs {
                leases,
                neighbours,
                wireless,
                wireless_known: wireless_state != SourceState::Missing,
                exclude_devs: self.wan_if.iter().cloned().chain(["lo".into()]).collect(),
            },
            sources: SourcesOut {
                leases: leases_state,
                neighbours: neighbours_state,
                wireless: wireless_state,
                usage: SourceState::Missing,
            },
        }
    }

    /// Merges what [`Scanner::gather`] read with the policy, the usage reading and
    /// this scan's time. Pure but for reading last-seen times: marking who is
    /// online (a possible write) is [`Scanner::mark`]'s, outside the policy lock.
    pub fn finish(
        &self,
        mut g: Gathered,
        desired: &Desired,
        usage: ScanUsage,
        now: u64,
    ) -> ScanOut {
        let devices = merge(
            &g.inputs,
            now,
            &|m| self.seen.get(m),
            &usage,
            &|mac, ips| policy_facts(desired, mac, ips),
        );
        g.sources.usage = usage.state;
        ScanOut {
            timestamp: now,
            total: devices.len(),
            online: devices.iter().filter(|d| d.online).count(),
            devices,
            sources: g.sources,
            usage_period: usage.period,
        }
    }

    /// Remembers that the scan's online devices were seen at its time.
    pub fn mark(&self, out: &ScanOut) {
        let online: Vec<Mac> = out
            .devices
            .iter()
            .filter(|d| d.online)
            .map(|d| d.mac)
            .collect();
        self.seen.mark(&online, out.timestamp);
    }

    /// [`Scanner::gather`], [`Scanner::finish`] and [`Scanner::mark`].
    pub async fn scan(&self, desired: &Desired, usage: ScanUsage, now: u64) -> ScanOut {
        let g = self.gather().await;
        let out = self.finish(g, desired, usage, now);
        self.mark(&out);
        out
    }

    fn leases(&self) -> (Vec<Lease>, SourceState) {
        match self.files.read_to_string(LEASES_PATH) {
            Ok(text) => (parse::leases(&text), SourceState::Ok),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                (Vec::new(), SourceState::Missing)
            }
            Err(e) => (
                Vec::new(),
                SourceState::Error(format!("{LEASES_PATH}: {e}")),
            ),
        }
    }

    fn proc_arp(&self) -> (Vec<Neighbour>, SourceState) {
        match self.files.read_to_string(ARP_PATH) {
            Ok(text) => (parse::proc_arp(&text), SourceState::Ok),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                (Vec::new(), SourceState::Missing)
            }
            Err(e) => (Vec::new(), SourceState::Error(format!("{ARP_PATH}: {e}"))),
        }
    }

    async fn neighbours(&self) -> (Vec<Neighbour>, SourceState) {
        let NeighbourSource::Ip { program } = &self.neighbours else {
            return self.proc_arp();
        };
        let argv = [program.as_str(), "-j", "neigh", "show"];
        let failure = match process::run(&argv, None, self.timeout).await {
            Ok(out) => match parse::ip_neigh_json(&out) {
                Ok(n) => return (n, SourceState::Ok),
                Err(e) => format!("`ip -j neigh` output: {e}"),
            },
            Err(e) => e.to_string(),
        };
        tracing::debug!(error = %failure, "no JSON neighbour table; reading {ARP_PATH}");
        self.proc_arp()
    }

    async fn wireless(&self) -> (Vec<WirelessIf>, SourceState) {
        let names = match self.ubus.list("hostapd.*").await {
            Ok(names) => names,
            Err(e) => return (Vec::new(), ubus_state(e)),
        };
        if names.is_empty() {
            return (Vec::new(), SourceState::Missing);
        }
        let mut out = Vec::new();
        let mut errors = Vec::new();
        for object in names {
            let ifname = object.trim_start_matches("hostapd.").to_owned();
            match self
                .ubus
                .call(&object, "get_clients", &Value::Object(Default::default()))
                .await
            {
                Ok(v) => {
                    let (freq, stations) = parse::hostapd_clients(&v);
                    out.push(WirelessIf {
                        ifname,
                        band: freq.and_then(parse::band_of),
                        stations,
                    });
                }
                // An interface that went away between list and call has no clients.
                Err(crate::system::ubus::UbusError::NotFound(_)) => {}
                Err(e) => errors.push(format!("{object}: {e}")),
            }
        }
        let state = if errors.is_empty() {
            SourceState::Ok
        } else {
            SourceState::Error(errors.join("; "))
        };
        (out, state)
    }
}

fn ubus_state(e: crate::system::ubus::UbusError) -> SourceState {
    use crate::system::ubus::UbusError;
    match e {
        UbusError::NotFound(_) => SourceState::Missing,
        UbusError::Process(p) if p.is_not_found() => SourceState::Missing,
        other => SourceState::Error(other.to_string()),
    }
}

#[cfg(test)]
mod tests;
