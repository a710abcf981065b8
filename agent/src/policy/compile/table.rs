//! The nftables half of the compiler: NetPilot's table as text — the structure
//! (chains, rules, declared sets) and the elements of the sets that change with
//! devices and lists, kept apart so those can change incrementally.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;

use super::resolvers::DnsPlan;
use super::shaper::{classid, GroupClasses, Side};
use super::{digest, Context, Pinned, BRIDGE_SETS, CT_MASK, ELEMENT_SETS};
use crate::policy::model::{Bandwidth, Desired, GroupId, Internet, ListKind, Mac, Policy, Target};
use crate::policy::schedule::{self, KernelSchedule, Restriction};
use crate::system::nft::{BRIDGE_FAMILY, FAMILY, TABLE};
use crate::system::tc::MAJOR;

/// The group's slot as it appears in the conntrack mark.
pub fn mark_of(slot: u8) -> u32 {
    (slot as u32) << 16
}

/// The `ct_group` element that sends replies of the group's connections to its
/// download chain.
pub fn ct_group_element(slot: u8) -> String {
    format!("0x{:08x} : goto g{slot}_down", mark_of(slot))
}

/// What one group's chains are made of.
pub struct GroupRules<'a> {
    pub id: GroupId,
    pub slot: u8,
    pub policy: &'a Policy,
    pub sched: &'a KernelSchedule,
    pub classes: &'a GroupClasses,
    /// The group has a filtering resolver: the ways around it are refused.
    pub dns_filtered: bool,
}

/// One group's two chains: `g<slot>_up` for what its devices send (marks the
/// connection, refuses what the policy forbids, picks the upload class) and
/// `g<slot>_down` for what they receive.
pub fn push_group_chains(chains: &mut String, g: &GroupRules<'_>, ctx: &Context<'_>) {
    let GroupRules {
        id,
        slot,
        policy,
        sched,
        classes,
        dns_filtered,
    } = *g;
    let mark = mark_of(slot);
    let base = classes.base;
    for side in [Side::Up, Side::Down] {
        let dir = match side {
            Side::Up => "up",
            Side::Down => "down",
        };
        let _ = writeln!(chains, "\tchain g{slot}_{dir} {{");
        let _ = writeln!(chains, "\t\t# group {id}");
        let verdict_block = match side {
            Side::Up => "reject with icmpx admin-prohibited",
            Side::Down => "drop",
        };
        if side == Side::Up {
            let _ = writeln!(
                chains,
                "\t\tct mark set ct mark and 0x{:08x} or 0x{mark:08x}",
                !CT_MASK
            );
            if dns_filtered {
                push_dns_refusals(chains, policy.dns.block_quic, ctx);
            }
        }
        if policy.internet == Internet::Block {
            let _ = writeln!(chains, "\t\t{verdict_block}");
        }
        // Upload is classified in the bridge table (see [`push_bridge_chain`]):
        // the ifb's HTB sees packets before this hook.
        if side == Side::Down && side.rate(base).is_some() {
            let _ = writeln!(
                chains,
                "\t\tmeta priority set {}",
                classid(classes.base_minor)
            );
        }
        if policy.internet == Internet::Allow {
            for p in &sched.pieces {
                let action = match p.restriction {
                    Restriction::Block => verdict_block.to_owned(),
                    Restriction::Limit { down_kbps, up_kbps } => {
                        let eff = base.tighter(Bandwidth { down_kbps, up_kbps });
                        if side == Side::Up || side.rate(eff) == side.rate(base) {
                            continue;
                        }
                        format!("meta priority set {}", classid(classes.class_of(eff)))
                    }
                };
                let _ = writeln!(chains, "\t\t{}{action}", piece_match(p));
            }
        }
        let _ = writeln!(chains, "\t}}\n");
    }
}

/// One group's chain in the bridge table: the upload class its devices' frames
/// get, by the same schedule pieces as its download class. Blocking stays in the
/// inet table; a blocked group's frames are simply not classified.
pub fn push_bridge_chain(chains: &mut String, g: &GroupRules<'_>) {
    let GroupRules {
        id,
        slot,
        policy,
        sched,
        classes,
        ..
    } = *g;
    let base = classes.base;
    let _ = writeln!(chains, "\tchain g{slot}_up {{\n\t\t# group {id}");
    if policy.internet == Internet::Allow {
        if base.up_kbps.is_some() {
            let _ = writeln!(
                chains,
                "\t\tmeta priority set {}",
                classid(classes.base_minor)
            );
        }
        for p in &sched.pieces {
            if let Restriction::Limit { down_kbps, up_kbps } = p.restriction {
                let eff = base.tighter(Bandwidth { down_kbps, up_kbps });
                if eff.up_kbps != base.up_kbps {
                    let _ = writeln!(
                        chains,
                        "\t\t{}meta priority set {}",
                        piece_match(p),
                        classid(classes.class_of(eff))
                    );
                }
            }
        }
    }
    let _ = writeln!(chains, "\t}}\n");
}

/// The bridge table, which gives upload its class: its prerouting hook sees a
/// device's frame on the bridge port, before the bridge passes it up to its own
/// ingress, where NetPilot's filter redirects it to the ifb whose HTB picks the
/// class by `meta priority`. (`meta ibrname` needs a module this kernel lacks, so
/// frames of every bridge are looked at; the priority only matters on the ifb, and
/// IPv4 forwarding resets it before the inet forward hook.) Device → group as in
/// the inet table, with the same element text (`goto g<slot>_up`).
pub fn bridge_structure(guest_slot: u8, bridge_chains: &str) -> String {
    let mut body = String::new();
    let _ = writeln!(body, "table {BRIDGE_FAMILY} {TABLE} {{");
    for name in BRIDGE_SETS {
        let _ = writeln!(
            body,
            "\tmap {name} {{\n\t\ttype ether_addr : verdict\n\t}}\n"
        );
    }
    let _ = writeln!(
        body,
        "\tchain prerouting {{\n\t\ttype filter hook prerouting priority filter; policy accept;\n\t\tether saddr vmap @dev_moved\n\t\tether saddr vmap @dev_group\n\t\tgoto g{guest_slot}_up\n\t}}\n"
    );
    body.push_str(bridge_chains);
    let mut s = body.trim_end().to_owned();
    s.push_str("\n}\n");
    s
}

/// In a filtered group's upload chain: the ways around its resolver are refused.
/// TCP gets a reset so clients give up at once and fall back to plain DNS.
fn push_dns_refusals(chains: &mut String, block_quic: bool, ctx: &Context<'_>) {
    let doh = ctx.dns.map(|d| &d.config.doh);
    // DNS over TLS, and DNS over QUIC on the same port.
    let _ = writeln!(chains, "\t\ttcp dport 853 reject with tcp reset");
    let _ = writeln!(chains, "\t\tudp dport 853 reject");
    if doh.is_some_and(|d| !d.v4.is_empty()) {
        let _ = writeln!(
            chains,
            "\t\tip daddr @doh_ip4 tcp dport 443 reject with tcp reset"
        );
        let _ = writeln!(chains, "\t\tip daddr @doh_ip4 udp dport 443 reject");
    }
    if doh.is_some_and(|d| !d.v6.is_empty()) {
        let _ = writeln!(
            chains,
            "\t\tip6 daddr @doh_ip6 tcp dport 443 reject with tcp reset"
        );
        let _ = writeln!(chains, "\t\tip6 daddr @doh_ip6 udp dport 443 reject");
    }
    if block_quic {
        let _ = writeln!(chains, "\t\tudp dport 443 reject");
    }
}

/// The redirect of filtered groups' port-53 traffic, whatever resolver it asks,
/// to the group's own resolver on the router; and the DoH address sets.
fn push_dns_chains(body: &mut String, dns: &DnsPlan, guest: Option<u8>, ctx: &Context<'_>) {
    if let Some(doh) = ctx.dns.map(|d| &d.config.doh) {
        for (name, ty, addrs) in [
            (
                "doh_ip4",
                "ipv4_addr",
                doh.v4.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            ),
            (
                "doh_ip6",
                "ipv6_addr",
                doh.v6.iter().map(|a| a.to_string()).collect(),
            ),
        ] {
            if !addrs.is_empty() {
                let _ = writeln!(
                    body,
                    "\tset {name} {{\n\t\ttype {ty}\n\t\telements = {{ {} }}\n\t}}\n",
                    addrs.join(", ")
                );
            }
        }
    }
    // dstnat - 5: before fw4's own dstnat rules (port forwards), which must not
    // see a filtered device's DNS first.
    let _ = writeln!(
        body,
        "\tchain dns_nat {{\n\t\ttype nat hook prerouting priority dstnat - 5; policy accept;\n\t\tiifname {} meta l4proto {{ tcp, udp }} th dport 53 jump dns_from_lan\n\t}}\n",
        ifnames(&ctx.lan_ifs)
    );
    let _ = writeln!(
        body,
        "\tchain dns_from_lan {{\n\t\tether saddr vmap @dns_dev"
    );
    if let Some(g) = guest {
        let _ = writeln!(body, "\t\tgoto dns_g{g}");
    }
    let _ = writeln!(body, "\t}}\n");
    for (slot, p) in &dns.instances {
        let _ = writeln!(
            body,
            "\tchain dns_g{slot} {{\n\t\t# group {}\n\t\tmeta l4proto {{ tcp, udp }} redirect to :{}\n\t}}\n",
            p.group, p.spec.port
        );
    }
}

/// An interface-name match for nft: `"br-lan"`, or an anonymous set of several
/// (`{ "br-lan", "br-guest" }`). One name stays a plain match, as it always was.
pub fn ifnames(names: &[&str]) -> String {
    match names {
        [one] => format!("\"{one}\""),
        many => {
            let quoted: Vec<String> = many.iter().map(|n| format!("\"{n}\"")).collect();
            format!("{{ {} }}", quoted.join(", "))
        }
    }
}

fn piece_match(p: &schedule::Piece) -> String {
    let mut s = String::new();
    if let Some(t) = p.not_before {
        let _ = write!(s, "meta time >= \"{}\" ", utc_datetime(t));
    }
    if let Some(t) = p.before {
        let _ = write!(s, "meta time < \"{}\" ", utc_datetime(t));
    }
    let _ = write!(
        s,
        "meta day {} meta hour \"{}\"-\"{}\" ",
        p.day,
        hms(p.from_sec),
        hms(p.to_sec)
    );
    s
}

fn hms(sec: u32) -> String {
    format!("{:02}:{:02}:{:02}", sec / 3600, sec / 60 % 60, sec % 60)
}

/// `YYYY-MM-DD HH:MM:SS` in UTC, as nft parses it under `TZ=UTC0`.
pub fn utc_datetime(unix: i64) -> String {
    let (y, m, d) = crate::runtime::clock::civil_from_days(unix.div_euclid(86_400));
    let secs = unix.rem_euclid(86_400) as u32;
    format!("{y:04}-{m:02}-{d:02} {}", hms(secs))
}

/// The elements of [`ELEMENT_SETS`] as they are built, indexed like it.
pub struct Sets(Vec<BTreeSet<String>>);

impl Default for Sets {
    fn default() -> Self {
        Sets(vec![BTreeSet::new(); ELEMENT_SETS.len()])
    }
}

impl Sets {
    fn get_mut(&mut self, name: &str) -> &mut BTreeSet<String> {
        let i = ELEMENT_SETS
            .iter()
            .position(|s| *s == name)
            .expect("known set");
        &mut self.0[i]
    }
}

/// Which devices' DNS is redirected: those of filtered groups, and when the guest
/// group filters, everyone else except the devices of unfiltered groups.
pub fn dns_devices(sets: &mut Sets, wanted: &BTreeMap<Mac, u8>, dns: &DnsPlan, guest_slot: u8) {
    if dns.instances.is_empty() {
        return;
    }
    let guest_filters = dns.instances.contains_key(&guest_slot);
    let target = sets.get_mut("dns_dev");
    for (mac, slot) in wanted {
        let verdict = if dns.instances.contains_key(slot) {
            if *slot == guest_slot {
                continue;
            }
            format!("goto dns_g{slot}")
        } else if guest_filters {
            "return".to_owned()
        } else {
            continue;
        };
        let mut e = String::with_capacity(32);
        mac.push_to(&mut e);
        e.push_str(" : ");
        e.push_str(&verdict);
        target.insert(e);
    }
}

fn push_dev_group(set: &mut BTreeSet<String>, mac: &Mac, slot: u8) {
    let mut e = String::with_capacity(32);
    mac.push_to(&mut e);
    e.push_str(" : goto g");
    e.push_str(&slot.to_string());
    e.push_str("_up");
    set.insert(e);
}

/// Device → group: the whole assignment into `dev_group` (no pin), or, pinned to a
/// live `dev_group`, only the differences into `dev_moved`. Returns the pin the
/// compiled state carries and how many devices moved.
pub fn device_groups(
    sets: &mut Sets,
    wanted: BTreeMap<Mac, u8>,
    pinned: Option<&Pinned>,
    guest_slot: u8,
) -> (Pinned, usize) {
    let (pin, moved): (Pinned, BTreeMap<Mac, u8>) = match pinned {
        None => {
            let mut set = BTreeSet::new();
            for (mac, slot) in &wanted {
                push_dev_group(&mut set, mac, *slot);
            }
            let mut bytes = Vec::with_capacity(wanted.len() * 7);
            for (mac, slot) in &wanted {
                bytes.extend_from_slice(&mac.0);
                bytes.push(*slot);
            }
            let pin = Pinned {
                assignment: Arc::new(wanted),
                dev_group: Arc::new(set),
                digest: digest(&[&bytes]),
            };
            (pin, BTreeMap::new())
        }
        Some(pinned) => {
            // Both sides sorted by MAC: one merge pass finds what differs.
            let mut moved = BTreeMap::new();
            let mut live = pinned.assignment.iter().peekable();
            for (mac, slot) in &wanted {
                while let Some((gone, was)) = live.next_if(|(m, _)| *m < mac) {
                    // Gone from every group: back to the guest group, as unknown.
                    if *was != guest_slot {
                        moved.insert(*gone, guest_slot);
                    }
                }
                match live.next_if(|(m, _)| *m == mac) {
                    Some((_, was)) if was == slot => {}
                    _ => {
                        moved.insert(*mac, *slot);
                    }
                }
            }
            for (gone, was) in live {
                if *was != guest_slot {
                    moved.insert(*gone, guest_slot);
                }
            }
            (pinned.clone(), moved)
        }
    };
    let target = sets.get_mut("dev_moved");
    for (mac, slot) in &moved {
        push_dev_group(target, mac, *slot);
    }
    (pin, moved.len())
}

/// The block, black and white lists into their address sets. Returns whether the
/// whitelist is in force (it is only while it holds something).
pub fn lists(sets: &mut Sets, desired: &Desired) -> bool {
    let mut whitelist_active = false;
    for (kind, targets) in &desired.lists {
        let prefix = match kind {
            ListKind::Block | ListKind::Black => "block",
            ListKind::White => {
                whitelist_active |= !targets.is_empty();
                "white"
            }
        };
        for t in targets {
            let (suffix, value) = match t {
                Target::Mac(m) => ("mac", m.to_string()),
                Target::Ip(std::net::IpAddr::V4(a)) => ("ip4", a.to_string()),
                Target::Ip(std::net::IpAddr::V6(a)) => ("ip6", a.to_string()),
            };
            sets.get_mut(&format!("{prefix}_{suffix}")).insert(value);
        }
    }
    whitelist_active
}

/// The element sets as the compiled state holds them; `dev_group` is the pin's.
pub fn elements(
    sets: Sets,
    pin: &Pinned,
    dns: &DnsPlan,
) -> BTreeMap<&'static str, Arc<BTreeSet<String>>> {
    let mut elements = BTreeMap::new();
    for (name, set) in ELEMENT_SETS.iter().zip(sets.0) {
        // Declared only while some group filters.
        if *name == "dns_dev" && dns.instances.is_empty() {
            continue;
        }
        let set = if *name == "dev_group" {
            pin.dev_group.clone()
        } else {
            Arc::new(set)
        };
        elements.insert(*name, set);
    }
    elements
}

/// The table's structure around the groups' chains, and its digest, which rides on
/// the comment of the first rule (nft's JSON listing shows rule comments but, in
/// 1.0.6, not the table's).
pub fn structure(
    dns: &DnsPlan,
    guest_slot: u8,
    ct_group: &[String],
    whitelist_active: bool,
    group_chains: &str,
    bridge: &str,
    ctx: &Context<'_>,
) -> (String, String) {
    let lan = ifnames(&ctx.lan_ifs);
    let mut body = String::new();
    let _ = writeln!(
        body,
        "\tmap dev_group {{\n\t\ttype ether_addr : verdict\n\t}}\n"
    );
    let _ = writeln!(
        body,
        "\tmap dev_moved {{\n\t\ttype ether_addr : verdict\n\t}}\n"
    );
    if !dns.instances.is_empty() {
        let _ = writeln!(
            body,
            "\tmap dns_dev {{\n\t\ttype ether_addr : verdict\n\t}}\n"
        );
        let guest_filters = dns.instances.contains_key(&guest_slot);
        push_dns_chains(&mut body, dns, guest_filters.then_some(guest_slot), ctx);
    }
    let _ = writeln!(
        body,
        "\tmap ct_group {{\n\t\ttype mark : verdict\n\t\telements = {{ {} }}\n\t}}\n",
        ct_group.join(", ")
    );
    for (name, ty) in [
        ("block_mac", "ether_addr"),
        ("block_ip4", "ipv4_addr"),
        ("block_ip6", "ipv6_addr"),
        ("white_mac", "ether_addr"),
        ("white_ip4", "ipv4_addr"),
        ("white_ip6", "ipv6_addr"),
    ] {
        let _ = writeln!(body, "\tset {name} {{\n\t\ttype {ty}\n\t}}\n");
    }
    // Before fw4's forward chain (priority filter): a reject here is final, an accept
    // only ends NetPilot's own processing.
    let _ = writeln!(
        body,
        "\tchain forward {{\n\t\ttype filter hook forward priority filter - 5; policy accept;\n\t\tiifname {lan} jump from_lan comment \"@DIGEST@\"\n\t\toifname {lan} jump to_lan\n\t}}\n"
    );
    let _ = writeln!(body, "\tchain from_lan {{");
    let _ = writeln!(
        body,
        "\t\tether saddr @block_mac reject with icmpx admin-prohibited"
    );
    let _ = writeln!(
        body,
        "\t\tip saddr @block_ip4 reject with icmpx admin-prohibited"
    );
    let _ = writeln!(
        body,
        "\t\tip6 saddr @block_ip6 reject with icmpx admin-prohibited"
    );
    if whitelist_active {
        let _ = writeln!(body, "\t\tjump whitelist");
    }
    if !bridge.is_empty() {
        // The bridge table's upload class has done its work on the ifb. IPv4
        // forwarding resets the priority from the TOS; IPv6 keeps it, and a
        // priority-banded qdisc on the WAN device (pfifo_fast, prio) would read
        // our class number as a band.
        let _ = writeln!(
            body,
            "\t\tmeta priority {MAJOR:x}:0-{MAJOR:x}:ffff meta priority set none"
        );
    }
    let _ = writeln!(body, "\t\tether saddr vmap @dev_moved");
    let _ = writeln!(body, "\t\tether saddr vmap @dev_group");
    let _ = writeln!(body, "\t\tgoto g{guest_slot}_up\n\t}}\n");
    if whitelist_active {
        let _ = writeln!(
            body,
            "\tchain whitelist {{\n\t\tether saddr @white_mac return\n\t\tip saddr @white_ip4 return\n\t\tip6 saddr @white_ip6 return\n\t\treject with icmpx admin-prohibited\n\t}}\n"
        );
    }
    let _ = writeln!(body, "\tchain to_lan {{");
    let _ = writeln!(body, "\t\tip daddr @block_ip4 drop");
    let _ = writeln!(body, "\t\tip6 daddr @block_ip6 drop");
    // Traffic to a device belongs to the connection's group, which the device's own
    // packets wrote into the conntrack mark. The first packet of a connection opened
    // from outside has none yet and passes; the device's answer is then judged by
    // its group (a blocked device's answer is rejected), and what follows is
    // classified. So no per-device address map is needed.
    let _ = writeln!(
        body,
        "\t\tct mark and 0x{CT_MASK:08x} vmap @ct_group\n\t}}\n"
    );
    body.push_str(group_chains);

    let structure_digest = digest(&[body.as_bytes(), bridge.as_bytes()]);
    let body = body.replacen("@DIGEST@", &format!("netpilot {structure_digest}"), 1);
    let mut structure = String::with_capacity(body.len() + 96);
    let _ = writeln!(structure, "table {FAMILY} {TABLE} {{");
    structure.push_str(body.trim_end());
    structure.push_str("\n}\n");
    (structure, structure_digest)
}

/// The key part of an element (`aa:… : goto g1` → `aa:…`).
pub fn element_key(e: &str) -> &str {
    e.split_once(" : ").map_or(e, |(k, _)| k)
}

pub fn push_elements<'a>(
    s: &mut String,
    verb: &str,
    set: &str,
    elems: impl Iterator<Item = &'a String>,
) {
    push_family_elements(s, FAMILY, verb, set, elems)
}

/// [`push_elements`] into the table of `family`.
pub fn push_family_elements<'a>(
    s: &mut String,
    family: &str,
    verb: &str,
    set: &str,
    elems: impl Iterator<Item = &'a String>,
) {
    let _ = write!(s, "{verb} element {family} {TABLE} {set} {{ ");
    for (i, e) in elems.enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        s.push_str(e);
    }
    s.push_str(" }\n");
}
