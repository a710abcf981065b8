//! The Wi-Fi control seam: `wifi reload [radio]`, which makes netifd apply the
//! committed `/etc/config/wireless`. [`RealWifi`] runs OpenWrt's `/sbin/wifi`
//! through the process module. [`FakeWifi`] stands in for `wifi` *and* netifd and
//! hostapd off-router: it keeps the running configuration, answers
//! `ubus call network.wireless status` in netifd's shape and
//! `ubus call hostapd.<ifname> get_clients` on a [`FakeUbus`].
//!
//! What OpenWrt does, and the fake copies:
//! - `wifi reload <radio>` (23.05: `ubus call network reload`) returns at once, exit
//!   0; netifd then re-reads the configuration and restarts only the radios whose
//!   configuration changed, asynchronously (a radio reads `pending: true` while its
//!   setup script runs, for a few seconds). The radio argument is not checked: an
//!   unknown radio is not an error. The fake applies at once (nothing in the agent
//!   waits for a radio: safe apply waits for the relay) and also ignores an unknown
//!   radio, so the agent must check radio names itself.
//! - netifd's status: per radio `up`, `pending`, `autostart`, `disabled`, `config`
//!   (the radio's options) and `interfaces`, each with `section`, `ifname` (only
//!   while set up), `config` (the interface's options, `network` as a list, the
//!   key included) and `vlans`/`stations`. An interface with `disabled '1'` is not
//!   listed; a disabled radio is not up and its interfaces have no `ifname`.
//! - Interface names: `phy<N>-ap<K>` (23.05+), N the radio's index, K counting the
//!   AP interfaces of that radio; `-sta<K>` for clients.
//! - hostapd registers `hostapd.<ifname>` on ubus only while that AP runs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::ubus::FakeUbus;
use super::uci::FakeUci;
use super::Fut;
use crate::runtime::process::{self, ProcessError};
use crate::uci_format::Section;

#[derive(Debug, thiserror::Error)]
pub enum WifiError {
    #[error("wifi reload failed: {0}")]
    Process(#[from] ProcessError),
    #[error("invalid radio name {0:?}")]
    BadRadio(String),
}

pub trait WifiControl: Send + Sync {
    /// `wifi reload <radio>`, or `wifi reload` for every radio when `None`.
    /// Returns once the reload was requested, not when radios are up again.
    fn reload<'a>(&'a self, radio: Option<&'a str>) -> Fut<'a, Result<(), WifiError>>;
}

pub struct RealWifi {
    pub program: String,
    pub timeout: Duration,
}

impl Default for RealWifi {
    fn default() -> Self {
        RealWifi {
            program: "wifi".into(),
            timeout: Duration::from_secs(30),
        }
    }
}

fn valid_radio(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl WifiControl for RealWifi {
    fn reload<'a>(&'a self, radio: Option<&'a str>) -> Fut<'a, Result<(), WifiError>> {
        Box::pin(async move {
            let mut argv = vec![self.program.as_str(), "reload"];
            if let Some(r) = radio {
                if !valid_radio(r) {
                    return Err(WifiError::BadRadio(r.to_owned()));
                }
                argv.push(r);
            }
            process::run(&argv, None, self.timeout).await?;
            Ok(())
        })
    }
}

#[derive(Default)]
struct FakeState {
    /// The configuration netifd runs: the committed one as of the last reload.
    running: Vec<Section>,
    reloads: Vec<Option<String>>,
    failing: bool,
    /// Associated stations per interface section.
    clients: BTreeMap<String, Vec<String>>,
    /// hostapd objects currently registered on the fake ubus.
    registered: Vec<String>,
}

/// `wifi`, netifd and hostapd in memory (see the module doc for what it copies).
#[derive(Clone)]
pub struct FakeWifi {
    uci: FakeUci,
    ubus: FakeUbus,
    inner: Arc<Mutex<FakeState>>,
}

impl FakeWifi {
    /// Boots with the committed `wireless` package running, and registers
    /// `network.wireless status` and the running APs' hostapd objects on `ubus`.
    pub fn new(uci: FakeUci, ubus: FakeUbus) -> FakeWifi {
        let fake = FakeWifi {
            inner: Arc::new(Mutex::new(FakeState {
                running: uci.committed("wireless"),
                ..Default::default()
            })),
            uci,
            ubus,
        };
        let f = fake.clone();
        fake.ubus.on("network.wireless", "status", move |args| {
            let all = f.status();
            match args.get("device").and_then(Value::as_str) {
                None => Ok(all),
                Some(d) => Ok(all
                    .get(d)
                    .map(|v| {
                        let mut m = Map::new();
                        m.insert(d.to_owned(), v.clone());
                        Value::Object(m)
                    })
                    .unwrap_or_else(|| json!({}))),
            }
        });
        fake.sync_hostapd();
        fake
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.inner.lock().expect("fake wifi lock")
    }

    /// Reload requests so far (`None`: all radios).
    pub fn reloads(&self) -> Vec<Option<String>> {
        self.lock().reloads.clone()
    }

    /// Makes `wifi reload` fail (as when the command is missing or the
    /// configuration is broken) until cleared.
    pub fn set_failing(&self, failing: bool) {
        self.lock().failing = failing;
    }

    /// Stations associated with the AP of an interface section.
    pub fn set_clients(&self, section: &str, macs: &[&str]) {
        self.lock().clients.insert(
            section.to_owned(),
            macs.iter().map(|m| (*m).to_owned()).collect(),
        );
        self.sync_hostapd();
    }

    /// The running configuration (what `status` describes).
    pub fn running(&self) -> Vec<Section> {
        self.lock().running.clone()
    }

    /// netifd's `network.wireless status` answer for the running configuration.
    pub fn status(&self) -> Value {
        status_of(&self.lock().running)
    }

    /// hostapd objects for the running, up APs; objects of APs gone are removed.
    fn sync_hostapd(&self) {
        let (aps, gone) = {
            let mut s = self.lock();
            let aps: Vec<(String, Vec<String>, u32)> = running_aps(&s.running)
                .into_iter()
                .map(|(section, ifname, freq)| {
                    let clients = s.clients.get(&section).cloned().unwrap_or_default();
                    (ifname, clients, freq)
                })
                .collect();
            let names: Vec<String> = aps.iter().map(|(n, _, _)| n.clone()).collect();
            let gone: Vec<String> = s
                .registered
                .iter()
                .filter(|n| !names.contains(n))
                .cloned()
                .collect();
            s.registered = names;
            (aps, gone)
        };
        for name in gone {
            self.ubus.remove(&format!("hostapd.{name}"));
        }
        for (ifname, clients, freq) in aps {
            let stations: Map<String, Value> = clients
                .iter()
                .enumerate()
                .map(|(i, mac)| {
                    (
                        mac.clone(),
                        json!({"auth": true, "assoc": true, "authorized": true,
                               "signal": -40 - 7 * i as i64, "connected_time": 600 + 97 * i as u64}),
                    )
                })
                .collect();
            self.ubus.answer(
                &format!("hostapd.{ifname}"),
                "get_clients",
                json!({"freq": freq, "clients": stations}),
            );
        }
    }
}

impl WifiControl for FakeWifi {
    fn reload<'a>(&'a self, radio: Option<&'a str>) -> Fut<'a, Result<(), WifiError>> {
        let r = (|| {
            let mut s = self.lock();
            s.reloads.push(radio.map(str::to_owned));
            if s.failing {
                return Err(WifiError::Process(ProcessError::Failed {
                    argv: vec!["wifi".into(), "reload".into()],
                    status: "exit status: 1".into(),
                    code: Some(1),
                    stderr: "simulated failure".into(),
                }));
            }
            // Like netifd's reload: the whole committed configuration is taken.
            s.running = self.uci.committed("wireless");
            Ok(())
        })();
        if r.is_ok() {
            self.sync_hostapd();
        }
        Box::pin(async move { r })
    }
}

fn disabled(s: &Section) -> bool {
    s.get("disabled") == Some("1")
}

fn radios(running: &[Section]) -> impl Iterator<Item = (usize, &Section)> {
    running
        .iter()
        .filter(|s| s.kind == "wifi-device")
        .enumerate()
}

/// (interface section, ifname) of every set-up interface, radio by radio.
fn ifnames(running: &[Section]) -> Vec<(String, String, &Section)> {
    let mut out = Vec::new();
    for (n, radio) in radios(running) {
        if disabled(radio) {
            continue;
        }
        let name = radio.name.as_deref().unwrap_or("");
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for vif in running
            .iter()
            .filter(|s| s.kind == "wifi-iface" && s.get("device") == Some(name) && !disabled(s))
        {
            let mode = match vif.get("mode").unwrap_or("ap") {
                "ap" => "ap",
                "sta" => "sta",
                "mesh" => "mesh",
                _ => "wds",
            };
            let k = counts.entry(mode).or_default();
            out.push((
                vif.name.clone().unwrap_or_default(),
                format!("phy{n}-{mode}{k}"),
                radio,
            ));
            *k += 1;
        }
    }
    out
}

fn running_aps(running: &[Section]) -> Vec<(String, String, u32)> {
    ifnames(running)
        .into_iter()
        .filter(|(_, ifname, _)| ifname.contains("-ap"))
        .map(|(section, ifname, radio)| {
            let channel: u32 = radio
                .get("channel")
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let freq = match radio.get("band") {
                Some("5g") => 5000 + 5 * channel,
                _ => 2407 + 5 * channel,
            };
            (section, ifname, freq)
        })
        .collect()
}

/// A section's options as netifd passes them: strings, `disabled` as a bool,
/// lists (and `network`) as arrays.
fn config_of(s: &Section) -> Value {
    let mut m = Map::new();
    for (k, _) in &s.values {
        if m.contains_key(k) {
            continue;
        }
        let v = if k == "disabled" {
            json!(s.get(k) == Some("1"))
        } else if s.is_list(k) || k == "network" {
            json!(s
                .all(k)
                .iter()
                .flat_map(|v| v.split_whitespace())
                .collect::<Vec<_>>())
        } else {
            json!(s.get(k))
        };
        m.insert(k.clone(), v);
    }
    Value::Object(m)
}

fn status_of(running: &[Section]) -> Value {
    let names = ifnames(running);
    let mut out = Map::new();
    for (_, radio) in radios(running) {
        let name = radio.name.clone().unwrap_or_default();
        let up = !disabled(radio);
        let interfaces: Vec<Value> = running
            .iter()
            .filter(|s| {
                s.kind == "wifi-iface" && s.get("device") == Some(name.as_str()) && !disabled(s)
            })
            .map(|vif| {
                let section = vif.name.clone().unwrap_or_default();
                let mut i = Map::new();
                i.insert("section".into(), json!(section));
                if let Some((_, ifname, _)) = names.iter().find(|(s, _, _)| *s == section) {
                    i.insert("ifname".into(), json!(ifname));
                }
                i.insert("config".into(), config_of(vif));
                i.insert("vlans".into(), json!([]));
                i.insert("stations".into(), json!([]));
                Value::Object(i)
            })
            .collect();
        out.insert(
            name,
            json!({
                "up": up,
                "pending": false,
                "autostart": true,
                "disabled": !up,
                "retry_setup_failed": false,
                "config": config_of(radio),
                "interfaces": interfaces,
            }),
        );
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::ubus::{Ubus, UbusError};
    use crate::system::uci::{Uci, UciCmd};

    const FIXTURE: &str = include_str!("../../fixtures/uci/etc-config-wireless");

    #[tokio::test]
    async fn fake_status_has_netifds_shape_and_follows_reloads_only() {
        let uci = FakeUci::with_package("wireless", FIXTURE);
        let ubus = FakeUbus::default();
        let wifi = FakeWifi::new(uci.clone(), ubus.clone());
        wifi.set_clients(
            "default_radio0",
            &["02:00:00:00:01:02", "02:00:00:00:01:03"],
        );
        let st = ubus
            .call("network.wireless", "status", &json!({}))
            .await
            .unwrap();
        let r0 = &st["radio0"];
        assert_eq!(r0["up"], true);
        assert_eq!(r0["pending"], false);
        assert_eq!(r0["config"]["band"], "2g");
        let ifs = r0["interfaces"].as_array().unwrap();
        assert_eq!(ifs[0]["section"], "default_radio0");
        assert_eq!(ifs[0]["ifname"], "phy0-ap0");
        assert_eq!(ifs[0]["config"]["network"], json!(["lan"]));
        assert_eq!(ifs[1]["ifname"], "phy0-ap1");
        assert_eq!(st["radio1"]["interfaces"][0]["ifname"], "phy1-ap0");
        let c = ubus
            .call("hostapd.phy0-ap0", "get_clients", &json!({}))
            .await
            .unwrap();
        assert_eq!(c["clients"].as_object().unwrap().len(), 2);
        assert_eq!(c["freq"], 2412);

        // Committed but not reloaded: netifd still runs the old configuration.
        uci.apply("wireless", &[UciCmd::set("wireless.radio0.disabled", "1")])
            .await
            .unwrap();
        let st = ubus
            .call("network.wireless", "status", &json!({"device": "radio0"}))
            .await
            .unwrap();
        assert_eq!(st["radio0"]["up"], true);
        assert!(st.get("radio1").is_none());

        // An unknown radio is accepted, as by OpenWrt's wifi; the reload applies all.
        wifi.reload(Some("radio9")).await.unwrap();
        let st = wifi.status();
        assert_eq!(st["radio0"]["up"], false);
        assert_eq!(st["radio0"]["disabled"], true);
        assert!(st["radio0"]["interfaces"][0].get("ifname").is_none());
        assert!(matches!(
            ubus.call("hostapd.phy0-ap0", "get_clients", &json!({}))
                .await
                .unwrap_err(),
            UbusError::NotFound(_)
        ));
        assert_eq!(wifi.reloads(), [Some("radio9".to_owned())]);

        wifi.set_failing(true);
        assert!(wifi.reload(None).await.is_err());
    }

    #[tokio::test]
    async fn real_wifi_reports_a_missing_program_and_refuses_odd_radios() {
        let wifi = RealWifi {
            program: "netpilot-no-such-wifi".into(),
            ..Default::default()
        };
        match wifi.reload(Some("radio0")).await {
            Err(WifiError::Process(e)) => assert!(e.is_not_found()),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            wifi.reload(Some("radio0 ; reboot")).await,
            Err(WifiError::BadRadio(_))
        ));
    }
}
