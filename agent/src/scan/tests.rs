use std::sync::Arc;

use serde_json::json;

use super::*;
use crate::policy::model::{Device, Group, Internet, ListKind, Policy};
use crate::policy::ops;
use crate::system::files::MemFiles;
use crate::system::ubus::FakeUbus;

const LEASES: &str = "1900000000 02:00:00:00:01:01 192.168.1.101 alice-laptop *\n\
                      1900000000 02:00:00:00:01:02 192.168.1.102 bob-phone *\n\
                      1900000000 02:00:00:00:01:05 192.168.1.105 printer *\n";

fn arp(rows: &[(&str, &str, &str)]) -> String {
    let mut s = String::from(
        "IP address       HW type     Flags       HW address            Mask     Device\n",
    );
    for (ip, mac, dev) in rows {
        s.push_str(&format!("{ip} 0x1 0x2 {mac} * {dev}\n"));
    }
    s
}

fn mac(s: &str) -> Mac {
    Mac::parse(s).unwrap()
}

fn hostapd(ubus: &FakeUbus, ifname: &str, freq: u64, clients: serde_json::Value) {
    ubus.answer(
        &format!("hostapd.{ifname}"),
        "get_clients",
        json!({"freq": freq, "clients": clients}),
    );
}

fn seen() -> Arc<Seen> {
    let store = crate::store::Store::open_at(&crate::store::Location::Memory).unwrap();
    Arc::new(Seen::open(store, 0).unwrap())
}

fn scanner(files: MemFiles, ubus: FakeUbus) -> Scanner {
    Scanner::new(
        Arc::new(files),
        Arc::new(ubus),
        NeighbourSource::ProcArp,
        Some("wan".into()),
        crate::runtime::clock::system_clock(),
        seen(),
    )
}

/// nlbwmon not answering.
fn no_usage() -> ScanUsage {
    ScanUsage {
        state: SourceState::Error("nlbw is not installed".into()),
        period: None,
        devices: HashMap::new(),
    }
}

/// Kids (group 3, internet blocked) holds bob's phone; the printer is blacklisted.
fn policy() -> Desired {
    let mut d = ops::initial();
    ops::sync_group(
        &mut d,
        Group {
            id: 3,
            name: "Kids".into(),
            devices: vec![Device {
                mac: mac("02:00:00:00:01:02"),
                ipv4: None,
                ipv6: None,
                name: Some("Bob's phone".into()),
            }],
            policy: Policy {
                internet: Internet::Block,
                ..Policy::default()
            },
        },
    )
    .unwrap();
    ops::list_add(
        &mut d,
        ListKind::Black,
        Target::Ip("192.168.1.105".parse().unwrap()),
    )
    .unwrap();
    d
}

#[tokio::test]
async fn merges_leases_neighbours_and_wireless_clients_by_mac() {
    let files = MemFiles::default().with(LEASES_PATH, LEASES).with(
        ARP_PATH,
        &arp(&[
            ("192.168.1.101", "02:00:00:00:01:01", "br-lan"),
            ("192.168.1.104", "02:00:00:00:01:04", "br-lan"),
            // The upstream gateway is not a LAN device.
            ("10.0.0.1", "02:00:00:00:99:01", "wan"),
        ]),
    );
    let ubus = FakeUbus::default();
    hostapd(
        &ubus,
        "phy1-ap0",
        5180,
        json!({"02:00:00:00:01:01": {"authorized": true, "signal": -51, "connected_time": 420}}),
    );
    hostapd(
        &ubus,
        "phy0-ap0",
        2437,
        json!({"02:00:00:00:01:02": {"authorized": true, "signal": -70, "connected_time": 30}}),
    );
    let s = scanner(files, ubus);
    let usage = ScanUsage {
        state: SourceState::Ok,
        period: Some("2026-12-01".into()),
        devices: HashMap::from([(
            mac("02:00:00:00:01:01"),
            DeviceBytes {
                today: RxTx {
                    bytes_rx: 10,
                    bytes_tx: 2,
                },
                period: RxTx {
                    bytes_rx: 500,
                    bytes_tx: 70,
                },
            },
        )]),
    };
    let out = s.scan(&policy(), usage, 1_800_000_000).await;

    let macs: Vec<String> = out.devices.iter().map(|d| d.mac.to_string()).collect();
    // Online first (by MAC), then the printer, known only from its lease.
    assert_eq!(
        macs,
        [
            "02:00:00:00:01:01",
            "02:00:00:00:01:02",
            "02:00:00:00:01:04",
            "02:00:00:00:01:05"
        ]
    );
    assert_eq!((out.total, out.online), (4, 3));
    let alice = &out.devices[0];
    assert_eq!(alice.hostname.as_deref(), Some("alice-laptop"));
    assert_eq!(alice.ip, Some("192.168.1.101".parse().unwrap()));
    assert_eq!(alice.interface.as_deref(), Some("phy1-ap0"));
    assert_eq!(alice.connection, "wireless");
    let w = alice.wireless.as_ref().unwrap();
    assert_eq!(
        (w.band, w.signal_dbm, w.connected_s),
        (Some("5g"), Some(-51), Some(420))
    );
    assert_eq!(alice.last_seen, Some(1_800_000_000));
    assert_eq!(alice.group.id, 0);
    assert!(!alice.blocked);
    // Named by its DHCP hostname; a 02:… MAC is a random one.
    assert_eq!(
        (alice.name.as_deref(), alice.name_source, alice.randomized),
        (Some("alice-laptop"), Some(NameSource::Hostname), true)
    );
    assert_eq!(alice.usage.unwrap().period.bytes_rx, 500);
    assert_eq!(alice.usage.unwrap().today.bytes_tx, 2);
    assert_eq!(out.usage_period.as_deref(), Some("2026-12-01"));
    assert_eq!(out.sources.usage, SourceState::Ok);

    let bob = &out.devices[1];
    assert_eq!(
        bob.group,
        GroupRef {
            id: 3,
            name: "Kids".into()
        }
    );
    assert!(bob.blocked);
    assert_eq!(bob.blocked_by, ["group 3"]);
    // The owner's name wins over the hostname the phone sends.
    assert_eq!(bob.name.as_deref(), Some("Bob's phone"));
    assert_eq!(bob.name_source, Some(NameSource::Owner));
    assert_eq!(bob.hostname.as_deref(), Some("bob-phone"));
    // nlbwmon answered without this device: no traffic, not "unknown".
    assert_eq!(bob.usage, Some(DeviceBytes::default()));
    assert_eq!(bob.wireless.as_ref().unwrap().band, Some("2g"));

    let tv = &out.devices[2];
    assert_eq!((tv.connection, tv.hostname.as_deref()), ("wired", None));
    assert_eq!((tv.name.as_deref(), tv.name_source), (None, None));
    assert_eq!(tv.interface.as_deref(), Some("br-lan"));

    let printer = &out.devices[3];
    assert!(!printer.online);
    assert_eq!(printer.last_seen, None);
    assert_eq!(printer.lease_expires, Some(1_900_000_000));
    assert_eq!(printer.blocked_by, ["blacklist"], "blocked by its address");
    assert_eq!(out.sources.wireless, SourceState::Ok);
}

#[tokio::test]
async fn missing_sources_degrade_and_say_so() {
    // No lease file, no hostapd (no ubus objects), only the neighbour table.
    let files = MemFiles::default().with(
        ARP_PATH,
        &arp(&[("192.168.1.104", "02:00:00:00:01:04", "br-lan")]),
    );
    let out = scanner(files, FakeUbus::default())
        .scan(&ops::initial(), no_usage(), 100)
        .await;
    assert_eq!(out.total, 1);
    // Without nlbwmon no device carries usage, and the sources say why.
    assert_eq!(out.devices[0].usage, None);
    assert!(matches!(&out.sources.usage, SourceState::Error(e) if e.contains("not installed")));
    assert_eq!(out.devices[0].connection, "unknown");
    assert_eq!(out.devices[0].group.id, 0);
    assert_eq!(out.sources.leases, SourceState::Missing);
    assert_eq!(out.sources.wireless, SourceState::Missing);
    assert_eq!(out.sources.neighbours, SourceState::Ok);

    // Nothing at all: an empty scan that says every source is missing.
    let out = scanner(MemFiles::default(), FakeUbus::default())
        .scan(&ops::initial(), no_usage(), 100)
        .await;
    assert_eq!(out.total, 0);
    assert_eq!(out.sources.neighbours, SourceState::Missing);
}

#[tokio::test]
async fn a_failing_hostapd_is_an_error_source_but_the_rest_is_listed() {
    let files = MemFiles::default().with(LEASES_PATH, LEASES);
    let ubus = FakeUbus::default();
    hostapd(&ubus, "phy0-ap0", 2412, json!({"02:00:00:00:01:01": {}}));
    ubus.on("hostapd.phy1-ap0", "get_clients", |_| {
        Err(crate::system::ubus::UbusError::Parse {
            object: "hostapd.phy1-ap0".into(),
            method: "get_clients".into(),
            message: "truncated".into(),
        })
    });
    let out = scanner(files, ubus)
        .scan(&ops::initial(), no_usage(), 100)
        .await;
    assert_eq!(out.total, 3);
    assert!(matches!(&out.sources.wireless, SourceState::Error(e) if e.contains("phy1-ap0")));
    assert_eq!(out.devices[0].connection, "wireless");
}

#[tokio::test]
async fn last_seen_is_remembered_after_a_device_goes_offline() {
    let ubus = FakeUbus::default();
    hostapd(&ubus, "phy0-ap0", 2412, json!({"02:00:00:00:01:01": {}}));
    let s = scanner(MemFiles::default().with(LEASES_PATH, LEASES), ubus.clone());
    let first = s.scan(&ops::initial(), no_usage(), 1000).await;
    assert!(first.devices[0].online);
    hostapd(&ubus, "phy0-ap0", 2412, json!({}));
    let later = s.scan(&ops::initial(), no_usage(), 2000).await;
    let alice = later
        .devices
        .iter()
        .find(|d| d.mac == mac("02:00:00:00:01:01"))
        .unwrap();
    assert!(!alice.online);
    assert_eq!(alice.last_seen, Some(1000));
}

#[test]
fn whitelisting_by_mac_clears_the_whitelist_reason_for_its_addresses() {
    let mut d = ops::initial();
    let m = mac("02:00:00:00:01:01");
    ops::list_add(&mut d, ListKind::White, Target::Mac(m)).unwrap();
    let ip: IpAddr = "192.168.1.101".parse().unwrap();
    assert!(policy_facts(&d, &m, &[ip]).blocked_by.is_empty());
    let other = policy_facts(&d, &mac("02:00:00:00:01:02"), &[]);
    assert_eq!(other.blocked_by, [crate::policy::model::NOT_WHITELISTED]);
}

#[tokio::test]
async fn the_real_ip_neighbour_table_parses() {
    // `ip` exists here: the real adapter's output must parse (the table may be
    // empty in a test sandbox, but it is read as the JSON source, not the fallback).
    let s = Scanner::new(
        Arc::new(MemFiles::default()),
        Arc::new(FakeUbus::default()),
        NeighbourSource::Ip {
            program: "ip".into(),
        },
        None,
        crate::runtime::clock::system_clock(),
        seen(),
    );
    let (_, state) = s.neighbours().await;
    assert_eq!(state, SourceState::Ok);
    // A missing `ip` falls back to /proc/net/arp (absent here: Missing, not an error).
    let s = Scanner::new(
        Arc::new(MemFiles::default()),
        Arc::new(FakeUbus::default()),
        NeighbourSource::Ip {
            program: "netpilot-no-such-ip".into(),
        },
        None,
        crate::runtime::clock::system_clock(),
        seen(),
    );
    assert_eq!(s.neighbours().await.1, SourceState::Missing);
}
