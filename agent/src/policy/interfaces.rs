//! Which devices the engine works on: the LAN-side bridges (LAN traffic is
//! classified by them, their DNS redirected, download shaped on each one's egress
//! and upload on the ifb they feed) and the WAN device (never shaped: SQM's place). On OpenWrt they come from UCI `firewall`
//! (which zones are LAN-side) and `network` (their devices); elsewhere from the
//! command line or the config file.

use crate::system::files::Files;
use crate::uci_format;

pub const DEFAULT_LAN: &str = "br-lan";
pub const DEFAULT_WAN: &str = "wan";

/// Interface names go into nft scripts and tc batches: only the characters Linux
/// interface names use in practice, at most 15 bytes.
pub fn validate(name: &str) -> crate::error::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'@'));
    if !ok {
        crate::bail!("invalid interface name {name:?}");
    }
    Ok(())
}

/// The device of a UCI `interface` section: `device` (21.02+) or `ifname`;
/// PPPoE's traffic leaves through `pppoe-<name>`.
fn uci_device(sections: &[uci_format::Section], name: &str) -> Option<String> {
    let s = sections
        .iter()
        .find(|s| s.kind == "interface" && s.name.as_deref() == Some(name))?;
    if matches!(s.get("proto"), Some("pppoe" | "pppoa")) {
        return Some(format!("pppoe-{name}"));
    }
    s.get("device")
        .or_else(|| s.get("ifname"))
        .and_then(|d| d.split_whitespace().next())
        .map(str::to_owned)
        .filter(|d| validate(d).is_ok())
}

/// A fw4 zone on the LAN side, as UCI `firewall` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LanZone {
    /// `lan`, `guest`: fw4's chains are `input_<name>`, `forward_<name>`.
    pub name: String,
    /// `option input` (ACCEPT, REJECT, DROP); fw4's default when unset is the
    /// `defaults` section's, read the same way.
    pub input: String,
    /// The devices of its networks (`br-guest`).
    pub devices: Vec<String>,
}

impl LanZone {
    /// Queries redirected to the router's own ports pass fw4's input chain of this
    /// zone only when something accepts them.
    pub fn rejects_input(&self) -> bool {
        !self.input.eq_ignore_ascii_case("ACCEPT")
    }
}

/// fw4 zone names are at most 11 characters of `[A-Za-z0-9_]` (it refuses others);
/// they go into chain names and include paths.
pub fn valid_zone(name: &str) -> bool {
    (1..=11).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn truthy(v: Option<&str>) -> bool {
    matches!(v, Some("1" | "on" | "true" | "yes" | "enabled"))
}

/// The LAN-side zones of UCI `firewall`, their devices from UCI `network`. The rule:
/// a zone is LAN-side unless it masquerades (`option masq 1`, what marks OpenWrt's
/// WAN zones) or holds the WAN device; its devices are those of its `network`s.
/// Zones with no device here (a VPN interface that is down, a typo) are left out.
pub fn lan_zones(
    firewall: &[uci_format::Section],
    network: &[uci_format::Section],
    wan: &str,
) -> Vec<LanZone> {
    let default_input = firewall
        .iter()
        .find(|s| s.kind == "defaults")
        .and_then(|s| s.get("input"))
        .unwrap_or("REJECT")
        .to_owned();
    let mut out: Vec<LanZone> = Vec::new();
    for z in firewall.iter().filter(|s| s.kind == "zone") {
        let Some(name) = z.get("name").filter(|n| valid_zone(n)) else {
            continue;
        };
        if truthy(z.get("masq")) {
            continue;
        }
        let mut devices: Vec<String> = Vec::new();
        // `list network 'a'` or the older `option network 'a b'`.
        for net in z.all("network").iter().flat_map(|v| v.split_whitespace()) {
            if let Some(d) = uci_device(network, net) {
                if !devices.contains(&d) {
                    devices.push(d);
                }
            }
        }
        if devices.iter().any(|d| d == wan) || devices.iter().any(|d| d == "lo") {
            continue;
        }
        if devices.is_empty() || out.iter().any(|o| o.name == name) {
            continue;
        }
        out.push(LanZone {
            name: name.to_owned(),
            input: z.get("input").unwrap_or(&default_input).to_owned(),
            devices,
        });
    }
    out
}

/// The LAN side and the WAN device the engine works on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Every LAN-side bridge, the first being where download is shaped.
    pub lan: Vec<String>,
    pub wan: String,
    /// The LAN-side zones as UCI `firewall` has them (empty without fw4).
    pub zones: Vec<LanZone>,
}

fn read_uci(files: &dyn Files, path: &str) -> Vec<uci_format::Section> {
    files
        .read_to_string(path)
        .ok()
        .and_then(|t| uci_format::parse(&t).ok())
        .unwrap_or_default()
}

/// The command line wins, then UCI (`--lan-if` given: exactly those bridges; else
/// every LAN-side zone's devices, else network.lan's), then OpenWrt's usual names.
pub fn resolve(files: &dyn Files, lan: &[String], wan: Option<&str>) -> Resolved {
    let network = read_uci(files, "/etc/config/network");
    let firewall = read_uci(files, "/etc/config/firewall");
    let wan = wan
        .map(str::to_owned)
        .or_else(|| uci_device(&network, "wan"))
        .unwrap_or_else(|| DEFAULT_WAN.to_owned());
    let zones = lan_zones(&firewall, &network, &wan);
    let lan = if !lan.is_empty() {
        lan.to_vec()
    } else {
        let mut from_zones: Vec<String> = Vec::new();
        for d in zones.iter().flat_map(|z| z.devices.iter()) {
            if !from_zones.contains(d) {
                from_zones.push(d.clone());
            }
        }
        // network.lan's device first: it is where download is shaped.
        if let Some(main) = uci_device(&network, "lan") {
            if let Some(i) = from_zones.iter().position(|d| *d == main) {
                from_zones.remove(i);
            }
            from_zones.insert(0, main);
        }
        if from_zones.is_empty() {
            from_zones.push(DEFAULT_LAN.to_owned());
        }
        from_zones
    };
    Resolved { lan, wan, zones }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::files::MemFiles;

    fn pair(r: Resolved) -> (String, String) {
        assert_eq!(r.lan.len(), 1, "{r:?}");
        (r.lan[0].clone(), r.wan)
    }

    #[test]
    fn names_come_from_flags_then_uci_then_defaults() {
        let files = MemFiles::default().with(
            "/etc/config/network",
            "config interface 'lan'\n\toption device 'br-lan'\n\toption proto 'static'\n\nconfig interface 'wan'\n\toption device 'eth0.2'\n\toption proto 'dhcp'\n",
        );
        assert_eq!(
            pair(resolve(&files, &[], None)),
            ("br-lan".into(), "eth0.2".into())
        );
        assert_eq!(
            pair(resolve(&files, &["br0".into()], Some("eth9"))),
            ("br0".into(), "eth9".into())
        );
        let pppoe = MemFiles::default().with(
            "/etc/config/network",
            "config interface 'wan'\n\toption device 'eth1'\n\toption proto 'pppoe'\n",
        );
        assert_eq!(
            pair(resolve(&pppoe, &[], None)),
            ("br-lan".into(), "pppoe-wan".into())
        );
        assert_eq!(
            pair(resolve(&MemFiles::default(), &[], None)),
            ("br-lan".into(), "wan".into())
        );
    }

    const FIREWALL: &str = include_str!("../../fixtures/fw4/etc-config-firewall");
    const NETWORK: &str = include_str!("../../fixtures/fw4/etc-config-network");

    #[test]
    fn the_stock_router_has_one_lan_zone() {
        let files = MemFiles::default()
            .with("/etc/config/firewall", FIREWALL)
            .with("/etc/config/network", NETWORK);
        let r = resolve(&files, &[], None);
        assert_eq!(
            (r.lan.clone(), r.wan.as_str()),
            (vec!["br-lan".to_owned()], "r-wan")
        );
        assert_eq!(
            r.zones,
            vec![LanZone {
                name: "lan".into(),
                input: "ACCEPT".into(),
                devices: vec!["br-lan".into()],
            }]
        );
        assert!(!r.zones[0].rejects_input());
    }

    #[test]
    fn a_guest_zone_adds_its_bridge_and_rejects_input() {
        // The stock files plus what LuCI's guest-network recipe adds.
        let network = format!(
            "{NETWORK}\nconfig device\n\toption name 'br-guest'\n\toption type 'bridge'\n\nconfig interface 'guest'\n\toption device 'br-guest'\n\toption proto 'static'\n\toption ipaddr '192.168.2.1'\n\nconfig interface 'iot'\n\toption device 'br-iot'\n\toption proto 'static'\n"
        );
        let firewall = format!(
            "{FIREWALL}\nconfig zone\n\toption name 'guest'\n\tlist network 'guest'\n\toption input 'REJECT'\n\toption output 'ACCEPT'\n\toption forward 'REJECT'\n\nconfig zone\n\toption name 'iot'\n\toption network 'iot nosuch'\n\nconfig zone\n\toption name 'vpn'\n\tlist network 'wg0'\n"
        );
        let files = MemFiles::default()
            .with("/etc/config/firewall", &firewall)
            .with("/etc/config/network", &network);
        let r = resolve(&files, &[], None);
        assert_eq!(r.lan, ["br-lan", "br-guest", "br-iot"]);
        let zones: Vec<(&str, &str, bool)> = r
            .zones
            .iter()
            .map(|z| (z.name.as_str(), z.input.as_str(), z.rejects_input()))
            .collect();
        // iot has no input option: the defaults' REJECT. vpn has no device here.
        assert_eq!(
            zones,
            [
                ("lan", "ACCEPT", false),
                ("guest", "REJECT", true),
                ("iot", "REJECT", true)
            ]
        );
        // The command line still wins, whole.
        assert_eq!(resolve(&files, &["br-x".into()], None).lan, ["br-x"]);
    }

    #[test]
    fn odd_names_are_refused() {
        for bad in ["", "a b", "eth0;reboot", "\"x\"", "averyveryverylongname"] {
            assert!(validate(bad).is_err(), "{bad:?}");
        }
        for good in ["br-lan", "eth0.2", "wan", "lan1@eth0", "pppoe-wan"] {
            validate(good).unwrap();
        }
    }
}
