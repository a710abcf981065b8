//! The simulated router (`netpilot-agent run --simulate`): an in-memory OpenWrt box
//! with a handful of devices and two radios, served through the same traits as the
//! real system so every handler runs its real code path off-router. Later features
//! read more of it (leases, neighbours, wireless config) as they land.

use std::io;
use std::time::Instant;

use crate::system::files::Files;
use crate::system::nlbw::{Control, Nlbw, NlbwError, Query};
use crate::system::ubus::FakeUbus;
use crate::system::uci::FakeUci;
use crate::system::wifi::FakeWifi;
use crate::system::Fut;

/// One simulated LAN device.
#[derive(Debug, Clone)]
pub struct SimDevice {
    pub mac: &'static str,
    pub ip: &'static str,
    pub hostname: &'static str,
    /// Wireless radio it is associated with, or `None` for a wired device.
    pub radio: Option<&'static str>,
}

/// Makers' MACs (Intel, LG, Brother) beside two phones' random ones, as a home
/// network looks today.
pub const DEVICES: &[SimDevice] = &[
    SimDevice {
        mac: "3c:a9:f4:00:01:01",
        ip: "192.168.1.101",
        hostname: "alice-laptop",
        radio: Some("radio1"),
    },
    SimDevice {
        mac: "02:00:00:00:01:02",
        ip: "192.168.1.102",
        hostname: "bob-phone",
        radio: Some("radio0"),
    },
    SimDevice {
        mac: "02:00:00:00:01:03",
        ip: "192.168.1.103",
        hostname: "kids-tablet",
        radio: Some("radio0"),
    },
    SimDevice {
        mac: "64:95:6c:00:01:04",
        ip: "192.168.1.104",
        hostname: "living-room-tv",
        radio: None,
    },
    SimDevice {
        mac: "30:05:5c:00:01:05",
        ip: "192.168.1.105",
        hostname: "printer",
        radio: None,
    },
];

/// `/etc/config/wireless` of a dual-band router (radio0 2.4 GHz, radio1 5 GHz).
const WIRELESS: &str = "
config wifi-device 'radio0'
\toption type 'mac80211'
\toption channel '1'
\toption band '2g'
\toption htmode 'HE20'
\toption country 'US'

config wifi-device 'radio1'
\toption type 'mac80211'
\toption channel '36'
\toption band '5g'
\toption htmode 'HE80'
\toption country 'US'

config wifi-iface 'default_radio0'
\toption device 'radio0'
\toption network 'lan'
\toption mode 'ap'
\toption ssid 'NetPilot-Sim'
\toption encryption 'psk2'
\toption key 'simulated-only'

config wifi-iface 'default_radio1'
\toption device 'radio1'
\toption network 'lan'
\toption mode 'ap'
\toption ssid 'NetPilot-Sim-5G'
\toption encryption 'sae-mixed'
\toption key 'simulated-only'
";

/// nlbwmon's UCI defaults as the OpenWrt package ships them.
const NLBWMON: &str = "
config nlbwmon
\toption netlink_buffer_size '524288'
\toption commit_interval '24h'
\toption refresh_interval '30s'
\toption database_directory '/var/lib/nlbwmon'
\toption database_generations '10'
\toption database_interval '1'
\toption protocol_database '/usr/share/nlbwmon/protocols'
";

const RELEASE: &str = "DISTRIB_ID='OpenWrt'
DISTRIB_RELEASE='23.05.5'
DISTRIB_REVISION='r24106-10cc5fcd00'
DISTRIB_TARGET='ramips/mt7621'
DISTRIB_ARCH='mipsel_24kc'
DISTRIB_DESCRIPTION='OpenWrt 23.05.5 r24106-10cc5fcd00 (NetPilot simulated router)'
DISTRIB_TAINTS=''
";

pub struct SimRouter {
    booted: Instant,
    /// Seconds the simulated router had been up when the agent started.
    uptime_offset: u64,
}

impl Default for SimRouter {
    fn default() -> Self {
        SimRouter {
            booted: Instant::now(),
            uptime_offset: 86_400 * 3 + 4_321,
        }
    }
}

impl SimRouter {
    fn uptime(&self) -> f64 {
        self.uptime_offset as f64 + self.booted.elapsed().as_secs_f64()
    }

    /// dnsmasq's lease file: `expiry mac ip hostname clientid`.
    fn leases(&self) -> String {
        let expiry = 1_900_000_000u64;
        DEVICES
            .iter()
            .map(|d| format!("{expiry} {} {} {} *\n", d.mac, d.ip, d.hostname))
            .collect()
    }

    fn arp(&self) -> String {
        let mut out = String::from(
            "IP address       HW type     Flags       HW address            Mask     Device\n",
        );
        for d in DEVICES {
            out.push_str(&format!(
                "{:<16} 0x1         0x2         {}     *        br-lan\n",
                d.ip, d.mac
            ));
        }
        out
    }
}

impl Files for SimRouter {
    fn read_to_string(&self, path: &str) -> io::Result<String> {
        let s = match path {
            "/proc/sys/kernel/hostname" => "netpilot-sim\n".to_owned(),
            "/tmp/sysinfo/model" => "NetPilot Simulated Router (MT7621)\n".to_owned(),
            "/etc/openwrt_release" => RELEASE.to_owned(),
            "/proc/sys/kernel/osrelease" => "5.15.167\n".to_owned(),
            "/proc/uptime" => format!("{:.2} {:.2}\n", self.uptime(), self.uptime() * 1.7),
            "/proc/loadavg" => "0.08 0.12 0.10 1/97 2412\n".to_owned(),
            "/proc/meminfo" => "MemTotal:         249584 kB\nMemFree:          141212 kB\nMemAvailable:     128560 kB\nBuffers:            4096 kB\nCached:            30820 kB\n".to_owned(),
            "/tmp/dhcp.leases" => self.leases(),
            "/proc/net/arp" => self.arp(),
            "/etc/config/wireless" => WIRELESS.to_owned(),
            "/etc/config/nlbwmon" => NLBWMON.to_owned(),
            _ => return Err(io::Error::new(io::ErrorKind::NotFound, path.to_owned())),
        };
        Ok(s)
    }
}

// ---- Wi-Fi -------------------------------------------------------------------
// The simulated `uci` (seeded with WIRELESS), `wifi` and netifd/hostapd answers on
// the simulated ubus, so `/api/wifi/*` runs its real code path.

/// The simulated router's UCI and Wi-Fi control; registers `network.wireless` and
/// the APs' `hostapd.<ifname>` objects on `ubus`, with the wireless DEVICES as
/// their stations.
pub fn wireless(ubus: &FakeUbus) -> (FakeUci, FakeWifi) {
    let uci = FakeUci::with_package("wireless", WIRELESS);
    let wifi = FakeWifi::new(uci.clone(), ubus.clone());
    for radio in ["radio0", "radio1"] {
        let macs: Vec<&str> = DEVICES
            .iter()
            .filter(|d| d.radio == Some(radio))
            .map(|d| d.mac)
            .collect();
        wifi.set_clients(&format!("default_{radio}"), &macs);
    }
    (uci, wifi)
}

// ---- Device usage ----------------------------------------------------------------

/// Per simulated device: download and upload rate (bytes/s) and its protocol mix
/// (layer7 name or `None` for unclassified, share of the traffic in percent).
/// (layer7, IP protocol, port, percent of the device's traffic)
type Mix = &'static [(Option<&'static str>, &'static str, u16, u64)];

const USAGE: &[(u64, u64, Mix)] = &[
    (
        180_000,
        12_000,
        &[
            (Some("HTTPS"), "TCP", 443, 70),
            (Some("QUIC"), "UDP", 443, 25),
            (Some("DNS"), "UDP", 53, 5),
        ],
    ),
    (
        60_000,
        9_000,
        &[(Some("HTTPS"), "TCP", 443, 80), (None, "UDP", 0, 20)],
    ),
    (
        95_000,
        4_000,
        &[
            (Some("HTTPS"), "TCP", 443, 60),
            (Some("QUIC"), "UDP", 443, 40),
        ],
    ),
    (
        420_000,
        6_000,
        &[
            (Some("HTTPS"), "TCP", 443, 90),
            (Some("HTTP"), "TCP", 80, 10),
        ],
    ),
    (300, 150, &[(Some("IPP"), "TCP", 631, 100)]),
];

/// The simulated router's nlbwmon: counters that grow at each device's rate from a
/// few days into the period, `nlbw`'s outputs generated from them, and an init
/// script whose stop/start resets them the way deleting the database does.
pub struct SimNlbw {
    state: std::sync::Mutex<SimNlbwState>,
}

struct SimNlbwState {
    running: bool,
    /// Counting started here; seconds before it were already counted at start.
    since: Instant,
    head_start_s: u64,
}

impl Default for SimNlbw {
    fn default() -> Self {
        SimNlbw {
            state: std::sync::Mutex::new(SimNlbwState {
                running: true,
                since: Instant::now(),
                head_start_s: 3 * 3600,
            }),
        }
    }
}

impl SimNlbw {
    /// `nlbw -c json` in the default grouping for the counters now.
    fn json(&self) -> String {
        let s = self.state.lock().expect("sim nlbw");
        let secs = s.head_start_s + s.since.elapsed().as_secs();
        let mut rows = Vec::new();
        for (d, (rx, tx, mix)) in DEVICES.iter().zip(USAGE) {
            for (l7, proto, port, pct) in mix.iter() {
                let r = rx * secs * pct / 100;
                let t = tx * secs * pct / 100;
                let l7 = l7.map_or("null".to_owned(), |l| format!("\"{l}\""));
                rows.push(format!(
                    "[4,\"{proto}\",{port},\"{}\",\"{}\",{},{r},{},{t},{},{l7}]",
                    d.mac,
                    d.ip,
                    1 + secs / 600,
                    r / 1200 + 1,
                    t / 600 + 1
                ));
            }
        }
        format!("{{\"columns\":[\"family\",\"proto\",\"port\",\"mac\",\"ip\",\"conns\",\"rx_bytes\",\"rx_pkts\",\"tx_bytes\",\"tx_pkts\",\"layer7\"],\"data\":[{}]}}", rows.join(","))
    }
}

impl Nlbw for SimNlbw {
    fn query<'a>(
        &'a self,
        q: Query<'a>,
        _protocols: Option<&'a str>,
    ) -> Fut<'a, Result<String, NlbwError>> {
        Box::pin(async move {
            if !self.state.lock().expect("sim nlbw").running {
                return Err(NlbwError::NotRunning {
                    detail: "Error while processing command: No such file or directory".into(),
                });
            }
            Ok(match q {
                Query::Json { group_by: None, .. } => self.json(),
                Query::List => "2026-11-01\n".to_owned(),
                Query::Commit => "0 Ok\n".to_owned(),
                other => {
                    return Err(NlbwError::NotRunning {
                        detail: format!("the simulated nlbw does not serve {:?}", other.args()),
                    })
                }
            })
        })
    }

    fn control(&self, action: Control) -> Fut<'_, Result<(), NlbwError>> {
        Box::pin(async move {
            let mut s = self.state.lock().expect("sim nlbw");
            match action {
                Control::Stop => s.running = false,
                Control::Start => {
                    s.running = true;
                    s.since = Instant::now();
                    s.head_start_s = 0;
                }
            }
            Ok(())
        })
    }

    fn remove_files<'a>(
        &'a self,
        dir: &'a str,
        matches: fn(&str) -> bool,
    ) -> Fut<'a, Result<Vec<String>, NlbwError>> {
        Box::pin(async move {
            let name = if dir == crate::usage::DEFAULT_DATABASE_DIR {
                "20261101.db.gz"
            } else {
                "0.db"
            };
            Ok(if matches(name) {
                vec![name.to_owned()]
            } else {
                Vec::new()
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::sysinfo;

    #[test]
    fn simulated_router_reads_like_openwrt() {
        let sim = SimRouter::default();
        let info = sysinfo::collect(&sim);
        assert_eq!(info.hostname.as_deref(), Some("netpilot-sim"));
        assert_eq!(info.openwrt.unwrap().arch.as_deref(), Some("mipsel_24kc"));
        assert!(info.uptime_s.unwrap() >= 3 * 86_400);
        assert!(info.memory.is_some() && info.load.is_some());
        let leases = sim.read_to_string("/tmp/dhcp.leases").unwrap();
        assert_eq!(leases.lines().count(), DEVICES.len());
        let usage = crate::usage::parse::aggregate(
            &crate::usage::parse::json(&SimNlbw::default().json()).unwrap(),
        );
        assert_eq!(usage.devices.len(), DEVICES.len());
        assert!(usage
            .devices
            .values()
            .all(|d| d.rx_bytes > d.tx_bytes && d.conns > 0));
        let wireless = sim.read_to_string("/etc/config/wireless").unwrap();
        assert_eq!(wireless.matches("config wifi-device").count(), 2);
    }

    #[tokio::test]
    async fn simulated_wifi_answers_like_netifd_and_hostapd() {
        use crate::system::ubus::Ubus;
        let ubus = FakeUbus::default();
        let (uci, _wifi) = wireless(&ubus);
        assert_eq!(uci.committed("wireless").len(), 4);
        let st = ubus
            .call("network.wireless", "status", &serde_json::json!({}))
            .await
            .unwrap();
        assert_eq!(st["radio1"]["interfaces"][0]["ifname"], "phy1-ap0");
        let c = ubus
            .call("hostapd.phy0-ap0", "get_clients", &serde_json::json!({}))
            .await
            .unwrap();
        assert_eq!(c["clients"].as_object().unwrap().len(), 2);
    }
}
