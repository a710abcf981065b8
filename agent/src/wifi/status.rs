//! `GET /api/wifi/status`, pure: the configured state (from `uci export`) merged
//! with what runs (netifd's `network.wireless status`) and client counts
//! (hostapd's `get_clients`). The key is never part of the answer.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use super::model::{Iface, Wireless};
use super::persist::ChangeView;

#[derive(Debug, Serialize)]
pub struct WifiStatus {
    pub radios: Vec<RadioStatus>,
    /// Stations on all APs whose hostapd answered.
    pub clients: u64,
    /// Why the running state is unknown (netifd not answering), when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime_error: Option<String>,
    /// The latest change and its state (pending, confirmed, rolled_back, failed).
    pub change: Option<ChangeView>,
}

#[derive(Debug, Serialize)]
pub struct RadioStatus {
    pub radio: String,
    pub band: Option<String>,
    pub channel: Option<String>,
    pub htmode: Option<String>,
    /// Configured on (`disabled` is not `1`).
    pub enabled: bool,
    /// Running, per netifd; `null` when netifd did not answer.
    pub up: Option<bool>,
    /// netifd is (re)configuring the radio right now.
    pub pending: Option<bool>,
    pub interfaces: Vec<IfaceStatus>,
}

#[derive(Debug, Serialize)]
pub struct IfaceStatus {
    pub interface: String,
    pub ifname: Option<String>,
    pub mode: String,
    pub ssid: Option<String>,
    pub encryption: String,
    pub network: Vec<String>,
    /// Configured on: neither the interface nor its radio is disabled.
    pub enabled: bool,
    /// Whether a key is set; the key itself is never returned.
    pub has_password: bool,
    /// Associated stations; `0` when the interface is not set up, `null` when its
    /// hostapd did not answer.
    pub clients: Option<u64>,
}

/// What netifd reports per radio.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Runtime {
    pub up: bool,
    pub pending: bool,
    /// Interface section → ifname, for the interfaces set up.
    pub ifnames: BTreeMap<String, String>,
}

/// netifd's `network.wireless status`: `{radio: {up, pending, interfaces: [{section,
/// ifname, …}]}}`. Fields it lacks are taken as false/absent.
pub fn parse_runtime(v: &Value) -> BTreeMap<String, Runtime> {
    let mut out = BTreeMap::new();
    let Some(radios) = v.as_object() else {
        return out;
    };
    for (name, r) in radios {
        let flag = |k: &str| r.get(k).and_then(Value::as_bool).unwrap_or(false);
        let ifnames = r
            .get("interfaces")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|i| {
                Some((
                    i.get("section")?.as_str()?.to_owned(),
                    i.get("ifname")?.as_str()?.to_owned(),
                ))
            })
            .collect();
        out.insert(
            name.clone(),
            Runtime {
                up: flag("up"),
                pending: flag("pending"),
                ifnames,
            },
        );
    }
    out
}

/// hostapd's `get_clients`: `{"freq": …, "clients": {mac: {…}}}`.
pub fn client_count(v: &Value) -> u64 {
    v.get("clients")
        .and_then(Value::as_object)
        .map_or(0, |m| m.len() as u64)
}

/// Ifnames whose hostapd should be asked for clients: AP interfaces set up.
pub fn ap_ifnames(w: &Wireless, runtime: &BTreeMap<String, Runtime>) -> Vec<String> {
    w.ifaces
        .iter()
        .filter(|i| i.is_ap())
        .filter_map(|i| runtime.get(&i.radio)?.ifnames.get(&i.section).cloned())
        .collect()
}

/// The answer. `runtime` is `Err` when netifd did not answer; `clients` maps an
/// ifname to its station count for the hostapds that answered.
pub fn build(
    w: &Wireless,
    runtime: Result<&BTreeMap<String, Runtime>, String>,
    clients: &BTreeMap<String, u64>,
    change: Option<ChangeView>,
) -> WifiStatus {
    let (rt, runtime_error) = match runtime {
        Ok(rt) => (Some(rt), None),
        Err(e) => (None, Some(e)),
    };
    let iface = |i: &Iface, radio_enabled: bool| {
        let ifname = rt
            .and_then(|rt| rt.get(&i.radio))
            .and_then(|r| r.ifnames.get(&i.section))
            .cloned();
        let clients = match (&ifname, rt) {
            (Some(n), _) => clients.get(n).copied(),
            // Not set up: nobody can be associated.
            (None, Some(_)) => Some(0),
            (None, None) => None,
        };
        IfaceStatus {
            interface: i.section.clone(),
            ifname,
            mode: i.mode.clone(),
            ssid: i.ssid.clone(),
            encryption: i.encryption.clone(),
            network: i.networks.clone(),
            enabled: i.enabled && radio_enabled,
            has_password: i.has_key,
            clients,
        }
    };
    let radios: Vec<RadioStatus> = w
        .radios
        .iter()
        .map(|r| {
            let run = rt.map(|rt| rt.get(&r.name).cloned().unwrap_or_default());
            RadioStatus {
                radio: r.name.clone(),
                band: r.band.clone(),
                channel: r.channel.clone(),
                htmode: r.htmode.clone(),
                enabled: r.enabled,
                up: run.as_ref().map(|x| x.up),
                pending: run.as_ref().map(|x| x.pending),
                interfaces: w
                    .ifaces
                    .iter()
                    .filter(|i| i.radio == r.name)
                    .map(|i| iface(i, r.enabled))
                    .collect(),
            }
        })
        .collect();
    let total = radios
        .iter()
        .flat_map(|r| &r.interfaces)
        .filter_map(|i| i.clients)
        .sum();
    WifiStatus {
        radios,
        clients: total,
        runtime_error,
        change,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const FIXTURE: &str = include_str!("../../fixtures/uci/etc-config-wireless");

    fn netifd() -> Value {
        json!({
            "radio0": {"up": true, "pending": false, "autostart": true, "disabled": false,
                "config": {"band": "2g", "channel": "1"},
                "interfaces": [
                    {"section": "default_radio0", "ifname": "phy0-ap0", "config": {"ssid": "OpenWrt", "key": "changeme123"}},
                    {"section": "guest", "ifname": "phy0-ap1", "config": {}}]},
            "radio1": {"up": false, "pending": true, "autostart": true, "disabled": false,
                "interfaces": [{"section": "default_radio1", "config": {}}]}
        })
    }

    #[test]
    fn merges_config_runtime_and_clients_without_the_key() {
        let w = Wireless::parse(FIXTURE).unwrap();
        let rt = parse_runtime(&netifd());
        assert_eq!(ap_ifnames(&w, &rt), ["phy0-ap0", "phy0-ap1"]);
        let clients = BTreeMap::from([("phy0-ap0".to_owned(), 2u64)]);
        let st = build(&w, Ok(&rt), &clients, None);
        let v = serde_json::to_value(&st).unwrap();
        assert!(!v.to_string().contains("changeme123"), "{v}");
        assert_eq!(v["clients"], 2);
        let r0 = &v["radios"][0];
        assert_eq!(
            (r0["up"].clone(), r0["band"].clone()),
            (json!(true), json!("2g"))
        );
        assert_eq!(r0["interfaces"][0]["ifname"], "phy0-ap0");
        assert_eq!(r0["interfaces"][0]["encryption"], "sae-mixed");
        assert_eq!(r0["interfaces"][0]["has_password"], true);
        // Guest is up but its hostapd did not answer: unknown, not zero.
        assert_eq!(r0["interfaces"][1]["clients"], Value::Null);
        let r1 = &v["radios"][1];
        assert_eq!(r1["pending"], true);
        assert_eq!(r1["interfaces"][0]["clients"], 0);

        let st = build(&w, Err("ubus: not found".into()), &BTreeMap::new(), None);
        let v = serde_json::to_value(&st).unwrap();
        assert_eq!(v["runtime_error"], "ubus: not found");
        assert_eq!(v["radios"][0]["up"], Value::Null);
        assert_eq!(v["radios"][0]["interfaces"][0]["ssid"], "OpenWrt");
    }
}
