use super::*;
use crate::policy::model::{
    Bandwidth, Device, Group, Internet, ListKind, Mac, Policy, Schedule, Target,
};
use crate::policy::ops;
use crate::policy::schedule::{LocalWindow, Restriction, Weekdays};

/// Monday 2026-11-23 12:00:00 UTC.
const NOW: i64 = 1_795_435_200;

fn dev(last: u8, ip: Option<&str>, ip6: Option<&str>) -> Device {
    Device {
        mac: Mac([0x02, 0x4e, 0x50, 0, 0, last]),
        ipv4: ip.map(|s| s.parse().unwrap()),
        ipv6: ip6.map(|s| s.parse().unwrap()),
        name: Some(format!("dev {last}")),
    }
}

fn home() -> Desired {
    let mut d = ops::initial();
    let kids = Group {
        id: 3,
        name: "Kids".into(),
        devices: vec![
            dev(0x11, Some("192.168.77.11"), Some("fd77::11")),
            dev(0x13, None, None),
        ],
        policy: Policy {
            bandwidth: Bandwidth {
                down_kbps: Some(5000),
                up_kbps: Some(1000),
            },
            internet: Internet::Allow,
            schedules: vec![
                Schedule {
                    window: LocalWindow {
                        days: Weekdays(0b0011_1110),
                        start_min: 22 * 60,
                        end_min: 6 * 60 + 30,
                    },
                    action: Restriction::Block,
                },
                Schedule {
                    window: LocalWindow {
                        days: Weekdays(0b0100_0000),
                        start_min: 8 * 60,
                        end_min: 12 * 60,
                    },
                    action: Restriction::Limit {
                        down_kbps: Some(1000),
                        up_kbps: None,
                    },
                },
            ],
            dns: Default::default(),
        },
    };
    ops::sync_group(&mut d, kids).unwrap();
    let work = Group {
        id: 4,
        name: "Work \"laptops\"".into(),
        devices: vec![dev(0x12, Some("192.168.77.12"), None)],
        policy: Policy {
            internet: Internet::Block,
            ..Policy::default()
        },
    };
    ops::sync_group(&mut d, work).unwrap();
    ops::list_add(
        &mut d,
        ListKind::Block,
        Target::Mac(Mac([2, 0, 0, 0, 0, 0x99])),
    )
    .unwrap();
    ops::list_add(
        &mut d,
        ListKind::Black,
        Target::Ip("192.168.77.66".parse().unwrap()),
    )
    .unwrap();
    d
}

fn compile_in(d: &Desired, tz: &str, now: i64) -> Compiled {
    let zone = Zone::parse(tz).unwrap();
    compile(d, &Context::new("br-lan", "wan0", &zone, now)).unwrap()
}

/// Compares with `golden/<name>`; `NETPILOT_UPDATE_GOLDEN=1` rewrites it.
fn golden(name: &str, got: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/policy/golden")
        .join(name);
    if std::env::var_os("NETPILOT_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, got).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with NETPILOT_UPDATE_GOLDEN=1)",
            path.display()
        )
    });
    assert_eq!(got, want, "golden {name} differs");
}

#[test]
fn golden_home_in_utc() {
    let c = compile_in(&home(), "UTC0", NOW);
    golden("home-utc.nft", &c.full_script());
    assert_eq!(c.tc.down, BTreeMap::from([(0x102, 5000), (0x1080, 1000)]));
    assert_eq!(c.tc.up, BTreeMap::from([(0x102, 1000)]));
    assert_eq!(c.refresh_at, None);
}

fn dns_config() -> DnsConfig {
    DnsConfig {
        port_base: 5400,
        upstreams: vec!["127.0.0.1".into()],
        doh: crate::dns::categories::parse_doh("dns.example\n10.77.0.3\nfd77::3\n").unwrap(),
        cache_size: 1000,
    }
}

fn dns_policy(
    categories: &[&str],
    block: &[&str],
    allow: &[&str],
) -> crate::policy::model::DnsPolicy {
    let list = |l: &[&str]| {
        l.iter()
            .map(|s| crate::dns::domain::normalize(s).unwrap())
            .collect()
    };
    crate::policy::model::DnsPolicy {
        categories: categories.iter().map(|s| s.to_string()).collect(),
        block: list(block),
        allow: list(allow),
        block_quic: false,
    }
}

#[test]
fn golden_dns_filtering() {
    let mut d = home();
    let kids = d.groups.get_mut(&3).unwrap();
    kids.policy.dns = dns_policy(&["social"], &["example.com"], &["ok.example.com"]);
    kids.policy.dns.block_quic = true;
    // The guest group filters too: devices of unfiltered groups are let out.
    d.groups.get_mut(&GUEST_GROUP).unwrap().policy.dns = dns_policy(&[], &["guest.example"], &[]);
    ops::normalize(&mut d).unwrap();
    let zone = Zone::parse("UTC0").unwrap();
    let cfg = dns_config();
    let with = |previous| {
        compile(
            &d,
            &Context {
                dns: Some(DnsContext {
                    config: &cfg,
                    previous,
                }),
                ..Context::new("br-lan", "wan0", &zone, NOW)
            },
        )
        .unwrap()
    };
    let c = with(None);
    golden("dns.nft", &c.full_script());
    let kids_slot = d.slots[&3];
    let kids_dns = &c.dns.instances[&kids_slot];
    assert_eq!(kids_dns.spec.port, 5400 + kids_slot as u16);
    golden("dns-kids.servers", &kids_dns.spec.servers);
    assert_eq!(c.dns.instances.len(), 2, "kids and guests");
    // The unfiltered work group's device is let out of the guests' redirect.
    assert!(c.elements["dns_dev"].contains("02:4e:50:00:00:12 : return"));

    // Unchanged inputs reuse the servers file (the same allocation).
    let again = with(Some(&c.dns));
    assert!(std::sync::Arc::ptr_eq(
        &again.dns.instances[&kids_slot].spec.servers,
        &kids_dns.spec.servers
    ));
    assert_eq!(again.digest, c.digest);
    // Every list ends with the canaries; the resolver is asked for its own.
    assert!(kids_dns.spec.servers.ends_with(&format!(
        "server=/canary.netpilot.invalid/\nserver=/{}/\n",
        kids_dns.spec.canary
    )));
    assert_eq!(kids_dns.spec.label, "group 3");
}

/// Two LAN-side bridges (a guest network beside the LAN): the forward rules, the
/// DNS redirect and the resolvers cover both; nothing else changes.
#[test]
fn golden_two_bridges() {
    let mut d = home();
    d.groups.get_mut(&3).unwrap().policy.dns = dns_policy(&["social"], &["example.com"], &[]);
    ops::normalize(&mut d).unwrap();
    let zone = Zone::parse("UTC0").unwrap();
    let cfg = dns_config();
    let at = |lan_ifs: Vec<&'static str>| {
        compile(
            &d,
            &Context {
                dns: Some(DnsContext {
                    config: &cfg,
                    previous: None,
                }),
                lan_ifs,
                ..Context::new("br-lan", "wan0", &zone, NOW)
            },
        )
        .unwrap()
    };
    let two = at(vec!["br-lan", "br-guest"]);
    golden("two-bridges.nft", &two.full_script());
    for line in [
        "iifname { \"br-lan\", \"br-guest\" } jump from_lan",
        "oifname { \"br-lan\", \"br-guest\" } jump to_lan",
        "iifname { \"br-lan\", \"br-guest\" } meta l4proto { tcp, udp } th dport 53 jump dns_from_lan",
    ] {
        assert!(two.structure.contains(line), "{line}\n{}", two.structure);
    }
    let kids = &two.dns.instances[&d.slots[&3]].spec;
    assert_eq!(kids.interfaces, ["br-lan", "br-guest"]);
    // Download is shaped on every bridge (each gets the classes), so the class is
    // set whichever bridge the packet leaves by; `4e50:` is no other qdisc's major.
    assert!(
        two.structure.contains("\t\tmeta priority set 4e50:102\n"),
        "{}",
        two.structure
    );
    assert!(!two.structure.contains("oifname \"br-lan\" meta priority"));
    // One bridge: the plain match it always was, and another digest.
    let one = at(vec!["br-lan"]);
    assert!(one.structure.contains("iifname \"br-lan\" jump from_lan"));
    assert!(one.structure.contains("\t\tmeta priority set 4e50:102\n"));
    assert_ne!(one.digest, two.digest);
}

#[test]
fn no_dns_filter_no_dns_rules() {
    let mut d = home();
    d.groups.get_mut(&3).unwrap().policy.dns = dns_policy(&[], &[], &["ok.example.com"]);
    let c = compile_in(&d, "UTC0", NOW);
    assert!(c.dns.instances.is_empty());
    assert!(!c.structure.contains("dns"), "{}", c.structure);
    assert!(!c.elements.contains_key("dns_dev"));
}

#[test]
fn golden_whitelist_in_berlin_before_dst() {
    let mut d = home();
    ops::list_add(
        &mut d,
        ListKind::White,
        Target::Mac(Mac([0x02, 0x4e, 0x50, 0, 0, 0x11])),
    )
    .unwrap();
    ops::list_add(
        &mut d,
        ListKind::White,
        Target::Ip("fd77::12".parse().unwrap()),
    )
    .unwrap();
    // Friday 2027-03-26 12:00 UTC: summer time starts on Sunday the 28th.
    let c = compile_in(&d, "CET-1CEST,M3.5.0,M10.5.0/3", 1_806_062_400);
    golden("whitelist-berlin-dst.nft", &c.full_script());
    assert_eq!(c.refresh_at, Some(1_806_195_600), "2027-03-28 01:00 UTC");
}

#[test]
fn the_same_state_compiles_to_the_same_digest_and_a_move_is_an_element_delta() {
    let a = compile_in(&home(), "UTC0", NOW);
    assert_eq!(a, compile_in(&home(), "UTC0", NOW + 60));
    let mut moved = home();
    let d = moved.groups.get_mut(&3).unwrap().devices.remove(1);
    moved.groups.get_mut(&4).unwrap().devices.push(d);
    let b = compile_in(&moved, "UTC0", NOW);
    assert_eq!(a.structure_digest, b.structure_digest);
    assert_ne!(a.digest, b.digest);
    assert_eq!(
        b.element_delta(&a).unwrap(),
        "delete element inet netpilot dev_group { 02:4e:50:00:00:13 }\n\
         add element inet netpilot dev_group { 02:4e:50:00:00:13 : goto g3_up }\n\
         delete element bridge netpilot dev_group { 02:4e:50:00:00:13 }\n\
         add element bridge netpilot dev_group { 02:4e:50:00:00:13 : goto g3_up }\n"
    );
    // Pinned to what is live, the move is one add to dev_moved; a device that
    // left every group is sent back to the guests there too.
    let zone = Zone::parse("UTC0").unwrap();
    let pinned_ctx = |pinned| Context {
        pinned: Some(pinned),
        ..Context::new("br-lan", "wan0", &zone, NOW)
    };
    let c = compile(&moved, &pinned_ctx(&a.pin)).unwrap();
    assert_eq!(c.pin, a.pin);
    assert_eq!(
        c.element_delta(&a).unwrap(),
        "add element inet netpilot dev_moved { 02:4e:50:00:00:13 : goto g3_up }\n\
         add element bridge netpilot dev_moved { 02:4e:50:00:00:13 : goto g3_up }\n"
    );
    let mut gone = home();
    gone.groups.get_mut(&4).unwrap().devices.clear();
    let d = compile(&gone, &pinned_ctx(&a.pin)).unwrap();
    assert_eq!(d.moved, 1);
    assert!(d.elements["dev_moved"].contains("02:4e:50:00:00:12 : goto g1_up"));
    // A group deleted with devices in the pinned dev_group: no element may jump to
    // its chains any more, so the pin is dropped and dev_group compiled whole.
    let mut deleted = home();
    deleted.groups.remove(&4);
    let e = compile(&deleted, &pinned_ctx(&a.pin)).unwrap();
    let gone_slot = format!("goto g{}_up", home().slots[&4]);
    for set in ["dev_group", "dev_moved"] {
        assert!(
            e.elements[set].iter().all(|el| !el.ends_with(&gone_slot)),
            "{set} still jumps to the deleted group's chain: {:?}",
            e.elements[set]
        );
    }
    assert_eq!(
        e,
        compile_in(&deleted, "UTC0", NOW),
        "the same as an unpinned compile"
    );
    let mut limited = home();
    limited
        .groups
        .get_mut(&4)
        .unwrap()
        .policy
        .bandwidth
        .down_kbps = Some(100);
    assert!(compile_in(&limited, "UTC0", NOW)
        .element_delta(&a)
        .is_none());
}

// The test kit's deterministic generator: enough to explore the compiler's input
// space.
use netpilot_testkit::XorShift as Rng;

const NAMES: [&str; 6] = [
    "Kids",
    "a \"quoted\" name",
    "table inet fw4 { flush }",
    "Çocuklar 👪",
    "}; reject;",
    "x",
];
const ZONES: [&str; 5] = [
    "UTC0",
    "CET-1CEST,M3.5.0,M10.5.0/3",
    "NZST-12NZDT,M9.5.0,M4.1.0/3",
    "EST5EDT,M3.2.0,M11.1.0",
    "<+0330>-3:30",
];

/// A random state built only through the validating paths the API uses.
fn random_state(r: &mut Rng) -> Desired {
    use crate::policy::model::GroupIn;
    let mut d = ops::initial();
    let groups = r.below(6);
    for g in 0..groups {
        let id = if g == 0 { 0 } else { r.below(1000) as u32 + 1 };
        let devices: Vec<serde_json::Value> = (0..r.below(20))
            .map(|_| {
                let mut mac = (r.next_u64() & 0xfeff_ffff_ffff) | 0x0200_0000_0000;
                if mac == 0 {
                    mac = 2 << 40;
                }
                let mut v = serde_json::json!({"mac": format!("{:012x}", mac), "name": NAMES[r.below(6) as usize]});
                if r.below(2) == 0 {
                    v["ip"] = format!("10.{}.{}.{}", r.below(256), r.below(256), 1 + r.below(254)).into();
                }
                if r.below(3) == 0 {
                    v["ipv6"] = format!("fd00::{:x}:{:x}", r.below(65536), 1 + r.below(65535)).into();
                }
                v
            })
            .collect();
        let rate = |r: &mut Rng| -> serde_json::Value {
            match r.below(3) {
                0 => serde_json::Value::Null,
                _ => (8 + r.below(10_000_000 - 8)).into(),
            }
        };
        let schedules: Vec<serde_json::Value> = (0..r.below(4))
            .map(|_| {
                let days: Vec<&str> = crate::policy::model::DAY_NAMES
                    .iter()
                    .copied()
                    .filter(|_| r.below(2) == 0)
                    .collect();
                let days = if days.is_empty() { vec!["wed"] } else { days };
                let start = r.below(1440);
                let mut end = r.below(1441);
                if end % 1440 == start {
                    end = (start + 1) % 1440;
                }
                let action = if r.below(2) == 0 {
                    serde_json::json!("block")
                } else {
                    serde_json::json!({"limit": {"downloadKbps": 8 + r.below(100_000), "uploadKbps": rate(r)}})
                };
                serde_json::json!({"days": days, "start": format!("{:02}:{:02}", start / 60, start % 60),
                    "end": format!("{:02}:{:02}", end / 60, end % 60), "action": action})
            })
            .collect();
        let group = serde_json::json!({"id": id, "name": NAMES[r.below(6) as usize], "devices": devices,
            "policy": {"bandwidth": {"downloadKbps": rate(r), "uploadKbps": rate(r)},
                "internet": if r.below(5) == 0 { "block" } else { "allow" }, "schedules": schedules}});
        let Ok(group) = serde_json::from_value::<GroupIn>(group)
            .unwrap()
            .validate(None)
        else {
            continue;
        };
        ops::sync_group(&mut d, group).unwrap();
    }
    for _ in 0..r.below(4) {
        let kind = [ListKind::Block, ListKind::Black, ListKind::White][r.below(3) as usize];
        let t = match r.below(3) {
            0 => Target::Mac(Mac([2, 0, 0, 0, r.below(256) as u8, r.below(256) as u8])),
            1 => Target::Ip(
                format!("192.168.{}.{}", r.below(256), 1 + r.below(254))
                    .parse()
                    .unwrap(),
            ),
            _ => Target::Ip(format!("fd00::{:x}", 1 + r.below(65535)).parse().unwrap()),
        };
        ops::list_add(&mut d, kind, t).unwrap();
    }
    d
}

/// Whatever the store accepts, nft accepts: random valid states are checked with
/// `nft -c` (parse and validate against the kernel, change nothing). Needs root
/// and nft, as CI has.
#[tokio::test]
async fn netns_every_accepted_state_compiles_to_a_script_nft_accepts() {
    netpilot_testkit::require(&["nft"]);
    let mut r = Rng::new(0x9e37_79b9_7f4a_7c15);
    let mut checked = 0;
    for case in 0..150 {
        let d = random_state(&mut r);
        let tz = ZONES[r.below(ZONES.len() as u64) as usize];
        let now = NOW + r.below(400 * 86_400) as i64;
        let c = compile_in(&d, tz, now);
        let script = c.full_script();
        let check = crate::runtime::process::run_with_env(
            &["nft", "-c", "-f", "-"],
            Some(script.as_bytes()),
            std::time::Duration::from_secs(30),
            &[("TZ", "UTC0")],
        )
        .await;
        if let Err(e) = check {
            panic!("case {case} ({tz}, now {now}): nft refused: {e}\n{script}");
        }
        checked += 1;
    }
    assert_eq!(checked, 150);
}

/// Upload is classified in the bridge table only: the group's base class and a
/// schedule's tighter upload class, by the same time rule as download's; the inet
/// table sets no upload priority (it runs after the ifb), and nothing is
/// classified where no group limits upload.
#[test]
fn upload_classes_are_set_in_the_bridge_table_by_the_same_schedule() {
    let mut d = home();
    let kids = d.groups.get_mut(&3).unwrap();
    kids.policy.schedules[1].action = Restriction::Limit {
        down_kbps: Some(1000),
        up_kbps: Some(300),
    };
    let c = compile_in(&d, "UTC0", NOW);
    assert_eq!(c.tc.up.get(&0x1080), Some(&300), "{:?}", c.tc);
    assert!(
        c.bridge.contains(
            "\tchain g2_up {\n\t\t# group 3\n\t\tmeta priority set 4e50:102\n\t\tmeta day 6 meta hour \"08:00:00\"-\"11:59:59\" meta priority set 4e50:1080\n\t}"
        ),
        "{}",
        c.bridge
    );
    let inet_up = c.structure.split("chain g2_up {").nth(1).unwrap();
    let inet_up = inet_up.split("chain g2_down").next().unwrap();
    assert!(!inet_up.contains("meta priority"), "{inet_up}");
    // The blocked group's chain classifies nothing.
    assert!(
        c.bridge.contains("\tchain g3_up {\n\t\t# group 4\n\t}"),
        "{}",
        c.bridge
    );

    // No upload limit anywhere: no bridge table at all.
    let kids = d.groups.get_mut(&3).unwrap();
    kids.policy.bandwidth.up_kbps = None;
    kids.policy.schedules[1].action = Restriction::Limit {
        down_kbps: Some(1000),
        up_kbps: None,
    };
    let c = compile_in(&d, "UTC0", NOW);
    assert!(c.tc.up.is_empty() && c.bridge.is_empty(), "{}", c.bridge);
    assert!(!c.full_script().contains("table bridge netpilot {\n"));
}
