//! The pure core of applying a policy: from the compiled state wanted, the state
//! last applied and what was read from the system, the [`Plan`] — every step in
//! order, each with the actions that take it back — and, afterwards, what a
//! read-back must show. Also drift: what differs between a full observation and
//! the state wanted, in words. No I/O; [`super::execute`] carries a plan out.
//!
//! The order is make-before-break, so traffic is never steered at something that
//! does not exist: resolvers the new redirects point at, tc roots and classes the
//! new rules steer into, then the nftables change (one all-or-nothing transaction),
//! then what nothing points at any more is removed (tc classes, resolvers). A step
//! up to and including the nftables change that fails takes back every step before
//! it; a failure of a later one leaves the new rules in force and is reported.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::compile::{Compiled, DnsPlan, Side};
use crate::system::dnsmasq::{InstanceSpec, ObservedInstance};
use crate::system::nft::{self, ObservedTable, BRIDGE_FAMILY, FAMILY, TABLE};
use crate::system::tc::{ObservedShaper, RootOwner, TcOp, IFB, LEGACY_MAJOR, MAJOR};

/// The devices shaped: the LAN bridges' egress for download; the ifb their ingress
/// is redirected to for upload. The WAN device is only looked at (an older agent's
/// root is removed from it; what is there is reported), never shaped: it is
/// sqm-scripts' place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Devices {
    pub lan: Vec<String>,
    pub wan: String,
    pub ifb: String,
}

impl Devices {
    /// One LAN bridge, the WAN device and NetPilot's ifb.
    pub fn new(lan: &[&str], wan: &str) -> Devices {
        Devices {
            lan: lan.iter().map(|d| (*d).to_owned()).collect(),
            wan: wan.to_owned(),
            ifb: IFB.to_owned(),
        }
    }
}

/// What must be read before planning (or after applying, to verify). What the
/// last applied state shows unchanged is not read again: an element change at
/// 12,500 devices reads no tc and no resolver state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reads {
    /// NetPilot's table, whole (to know whether there is one to delete; for drift,
    /// everything in it).
    pub table: bool,
    /// Only the table's chain names: the cheap read-back after a transaction the
    /// kernel acknowledged.
    pub chains: bool,
    pub shapers: bool,
    pub resolvers: bool,
}

impl Reads {
    /// Everything, for drift detection.
    pub const ALL: Reads = Reads {
        table: true,
        chains: false,
        shapers: true,
        resolvers: true,
    };
}

/// What the shaped and looked-at devices have: roots, NetPilot's classes, ingress.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shapers {
    /// In the order of [`Devices::lan`].
    pub lan: Vec<ObservedShaper>,
    pub wan: ObservedShaper,
    pub ifb: ObservedShaper,
}

/// What was read from the system; `None` where it was not read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// `Some(None)`: there is no table of ours.
    pub table: Option<Option<ObservedTable>>,
    /// The bridge table, read with `table`; `Some(None)`: there is none.
    pub bridge: Option<Option<ObservedTable>>,
    /// `Some(None)`: there is no table of ours (or it has no chain).
    pub chains: Option<Option<BTreeSet<String>>>,
    pub shapers: Option<Shapers>,
    pub resolvers: Option<Vec<ObservedInstance>>,
}

/// Which part of the system a step changes; also the order steps run in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// Start or update a filtering resolver the new rules redirect to.
    MakeResolver,
    /// Roots and classes the new rules steer into.
    MakeShaper,
    /// NetPilot's table, in one transaction.
    Firewall,
    /// Classes and roots nothing steers into any more.
    BreakShaper,
    /// Resolvers nothing redirects to any more.
    StopResolver,
}

impl Phase {
    /// A failure here takes back every step before it; after the firewall
    /// change the new rules are in force and a failure is only reported.
    pub fn takes_back(self) -> bool {
        self <= Phase::Firewall
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::MakeResolver => "making a dns resolver",
            Phase::MakeShaper => "making tc classes",
            Phase::Firewall => "changing the nftables table",
            Phase::BreakShaper => "removing unused tc classes",
            Phase::StopResolver => "stopping an unused dns resolver",
        })
    }
}

/// How NetPilot's table changes, in one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NftChange<'a> {
    /// Replace whatever table of ours exists with this one.
    Table(&'a Compiled),
    /// Only set and map elements, the rest being the same; should the kernel
    /// refuse (the live table is not what was believed), the whole table.
    Elements { delta: String, whole: &'a Compiled },
    /// Nothing is to be enforced: remove the table.
    Delete,
}

impl NftChange<'_> {
    /// How the API reports it (`elements` or `table`).
    pub fn kind(&self) -> &'static str {
        match self {
            NftChange::Elements { .. } => "elements",
            NftChange::Table(_) | NftChange::Delete => "table",
        }
    }

    /// The transaction's text (for `Elements`, the incremental one).
    pub fn script(&self) -> String {
        match self {
            NftChange::Table(c) => c.full_script(),
            NftChange::Elements { delta, .. } => delta.clone(),
            // The bridge table is made first so its delete is valid without one.
            NftChange::Delete => format!(
                "delete table {FAMILY} {TABLE}\ntable {BRIDGE_FAMILY} {TABLE} {{}}\ndelete table {BRIDGE_FAMILY} {TABLE}\n"
            ),
        }
    }
}

/// One thing done to the system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<'a> {
    /// Make the resolver run with exactly this spec (idempotent).
    Ensure(&'a InstanceSpec),
    /// Stop a resolver and remove its files.
    Stop(String),
    /// tc operations, in order, stopping at the first failure.
    Tc(Vec<TcOp>),
    Nft(NftChange<'a>),
}

impl fmt::Display for Action<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Ensure(spec) => write!(f, "ensure dns resolver {}", spec.id),
            Action::Stop(id) => write!(f, "stop dns resolver {id}"),
            Action::Tc(ops) => write!(f, "{} tc operation(s)", ops.len()),
            Action::Nft(c) => write!(f, "nft {}", c.kind()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step<'a> {
    pub phase: Phase,
    pub action: Action<'a>,
    /// Takes the action back, run last to first; recorded before the action runs,
    /// so an action that fails half way is taken back too. Empty where nothing can
    /// be taken back (the state before is unknown) or nothing needs to be (a
    /// refused transaction changed nothing).
    pub undo: Vec<Action<'a>>,
}

/// Everything that applying one compiled state takes, as a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan<'a> {
    /// What is wanted; `None`: nothing to enforce.
    pub want: Option<&'a Compiled>,
    pub steps: Vec<Step<'a>>,
    /// What the read-back afterwards compares (chains always).
    pub verify: Reads,
}

impl Plan<'_> {
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The tc operations the plan runs (undo excluded).
    pub fn tc_ops(&self) -> usize {
        self.steps
            .iter()
            .map(|s| match &s.action {
                Action::Tc(ops) => ops.len(),
                _ => 0,
            })
            .sum()
    }
}

impl fmt::Display for Plan<'_> {
    /// One line per step, with its undo: what an apply is about to do, for the log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.steps.is_empty() {
            return writeln!(f, "nothing to change");
        }
        for step in &self.steps {
            write!(f, "{}: {}", step.phase, step.action)?;
            if !step.undo.is_empty() {
                let undo: Vec<String> = step.undo.iter().map(|a| a.to_string()).collect();
                write!(f, " (undo: {})", undo.join(", "))?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

const NO_INSTANCES: &DnsPlan = &DnsPlan {
    instances: BTreeMap::new(),
};

fn dns_of(c: Option<&Compiled>) -> &DnsPlan {
    c.map_or(NO_INSTANCES, |c| &c.dns)
}

fn tc_of(c: Option<&Compiled>, side: Side) -> &BTreeMap<u16, u32> {
    static NONE: BTreeMap<u16, u32> = BTreeMap::new();
    c.map_or(&NONE, |c| c.tc.side(side))
}

/// What must be read to plan the move from `last` (the state believed live; `None`
/// when unknown) to `want`.
pub fn reads(want: Option<&Compiled>, last: Option<&Compiled>) -> Reads {
    Reads {
        table: want.is_none(),
        chains: false,
        shapers: !matches!((want, last), (Some(w), Some(b)) if w.tc == b.tc),
        resolvers: !last.is_some_and(|b| b.dns == *dns_of(want)),
    }
}

/// The plan for putting `want` into the system, given the state last applied
/// (`None`: unknown, so everything observed is replaced) and what was read as
/// [`reads`] asked.
pub fn plan<'a>(
    want: Option<&'a Compiled>,
    last: Option<&'a Compiled>,
    observed: &Observed,
    devices: &Devices,
) -> Plan<'a> {
    let mut steps = Vec::new();
    if let Some(live) = &observed.resolvers {
        make_resolvers(want, last, live, &mut steps);
    }
    if let Some(shapers) = &observed.shapers {
        make_shapers(want, shapers, devices, &mut steps);
    }
    let table_present = observed.table.as_ref().map(|t| {
        t.is_some()
            || observed
                .bridge
                .as_ref()
                .is_some_and(|b: &Option<ObservedTable>| b.is_some())
    });
    if let Some(change) = nft_change(want, last, table_present) {
        steps.push(Step {
            phase: Phase::Firewall,
            action: Action::Nft(change),
            undo: Vec::new(),
        });
    }
    if let Some(shapers) = &observed.shapers {
        break_shapers(want, shapers, devices, &mut steps);
    }
    if let Some(live) = &observed.resolvers {
        for o in live {
            if !dns_of(want).instances.values().any(|p| p.spec.id == o.id) {
                steps.push(Step {
                    phase: Phase::StopResolver,
                    action: Action::Stop(o.id.clone()),
                    undo: Vec::new(),
                });
            }
        }
    }
    Plan {
        want,
        steps,
        verify: Reads {
            table: false,
            chains: true,
            shapers: observed.shapers.is_some(),
            resolvers: observed.resolvers.is_some(),
        },
    }
}

/// Every wanted resolver is ensured (it does nothing when already right). Its undo
/// puts back the spec last applied, or stops one that did not exist; one that was
/// running unknown to the last applied state cannot be put back, and the reconcile
/// after a failure repairs it.
fn make_resolvers<'a>(
    want: Option<&'a Compiled>,
    last: Option<&'a Compiled>,
    live: &[ObservedInstance],
    steps: &mut Vec<Step<'a>>,
) {
    for p in dns_of(want).instances.values() {
        let before = last.and_then(|b| b.dns.instances.values().find(|o| o.spec.id == p.spec.id));
        let known = live.iter().any(|o| o.id == p.spec.id);
        let undo = match before {
            Some(b) if b.spec != p.spec => vec![Action::Ensure(&b.spec)],
            Some(_) => Vec::new(),
            None if !known => vec![Action::Stop(p.spec.id.clone())],
            None => Vec::new(),
        };
        steps.push(Step {
            phase: Phase::MakeResolver,
            action: Action::Ensure(&p.spec),
            undo,
        });
    }
}

/// The classes of one shaped device: our root where there is none of ours (the
/// kernel's default or an older agent's `1:` is replaced; someone else's root is
/// never, and the device is left unshaped — [`unshaped`] names it), and every class
/// that is new or has another rate. Undo: a root we put there is deleted (with its
/// classes); under a root that was ours, each class goes back to its rate or away.
fn make_classes(
    dev: &str,
    classes: &BTreeMap<u16, u32>,
    live: &ObservedShaper,
    make: &mut Vec<TcOp>,
    undo: &mut Vec<Action<'_>>,
) {
    if classes.is_empty() || live.owner() == RootOwner::Foreign {
        return;
    }
    let dev = dev.to_owned();
    let ours = live.root_is_ours();
    if !ours {
        make.push(TcOp::ReplaceRoot { dev: dev.clone() });
        undo.push(Action::Tc(vec![TcOp::DeleteRoot {
            dev: dev.clone(),
            major: MAJOR,
        }]));
    }
    for (minor, kbps) in classes {
        let was = if ours { live.classes.get(minor) } else { None };
        if was == Some(kbps) {
            continue;
        }
        make.push(TcOp::SetClass {
            dev: dev.clone(),
            minor: *minor,
            kbps: *kbps,
        });
        if ours {
            undo.push(Action::Tc(vec![match was {
                Some(old) => TcOp::SetClass {
                    dev: dev.clone(),
                    minor: *minor,
                    kbps: *old,
                },
                None => TcOp::DeleteClass {
                    dev: dev.clone(),
                    minor: *minor,
                },
            }]));
        }
    }
}

/// Download classes on every LAN bridge whose root is free; for upload, the ifb
/// (made when missing), its classes, then the redirect into it from every LAN
/// bridge (into its ingress qdisc, or someone else's ingress qdisc beside their
/// filters). The redirect comes last, so traffic only reaches the ifb once its
/// classes are there; its undo comes first.
fn make_shapers<'a>(
    want: Option<&'a Compiled>,
    shapers: &Shapers,
    devices: &Devices,
    steps: &mut Vec<Step<'a>>,
) {
    let mut make = Vec::new();
    let mut undo = Vec::new();
    let down = tc_of(want, Side::Down);
    for (dev, live) in devices.lan.iter().zip(&shapers.lan) {
        make_classes(dev, down, live, &mut make, &mut undo);
    }
    let up = tc_of(want, Side::Up);
    if !up.is_empty() {
        let ifb = &devices.ifb;
        let mut live = shapers.ifb.clone();
        if live.missing {
            make.push(TcOp::AddIfb { dev: ifb.clone() });
            undo.push(Action::Tc(vec![TcOp::DeleteIfb { dev: ifb.clone() }]));
            // A new ifb has the kernel's default root; the undo above removes
            // everything made on it.
            live = ObservedShaper::default();
            let mut ignored = Vec::new();
            make_classes(ifb, up, &live, &mut make, &mut ignored);
        } else {
            make_classes(ifb, up, &live, &mut make, &mut undo);
        }
        for (dev, live) in devices.lan.iter().zip(&shapers.lan) {
            if live.ingress.ours {
                continue;
            }
            make.push(TcOp::AddRedirect {
                dev: dev.clone(),
                to: ifb.clone(),
                qdisc: !live.ingress.present,
            });
            undo.push(Action::Tc(vec![TcOp::DeleteRedirect {
                dev: dev.clone(),
                qdisc: !live.ingress.present,
            }]));
        }
    }
    if !make.is_empty() {
        steps.push(Step {
            phase: Phase::MakeShaper,
            action: Action::Tc(make),
            undo,
        });
    }
}

/// Our classes nothing steers into on `dev`, or our root when nothing is shaped
/// there; an older agent's root where ours has not replaced it.
fn break_classes(
    dev: &str,
    classes: &BTreeMap<u16, u32>,
    live: &ObservedShaper,
    ops: &mut Vec<TcOp>,
) {
    let dev = dev.to_owned();
    match live.owner() {
        RootOwner::Netpilot if classes.is_empty() => {
            ops.push(TcOp::DeleteRoot { dev, major: MAJOR })
        }
        RootOwner::Netpilot => {
            for minor in live.classes.keys().filter(|m| !classes.contains_key(m)) {
                ops.push(TcOp::DeleteClass {
                    dev: dev.clone(),
                    minor: *minor,
                });
            }
        }
        RootOwner::NetpilotLegacy if classes.is_empty() => ops.push(TcOp::DeleteRoot {
            dev,
            major: LEGACY_MAJOR,
        }),
        _ => {}
    }
}

/// What nothing steers into once the new rules are in: our classes and roots not
/// wanted, an older agent's root on the WAN, and without upload classes the
/// redirects and then the ifb.
fn break_shapers(
    want: Option<&Compiled>,
    shapers: &Shapers,
    devices: &Devices,
    steps: &mut Vec<Step<'_>>,
) {
    let mut ops = Vec::new();
    let down = tc_of(want, Side::Down);
    let up = tc_of(want, Side::Up);
    for (dev, live) in devices.lan.iter().zip(&shapers.lan) {
        break_classes(dev, down, live, &mut ops);
        if up.is_empty() && live.ingress.ours {
            ops.push(TcOp::DeleteRedirect {
                dev: dev.clone(),
                qdisc: live.ingress.others == 0,
            });
        }
    }
    if shapers.wan.legacy && !devices.lan.contains(&devices.wan) {
        ops.push(TcOp::DeleteRoot {
            dev: devices.wan.clone(),
            major: LEGACY_MAJOR,
        });
    }
    if !shapers.ifb.missing {
        if up.is_empty() {
            ops.push(TcOp::DeleteIfb {
                dev: devices.ifb.clone(),
            });
        } else {
            break_classes(&devices.ifb, up, &shapers.ifb, &mut ops);
        }
    }
    if !ops.is_empty() {
        steps.push(Step {
            phase: Phase::BreakShaper,
            action: Action::Tc(ops),
            undo: Vec::new(),
        });
    }
}

/// The LAN bridges that cannot be shaped because someone else's root qdisc is
/// there (download to their devices is not limited), in words.
pub fn unshaped(shapers: &Shapers, devices: &Devices) -> Vec<String> {
    devices
        .lan
        .iter()
        .zip(&shapers.lan)
        .filter(|(_, l)| l.owner() == RootOwner::Foreign)
        .map(|(dev, l)| {
            format!(
                "{dev}: someone else's root qdisc ({}) is there; download is not shaped on it",
                l.root_text()
            )
        })
        .collect()
}

/// The table change: none when the digest says the live table is already this
/// one, elements when only they differ, else the whole table; with nothing
/// wanted, a delete of the table when there is one.
fn nft_change<'a>(
    want: Option<&'a Compiled>,
    last: Option<&'a Compiled>,
    table_present: Option<bool>,
) -> Option<NftChange<'a>> {
    let Some(want) = want else {
        return (table_present == Some(true)).then_some(NftChange::Delete);
    };
    if let Some(last) = last {
        if last.digest == want.digest {
            return None;
        }
        if let Some(delta) = want.element_delta(last) {
            // Empty: only tc rates changed.
            return (!delta.is_empty()).then_some(NftChange::Elements { delta, whole: want });
        }
    }
    Some(NftChange::Table(want))
}

/// What a read-back after carrying out `plan` shows that differs from what it
/// wanted. The nftables transaction is all or nothing and the kernel
/// acknowledged it, so only its chains are compared (listing rules or elements
/// costs a fetch of every element); tc has no transactions, so every class is.
pub fn verify(plan: &Plan<'_>, back: &Observed, devices: &Devices) -> Vec<String> {
    let want = plan.want;
    let mut drift = Vec::new();
    match (want, back.chains.as_ref()) {
        (None, Some(Some(_))) => drift.push(format!("table {FAMILY} {TABLE} is still there")),
        (Some(_), Some(None)) => drift.push(format!("table {FAMILY} {TABLE} is missing")),
        (Some(w), Some(Some(have))) => {
            let expected = expected_chains(w);
            if *have != expected {
                drift.push(format!("chains {have:?}, expected {expected:?}"));
            }
        }
        _ => {}
    }
    drift.extend(shaper_and_resolver_drift(want, back, devices));
    drift
}

/// The chain names a read-back of both tables shows for `c` (the bridge table's
/// as `bridge <name>`).
pub fn expected_chains(c: &Compiled) -> BTreeSet<String> {
    let mut names = nft::set_of(nft::rule_counts(&c.structure).into_keys());
    names.extend(
        nft::rule_counts(&c.bridge)
            .into_keys()
            .map(|n| format!("{BRIDGE_FAMILY} {n}")),
    );
    names
}

/// What differs between a full observation ([`Reads::ALL`]) and `want` (nothing
/// wanted: no table, no NetPilot qdisc, no resolver).
pub fn drift(want: Option<&Compiled>, observed: &Observed, devices: &Devices) -> Vec<String> {
    let mut drift = Vec::new();
    match (want, observed.table.as_ref()) {
        (None, Some(Some(_))) => drift.push(format!(
            "table {FAMILY} {TABLE} exists but nothing is to be enforced"
        )),
        (Some(_), Some(None)) => drift.push(format!("table {FAMILY} {TABLE} is missing")),
        (Some(c), Some(Some(t))) => drift.extend(table_drift(c, t)),
        _ => {}
    }
    let bridge_wanted = want.filter(|c| !c.bridge.is_empty());
    match (bridge_wanted, observed.bridge.as_ref()) {
        (None, Some(Some(_))) => drift.push(format!(
            "table {BRIDGE_FAMILY} {TABLE} exists but no upload is shaped"
        )),
        (Some(_), Some(None)) => drift.push(format!("table {BRIDGE_FAMILY} {TABLE} is missing")),
        (Some(c), Some(Some(t))) => drift.extend(
            bridge_drift(c, t)
                .into_iter()
                .map(|d| format!("table {BRIDGE_FAMILY} {TABLE}: {d}")),
        ),
        _ => {}
    }
    drift.extend(shaper_and_resolver_drift(want, observed, devices));
    drift
}

/// What differs in the classes and resolvers that were read.
fn shaper_and_resolver_drift(
    want: Option<&Compiled>,
    observed: &Observed,
    devices: &Devices,
) -> Vec<String> {
    let mut drift = Vec::new();
    if let Some(shapers) = &observed.shapers {
        let down = tc_of(want, Side::Down);
        let up = tc_of(want, Side::Up);
        for (dev, live) in devices.lan.iter().zip(&shapers.lan) {
            // Someone else's root: reported in the status, not repairable by us.
            if live.owner() != RootOwner::Foreign {
                drift.extend(tc_drift(dev, down, live));
            }
            match (up.is_empty(), live.ingress.ours) {
                (false, false) => drift.push(format!("{dev}: the upload redirect is missing")),
                (true, true) => drift.push(format!(
                    "{dev}: the upload redirect is there but nothing is shaped"
                )),
                _ => {}
            }
        }
        if shapers.wan.legacy {
            drift.push(format!(
                "{}: an older NetPilot's root qdisc htb 1: is still there",
                devices.wan
            ));
        }
        match (up.is_empty(), shapers.ifb.missing) {
            (true, false) => drift.push(format!(
                "{}: ifb is there but nothing is shaped",
                devices.ifb
            )),
            (false, true) => drift.push(format!("{}: ifb is missing", devices.ifb)),
            (false, false) => drift.extend(tc_drift(&devices.ifb, up, &shapers.ifb)),
            (true, true) => {}
        }
    }
    if let Some(live) = &observed.resolvers {
        drift.extend(dns_drift(dns_of(want), live));
    }
    drift
}

/// Chains whose rule count differs from `rules` (chain → count), missing or extra.
fn chain_drift(rules: &BTreeMap<String, usize>, live: &ObservedTable) -> Vec<String> {
    let mut out = Vec::new();
    for (chain, n) in rules {
        let have = live.chains.get(chain).copied();
        if have != Some(*n) {
            out.push(format!(
                "chain {chain}: {} rules, expected {n}",
                have.map_or("no".into(), |h| h.to_string())
            ));
        }
    }
    for chain in live.chains.keys().filter(|c| !rules.contains_key(*c)) {
        out.push(format!("unexpected chain {chain}"));
    }
    out
}

/// Differences between the compiled bridge table and a read-back: its rules per
/// chain and the elements of the maps it shares with the inet table.
fn bridge_drift(want: &Compiled, live: &ObservedTable) -> Vec<String> {
    let mut out = chain_drift(&nft::rule_counts(&want.bridge), live);
    for set in crate::policy::compile::BRIDGE_SETS {
        let empty = BTreeSet::new();
        let elems = want.elements.get(set).map_or(&empty, |e| &**e);
        match live.elements.get(set) {
            None => out.push(format!("map {set} is missing")),
            Some(have) if have != elems => out.push(format!(
                "map {set}: {} element(s) missing, {} unexpected",
                elems.difference(have).count(),
                have.difference(elems).count()
            )),
            Some(_) => {}
        }
    }
    out
}

/// Differences between a compiled table and a read-back, in words.
pub fn table_drift(want: &Compiled, live: &ObservedTable) -> Vec<String> {
    let mut out = Vec::new();
    let comment = format!("netpilot {}", want.structure_digest);
    match live.comment.as_deref() {
        Some(c) if c == comment => {}
        // Its rule is gone too; the rule counts below say what else is.
        None => out.push("the digest rule is missing".into()),
        Some(c) => {
            out.push(format!("rule set {c:?} is live, {comment:?} is wanted"));
            return out;
        }
    }
    out.extend(chain_drift(&nft::rule_counts(&want.structure), live));
    let mut sets = nft::inline_elements(&want.structure);
    for (name, elems) in &want.elements {
        sets.insert((*name).to_owned(), BTreeSet::clone(elems));
    }
    for (name, elems) in &sets {
        match live.elements.get(name) {
            None => out.push(format!("set {name} is missing")),
            Some(have) if have != elems => {
                let missing = elems.difference(have).count();
                let extra = have.difference(elems).count();
                out.push(format!(
                    "set {name}: {missing} element(s) missing, {extra} unexpected"
                ));
            }
            Some(_) => {}
        }
    }
    out
}

/// Differences between the classes wanted on `dev` and what it has. A rate within
/// 0.5 % is the same: tc prints rates rounded.
pub fn tc_drift(dev: &str, want: &BTreeMap<u16, u32>, live: &ObservedShaper) -> Vec<String> {
    let mut out = Vec::new();
    if want.is_empty() {
        if live.root_is_ours() || live.legacy {
            out.push(format!(
                "{dev}: NetPilot's qdisc is present but nothing is shaped"
            ));
        }
        return out;
    }
    if !live.root_is_ours() {
        out.push(format!(
            "{dev}: NetPilot's HTB root qdisc is missing (root is {})",
            live.root_text()
        ));
        return out;
    }
    for (minor, kbps) in want {
        match live.classes.get(minor) {
            None => out.push(format!("{dev}: class {MAJOR:x}:{minor:x} is missing")),
            Some(k) if k.abs_diff(*kbps) * 200 > *kbps => out.push(format!(
                "{dev}: class {MAJOR:x}:{minor:x} is {k} kbit/s, expected {kbps}"
            )),
            Some(_) => {}
        }
    }
    for minor in live.classes.keys().filter(|m| !want.contains_key(m)) {
        out.push(format!("{dev}: unexpected class {MAJOR:x}:{minor:x}"));
    }
    out
}

/// Differences between the running filtering resolvers and the plan.
pub fn dns_drift(want: &DnsPlan, live: &[ObservedInstance]) -> Vec<String> {
    let mut drift = Vec::new();
    for p in want.instances.values() {
        let id = &p.spec.id;
        match live.iter().find(|o| &o.id == id) {
            None => drift.push(format!("dns resolver {id} is missing")),
            Some(o) if !o.running => drift.push(format!("dns resolver {id} is not running")),
            Some(o) if o.servers.as_deref() != Some(p.spec.servers.as_str()) => {
                drift.push(format!("dns resolver {id}: its block list differs"))
            }
            Some(o) if o.canary.is_some() => drift.push(format!(
                "dns resolver {id} ({}, port {}) answers the canary unfiltered: {}",
                p.group_label(),
                p.spec.port,
                o.canary.as_deref().unwrap_or_default()
            )),
            Some(_) => {}
        }
    }
    for o in live {
        if !want.instances.values().any(|p| p.spec.id == o.id) {
            drift.push(format!("dns resolver {} is not wanted", o.id));
        }
    }
    drift
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::compile::{compile, Context, DnsConfig, DnsContext};
    use crate::policy::fixtures::{filtered, kids};
    use crate::policy::ops;
    use crate::policy::tz::Zone;

    fn devices() -> Devices {
        Devices::new(&["br-lan"], "wan")
    }

    /// Group 3 with `macs` (last octet), limited to `kbps` both ways, filtering
    /// `blocked.test` when `filter`.
    fn state(macs: &[u8], kbps: Option<u32>, filter: bool) -> Compiled {
        let mut d = ops::initial();
        let mut group = kids(macs, kbps);
        if filter {
            group.policy.dns = filtered(macs, &["blocked.test"]).policy.dns;
        }
        ops::sync_group(&mut d, group).unwrap();
        let zone = Zone::utc();
        let config = DnsConfig::default();
        let ctx = Context {
            dns: Some(DnsContext {
                config: &config,
                previous: None,
            }),
            ..Context::new("br-lan", "wan", &zone, 1_795_435_200)
        };
        compile(&d, &ctx).unwrap()
    }

    /// What a device shows with our root and these classes.
    fn ours(classes: &[(u16, u32)]) -> ObservedShaper {
        ObservedShaper {
            root: Some(("htb".into(), format!("{MAJOR:x}:"))),
            classes: classes.iter().copied().collect(),
            ..ObservedShaper::default()
        }
    }

    /// A device with this root (kind, handle) and nothing of ours.
    fn rooted(kind: &str, handle: &str) -> ObservedShaper {
        ObservedShaper {
            root: Some((kind.into(), handle.into())),
            ..ObservedShaper::default()
        }
    }

    /// `o` with our redirect filter in its ingress qdisc.
    fn redirected(mut o: ObservedShaper) -> ObservedShaper {
        o.ingress.present = true;
        o.ingress.ours = true;
        o
    }

    /// A system shaping both ways: the LAN bridge `lan`, the ifb `ifb`, a WAN
    /// device with the kernel's default.
    fn shaping(lan: ObservedShaper, ifb: ObservedShaper) -> Shapers {
        Shapers {
            lan: vec![lan],
            wan: rooted("fq_codel", "0:"),
            ifb,
        }
    }

    fn lan(dev: &str) -> String {
        dev.to_owned()
    }

    fn running(id: &str, servers: &str) -> ObservedInstance {
        ObservedInstance {
            id: id.into(),
            pid: Some(42),
            running: true,
            conf: None,
            servers: Some(servers.into()),
            canary: None,
        }
    }

    /// Nothing of ours anywhere: a fresh boot.
    fn empty_system() -> Observed {
        Observed {
            table: Some(None),
            bridge: Some(None),
            chains: None,
            shapers: Some(Shapers {
                lan: vec![rooted("noqueue", "0:")],
                wan: rooted("fq_codel", "0:"),
                ifb: ObservedShaper::missing(),
            }),
            resolvers: Some(Vec::new()),
        }
    }

    fn tc(steps: &[Step<'_>], phase: Phase) -> Vec<TcOp> {
        steps
            .iter()
            .filter(|s| s.phase == phase)
            .flat_map(|s| match &s.action {
                Action::Tc(ops) => ops.clone(),
                _ => Vec::new(),
            })
            .collect()
    }

    #[test]
    fn what_is_read_follows_what_can_have_changed() {
        let a = state(&[1], Some(5000), true);
        let more = state(&[1, 2], Some(5000), true);
        let faster = state(&[1], Some(9000), true);
        // Unknown live state: everything but the table (a table is replaced
        // whatever it holds).
        assert_eq!(
            reads(Some(&a), None),
            Reads {
                table: false,
                chains: false,
                shapers: true,
                resolvers: true
            }
        );
        // One more device: elements only, so neither tc nor the resolvers are read.
        assert_eq!(reads(Some(&more), Some(&a)), Reads::default());
        assert!(reads(Some(&faster), Some(&a)).shapers);
        assert!(!reads(Some(&faster), Some(&a)).resolvers);
        // Nothing wanted: whether there is a table to delete matters.
        assert!(reads(None, Some(&a)).table);
    }

    #[test]
    fn a_first_apply_makes_resolver_then_classes_then_the_table_each_with_its_undo() {
        let a = state(&[1], Some(5000), true);
        let p = plan(Some(&a), None, &empty_system(), &devices());
        let phases: Vec<Phase> = p.steps.iter().map(|s| s.phase).collect();
        assert_eq!(
            phases,
            [Phase::MakeResolver, Phase::MakeShaper, Phase::Firewall]
        );
        let spec = &a.dns.instances.values().next().unwrap().spec;
        assert_eq!(p.steps[0].action, Action::Ensure(spec));
        // A resolver that did not exist is stopped again.
        assert_eq!(p.steps[0].undo, [Action::Stop(spec.id.clone())]);
        let root = |dev: &str| TcOp::ReplaceRoot { dev: dev.into() };
        let class = |dev: &str| TcOp::SetClass {
            dev: dev.into(),
            minor: 0x102,
            kbps: 5000,
        };
        // Download on the bridge; upload on a new ifb, which the bridge's ingress
        // is redirected to once its class is there. The WAN device is not touched.
        assert_eq!(
            p.steps[1].action,
            Action::Tc(vec![
                root("br-lan"),
                class("br-lan"),
                TcOp::AddIfb { dev: IFB.into() },
                root(IFB),
                class(IFB),
                TcOp::AddRedirect {
                    dev: lan("br-lan"),
                    to: IFB.into(),
                    qdisc: true
                },
            ])
        );
        // A root put there goes again, its classes with it; so does the ifb and
        // the redirect (undone last to first: the redirect first).
        assert_eq!(
            p.steps[1].undo,
            [
                Action::Tc(vec![TcOp::DeleteRoot {
                    dev: "br-lan".into(),
                    major: MAJOR
                }]),
                Action::Tc(vec![TcOp::DeleteIfb { dev: IFB.into() }]),
                Action::Tc(vec![TcOp::DeleteRedirect {
                    dev: "br-lan".into(),
                    qdisc: true
                }]),
            ]
        );
        assert_eq!(p.steps[2].action, Action::Nft(NftChange::Table(&a)));
        assert!(
            p.steps[2].undo.is_empty(),
            "a refused transaction changed nothing"
        );
        assert_eq!(p.tc_ops(), 6);
        assert_eq!(
            p.verify,
            Reads {
                table: false,
                chains: true,
                shapers: true,
                resolvers: true
            }
        );
    }

    #[test]
    fn a_moved_device_is_one_element_transaction_and_reads_nothing_else() {
        let a = state(&[1], Some(5000), false);
        let b = state(&[1, 2], Some(5000), false);
        let p = plan(Some(&b), Some(&a), &Observed::default(), &devices());
        assert_eq!(p.steps.len(), 1);
        match &p.steps[0].action {
            Action::Nft(NftChange::Elements { delta, whole }) => {
                // In both tables: the bridge table classifies the device's upload.
                assert_eq!(
                    delta,
                    "add element inet netpilot dev_group { 02:00:00:00:00:02 : goto g2_up }\n\
                     add element bridge netpilot dev_group { 02:00:00:00:00:02 : goto g2_up }\n"
                );
                assert_eq!(*whole, &b, "the fallback is the whole new table");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            p.verify,
            Reads {
                chains: true,
                ..Reads::default()
            }
        );
        // The same state again: nothing to do.
        assert!(plan(Some(&a), Some(&a), &Observed::default(), &devices()).is_empty());
    }

    #[test]
    fn a_new_rate_changes_classes_in_place_and_takes_back_to_the_old_rate() {
        let a = state(&[1], Some(5000), false);
        let faster = state(&[1], Some(9000), false);
        let observed = Observed {
            shapers: Some(shaping(
                redirected(ours(&[(0x102, 5000)])),
                ours(&[(0x102, 5000)]),
            )),
            ..Observed::default()
        };
        let p = plan(Some(&faster), Some(&a), &observed, &devices());
        assert_eq!(p.steps.len(), 1, "the table is unchanged: {:?}", p.steps);
        let set = |dev: &str, kbps| TcOp::SetClass {
            dev: dev.into(),
            minor: 0x102,
            kbps,
        };
        assert_eq!(
            p.steps[0].action,
            Action::Tc(vec![set("br-lan", 9000), set(IFB, 9000)])
        );
        assert_eq!(
            p.steps[0].undo,
            [
                Action::Tc(vec![set("br-lan", 5000)]),
                Action::Tc(vec![set(IFB, 5000)])
            ]
        );
    }

    #[test]
    fn a_changed_block_list_takes_back_to_the_list_before() {
        let a = state(&[1], None, true);
        let mut b = a.clone();
        let slot = *b.dns.instances.keys().next().unwrap();
        let planned = b.dns.instances.get_mut(&slot).unwrap();
        planned.spec.servers = std::sync::Arc::new("server=/other.test/\n".into());
        planned.key = "changed".into();
        let observed = Observed {
            resolvers: Some(vec![running(&planned.spec.id, "old")]),
            ..Observed::default()
        };
        let p = plan(Some(&b), Some(&a), &observed, &devices());
        let old = &a.dns.instances[&slot].spec;
        assert_eq!(p.steps[0].phase, Phase::MakeResolver);
        assert_eq!(p.steps[0].undo, [Action::Ensure(old)]);
    }

    #[test]
    fn a_reset_deletes_the_table_then_our_roots_then_the_resolvers() {
        let a = state(&[1], Some(5000), true);
        let id = a.dns.instances.values().next().unwrap().spec.id.clone();
        let observed = Observed {
            table: Some(Some(ObservedTable::default())),
            bridge: Some(Some(ObservedTable::default())),
            chains: None,
            // Someone else's root on the WAN (sqm-scripts') stays.
            shapers: Some(Shapers {
                wan: rooted("htb", "1:"),
                ..shaping(redirected(ours(&[(0x102, 5000)])), ours(&[(0x102, 5000)]))
            }),
            resolvers: Some(vec![running(&id, "")]),
        };
        assert!(reads(None, Some(&a)).table);
        let p = plan(None, Some(&a), &observed, &devices());
        let phases: Vec<Phase> = p.steps.iter().map(|s| s.phase).collect();
        assert_eq!(
            phases,
            [Phase::Firewall, Phase::BreakShaper, Phase::StopResolver]
        );
        assert_eq!(p.steps[0].action, Action::Nft(NftChange::Delete));
        assert_eq!(
            p.steps[0].action.to_string(),
            "nft table",
            "both tables in one transaction"
        );
        assert_eq!(
            tc(&p.steps, Phase::BreakShaper),
            [
                TcOp::DeleteRoot {
                    dev: "br-lan".into(),
                    major: MAJOR
                },
                TcOp::DeleteRedirect {
                    dev: "br-lan".into(),
                    qdisc: true
                },
                TcOp::DeleteIfb { dev: IFB.into() },
            ]
        );
        assert_eq!(p.steps[2].action, Action::Stop(id));
        assert!(p.steps.iter().all(|s| s.undo.is_empty()));
        // No table, nothing of ours: nothing to do.
        let clean = plan(None, None, &empty_system(), &devices());
        assert!(clean.is_empty(), "{:?}", clean.steps);
    }

    #[test]
    fn classes_nothing_steers_into_go_after_the_table_changed() {
        let a = state(&[1], Some(5000), false);
        let observed = Observed {
            shapers: Some(shaping(
                redirected(ours(&[(0x102, 5000), (0x1040, 700)])),
                ours(&[(0x102, 5000), (0x1041, 300)]),
            )),
            ..Observed::default()
        };
        let p = plan(Some(&a), None, &observed, &devices());
        let phases: Vec<Phase> = p.steps.iter().map(|s| s.phase).collect();
        assert_eq!(phases, [Phase::Firewall, Phase::BreakShaper]);
        assert_eq!(
            tc(&p.steps, Phase::BreakShaper),
            [
                TcOp::DeleteClass {
                    dev: "br-lan".into(),
                    minor: 0x1040
                },
                TcOp::DeleteClass {
                    dev: IFB.into(),
                    minor: 0x1041
                }
            ]
        );
        assert!(Phase::Firewall.takes_back() && !Phase::BreakShaper.takes_back());
    }

    #[test]
    fn the_read_back_compares_chains_classes_and_resolvers() {
        let a = state(&[1], Some(5000), true);
        let p = plan(Some(&a), None, &empty_system(), &devices());
        let spec = &a.dns.instances.values().next().unwrap().spec;
        let chains = expected_chains(&a);
        assert!(chains.contains("bridge prerouting"), "{chains:?}");
        let good = Observed {
            table: None,
            bridge: None,
            chains: Some(Some(chains.clone())),
            shapers: Some(shaping(
                redirected(ours(&[(0x102, 5000)])),
                ours(&[(0x102, 5001)]),
            )),
            resolvers: Some(vec![running(&spec.id, &spec.servers)]),
        };
        assert_eq!(verify(&p, &good, &devices()), Vec::<String>::new());
        let mut bad = good.clone();
        bad.chains = Some(None);
        bad.shapers.as_mut().unwrap().ifb = ours(&[(0x102, 4000)]);
        bad.resolvers = Some(vec![running(&spec.id, "stale")]);
        assert_eq!(
            verify(&p, &bad, &devices()),
            [
                "table inet netpilot is missing",
                "np-up: class 4e50:102 is 4000 kbit/s, expected 5000",
                "dns resolver g2: its block list differs"
            ]
        );
    }

    #[test]
    fn drift_names_what_differs_from_what_is_wanted() {
        let a = state(&[1], Some(5000), false);
        let nothing = Observed {
            table: Some(Some(ObservedTable::default())),
            ..empty_system()
        };
        assert_eq!(
            drift(None, &nothing, &devices()),
            ["table inet netpilot exists but nothing is to be enforced"]
        );
        let d = drift(Some(&a), &empty_system(), &devices());
        assert_eq!(
            d,
            [
                "table inet netpilot is missing",
                "table bridge netpilot is missing",
                "br-lan: NetPilot's HTB root qdisc is missing (root is noqueue 0:)",
                "br-lan: the upload redirect is missing",
                "np-up: ifb is missing"
            ]
        );
    }

    /// sqm-scripts on the WAN: its HTB `1:` root and its ingress (redirected to
    /// its own ifb) are never in a plan, whatever is applied or reset.
    #[test]
    fn sqm_on_the_wan_is_in_no_plan() {
        let a = state(&[1], Some(5000), false);
        let mut sqm = rooted("htb", "1:");
        sqm.ingress = crate::system::tc::Ingress {
            present: true,
            ours: false,
            others: 1,
        };
        let mut observed = empty_system();
        observed.shapers.as_mut().unwrap().wan = sqm.clone();
        let touches_wan = |p: &Plan<'_>| {
            p.steps.iter().any(|s| {
                std::iter::once(&s.action)
                    .chain(&s.undo)
                    .any(|a| matches!(a, Action::Tc(ops) if ops.iter().any(|o| o.dev() == "wan")))
            })
        };
        let p = plan(Some(&a), None, &observed, &devices());
        assert_eq!(p.tc_ops(), 6, "{p}");
        assert!(!touches_wan(&p), "{p}");
        // Reset, with everything of ours in place.
        let mut live = observed.clone();
        live.table = Some(Some(ObservedTable::default()));
        live.shapers = Some(Shapers {
            wan: sqm,
            ..shaping(redirected(ours(&[(0x102, 5000)])), ours(&[(0x102, 5000)]))
        });
        let p = plan(None, Some(&a), &live, &devices());
        assert_eq!(tc(&p.steps, Phase::BreakShaper).len(), 3, "{p}");
        assert!(!touches_wan(&p), "{p}");
        // Nothing to report about it either: it is not drift.
        let back = Observed {
            table: None,
            bridge: None,
            ..live
        };
        assert_eq!(drift(Some(&a), &back, &devices()), Vec::<String>::new());
    }

    /// Someone else's root on a LAN bridge is left there (download to it is not
    /// shaped, which `unshaped` reports); upload still is, through a redirect added
    /// beside someone else's ingress filter, which is left in place on removal.
    #[test]
    fn a_foreign_lan_root_is_left_unshaped_and_a_foreign_ingress_is_shared() {
        let a = state(&[1], Some(5000), false);
        let mut lan = rooted("htb", "1:");
        lan.ingress = crate::system::tc::Ingress {
            present: true,
            ours: false,
            others: 2,
        };
        let mut observed = empty_system();
        observed.shapers.as_mut().unwrap().lan = vec![lan.clone()];
        let p = plan(Some(&a), None, &observed, &devices());
        assert_eq!(
            tc(&p.steps, Phase::MakeShaper),
            [
                TcOp::AddIfb { dev: IFB.into() },
                TcOp::ReplaceRoot { dev: IFB.into() },
                TcOp::SetClass {
                    dev: IFB.into(),
                    minor: 0x102,
                    kbps: 5000
                },
                TcOp::AddRedirect {
                    dev: "br-lan".into(),
                    to: IFB.into(),
                    qdisc: false
                },
            ]
        );
        let shapers = observed.shapers.as_ref().unwrap();
        assert_eq!(
            unshaped(shapers, &devices()),
            ["br-lan: someone else's root qdisc (htb 1:) is there; download is not shaped on it"]
        );
        // Not drift (we cannot repair it); the status reports it.
        let mut back = empty_system();
        back.table = None;
        back.bridge = None;
        lan.ingress.ours = true;
        back.shapers = Some(Shapers {
            lan: vec![lan.clone()],
            wan: rooted("fq_codel", "0:"),
            ifb: ours(&[(0x102, 5000)]),
        });
        assert_eq!(drift(Some(&a), &back, &devices()), Vec::<String>::new());
        // Removing ours keeps their ingress qdisc and filters.
        let p = plan(None, Some(&a), &back, &devices());
        assert_eq!(
            tc(&p.steps, Phase::BreakShaper),
            [
                TcOp::DeleteRedirect {
                    dev: "br-lan".into(),
                    qdisc: false
                },
                TcOp::DeleteIfb { dev: IFB.into() },
            ]
        );
    }

    /// Every LAN bridge is shaped the same way (the LAN side is a list).
    #[test]
    fn every_lan_bridge_gets_the_classes_and_the_redirect() {
        let a = state(&[1], Some(5000), false);
        let two = Devices::new(&["br-lan", "br-guest"], "wan");
        let mut observed = empty_system();
        let sh = observed.shapers.as_mut().unwrap();
        sh.lan = vec![rooted("noqueue", "0:"), rooted("noqueue", "0:")];
        let p = plan(Some(&a), None, &observed, &two);
        let make = tc(&p.steps, Phase::MakeShaper);
        for dev in ["br-lan", "br-guest"] {
            assert!(
                make.contains(&TcOp::ReplaceRoot { dev: dev.into() }),
                "{make:?}"
            );
            assert!(
                make.contains(&TcOp::AddRedirect {
                    dev: dev.into(),
                    to: IFB.into(),
                    qdisc: true
                }),
                "{make:?}"
            );
        }
        assert_eq!(
            make.iter()
                .filter(|o| matches!(o, TcOp::AddIfb { .. }))
                .count(),
            1
        );
        let d = drift(Some(&a), &observed, &two);
        assert!(
            d.contains(&"br-guest: the upload redirect is missing".to_owned()),
            "{d:?}"
        );
    }

    /// An older agent's HTB `1:`: replaced by ours on the LAN bridge, removed from
    /// the WAN device (upload is shaped on the ifb now) after the new rules are in.
    #[test]
    fn an_older_agents_roots_are_migrated() {
        let a = state(&[1], Some(5000), false);
        let legacy = ObservedShaper {
            legacy: true,
            ..rooted("htb", "1:")
        };
        let mut observed = empty_system();
        let sh = observed.shapers.as_mut().unwrap();
        sh.lan = vec![legacy.clone()];
        sh.wan = legacy.clone();
        let p = plan(Some(&a), None, &observed, &devices());
        let make = tc(&p.steps, Phase::MakeShaper);
        assert_eq!(
            make[0],
            TcOp::ReplaceRoot {
                dev: "br-lan".into()
            }
        );
        assert_eq!(
            tc(&p.steps, Phase::BreakShaper),
            [TcOp::DeleteRoot {
                dev: "wan".into(),
                major: LEGACY_MAJOR
            }]
        );
        let d = drift(Some(&a), &observed, &devices());
        assert!(
            d.contains(&"wan: an older NetPilot's root qdisc htb 1: is still there".to_owned()),
            "{d:?}"
        );
        // Nothing wanted: an older root on the bridge goes too.
        let p = plan(None, None, &observed, &devices());
        assert_eq!(
            tc(&p.steps, Phase::BreakShaper),
            [
                TcOp::DeleteRoot {
                    dev: "br-lan".into(),
                    major: LEGACY_MAJOR
                },
                TcOp::DeleteRoot {
                    dev: "wan".into(),
                    major: LEGACY_MAJOR
                }
            ]
        );
    }
}
