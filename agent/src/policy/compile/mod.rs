//! The pure compiler: desired state → NetPilot's own nftables table, the HTB
//! classes it steers traffic into and the filtering resolvers it redirects DNS to.
//! No I/O; the output is golden-tested text. [`compile`] walks the groups once and
//! hands each piece to its builder: [`table`] (nftables), [`shaper`] (tc) and
//! [`resolvers`] (dnsmasq instances).
//!
//! How traffic is classified (verified on this project's kernel and stock OpenWrt):
//! - Packets forwarded from the LAN bridge are looked up by source MAC in a verdict
//!   map that jumps to the device's group chain; unknown devices fall to the guest
//!   group. The group chain writes the group's slot into bits 16–23 of the conntrack
//!   mark (other bits are left to mwan3 and friends), so reply packets, whose
//!   destination MAC is not known yet at the forward hook, find their group again.
//! - Shaping needs no classifying tc filter (`fw` is missing here, `u32 match mark`
//!   matches everything): `meta priority set 4e50:N` makes HTB pick class 4e50:N
//!   directly (a qdisc with another handle, sqm-scripts' `1:`, finds no such class
//!   and ignores it). Download is shaped on each LAN bridge's egress, classified in
//!   the inet forward chain. Upload is shaped on NetPilot's ifb, which each LAN
//!   bridge's ingress is redirected to; that runs before any inet hook, so upload is
//!   classified in a `bridge` table's prerouting hook, on the bridge port, which
//!   runs before the bridge passes the frame up. The WAN device is left alone.
//! - Schedules are kernel rules (`meta day`, `meta hour`, guarded by `meta time`
//!   around the next DST change), so they hold while the agent is stopped. nft is run
//!   with `TZ=UTC0`, so the hours written here are the kernel's UTC hours.

pub mod resolvers;
pub mod shaper;
pub mod table;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

pub use resolvers::{DnsConfig, DnsPlan};
pub use shaper::{base_class, classid, Side, TcPlan};
pub use table::{element_key, mark_of, utc_datetime};

use super::model::{Desired, GroupId, Mac, GUEST_GROUP};
use super::schedule::{self, KernelSchedule};
use super::tz::Zone;
use crate::system::nft::{BRIDGE_FAMILY, FAMILY, TABLE};

/// The conntrack-mark bits NetPilot owns.
pub const CT_MASK: u32 = 0x00ff_0000;

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

/// The maps the bridge table shares with the inet table, element for element.
pub const BRIDGE_SETS: [&str; 2] = ["dev_group", "dev_moved"];

/// What the compiler needs besides the desired state.
#[derive(Debug, Clone)]
pub struct Context<'a> {
    /// Every LAN-side bridge (`br-lan`, `br-guest`): forward rules, the DNS
    /// redirect and the resolvers cover devices on each; the first is where
    /// download is shaped.
    pub lan_ifs: Vec<&'a str>,
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

impl<'a> Context<'a> {
    /// A plain compile: nothing pinned, no DNS enforcement, the kernel's clock on
    /// UTC. The engine sets every field; tools and tests start from this.
    pub fn new(lan_if: &'a str, wan_if: &'a str, zone: &'a Zone, now_unix: i64) -> Context<'a> {
        Context {
            lan_ifs: vec![lan_if],
            wan_if,
            zone,
            now_unix,
            kernel_minutes_west: 0,
            pinned: None,
            dns: None,
        }
    }
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
    /// The bridge table that classifies upload (`table bridge netpilot {…}`, its
    /// maps without elements); empty when no group limits upload. Its text is in
    /// `structure_digest`.
    pub bridge: String,
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
        use std::fmt::Write as _;
        let mut s = String::with_capacity(self.structure.len() + 64 * self.element_count());
        for family in [FAMILY, BRIDGE_FAMILY] {
            let _ = writeln!(s, "table {family} {TABLE} {{}}");
            let _ = writeln!(s, "delete table {family} {TABLE}");
        }
        s.push_str(&self.structure);
        s.push_str(&self.bridge);
        for (set, elems) in &self.elements {
            if !elems.is_empty() {
                table::push_elements(&mut s, "add", set, elems.iter());
            }
        }
        for (family, set, elems) in self.bridge_elements() {
            if !elems.is_empty() {
                table::push_family_elements(&mut s, family, "add", set, elems.iter());
            }
        }
        s
    }

    /// The bridge table's elements (those of the inet table's [`BRIDGE_SETS`]),
    /// when there is a bridge table.
    fn bridge_elements(&self) -> Vec<(&'static str, &'static str, &Arc<BTreeSet<String>>)> {
        if self.bridge.is_empty() {
            return Vec::new();
        }
        BRIDGE_SETS
            .iter()
            .filter_map(|set| Some((BRIDGE_FAMILY, *set, self.elements.get(set)?)))
            .collect()
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
        // Same structure digest, same bridge table (its text is in the digest).
        let families: &[&str] = if self.bridge.is_empty() {
            &[FAMILY]
        } else {
            &[FAMILY, BRIDGE_FAMILY]
        };
        for family in families {
            for set in ELEMENT_SETS {
                if *family == BRIDGE_FAMILY && !BRIDGE_SETS.contains(&set) {
                    continue;
                }
                let empty = Arc::new(BTreeSet::new());
                let new = self.elements.get(set).unwrap_or(&empty);
                let was = old.elements.get(set).unwrap_or(&empty);
                // A changed verdict is a delete of the old key plus an add of the new.
                let gone: Vec<&String> = was.difference(new).collect();
                if !gone.is_empty() {
                    let keys: Vec<String> =
                        gone.iter().map(|e| element_key(e).to_owned()).collect();
                    table::push_family_elements(&mut s, family, "delete", set, keys.iter());
                }
                let added: Vec<&String> = new.difference(was).collect();
                if !added.is_empty() {
                    table::push_family_elements(&mut s, family, "add", set, added.into_iter());
                }
            }
        }
        Some(s)
    }
}

pub fn compile(desired: &Desired, ctx: &Context<'_>) -> Result<Compiled, CompileError> {
    let guest_slot = *desired
        .slots
        .get(&GUEST_GROUP)
        .ok_or(CompileError::NoSlot(GUEST_GROUP))?;
    let dns = match ctx.dns {
        Some(d) => resolvers::plan(desired, d.config, &ctx.lan_ifs, d.previous),
        None => DnsPlan::default(),
    };

    let mut tc = TcPlan::default();
    let mut group_chains = String::new();
    let mut bridge_chains = String::new();
    let mut ct_group = Vec::new();
    let mut refresh_at: Option<i64> = None;
    let mut wanted: BTreeMap<Mac, u8> = BTreeMap::new();
    for (id, group) in &desired.groups {
        let slot = *desired.slots.get(id).ok_or(CompileError::NoSlot(*id))?;
        let policy = &group.policy;
        let sched = kernel_schedule(group, ctx);
        if let Some(t) = sched.refresh_at {
            refresh_at = Some(refresh_at.map_or(t, |r| r.min(t)));
        }
        let classes = shaper::classes(*id, slot, policy.bandwidth, &sched, &mut tc)?;
        ct_group.push(table::ct_group_element(slot));
        let rules = table::GroupRules {
            id: *id,
            slot,
            policy,
            sched: &sched,
            classes: &classes,
            dns_filtered: dns.instances.contains_key(&slot),
        };
        table::push_group_chains(&mut group_chains, &rules, ctx);
        table::push_bridge_chain(&mut bridge_chains, &rules);
        wanted.extend(group.devices.iter().map(|d| (d.mac, slot)));
    }

    let mut sets = table::Sets::default();
    table::dns_devices(&mut sets, &wanted, &dns, guest_slot);
    // A pin holds only while every chain its elements jump to is still compiled: a
    // group deleted while its devices sit in the live `dev_group` takes its chains
    // with it, and nft refuses a map that jumps to a chain that is gone (found by
    // schemathesis: DELETE /api/groups/{id} and sync-all failed with APPLY_FAILED
    // once the engine had compacted). Then `dev_group` is compiled whole again.
    let pinned = ctx.pinned.filter(|p| {
        p.assignment.values().all(|slot| {
            desired
                .groups
                .keys()
                .any(|id| desired.slots.get(id) == Some(slot))
        })
    });
    let (pin, moved) = table::device_groups(&mut sets, wanted, pinned, guest_slot);
    let whitelist_active = table::lists(&mut sets, desired);
    let bridge = if tc.up.is_empty() {
        String::new()
    } else {
        table::bridge_structure(guest_slot, &bridge_chains)
    };
    let (structure, structure_digest) = table::structure(
        &dns,
        guest_slot,
        &ct_group,
        whitelist_active,
        &group_chains,
        &bridge,
        ctx,
    );
    let elements = table::elements(sets, &pin, &dns);
    let digest = whole_digest(&structure, &elements, &pin, &tc, &dns);
    Ok(Compiled {
        structure,
        structure_digest,
        bridge,
        elements,
        tc,
        refresh_at,
        moved,
        dns,
        pin,
        digest,
    })
}

/// The group's schedules as kernel time windows in the router's zone.
fn kernel_schedule(group: &super::model::Group, ctx: &Context<'_>) -> KernelSchedule {
    let windows: Vec<_> = group
        .policy
        .schedules
        .iter()
        .map(|s| (s.window.clone(), s.action))
        .collect();
    if windows.is_empty() {
        return KernelSchedule {
            pieces: Vec::new(),
            refresh_at: None,
        };
    }
    schedule::compile(&windows, ctx.zone, ctx.now_unix, ctx.kernel_minutes_west)
}

/// Over everything the kernel will hold: equal digests, equal kernel state.
/// `dev_group` is identified by its assignment: the same pinned map, the same set.
fn whole_digest(
    structure: &str,
    elements: &BTreeMap<&'static str, Arc<BTreeSet<String>>>,
    pin: &Pinned,
    tc: &TcPlan,
    dns: &DnsPlan,
) -> String {
    let mut all = ring::digest::Context::new(&ring::digest::SHA256);
    let mut feed = |b: &[u8]| {
        all.update(&(b.len() as u64).to_le_bytes());
        all.update(b);
    };
    feed(structure.as_bytes());
    for (set, elems) in elements {
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
                "dns {slot} {} {} {:?} {:?}",
                s.port, p.key, s.interfaces, s.upstreams
            )
            .as_bytes(),
        );
    }
    hex8(all.finish().as_ref())
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

#[cfg(test)]
mod tests;
