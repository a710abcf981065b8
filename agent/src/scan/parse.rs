//! Pure parsers for the sources device discovery merges: dnsmasq's lease file, the
//! kernel's neighbour table (`/proc/net/arp` and `ip -j neigh`) and hostapd's
//! `get_clients` answer. Each skips what it cannot read rather than failing the
//! whole scan: one odd line must not hide every other device.

use std::net::IpAddr;

use serde_json::Value;

use crate::policy::model::Mac;

/// One line of `/tmp/dhcp.leases`: `expiry mac ip hostname clientid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Unix seconds; 0 is an infinite lease.
    pub expiry: u64,
    pub mac: Mac,
    pub ip: IpAddr,
    pub hostname: Option<String>,
}

/// dnsmasq writes `*` for a missing hostname or client id. DHCPv6 lines (after the
/// `duid` line) carry an IAID where the MAC is, so they do not parse as a MAC and are
/// skipped: those addresses reach the scan through the neighbour table instead.
pub fn leases(text: &str) -> Vec<Lease> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_ascii_whitespace();
            let expiry = f.next()?.parse().ok()?;
            let mac = f.next().and_then(|m| Mac::parse(m).ok())?;
            let ip = f.next()?.parse().ok()?;
            let hostname = f
                .next()
                .filter(|h| *h != "*")
                .and_then(clean_hostname)
                .map(str::to_owned);
            Some(Lease {
                expiry,
                mac,
                ip,
                hostname,
            })
        })
        .collect()
}

/// Hostnames come from the device itself: keep only what a DNS label allows, so a
/// hostile DHCP client cannot put control characters into the web app.
fn clean_hostname(h: &str) -> Option<&str> {
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    ok.then_some(h)
}

/// A neighbour-table entry with a link-layer address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub ip: IpAddr,
    pub mac: Mac,
    pub dev: String,
    /// The kernel's NUD state, upper case (`REACHABLE`, `STALE`, …); `/proc/net/arp`
    /// only knows complete (`REACHABLE` here) or permanent.
    pub state: String,
}

impl Neighbour {
    /// Recently confirmed by the kernel: the device answered within the last
    /// reachable time (about 30 s), or is being probed now.
    pub fn is_fresh(&self) -> bool {
        matches!(
            self.state.as_str(),
            "REACHABLE" | "DELAY" | "PROBE" | "PERMANENT" | "NOARP"
        )
    }
}

/// `/proc/net/arp`: `IP address  HW type  Flags  HW address  Mask  Device`.
/// Flags 0x2 is complete, 0x4 permanent; incomplete entries have no usable MAC.
pub fn proc_arp(text: &str) -> Vec<Neighbour> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_ascii_whitespace().collect();
            let [ip, _hw, flags, mac, _mask, dev] = f.as_slice() else {
                return None;
            };
            let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).ok()?;
            if flags & 0x2 == 0 {
                return None;
            }
            Some(Neighbour {
                ip: ip.parse().ok()?,
                mac: Mac::parse(mac).ok()?,
                dev: (*dev).to_owned(),
                state: if flags & 0x4 != 0 {
                    "PERMANENT"
                } else {
                    "REACHABLE"
                }
                .to_owned(),
            })
        })
        .collect()
}

/// `ip -j neigh show`: `[{"dst", "dev", "lladdr", "state": ["REACHABLE"]}, …]`.
/// Entries without `lladdr` (FAILED, INCOMPLETE) are skipped.
pub fn ip_neigh_json(json: &str) -> Result<Vec<Neighbour>, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let items = v.as_array().ok_or("not a JSON array")?;
    Ok(items
        .iter()
        .filter_map(|n| {
            let state = match &n["state"] {
                Value::Array(a) => a.first().and_then(Value::as_str).unwrap_or(""),
                Value::String(s) => s,
                _ => "",
            };
            Some(Neighbour {
                ip: n["dst"].as_str()?.parse().ok()?,
                mac: Mac::parse(n["lladdr"].as_str()?).ok()?,
                dev: n["dev"].as_str()?.to_owned(),
                state: state.to_ascii_uppercase(),
            })
        })
        .collect())
}

/// One station of hostapd's `get_clients` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Station {
    pub mac: Mac,
    /// dBm, when the driver reports it.
    pub signal: Option<i64>,
    /// Seconds since association.
    pub connected_time: Option<u64>,
    pub authorized: bool,
}

/// hostapd's `{"freq": 2412, "clients": {"aa:bb:…": {"signal": -52, "connected_time":
/// 1234, "authorized": true, …}}}`: the radio's frequency (MHz) and its stations.
pub fn hostapd_clients(v: &Value) -> (Option<u64>, Vec<Station>) {
    let freq = v["freq"].as_u64();
    let stations = v["clients"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(mac, c)| {
                    Some(Station {
                        mac: Mac::parse(mac).ok()?,
                        signal: c["signal"].as_i64().filter(|s| *s != 0),
                        connected_time: c["connected_time"].as_u64(),
                        // Older hostapd builds omit the flag; associated is enough then.
                        authorized: c["authorized"].as_bool().unwrap_or(true),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    (freq, stations)
}

/// The band of a frequency in MHz, as UCI names bands.
pub fn band_of(freq_mhz: u64) -> Option<&'static str> {
    match freq_mhz {
        2400..=2500 => Some("2g"),
        // 6 GHz channel 2 is 5935 MHz; 5 GHz ends at 5925 (channel 181 is 5905).
        5150..=5930 => Some("5g"),
        5931..=7125 => Some("6g"),
        57_000..=71_000 => Some("60g"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mac(s: &str) -> Mac {
        Mac::parse(s).unwrap()
    }

    #[test]
    fn leases_with_missing_hostnames_ipv6_lines_and_garbage() {
        let text = "1900000000 02:00:00:00:01:01 192.168.1.101 alice-laptop 01:02:00:00:00:01:01\n\
                    0 02:00:00:00:01:02 192.168.1.102 * *\n\
                    duid 00:01:00:01:2c:3b:4a:5d:02:00:00:00:00:01\n\
                    1900000000 3564781 fd00::1:55 phone 00:04:aa\n\
                    1900000000 02:00:00:00:01:03 192.168.1.103 evil$(reboot) *\n\
                    not a lease line\n\
                    \n";
        let l = leases(text);
        assert_eq!(l.len(), 3, "{l:?}");
        assert_eq!(l[0].hostname.as_deref(), Some("alice-laptop"));
        assert_eq!(l[0].expiry, 1_900_000_000);
        assert_eq!(l[1].hostname, None);
        assert_eq!(l[1].expiry, 0);
        assert_eq!(l[2].mac, mac("02:00:00:00:01:03"));
        assert_eq!(
            l[2].hostname, None,
            "a hostname with shell characters is dropped"
        );
    }

    #[test]
    fn proc_arp_keeps_complete_entries_only() {
        let text = "IP address       HW type     Flags       HW address            Mask     Device\n\
                    192.168.1.101    0x1         0x2         02:00:00:00:01:01     *        br-lan\n\
                    192.168.1.150    0x1         0x0         00:00:00:00:00:00     *        br-lan\n\
                    10.0.0.1         0x1         0x6         02:aa:bb:cc:dd:ee     *        wan\n";
        let n = proc_arp(text);
        assert_eq!(n.len(), 2);
        assert_eq!(n[0].dev, "br-lan");
        assert!(n[0].is_fresh());
        assert_eq!(n[1].state, "PERMANENT");
    }

    #[test]
    fn ip_neigh_json_with_v6_and_failed_entries() {
        let json = r#"[{"dst":"192.168.1.101","dev":"br-lan","lladdr":"02:00:00:00:01:01","state":["REACHABLE"]},
            {"dst":"fe80::1","dev":"br-lan","lladdr":"02:00:00:00:01:01","router":null,"state":["STALE"]},
            {"dst":"192.168.1.99","dev":"br-lan","state":["FAILED"]}]"#;
        let n = ip_neigh_json(json).unwrap();
        assert_eq!(n.len(), 2);
        assert!(n[0].is_fresh());
        assert_eq!(n[1].ip, "fe80::1".parse::<IpAddr>().unwrap());
        assert!(!n[1].is_fresh());
        assert!(ip_neigh_json("{").is_err());
        assert!(ip_neigh_json("{}").is_err());
        assert!(ip_neigh_json("[]").unwrap().is_empty());
    }

    #[test]
    fn hostapd_clients_answer() {
        let v = json!({"freq": 5180, "clients": {
            "02:00:00:00:01:01": {"auth": true, "assoc": true, "authorized": true, "signal": -48, "connected_time": 3600},
            "02:00:00:00:01:09": {"auth": true, "assoc": true, "authorized": false},
            "not-a-mac": {}
        }});
        let (freq, st) = hostapd_clients(&v);
        assert_eq!(freq, Some(5180));
        assert_eq!(band_of(5180), Some("5g"));
        assert_eq!(st.len(), 2);
        assert_eq!(st[0].signal, Some(-48));
        assert_eq!(st[0].connected_time, Some(3600));
        assert!(!st[1].authorized);
        assert_eq!(hostapd_clients(&json!({})), (None, Vec::new()));
        assert_eq!(band_of(2412), Some("2g"));
        assert_eq!(band_of(5955), Some("6g"));
        assert_eq!(band_of(900), None);
    }
}
