//! The Wi-Fi model, pure: the wireless configuration read from `uci export`, the
//! validated requests (SSID, WPA passphrase with a redacted `Debug`), and the plan
//! that turns a request into `uci batch` commands plus the radios to reload.

use std::fmt;

use netpilot_proto::ErrorCode;

use crate::policy::model::Invalid;
use crate::system::uci::UciCmd;
use crate::uci_format::{self as uci, Section};

/// The UCI package the Wi-Fi feature owns.
pub const PACKAGE: &str = "wireless";
/// The network OpenWrt's default configuration puts its main APs on: requests
/// without `interface` change the APs on it (and APs with no network), never a
/// guest or IoT AP on another network.
pub const MAIN_NETWORK: &str = "lan";
pub const MAX_SSID_BYTES: usize = 32;

fn invalid(code: ErrorCode, message: impl Into<String>) -> Invalid {
    Invalid {
        code,
        message: message.into(),
    }
}

/// An SSID: 1–32 bytes of UTF-8 without control characters (a newline would end
/// the `ssid=` line of hostapd's configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ssid(String);

impl Ssid {
    pub fn parse(s: &str) -> Result<Ssid, Invalid> {
        if s.is_empty() {
            return Err(invalid(ErrorCode::InvalidSsid, "the SSID is empty"));
        }
        if s.len() > MAX_SSID_BYTES {
            return Err(invalid(
                ErrorCode::InvalidSsid,
                format!(
                    "the SSID is {} bytes of UTF-8; at most {MAX_SSID_BYTES} fit",
                    s.len()
                ),
            ));
        }
        if s.chars().any(char::is_control) {
            return Err(invalid(
                ErrorCode::InvalidSsid,
                "the SSID contains a control character (newline, tab, …)",
            ));
        }
        Ok(Ssid(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A WPA passphrase (8–63 printable ASCII) or raw PSK (64 hex digits). Never
/// printed: `Debug` and `Display` show `<redacted>`, and errors never quote it.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

impl fmt::Display for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Password {
    pub fn parse(s: &str) -> Result<Password, Invalid> {
        let bad = |why: &str| {
            invalid(
                ErrorCode::InvalidPassword,
                format!(
                    "{why}: a WPA password is 8 to 63 printable ASCII characters, or exactly 64 hex digits"
                ),
            )
        };
        if s.bytes().any(|b| b.is_ascii_control()) || s.chars().any(char::is_control) {
            return Err(bad("the password contains a control character"));
        }
        if !s.is_ascii() {
            return Err(bad("the password contains non-ASCII characters"));
        }
        match s.len() {
            0..=7 => Err(bad("the password is too short")),
            8..=63 => Ok(Password(s.to_owned())),
            64 if s.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(Password(s.to_owned())),
            64 => Err(bad("64 characters must all be hex digits")),
            _ => Err(bad("the password is too long")),
        }
    }

    /// A raw 256-bit PSK rather than a passphrase.
    pub fn is_hex_psk(&self) -> bool {
        self.0.len() == 64
    }

    /// The value, for the one place that writes it (the uci batch).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// What an interface's `encryption` option (`psk2+ccmp`, `sae-mixed`, …) means
/// for its passphrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// WPA/WPA2-PSK: passphrase or 64-hex PSK.
    Psk,
    /// WPA3-SAE, alone or mixed with WPA2: SAE has no raw-PSK form.
    Sae,
    /// Open, OWE, 802.1X (the key is a RADIUS secret) or WEP: no passphrase to set.
    NotApplicable,
}

pub fn key_kind(encryption: &str) -> KeyKind {
    let base = encryption.split('+').next().unwrap_or("");
    match base {
        "psk" | "psk2" | "psk-mixed" => KeyKind::Psk,
        "sae" | "sae-mixed" => KeyKind::Sae,
        _ => KeyKind::NotApplicable,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Radio {
    pub name: String,
    pub band: Option<String>,
    pub channel: Option<String>,
    pub htmode: Option<String>,
    pub enabled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iface {
    pub section: String,
    pub radio: String,
    pub mode: String,
    pub ssid: Option<String>,
    /// As configured; OpenWrt's default when absent is `none`.
    pub encryption: String,
    pub networks: Vec<String>,
    pub enabled: bool,
    pub has_key: bool,
    /// Held to skip a change to the same key; redacted like any password.
    key: Option<Password>,
}

impl Iface {
    pub fn is_ap(&self) -> bool {
        self.mode == "ap"
    }

    fn on_main_network(&self) -> bool {
        self.networks.is_empty() || self.networks.iter().any(|n| n == MAIN_NETWORK)
    }
}

/// The wireless package as the agent reads it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Wireless {
    pub radios: Vec<Radio>,
    pub ifaces: Vec<Iface>,
}

/// Band from `band`, else the older `hwmode` (`11a` is 5 GHz), else the channel.
fn band_of(s: &Section) -> Option<String> {
    if let Some(b) = s.get("band") {
        return Some(b.to_owned());
    }
    match s.get("hwmode") {
        Some("11a") => return Some("5g".into()),
        Some("11g" | "11b") => return Some("2g".into()),
        _ => {}
    }
    match s.get("channel").and_then(|c| c.parse::<u32>().ok()) {
        Some(1..=14) => Some("2g".into()),
        Some(_) => Some("5g".into()),
        None => None,
    }
}

impl Wireless {
    pub fn parse(export: &str) -> Result<Wireless, uci::ParseError> {
        let sections = uci::parse(export)?;
        let mut w = Wireless::default();
        for s in &sections {
            let Some(name) = s.name.clone() else {
                // Anonymous sections cannot be addressed by name; the agent only
                // changes named ones (OpenWrt names its defaults).
                continue;
            };
            let disabled = s.get("disabled") == Some("1");
            match s.kind.as_str() {
                "wifi-device" => w.radios.push(Radio {
                    name,
                    band: band_of(s),
                    channel: s.get("channel").map(str::to_owned),
                    htmode: s.get("htmode").map(str::to_owned),
                    enabled: !disabled,
                }),
                "wifi-iface" => w.ifaces.push(Iface {
                    section: name,
                    radio: s.get("device").unwrap_or_default().to_owned(),
                    mode: s.get("mode").unwrap_or("ap").to_owned(),
                    ssid: s.get("ssid").map(str::to_owned),
                    encryption: s.get("encryption").unwrap_or("none").to_owned(),
                    networks: s
                        .all("network")
                        .iter()
                        .flat_map(|v| v.split_whitespace())
                        .map(str::to_owned)
                        .collect(),
                    enabled: !disabled,
                    has_key: s.get("key").is_some_and(|k| !k.is_empty()),
                    key: s.get("key").map(|k| Password(k.to_owned())),
                }),
                _ => {}
            }
        }
        Ok(w)
    }

    pub fn radio(&self, name: &str) -> Option<&Radio> {
        self.radios.iter().find(|r| r.name == name)
    }

    fn check_radio(&self, radio: Option<&str>) -> Result<(), Invalid> {
        match radio {
            Some(r) if self.radio(r).is_none() => Err(invalid(
                ErrorCode::UnknownRadio,
                format!(
                    "no radio {r:?}; this router has {}",
                    self.radios
                        .iter()
                        .map(|r| r.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
            _ => Ok(()),
        }
    }

    /// The AP interfaces a request changes: `interface` alone, or the main-network
    /// APs of `radio` (every radio when absent).
    pub fn targets(
        &self,
        radio: Option<&str>,
        interface: Option<&str>,
    ) -> Result<Vec<&Iface>, Invalid> {
        self.check_radio(radio)?;
        if let Some(name) = interface {
            let i = self
                .ifaces
                .iter()
                .find(|i| i.section == name)
                .ok_or_else(|| {
                    invalid(
                        ErrorCode::UnknownInterface,
                        format!("no wireless interface {name:?}"),
                    )
                })?;
            if radio.is_some_and(|r| r != i.radio) {
                return Err(invalid(
                    ErrorCode::UnknownInterface,
                    format!("interface {name:?} is on radio {:?}", i.radio),
                ));
            }
            if !i.is_ap() {
                return Err(invalid(
                    ErrorCode::NoApInterface,
                    format!(
                        "interface {name:?} is in {} mode, not an access point",
                        i.mode
                    ),
                ));
            }
            return Ok(vec![i]);
        }
        let out: Vec<&Iface> = self
            .ifaces
            .iter()
            .filter(|i| i.is_ap() && i.on_main_network())
            .filter(|i| radio.is_none_or(|r| i.radio == r))
            .collect();
        if out.is_empty() {
            return Err(invalid(
                ErrorCode::NoApInterface,
                format!(
                    "no access point on network {MAIN_NETWORK}{}; name one with `interface`",
                    radio.map(|r| format!(" of {r}")).unwrap_or_default()
                ),
            ));
        }
        Ok(out)
    }
}

/// A validated change request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Enable {
        radio: Option<String>,
    },
    Disable {
        radio: Option<String>,
    },
    Ssid {
        ssid: Ssid,
        radio: Option<String>,
        interface: Option<String>,
    },
    Password {
        password: Password,
        radio: Option<String>,
        interface: Option<String>,
    },
}

impl Request {
    pub fn action(&self) -> &'static str {
        match self {
            Request::Enable { .. } => "enable",
            Request::Disable { .. } => "disable",
            Request::Ssid { .. } => "ssid",
            Request::Password { .. } => "password",
        }
    }

    pub fn password(&self) -> Option<&Password> {
        match self {
            Request::Password { password, .. } => Some(password),
            _ => None,
        }
    }
}

/// What applying a request takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Empty when the configuration already is as asked.
    pub cmds: Vec<UciCmd>,
    /// Radios or interface sections changed, for the answer and the audit log.
    pub targets: Vec<String>,
    /// `wifi reload` scope: one radio, or `None` for all.
    pub reload: Option<String>,
    /// For the audit log; never holds a password.
    pub detail: String,
}

fn scope(radios: &[&str]) -> Option<String> {
    let mut r: Vec<&str> = radios.to_vec();
    r.sort_unstable();
    r.dedup();
    match r.as_slice() {
        [one] => Some((*one).to_owned()),
        _ => None,
    }
}

pub fn plan(w: &Wireless, req: &Request) -> Result<Plan, Invalid> {
    match req {
        Request::Enable { radio } | Request::Disable { radio } => {
            w.check_radio(radio.as_deref())?;
            let enable = matches!(req, Request::Enable { .. });
            let radios: Vec<&Radio> = w
                .radios
                .iter()
                .filter(|r| radio.as_deref().is_none_or(|n| r.name == n))
                .collect();
            if radios.is_empty() {
                return Err(invalid(ErrorCode::UnknownRadio, "this router has no radio"));
            }
            let changed: Vec<&str> = radios
                .iter()
                .filter(|r| r.enabled != enable)
                .map(|r| r.name.as_str())
                .collect();
            // Like LuCI: an enabled radio has no `disabled` option at all (its
            // default is off), so enabling deletes it rather than writing '0'.
            let cmd = |r: &&str| {
                let path = format!("{PACKAGE}.{r}.disabled");
                if enable {
                    UciCmd::Delete { path }
                } else {
                    UciCmd::set(path, "1")
                }
            };
            Ok(Plan {
                cmds: changed.iter().map(cmd).collect(),
                targets: radios.iter().map(|r| r.name.clone()).collect(),
                reload: scope(&radios.iter().map(|r| r.name.as_str()).collect::<Vec<_>>()),
                detail: format!(
                    "{} {}",
                    if enable { "enable" } else { "disable" },
                    radios
                        .iter()
                        .map(|r| r.name.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            })
        }
        Request::Ssid {
            ssid,
            radio,
            interface,
        } => {
            let targets = w.targets(radio.as_deref(), interface.as_deref())?;
            Ok(Plan {
                cmds: targets
                    .iter()
                    .filter(|i| i.ssid.as_deref() != Some(ssid.as_str()))
                    .map(|i| UciCmd::set(format!("{PACKAGE}.{}.ssid", i.section), ssid.as_str()))
                    .collect(),
                targets: targets.iter().map(|i| i.section.clone()).collect(),
                reload: scope(&targets.iter().map(|i| i.radio.as_str()).collect::<Vec<_>>()),
                detail: format!(
                    "ssid {:?} on {}",
                    ssid.as_str(),
                    targets
                        .iter()
                        .map(|i| i.section.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            })
        }
        Request::Password {
            password,
            radio,
            interface,
        } => {
            let targets = w.targets(radio.as_deref(), interface.as_deref())?;
            for i in &targets {
                match key_kind(&i.encryption) {
                    KeyKind::Psk => {}
                    KeyKind::Sae if password.is_hex_psk() => {
                        return Err(invalid(
                            ErrorCode::InvalidPassword,
                            format!(
                                "interface {:?} uses WPA3 ({}), which has no 64-hex-digit key form; use an 8 to 63 character passphrase",
                                i.section, i.encryption
                            ),
                        ))
                    }
                    KeyKind::Sae => {}
                    KeyKind::NotApplicable => {
                        return Err(invalid(
                            ErrorCode::PasswordNotApplicable,
                            format!(
                                "interface {:?} uses encryption {:?}, which takes no WPA password; the agent keeps each interface's encryption mode",
                                i.section, i.encryption
                            ),
                        ))
                    }
                }
            }
            Ok(Plan {
                cmds: targets
                    .iter()
                    .filter(|i| i.key.as_ref() != Some(password))
                    .map(|i| UciCmd::set(format!("{PACKAGE}.{}.key", i.section), password.expose()))
                    .collect(),
                targets: targets.iter().map(|i| i.section.clone()).collect(),
                reload: scope(&targets.iter().map(|i| i.radio.as_str()).collect::<Vec<_>>()),
                detail: format!(
                    "password on {}",
                    targets
                        .iter()
                        .map(|i| i.section.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("../../fixtures/uci/etc-config-wireless");

    fn w() -> Wireless {
        Wireless::parse(FIXTURE).unwrap()
    }

    #[test]
    fn reads_the_fixture() {
        let w = w();
        assert_eq!(w.radios.len(), 2);
        assert_eq!(w.radios[1].band.as_deref(), Some("5g"));
        let guest = &w.ifaces[2];
        assert_eq!(
            (guest.mode.as_str(), guest.encryption.as_str()),
            ("ap", "none")
        );
        assert_eq!(guest.networks, ["guest"]);
        assert!(w.ifaces[0].has_key && !guest.has_key);
        // The key is held for comparison but never printed.
        assert!(!format!("{w:?}").contains("changeme123"));
    }

    #[test]
    fn ssid_validation_table() {
        let ok = [
            "OpenWrt",
            "it's \"home\"",
            "a",
            "Café ☕ 🚀🚀🚀🚀🚀",               // 26 bytes with emoji
            "🚀🚀🚀🚀🚀🚀🚀🚀",                 // exactly 32 bytes
            "0123456789abcdef0123456789abcdef", // 32 ASCII
            " spaced ",
        ];
        for s in ok {
            assert!(Ssid::parse(s).is_ok(), "{s:?} must be accepted");
        }
        let bad = [
            ("", "empty"),
            ("0123456789abcdef0123456789abcdef0", "33 bytes"),
            ("🚀🚀🚀🚀🚀🚀🚀🚀a", "33 bytes of emoji"),
            ("home\nset wireless.radio0.disabled='1'", "newline"),
            ("tab\there", "tab"),
            ("nul\0", "NUL"),
            ("del\u{7f}", "DEL"),
            ("c1\u{85}", "C1 control"),
        ];
        for (s, why) in bad {
            let e = Ssid::parse(s).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidSsid, "{why}");
        }
    }

    #[test]
    fn password_validation_table_never_quotes_the_input() {
        let hex64 = "0123456789abcdefABCDEF0123456789abcdef0123456789abcdef0123456789";
        for p in ["12345678", "it's a \"pass\" ~!", hex64, &"x".repeat(63)] {
            assert!(Password::parse(p).is_ok(), "{p:?}");
        }
        let bad = [
            "seven77",
            "",
            &"x".repeat(64),
            &"g".repeat(64),
            &"x".repeat(65),
            "pass\nword123",
            "pass\tword123",
            "pässwörd123",
            "password\u{7f}1",
        ];
        for p in bad {
            let e = Password::parse(p).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidPassword, "{p:?}");
            if p.len() >= 3 {
                assert!(!e.message.contains(p), "the message quotes the input: {e}");
            }
        }
    }

    #[test]
    fn encryption_decides_what_a_password_may_be() {
        let w = w();
        let hex = Password::parse(&"ab".repeat(32)).unwrap();
        let pass = Password::parse("new-secret-1").unwrap();
        let req = |password: &Password, interface: Option<&str>| Request::Password {
            password: password.clone(),
            radio: None,
            interface: interface.map(str::to_owned),
        };
        // sae-mixed (the fixture's main APs): no 64-hex form.
        let e = plan(&w, &req(&hex, None)).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidPassword);
        assert!(e.message.contains("WPA3"), "{e}");
        // The open guest AP takes no password.
        let e = plan(&w, &req(&pass, Some("guest"))).unwrap_err();
        assert_eq!(e.code, ErrorCode::PasswordNotApplicable);
        for (enc, kind) in [
            ("psk2+ccmp", KeyKind::Psk),
            ("psk-mixed+tkip+ccmp", KeyKind::Psk),
            ("sae", KeyKind::Sae),
            ("owe", KeyKind::NotApplicable),
            ("none", KeyKind::NotApplicable),
            ("wpa2+ccmp", KeyKind::NotApplicable),
            ("wep-open", KeyKind::NotApplicable),
        ] {
            assert_eq!(key_kind(enc), kind, "{enc}");
        }
        let p = plan(&w, &req(&pass, None)).unwrap();
        assert_eq!(p.targets, ["default_radio0", "default_radio1"]);
        assert_eq!(p.reload, None);
        assert!(!p.detail.contains("new-secret-1"));
        assert!(!format!("{p:?}").contains("new-secret-1"));
    }

    #[test]
    fn targets_radios_interfaces_and_no_ops() {
        let w = w();
        let ssid = |s: &str, radio: Option<&str>, interface: Option<&str>| Request::Ssid {
            ssid: Ssid::parse(s).unwrap(),
            radio: radio.map(str::to_owned),
            interface: interface.map(str::to_owned),
        };
        let p = plan(&w, &ssid("Home", Some("radio1"), None)).unwrap();
        assert_eq!(p.targets, ["default_radio1"]);
        assert_eq!(p.reload.as_deref(), Some("radio1"));
        assert_eq!(
            p.cmds,
            [UciCmd::set("wireless.default_radio1.ssid", "Home")]
        );
        // The guest AP is changed only when named.
        let p = plan(&w, &ssid("Home", Some("radio0"), None)).unwrap();
        assert_eq!(p.targets, ["default_radio0"]);
        let p = plan(&w, &ssid("Visitors", None, Some("guest"))).unwrap();
        assert_eq!(p.targets, ["guest"]);
        // Same SSID already: nothing to do.
        assert!(plan(&w, &ssid("OpenWrt", None, None))
            .unwrap()
            .cmds
            .is_empty());
        let e = plan(&w, &ssid("Home", Some("radio7"), None)).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownRadio);
        assert!(e.message.contains("radio0, radio1"), "{e}");
        let e = plan(&w, &ssid("Home", None, Some("nosuch"))).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownInterface);
        let e = plan(&w, &ssid("Home", Some("radio1"), Some("guest"))).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownInterface);

        let p = plan(&w, &Request::Disable { radio: None }).unwrap();
        assert_eq!(
            p.cmds,
            [
                UciCmd::set("wireless.radio0.disabled", "1"),
                UciCmd::set("wireless.radio1.disabled", "1")
            ]
        );
        assert!(plan(&w, &Request::Enable { radio: None })
            .unwrap()
            .cmds
            .is_empty());
        // Enabling deletes `disabled`, as LuCI does, instead of writing '0'.
        let mut off = w.clone();
        off.radios[1].enabled = false;
        let p = plan(
            &off,
            &Request::Enable {
                radio: Some("radio1".into()),
            },
        )
        .unwrap();
        assert_eq!(
            p.cmds,
            [UciCmd::Delete {
                path: "wireless.radio1.disabled".into()
            }]
        );
        assert_eq!(
            crate::system::uci::batch_script("wireless", &p.cmds).unwrap(),
            "delete wireless.radio1.disabled\n"
        );
        assert_eq!(
            crate::system::uci::batch_script(
                "wireless",
                &plan(
                    &w,
                    &Request::Disable {
                        radio: Some("radio1".into())
                    }
                )
                .unwrap()
                .cmds
            )
            .unwrap(),
            "set wireless.radio1.disabled='1'\n"
        );
        let e = plan(
            &w,
            &Request::Enable {
                radio: Some("wlan0".into()),
            },
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownRadio);
    }
}
