//! Which devices the engine works on: the LAN bridge (download is shaped on its
//! egress, LAN traffic is classified by it) and the WAN device (upload). On OpenWrt
//! they come from UCI `network`; elsewhere from the command line or the config file.

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

/// The command line wins, then UCI, then OpenWrt's usual names.
pub fn resolve(files: &dyn Files, lan: Option<&str>, wan: Option<&str>) -> (String, String) {
    let sections = files
        .read_to_string("/etc/config/network")
        .ok()
        .and_then(|t| uci_format::parse(&t).ok())
        .unwrap_or_default();
    let lan = lan
        .map(str::to_owned)
        .or_else(|| uci_device(&sections, "lan"))
        .unwrap_or_else(|| DEFAULT_LAN.to_owned());
    let wan = wan
        .map(str::to_owned)
        .or_else(|| uci_device(&sections, "wan"))
        .unwrap_or_else(|| DEFAULT_WAN.to_owned());
    (lan, wan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::files::MemFiles;

    #[test]
    fn names_come_from_flags_then_uci_then_defaults() {
        let files = MemFiles::default().with(
            "/etc/config/network",
            "config interface 'lan'\n\toption device 'br-lan'\n\toption proto 'static'\n\nconfig interface 'wan'\n\toption device 'eth0.2'\n\toption proto 'dhcp'\n",
        );
        assert_eq!(
            resolve(&files, None, None),
            ("br-lan".into(), "eth0.2".into())
        );
        assert_eq!(
            resolve(&files, Some("br0"), Some("eth9")),
            ("br0".into(), "eth9".into())
        );
        let pppoe = MemFiles::default().with(
            "/etc/config/network",
            "config interface 'wan'\n\toption device 'eth1'\n\toption proto 'pppoe'\n",
        );
        assert_eq!(
            resolve(&pppoe, None, None),
            ("br-lan".into(), "pppoe-wan".into())
        );
        assert_eq!(
            resolve(&MemFiles::default(), None, None),
            ("br-lan".into(), "wan".into())
        );
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
