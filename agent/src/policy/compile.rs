//! The pure compiler: desired state → NetPilot's own nftables table and the HTB
//! classes it steers traffic into. No I/O; the output is golden-tested text.
//!
//! How traffic is classified (verified on this project's kernel and stock OpenWrt):
//! - Packets forwarded from the LAN bridge are looked up by source MAC in a verdict
//!   map that jumps to the device's group chain; unknown devices fall to the guest
//!   group. The group chain writes the group's slot into bits 16–23 of the conntrack
//!   mark (other bits are left to mwan3 and friends), so reply packets, whose
//!   destination MAC is not known yet at the forward hook, find their group again.
//! - Shaping needs no tc filter (`fw` is missing here, `u32 match mark` matches
//!   everything): `meta priority set 1:N` makes HTB pick class 1:N directly. Download
//!   is shaped on the LAN bridge's egress, upload on the WAN device's egress.
//! - Schedules are kernel rules (`meta day`, `meta hour`, guarded by `meta time`
//!   around the next DST change), so they hold while the agent is stopped. nft is run
//!   with `TZ=UTC0`, so the hours written here are the kernel's UTC hours.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::sync::Arc;

use super::dnsfilter::{self, DnsConfig, DnsPlan};
use super::model::{Bandwidth, Desired, GroupId, Internet, ListKind, Mac, Target, GUEST_GROUP};
use super::schedule::{self, KernelSchedule, Restriction};
use super::tz::Zone;

pub const TABLE: &str = "netpilot";
pub const FAMILY: &str = "inet";
/// The conntrack-mark bits NetPilot owns.
pub const CT_MASK: u32 = 0x00ff_0000;
/// tc handle major of NetPilot's root HTB qdiscs.
pub const TC_MAJOR: u16 = 1;
const BASE_CLASS: u16 = 0x100;
const SCHEDULE_CLASS: u16 = 0x1000;
const SCHEDULE_CLASSES_PER_GROUP: u16 = 64;

/// Sets and maps whose elements change with devices and lists; they are applied
/// incrementally when the rest of the table is unchanged.
pub const ELEMENT_SETS: [&str; 9] = [
    "dev_group",
    "dns_dev",
    "dev_moved",
    "block_mac",
    "block_ip4",
    "block_ip6",
    "white_mac",
    "white_ip4",
    "white_ip6",
];

/// What the compiler needs besides the desired state.
#[derive(Debug, Clone)]
pub struct Context<'a> {
    pub lan_if: &'a str,
    pub wan_if: &'a str,
    pub zone: &'a Zone,
    pub now_unix: i64,
    pub kernel_minutes_west: i32,
    /// The device → group-slot map live in `dev_group`, to be left as it is: the
    /// differences go to the small `dev_moved` map, looked up first. Adding an
    /// element is cheap, but with nft 1.0.6 deleting one fetches every element of
    /// the table (16 ms at 12,500 devices), so moves are adds; `None` compiles
    /// everything into `dev_group` (the engine compacts that way).
    pub pinned: Option<&'a Pinned>,
    /// DNS filtering; `None` compiles no DNS enforcement at all.
    pub dns: Option<DnsContext<'a>>,
}

#[derive(Debug, Clone, Copy)]
pub struct DnsContext<'a> {
    pub config: &'a DnsConfig,
    /// The plan live now, whose servers files are reused where nothing changed.
    pub previous: Option<&'a DnsPlan>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    #[error("group {0} has no mark slot")]
    NoSlot(GroupId),
    #[error("group {group}: its schedules need {needed} distinct bandwidth limits; at most {max}")]
    TooManyLimits {
        group: GroupId,
        needed: usize,
        max: u16,
    },
}

/// Which egress a class shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    /// LAN bridge egress: traffic to devices.
    Down,
    /// WAN device egress: traffic from devices.
    Up,
}

/// The HTB classes wanted per side: class minor → rate in kbit/s.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TcPlan {
    pub down: BTreeMap<u16, u32>,
    pub up: BTreeMap<u16, u32>,
}

impl TcPlan {
    pub fn side(&self, side: Side) -> &BTreeMap<u16, u32> {
        match side {
            Side::Down => &self.down,
            Side::Up => &self.up,
        }
    }
}

/// A live `dev_group`: device → group slot, and its elements as compiled. Shared,
/// so pinning a compile to it copies nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pinned {
    pub assignment: Arc<BTreeMap<Mac, u8>>,
    pub dev_group: Arc<BTreeSet<String>>,
    /// Digest of the assignment, computed once.
    pub digest: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    /// The table without the elements of [`ELEMENT_SETS`]; its digest is the
    /// comment of the first rule, so a live table with it has this structure.
    pub structure: String,
    pub structure_digest: String,
    /// Elements per set in nft syntax (`key` or `key : verdict`).
    pub elements: BTreeMap<&'static str, Arc<BTreeSet<String>>>,
    pub tc: TcPlan,
    /// When the rules must be compiled again (the next DST change).
    pub refresh_at: Option<i64>,
    /// What `dev_group` holds, to pin the next compile to.
    pub pin: Pinned,
    /// Entries in `dev_moved`.
    pub moved: usize,
    /// The filtering resolvers the rules redirect to.
    pub dns: DnsPlan,
    /// Digest over everything above: equal digests, equal kernel state.
    pub digest: String,
}

impl Compiled {
    /// The whole table as one `nft -f` transaction that replaces whatever table of
    /// ours exists (creating it first makes the delete valid when there is none).
    pub fn full_script(&self) -> String {
        let mut s = String::with_capacity(self.structure.len() + 64 * self.element_count());
        let _ = writeln!(s, "table {FAMILY} {TABLE} {{}}");
        let _ = writeln!(s, "delete table {FAMILY} {TABLE}");
        s.push_str(&self.structure);
        for (set, elems) in &self.elements {
            if !elems.is_empty() {
                push_elements(&mut s, "add", set, elems.iter());
            }
        }
        s
    }

    pub fn element_count(&self) -> usize {
        self.elements.values().map(|e| e.len()).sum()
    }

    /// An `nft -f` transaction turning `old`'s elements into ours, when both have
    /// the same structure. Deleting an element that is not there fails the whole
    /// transaction, which is how a live table that drifted is noticed.
    pub fn element_delta(&self, old: &Compiled) -> Option<String> {
        if old.structure_digest != self.structure_digest {
            return None;
        }
        let mut s = String::new();
        for set in ELEMENT_SETS {
            let empty = Arc::new(BTreeSet::new());
            let new = self.elements.get(set).unwrap_or(&empty);
            let was = old.elements.get(set).unwrap_or(&empty);
            // A changed verdict is a delete of the old key plus an add of the new.
            let gone: Vec<&String> = was.difference(new).collect();
            if !gone.is_empty() {
                let keys: Vec<String> = gone.iter().map(|e| element_key(e).to_owned()).collect();
                push_elements(&mut s, "delete", set, keys.iter());
            }
            let added: Vec<&String> = new.difference(was).collect();
            if !added.is_empty() {
                push_elements(&mut s, "add", set, added.into_iter());
            }
        }
        Some(s)
    }
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
        "\tchain dns_nat {{\n\t\ttype nat hook prerouting priority dstnat - 5; policy accept;\n\t\tiifname \"{}\" meta l4proto {{ tcp, udp }} th dport 53 jump dns_from_lan\n\t}}\n",
        ctx.lan_if
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

/// The key part of an element (`aa:… : goto g1` → `aa:…`).
pub fn element_key(e: &str) -> &str {
    e.split_once(" : ").map_or(e, |(k, _)| k)
}

fn push_elements<'a>(
    s: &mut String,
    verb: &str,
    set: &str,
    elems: impl Iterator<Item = &'a String>,
) {
    let _ = write!(s, "{verb} element {FAMILY} {TABLE} {set} {{ ");
    for (i, e) in elems.enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        s.push_str(e);
    }
    s.push_str(" }\n");
}

/// The group's slot as it appears in the conntrack mark.
pub fn mark_of(slot: u8) -> u32 {
    (slot as u32) << 16
}

pub fn base_class(slot: u8) -> u16 {
    BASE_CLASS + slot as u16
}

pub fn classid(minor: u16) -> String {
    format!("{TC_MAJOR:x}:{minor:x}")
}

pub fn compile(desired: &Desired, ctx: &Context<'_>) -> Result<Compiled, CompileError> {
    let mut tc = TcPlan::default();
    let mut chains = String::new();
    let mut ct_group = Vec::new();
    let mut refresh_at: Option<i64> = None;
    // Indexed like ELEMENT_SETS.
    let mut sets: Vec<BTreeSet<String>> = vec![BTreeSet::new(); ELEMENT_SETS.len()];
    let set_index = |name: &str| {
        ELEMENT_SETS
            .iter()
            .position(|s| *s == name)
            .expect("known set")
    };
    let guest_slot = *desired
        .slots
        .get(&GUEST_GROUP)
        .ok_or(CompileError::NoSlot(GUEST_GROUP))?;
    let mut wanted: BTreeMap<Mac, u8> = BTreeMap::new();
    let dns = match ctx.dns {
        Some(d) => dnsfilter::plan(desired, d.config, ctx.lan_if, d.previous),
        None => DnsPlan::default(),
    };

    for (id, group) in &desired.groups {
        let slot = *desired.slots.get(id).ok_or(CompileError::NoSlot(*id))?;
        let policy = &group.policy;
        let windows: Vec<_> = policy
            .schedules
            .iter()
            .map(|s| (s.window.clone(), s.action))
            .collect();
        let sched: KernelSchedule = if windows.is_empty() {
            KernelSchedule {
                pieces: Vec::new(),
                refresh_at: None,
            }
        } else {
            schedule::compile(&windows, ctx.zone, ctx.now_unix, ctx.kernel_minutes_west)
        };
        if let Some(t) = sched.refresh_at {
            refresh_at = Some(refresh_at.map_or(t, |r| r.min(t)));
        }

        // One class per distinct effective limit while a schedule is active.
        let base = policy.bandwidth;
        // A few at most: a list, in the order the week meets them.
        let mut limits: Vec<Bandwidth> = Vec::new();
        for p in &sched.pieces {
            if let Restriction::Limit { down_kbps, up_kbps } = p.restriction {
                let eff = base.tighter(Bandwidth { down_kbps, up_kbps });
                if eff != base && !limits.contains(&eff) {
                    limits.push(eff);
                }
            }
        }
        if limits.len() > SCHEDULE_CLASSES_PER_GROUP as usize {
            return Err(CompileError::TooManyLimits {
                group: *id,
                needed: limits.len(),
                max: SCHEDULE_CLASSES_PER_GROUP,
            });
        }
        let limit_class: Vec<(Bandwidth, u16)> = limits
            .iter()
            .enumerate()
            .map(|(k, b)| {
                (
                    *b,
                    SCHEDULE_CLASS + slot as u16 * SCHEDULE_CLASSES_PER_GROUP + k as u16,
                )
            })
            .collect();
        let class_of = |b: Bandwidth| {
            limit_class
                .iter()
                .find(|(l, _)| *l == b)
                .map(|(_, minor)| *minor)
                .expect("every limit has a class")
        };
        let base_minor = base_class(slot);
        // A class per direction only where traffic is steered into it: the base
        // rate, and a schedule's rate where it is tighter than the base.
        if let Some(k) = base.down_kbps {
            tc.down.insert(base_minor, k);
        }
        if let Some(k) = base.up_kbps {
            tc.up.insert(base_minor, k);
        }
        for (b, minor) in &limit_class {
            if let Some(k) = b.down_kbps.filter(|_| b.down_kbps != base.down_kbps) {
                tc.down.insert(*minor, k);
            }
            if let Some(k) = b.up_kbps.filter(|_| b.up_kbps != base.up_kbps) {
                tc.up.insert(*minor, k);
            }
        }

        let mark = mark_of(slot);
        ct_group.push(format!("0x{mark:08x} : goto g{slot}_down"));
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
            // Upload priorities only where NetPilot's WAN qdisc is; another device's
            // own 1: qdisc must not see our class numbers.
            let steer = match side {
                Side::Up => format!("oifname \"{}\" ", ctx.wan_if),
                Side::Down => String::new(),
            };
            let rate = |b: Bandwidth| match side {
                Side::Up => b.up_kbps,
                Side::Down => b.down_kbps,
            };
            if side == Side::Up {
                let _ = writeln!(
                    chains,
                    "\t\tct mark set ct mark and 0x{:08x} or 0x{mark:08x}",
                    !CT_MASK
                );
                if dns.instances.contains_key(&slot) {
                    push_dns_refusals(&mut chains, policy.dns.block_quic, ctx);
                }
            }
            if policy.internet == Internet::Block {
                let _ = writeln!(chains, "\t\t{verdict_block}");
            }
            if rate(base).is_some() {
                let _ = writeln!(
                    chains,
                    "\t\t{steer}meta priority set {}",
                    classid(base_minor)
                );
            }
            if policy.internet == Internet::Allow {
                for p in &sched.pieces {
                    let action = match p.restriction {
                        Restriction::Block => verdict_block.to_owned(),
                        Restriction::Limit { down_kbps, up_kbps } => {
                            let eff = base.tighter(Bandwidth { down_kbps, up_kbps });
                            if rate(eff) == rate(base) {
                                continue;
                            }
                            format!("{steer}meta priority set {}", classid(class_of(eff)))
                        }
                    };
                    let _ = writeln!(chains, "\t\t{}{action}", piece_match(p));
                }
            }
            let _ = writeln!(chains, "\t}}\n");
        }

        wanted.extend(group.devices.iter().map(|d| (d.mac, slot)));
    }

    // Which devices' DNS is redirected: those of filtered groups, and when the guest
    // group filters, everyone else except the devices of unfiltered groups.
    let guest_filters = dns.instances.contains_key(&guest_slot);
    if !dns.instances.is_empty() {
        let target = &mut sets[set_index("dns_dev")];
        for (mac, slot) in &wanted {
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

    let push = |set: &mut BTreeSet<String>, mac: &Mac, slot: u8| {
        let mut e = String::with_capacity(32);
        mac.push_to(&mut e);
        e.push_str(" : goto g");
        e.push_str(&slot.to_string());
        e.push_str("_up");
        set.insert(e);
    };
    let (pin, moved): (Pinned, BTreeMap<Mac, u8>) = match ctx.pinned {
        None => {
            let mut set = BTreeSet::new();
            for (mac, slot) in &wanted {
                push(&mut set, mac, *slot);
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
    let target = &mut sets[set_index("dev_moved")];
    for (mac, slot) in &moved {
        push(target, mac, *slot);
    }

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
            sets[set_index(&format!("{prefix}_{suffix}"))].insert(value);
        }
    }

    let lan = ctx.lan_if;
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
        push_dns_chains(&mut body, &dns, guest_filters.then_some(guest_slot), ctx);
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
        "\tchain forward {{\n\t\ttype filter hook forward priority filter - 5; policy accept;\n\t\tiifname \"{lan}\" jump from_lan comment \"@DIGEST@\"\n\t\toifname \"{lan}\" jump to_lan\n\t}}\n"
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
    body.push_str(&chains);

    // The digest rides on a rule comment: nft's JSON listing shows rule comments
    // but (1.0.6) not the table's.
    let structure_digest = digest(&[body.as_bytes()]);
    let body = body.replacen("@DIGEST@", &format!("netpilot {structure_digest}"), 1);
    let mut structure = String::with_capacity(body.len() + 96);
    let _ = writeln!(structure, "table {FAMILY} {TABLE} {{");
    structure.push_str(body.trim_end());
    structure.push_str("\n}\n");

    let mut elements: BTreeMap<&'static str, Arc<BTreeSet<String>>> = BTreeMap::new();
    for (name, set) in ELEMENT_SETS.iter().zip(sets) {
        // Declared only while some group filters.
        if *name == "dns_dev" && dns.instances.is_empty() {
            continue;
        }
        let set = if *name == "dev_group" {
            pin.dev_group.clone()
        } else {
            Arc::new(set)
        };
        elements.insert(name, set);
    }
    let mut all = ring::digest::Context::new(&ring::digest::SHA256);
    let mut feed = |b: &[u8]| {
        all.update(&(b.len() as u64).to_le_bytes());
        all.update(b);
    };
    feed(structure.as_bytes());
    // dev_group is identified by its assignment: the same pinned map, the same set.
    for (set, elems) in &elements {
        feed(set.as_bytes());
        if *set == "dev_group" {
            feed(pin.digest.as_bytes());
        } else {
            for e in elems.iter() {
                feed(e.as_bytes());
            }
        }
    }
    for (side, m) in [("down", &tc.down), ("up", &tc.up)] {
        for (minor, kbps) in m {
            feed(format!("{side} {minor} {kbps}").as_bytes());
        }
    }
    for (slot, p) in &dns.instances {
        let s = &p.spec;
        feed(
            format!(
                "dns {slot} {} {} {} {:?}",
                s.port, p.key, s.interface, s.upstreams
            )
            .as_bytes(),
        );
    }
    let whole = hex8(all.finish().as_ref());
    Ok(Compiled {
        structure,
        structure_digest,
        elements,
        tc,
        refresh_at,
        moved: moved.len(),
        dns,
        pin,
        digest: whole,
    })
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
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400) as u32;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {}", hms(secs))
}

fn digest(parts: &[&[u8]]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(&(p.len() as u64).to_le_bytes());
        ctx.update(p);
    }
    hex8(ctx.finish().as_ref())
}

fn hex8(d: &[u8]) -> String {
    d[..8].iter().map(|b| format!("{b:02x}")).collect()
}

impl fmt::Display for Desired {
    /// One line per group and list: what the router is asked to enforce.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rate = |k: Option<u32>| k.map_or("unlimited".to_owned(), |k| format!("{k} kbit/s"));
        for (id, g) in &self.groups {
            let slot = self.slots.get(id).copied().unwrap_or(0);
            write!(
                f,
                "group {id} {:?} (slot {slot}): {} device(s), down {}, up {}, internet {}",
                g.name,
                g.devices.len(),
                rate(g.policy.bandwidth.down_kbps),
                rate(g.policy.bandwidth.up_kbps),
                match g.policy.internet {
                    Internet::Allow => "allowed",
                    Internet::Block => "blocked",
                }
            )?;
            for s in &g.policy.schedules {
                let days: Vec<&str> = (0..7)
                    .filter(|i| s.window.days.0 & (1 << i) != 0)
                    .map(|i| super::model::DAY_NAMES[i])
                    .collect();
                write!(
                    f,
                    "; {} {}–{} {}",
                    days.join(","),
                    super::model::format_time(s.window.start_min),
                    super::model::format_time(s.window.end_min),
                    match s.action {
                        Restriction::Block => "block".to_owned(),
                        Restriction::Limit { down_kbps, up_kbps } =>
                            format!("limit down {} up {}", rate(down_kbps), rate(up_kbps)),
                    }
                )?;
            }
            writeln!(f)?;
        }
        for (kind, targets) in &self.lists {
            if targets.is_empty() {
                continue;
            }
            let shown: Vec<String> = targets.iter().take(8).map(|t| t.to_string()).collect();
            let more = targets.len().saturating_sub(8);
            write!(f, "{}: {}", kind.as_str(), shown.join(", "))?;
            if more > 0 {
                write!(f, " and {more} more")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::{Device, Group, Internet, Mac, Policy, Schedule};
    use crate::policy::ops;
    use crate::policy::schedule::{LocalWindow, Weekdays};

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
        compile(
            d,
            &Context {
                lan_if: "br-lan",
                wan_if: "wan0",
                zone: &zone,
                now_unix: now,
                kernel_minutes_west: 0,
                pinned: None,
                dns: None,
            },
        )
        .unwrap()
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
    ) -> super::super::model::DnsPolicy {
        let list = |l: &[&str]| {
            l.iter()
                .map(|s| crate::dns::domain::normalize(s).unwrap())
                .collect()
        };
        super::super::model::DnsPolicy {
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
        d.groups.get_mut(&GUEST_GROUP).unwrap().policy.dns =
            dns_policy(&[], &["guest.example"], &[]);
        ops::normalize(&mut d).unwrap();
        let zone = Zone::parse("UTC0").unwrap();
        let cfg = dns_config();
        let with = |previous| {
            compile(
                &d,
                &Context {
                    lan_if: "br-lan",
                    wan_if: "wan0",
                    zone: &zone,
                    now_unix: NOW,
                    kernel_minutes_west: 0,
                    pinned: None,
                    dns: Some(DnsContext {
                        config: &cfg,
                        previous,
                    }),
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
             add element inet netpilot dev_group { 02:4e:50:00:00:13 : goto g3_up }\n"
        );
        // Pinned to what is live, the move is one add to dev_moved; a device that
        // left every group is sent back to the guests there too.
        let zone = Zone::parse("UTC0").unwrap();
        let pinned_ctx = |pinned| Context {
            lan_if: "br-lan",
            wan_if: "wan0",
            zone: &zone,
            now_unix: NOW,
            kernel_minutes_west: 0,
            pinned: Some(pinned),
            dns: None,
        };
        let c = compile(&moved, &pinned_ctx(&a.pin)).unwrap();
        assert_eq!(c.pin, a.pin);
        assert_eq!(
            c.element_delta(&a).unwrap(),
            "add element inet netpilot dev_moved { 02:4e:50:00:00:13 : goto g3_up }\n"
        );
        let mut gone = home();
        gone.groups.get_mut(&4).unwrap().devices.clear();
        let d = compile(&gone, &pinned_ctx(&a.pin)).unwrap();
        assert_eq!(d.moved, 1);
        assert!(d.elements["dev_moved"].contains("02:4e:50:00:00:12 : goto g1_up"));
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

    // The test kit's deterministic generator: enough to explore the compiler's
    // input space.
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
            let check = crate::system::process::run_with_env(
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
}
