//! The shaper seam: NetPilot's HTB roots and their classes, the ifb device that
//! carries upload shaping and the ingress redirect filters that feed it, changed
//! through `tc -batch` (and `ip link` for the ifb) and read back with `tc … show`.
//! tc has no transactions, so the engine orders the steps and restores on failure;
//! this module only runs them. [`FakeTc`] keeps the same state in memory.
//!
//! Everything of ours is recognisable, so nothing of anyone else's (sqm-scripts,
//! a hand-made qdisc) is ever replaced or deleted: our roots have the handle major
//! [`MAJOR`] (`4e50:`, "NP"; sqm-scripts and most tutorials use `1:`), our ingress
//! filter has the preference [`FILTER_PREF`], and the ifb is [`IFB`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use super::nft::Fut;
use crate::runtime::process::{self, ProcessError};

/// Handle major of NetPilot's root qdiscs (`4e50:`), the classes are
/// `4e50:<minor>`: the one definition, which the compiler and `cleanup` use too.
pub const MAJOR: u16 = 0x4e50;

/// The handle major agents before 0.x used (`1:`, which is sqm-scripts' too): such a
/// root is only touched when [`parse_observed`] recognises it as an older agent's.
pub const LEGACY_MAJOR: u16 = 1;

/// The ifb device upload is shaped on: LAN bridges' ingress is redirected to it.
pub const IFB: &str = "np-up";

/// Preference of NetPilot's redirect filter in a LAN bridge's ingress qdisc.
pub const FILTER_PREF: u16 = 0x4e50;

/// The minors NetPilot's compiler uses (base classes `0x100 + slot`, schedule
/// classes `0x1000 + 64·slot + k`): a legacy root's classes must all be in them.
fn is_our_minor(minor: u16) -> bool {
    (0x100..0x200).contains(&minor) || minor >= 0x1000
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcOp {
    /// Put NetPilot's HTB at the root (replacing the kernel's default qdisc or an
    /// older agent's root — the plan never asks for it over anyone else's;
    /// refused when ours is already there: HTB has no change operation).
    ReplaceRoot {
        dev: String,
    },
    /// Remove the root whose handle major is `major`; the kernel refuses when the
    /// root has another handle, so only the root the plan saw is removed.
    DeleteRoot {
        dev: String,
        major: u16,
    },
    /// Add or change a class and its leaf queue.
    SetClass {
        dev: String,
        minor: u16,
        kbps: u32,
    },
    DeleteClass {
        dev: String,
        minor: u16,
    },
    /// Create the ifb `dev` and set it up.
    AddIfb {
        dev: String,
    },
    /// Delete the ifb `dev` with its qdiscs.
    DeleteIfb {
        dev: String,
    },
    /// Redirect everything `dev` receives to the egress of `to`: our filter in its
    /// ingress qdisc, which is added first when `qdisc` (there is none yet).
    AddRedirect {
        dev: String,
        to: String,
        qdisc: bool,
    },
    /// Remove our redirect filter, and the ingress qdisc too when `qdisc` (nothing
    /// else is in it).
    DeleteRedirect {
        dev: String,
        qdisc: bool,
    },
}

impl TcOp {
    pub fn dev(&self) -> &str {
        match self {
            TcOp::ReplaceRoot { dev }
            | TcOp::DeleteRoot { dev, .. }
            | TcOp::SetClass { dev, .. }
            | TcOp::DeleteClass { dev, .. }
            | TcOp::AddIfb { dev }
            | TcOp::DeleteIfb { dev }
            | TcOp::AddRedirect { dev, .. }
            | TcOp::DeleteRedirect { dev, .. } => dev,
        }
    }
}

/// A device's ingress qdisc, as far as NetPilot cares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ingress {
    /// There is an ingress (or clsact) qdisc.
    pub present: bool,
    /// Our redirect filter is in it.
    pub ours: bool,
    /// Filters of anyone else in it (by preference).
    pub others: usize,
}

/// Who a root qdisc belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RootOwner {
    /// No root qdisc, or the kernel's default (handle `0:`): free to use.
    Default,
    Netpilot,
    /// An older agent's HTB `1:`, to migrate.
    NetpilotLegacy,
    /// Someone else's (sqm-scripts, by hand): never touched.
    Foreign,
}

/// What the device has now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObservedShaper {
    /// Kind and handle of the root qdisc, e.g. `("htb", "4e50:")`.
    pub root: Option<(String, String)>,
    /// Class minor → rate in kbit/s, for classes under NetPilot's major.
    pub classes: BTreeMap<u16, u32>,
    /// The root is an HTB `1:` an older agent put there (see [`parse_observed`]).
    pub legacy: bool,
    pub ingress: Ingress,
    /// The device does not exist (only an ifb is observed that way).
    pub missing: bool,
}

impl ObservedShaper {
    pub fn root_is_ours(&self) -> bool {
        matches!(&self.root, Some((kind, handle)) if kind == "htb" && *handle == format!("{MAJOR:x}:"))
    }

    pub fn owner(&self) -> RootOwner {
        if self.root_is_ours() {
            RootOwner::Netpilot
        } else if self.legacy {
            RootOwner::NetpilotLegacy
        } else {
            match &self.root {
                None => RootOwner::Default,
                Some((_, handle)) if handle == "0:" => RootOwner::Default,
                Some(_) => RootOwner::Foreign,
            }
        }
    }

    /// `htb 1:`, or `none`.
    pub fn root_text(&self) -> String {
        self.root
            .as_ref()
            .map_or("none".into(), |(k, h)| format!("{k} {h}"))
    }

    /// What a device that is there but has nothing shows.
    pub fn missing() -> ObservedShaper {
        ObservedShaper {
            missing: true,
            ..ObservedShaper::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TcError {
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("cannot read tc's listing: {0}")]
    Parse(String),
    #[error("tc refused: {0}")]
    Refused(String),
    /// The device does not exist (yet, or any more), so nothing of ours is on it.
    #[error("no such device {0:?}")]
    NoDevice(String),
}

pub trait Shaper: Send + Sync {
    /// Runs the operations in order, stopping at the first failure.
    fn run<'a>(&'a self, ops: &'a [TcOp]) -> Fut<'a, Result<(), TcError>>;
    fn observe<'a>(&'a self, dev: &'a str) -> Fut<'a, Result<ObservedShaper, TcError>>;
    /// Removes what is NetPilot's on `dev`: its root qdisc (ours or an older
    /// agent's, so the kernel's default comes back) and its redirect filter (with
    /// the ingress qdisc when nothing else is in it); someone else's stays.
    /// Returns what was removed, in words.
    fn remove_ours<'a>(&'a self, dev: &'a str) -> Fut<'a, Result<Vec<String>, TcError>> {
        Box::pin(async move {
            let live = self.observe(dev).await?;
            let mut ops = Vec::new();
            let mut what = Vec::new();
            match live.owner() {
                RootOwner::Netpilot => ops.push(TcOp::DeleteRoot {
                    dev: dev.to_owned(),
                    major: MAJOR,
                }),
                RootOwner::NetpilotLegacy => ops.push(TcOp::DeleteRoot {
                    dev: dev.to_owned(),
                    major: LEGACY_MAJOR,
                }),
                RootOwner::Default | RootOwner::Foreign => {}
            }
            if !ops.is_empty() {
                what.push(format!("tc root qdisc {} on {dev}", live.root_text()));
            }
            if live.ingress.ours {
                ops.push(TcOp::DeleteRedirect {
                    dev: dev.to_owned(),
                    qdisc: live.ingress.others == 0,
                });
                what.push(format!("tc ingress redirect on {dev}"));
            }
            self.run(&ops).await?;
            Ok(what)
        })
    }
}

pub struct RealTc {
    pub program: String,
    /// `ip`, for the ifb device.
    pub ip: String,
    pub timeout: Duration,
}

impl Default for RealTc {
    fn default() -> Self {
        RealTc {
            program: "tc".into(),
            ip: "ip".into(),
            timeout: Duration::from_secs(30),
        }
    }
}

/// Bytes HTB may send at once: 20 ms at the rate, at least two full frames, so a
/// slow class still passes a full-size packet and a fast one is not timer-bound.
fn burst_bytes(kbps: u32) -> u64 {
    (kbps as u64 * 1000 / 8 / 50).max(3028)
}

/// Leaf queue length: about 100 ms at the rate. HTB's default leaf takes the
/// device's txqueuelen, which is 0 on a bridge and would leave one packet of queue.
fn leaf_limit(kbps: u32) -> u64 {
    (kbps as u64 * 1000 / 8 / 10 / 1500).clamp(16, 1000)
}

/// One or more `tc -batch` lines per tc operation (the ifb ones are not tc's and
/// are skipped). Device names are validated at start-up (letters, digits, `.-_@`),
/// so nothing here needs quoting.
pub fn batch_lines(ops: &[TcOp]) -> String {
    let mut s = String::new();
    for op in ops {
        match op {
            TcOp::ReplaceRoot { dev } => s.push_str(&format!(
                "qdisc replace dev {dev} root handle {MAJOR:x}: htb\n"
            )),
            TcOp::DeleteRoot { dev, major } => {
                s.push_str(&format!("qdisc del dev {dev} root handle {major:x}:\n"))
            }
            TcOp::SetClass { dev, minor, kbps } => {
                let burst = burst_bytes(*kbps);
                // An explicit quantum keeps HTB quiet about r2q at very low and
                // very high rates.
                let quantum = (*kbps as u64 * 1000 / 8 / 10).clamp(1514, 60_000);
                s.push_str(&format!(
                    "class replace dev {dev} parent {MAJOR:x}: classid {MAJOR:x}:{minor:x} htb rate {kbps}kbit ceil {kbps}kbit burst {burst} cburst {burst} quantum {quantum}\n"
                ));
                s.push_str(&format!(
                    "qdisc replace dev {dev} parent {MAJOR:x}:{minor:x} handle {minor:x}: pfifo limit {}\n",
                    leaf_limit(*kbps)
                ));
            }
            TcOp::DeleteClass { dev, minor } => s.push_str(&format!(
                "class del dev {dev} classid {MAJOR:x}:{minor:x}\n"
            )),
            TcOp::AddRedirect { dev, to, qdisc } => {
                if *qdisc {
                    s.push_str(&format!("qdisc add dev {dev} ingress\n"));
                }
                // Everything the bridge passes up (routed traffic; frames bridged
                // between its ports never reach its ingress), to the ifb's HTB.
                s.push_str(&format!(
                    "filter add dev {dev} parent ffff: protocol all pref {FILTER_PREF} u32 match u32 0 0 action mirred egress redirect dev {to}\n"
                ));
            }
            TcOp::DeleteRedirect { dev, qdisc } => {
                s.push_str(&format!(
                    "filter del dev {dev} parent ffff: protocol all pref {FILTER_PREF}\n"
                ));
                if *qdisc {
                    s.push_str(&format!("qdisc del dev {dev} ingress\n"));
                }
            }
            TcOp::AddIfb { .. } | TcOp::DeleteIfb { .. } => {}
        }
    }
    s
}

/// The `ip` commands of an ifb operation.
pub fn ip_commands(op: &TcOp) -> Vec<Vec<String>> {
    let v = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<String>>();
    match op {
        TcOp::AddIfb { dev } => vec![
            v(&["link", "add", "dev", dev, "type", "ifb"]),
            v(&["link", "set", "dev", dev, "up"]),
        ],
        TcOp::DeleteIfb { dev } => vec![v(&["link", "del", "dev", dev])],
        _ => Vec::new(),
    }
}

fn is_ifb_op(op: &TcOp) -> bool {
    matches!(op, TcOp::AddIfb { .. } | TcOp::DeleteIfb { .. })
}

impl Shaper for RealTc {
    fn run<'a>(&'a self, ops: &'a [TcOp]) -> Fut<'a, Result<(), TcError>> {
        Box::pin(async move {
            // Runs of tc operations go as one batch each, ifb operations through
            // `ip` between them, in order.
            let mut rest = ops;
            while !rest.is_empty() {
                let n = rest.iter().position(is_ifb_op).unwrap_or(rest.len());
                let (tc_ops, after) = rest.split_at(n);
                if !tc_ops.is_empty() {
                    let lines = batch_lines(tc_ops);
                    process::run(
                        &[&self.program, "-batch", "-"],
                        Some(lines.as_bytes()),
                        self.timeout,
                    )
                    .await?;
                }
                if let Some((op, after)) = after.split_first() {
                    for args in ip_commands(op) {
                        let mut argv: Vec<&str> = vec![&self.ip];
                        argv.extend(args.iter().map(String::as_str));
                        process::run(&argv, None, self.timeout).await?;
                    }
                    rest = after;
                } else {
                    rest = after;
                }
            }
            Ok(())
        })
    }

    fn observe<'a>(&'a self, dev: &'a str) -> Fut<'a, Result<ObservedShaper, TcError>> {
        Box::pin(async move {
            let qdiscs = self.show(&["qdisc", "show", "dev", dev]).await?;
            let classes = self.show(&["class", "show", "dev", dev]).await?;
            let has_ingress = qdiscs.lines().any(is_ingress_line);
            let filters = if has_ingress {
                self.show(&["filter", "show", "dev", dev, "parent", "ffff:"])
                    .await?
            } else {
                String::new()
            };
            parse_observed(&qdiscs, &classes, &filters)
        })
    }
}

impl RealTc {
    /// `tc <args>` (a `show`), with a missing device told apart from a failure.
    async fn show(&self, args: &[&str]) -> Result<String, TcError> {
        let mut argv = vec![self.program.as_str()];
        argv.extend_from_slice(args);
        match process::run(&argv, None, self.timeout).await {
            Ok(out) => Ok(out),
            Err(ProcessError::Failed { stderr, .. }) if stderr.contains("Cannot find device") => {
                Err(TcError::NoDevice(
                    args.get(3).copied().unwrap_or("").to_owned(),
                ))
            }
            Err(e) => Err(e.into()),
        }
    }
}

fn is_ingress_line(line: &str) -> bool {
    let w: Vec<&str> = line.split_whitespace().collect();
    w.first() == Some(&"qdisc")
        && matches!(w.get(1), Some(&"ingress") | Some(&"clsact"))
        && w.get(2) == Some(&"ffff:")
}

fn hex_id(id: &str) -> Option<(u16, u16)> {
    let (major, minor) = id.split_once(':')?;
    let major = u16::from_str_radix(major, 16).ok()?;
    let minor = if minor.is_empty() {
        0
    } else {
        u16::from_str_radix(minor, 16).ok()?
    };
    Some((major, minor))
}

/// Parses `tc qdisc show dev X`, `tc class show dev X` and `tc filter show dev X
/// parent ffff:` (this iproute2 prints no JSON for HTB classes).
///
/// An HTB `1:` root is an older agent's (`legacy`) only when it looks exactly as
/// that agent made it: at least one class, every class `1:<minor>` directly under
/// the root with a minor from NetPilot's ranges and a pfifo leaf `<minor>:`, and
/// no other qdisc under it. sqm-scripts' `1:` has a parent class `1:1` and
/// fq_codel/cake leaves, so it is never taken for ours.
pub fn parse_observed(
    qdiscs: &str,
    classes: &str,
    filters: &str,
) -> Result<ObservedShaper, TcError> {
    let mut out = ObservedShaper::default();
    // Non-root qdiscs: handle major → (kind, parent).
    let mut leaves: BTreeMap<u16, (String, String)> = BTreeMap::new();
    let mut other_qdiscs = 0;
    for line in qdiscs.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.first() != Some(&"qdisc") || w.len() < 4 {
            continue;
        }
        if is_ingress_line(line) {
            out.ingress.present = true;
        } else if w[3] == "root" {
            out.root = Some((w[1].to_owned(), w[2].to_owned()));
        } else if w[3] == "parent" {
            match (hex_id(w[2]), w.get(4)) {
                (Some((major, _)), Some(parent)) => {
                    leaves.insert(major, (w[1].to_owned(), (*parent).to_owned()));
                }
                _ => other_qdiscs += 1,
            }
        }
    }
    let legacy_root = matches!(&out.root, Some((k, h)) if k == "htb" && h == "1:");
    if out.root_is_ours() || legacy_root {
        let want_major = if legacy_root { LEGACY_MAJOR } else { MAJOR };
        let mut found: BTreeMap<u16, u32> = BTreeMap::new();
        let mut looks_ours = legacy_root;
        for line in classes.lines() {
            let w: Vec<&str> = line.split_whitespace().collect();
            if w.first() != Some(&"class") || w.get(1) != Some(&"htb") {
                continue;
            }
            let id = w.get(2).ok_or_else(|| TcError::Parse(line.to_owned()))?;
            let (major, minor) = hex_id(id).ok_or_else(|| TcError::Parse(line.to_owned()))?;
            if major != want_major {
                continue;
            }
            let rate = w
                .iter()
                .position(|x| *x == "rate")
                .and_then(|i| w.get(i + 1))
                .ok_or_else(|| TcError::Parse(line.to_owned()))?;
            found.insert(minor, parse_rate_kbps(rate)?);
            let leaf = w
                .iter()
                .position(|x| *x == "leaf")
                .and_then(|i| w.get(i + 1))
                .and_then(|l| hex_id(l));
            let pfifo_leaf = leaf.is_some_and(|(m, _)| {
                m == minor
                    && leaves.get(&m).is_some_and(|(kind, parent)| {
                        kind == "pfifo" && *parent == format!("{want_major:x}:{minor:x}")
                    })
            });
            looks_ours &= w.get(3) == Some(&"root") && is_our_minor(minor) && pfifo_leaf;
        }
        if legacy_root {
            out.legacy =
                looks_ours && !found.is_empty() && other_qdiscs == 0 && leaves.len() == found.len();
        } else {
            out.classes = found;
        }
    }
    let mut prefs = BTreeSet::new();
    for line in filters.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if let Some(i) = w.iter().position(|x| *x == "pref") {
            let pref: u16 = w
                .get(i + 1)
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| TcError::Parse(line.to_owned()))?;
            prefs.insert(pref);
        }
    }
    out.ingress.ours = prefs.remove(&FILTER_PREF);
    out.ingress.others = prefs.len();
    Ok(out)
}

/// `5Mbit`, `1500Kbit`, `1.5Mbit`, `800bit` → kbit/s.
pub fn parse_rate_kbps(s: &str) -> Result<u32, TcError> {
    let bad = || TcError::Parse(format!("rate {s:?}"));
    let split = s.find(|c: char| c.is_ascii_alphabetic()).ok_or_else(bad)?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let scale = match unit {
        "bit" => 0.001,
        "Kbit" | "kbit" => 1.0,
        "Mbit" | "mbit" => 1_000.0,
        "Gbit" | "gbit" => 1_000_000.0,
        "Tbit" | "tbit" => 1_000_000_000.0,
        _ => return Err(bad()),
    };
    Ok((n * scale).round() as u32)
}

/// An in-memory shaper with tc's semantics for these operations: a device has the
/// kernel's default root (`noqueue 0:`, as an up bridge or veth shows) until one is
/// put there; our root cannot replace itself; a root is deleted only by its own
/// handle; the ifb [`IFB`] does not exist until added; a run stops at its first
/// failure, keeping what ran before it. The same contract test runs against it and
/// the real tc.
pub struct FakeTc {
    state: Mutex<FakeTcState>,
}

impl Default for FakeTc {
    fn default() -> Self {
        let mut state = FakeTcState::default();
        state.missing.insert(IFB.to_owned());
        FakeTc {
            state: Mutex::new(state),
        }
    }
}

#[derive(Default)]
struct FakeTcState {
    devs: BTreeMap<String, ObservedShaper>,
    /// Devices that do not exist; every other name does.
    missing: BTreeSet<String>,
    /// Fail the op with this index (counted across runs) to test restores.
    fail_at: Option<usize>,
    ops: usize,
}

fn default_state() -> ObservedShaper {
    ObservedShaper {
        root: Some(("noqueue".into(), "0:".into())),
        ..ObservedShaper::default()
    }
}

impl FakeTc {
    pub fn fail_op_after(&self, n: usize) {
        let mut s = self.state.lock().expect("fake tc");
        s.fail_at = Some(s.ops + n);
    }

    /// `dev` does not exist: observing or changing it fails with [`TcError::NoDevice`].
    pub fn remove_device(&self, dev: &str) {
        let mut s = self.state.lock().expect("fake tc");
        s.devs.remove(dev);
        s.missing.insert(dev.to_owned());
    }

    pub fn set_foreign_root(&self, dev: &str, kind: &str) {
        self.set_root(dev, kind, "8001:");
    }

    /// Someone else's root with this handle (sqm-scripts: `htb`, `1:`).
    pub fn set_root(&self, dev: &str, kind: &str, handle: &str) {
        let mut s = self.state.lock().expect("fake tc");
        let d = s.devs.entry(dev.to_owned()).or_insert_with(default_state);
        d.root = Some((kind.to_owned(), handle.to_owned()));
        d.classes.clear();
        d.legacy = false;
    }

    /// What an older agent left: HTB `1:` with these classes.
    pub fn set_legacy_root(&self, dev: &str) {
        let mut s = self.state.lock().expect("fake tc");
        let d = s.devs.entry(dev.to_owned()).or_insert_with(default_state);
        d.root = Some(("htb".into(), "1:".into()));
        d.classes.clear();
        d.legacy = true;
    }

    /// Someone else's ingress qdisc with a filter of theirs (sqm-scripts' on the WAN).
    pub fn set_foreign_ingress(&self, dev: &str) {
        let mut s = self.state.lock().expect("fake tc");
        let d = s.devs.entry(dev.to_owned()).or_insert_with(default_state);
        d.ingress.present = true;
        d.ingress.others += 1;
    }

    fn apply(s: &mut FakeTcState, op: &TcOp) -> Result<(), TcError> {
        let refused = |m: String| Err(TcError::Refused(m));
        let dev = op.dev().to_owned();
        if let TcOp::AddIfb { .. } = op {
            if !s.missing.remove(&dev) {
                return refused(format!("{dev}: File exists"));
            }
            s.devs.insert(dev, default_state());
            return Ok(());
        }
        if s.missing.contains(&dev) {
            return Err(TcError::NoDevice(dev));
        }
        if let TcOp::AddRedirect { to, .. } = op {
            if s.missing.contains(to) {
                return Err(TcError::NoDevice(to.clone()));
            }
        }
        let d = s.devs.entry(dev.clone()).or_insert_with(default_state);
        match op {
            TcOp::ReplaceRoot { .. } => {
                if d.root_is_ours() {
                    return refused(format!("{dev}: change operation not supported by htb"));
                }
                d.root = Some(("htb".into(), format!("{MAJOR:x}:")));
                d.classes.clear();
                d.legacy = false;
            }
            TcOp::DeleteRoot { major, .. } => {
                let handle = format!("{major:x}:");
                if !matches!(&d.root, Some((_, h)) if *h == handle) {
                    return refused(format!("{dev}: Invalid handle"));
                }
                d.root = Some(("noqueue".into(), "0:".into()));
                d.classes.clear();
                d.legacy = false;
            }
            TcOp::SetClass { minor, kbps, .. } => {
                if !d.root_is_ours() {
                    return refused(format!("{dev}: no htb root"));
                }
                d.classes.insert(*minor, *kbps);
            }
            TcOp::DeleteClass { minor, .. } => {
                if d.classes.remove(minor).is_none() {
                    return refused(format!("{dev}: no class {minor:x}"));
                }
            }
            TcOp::AddRedirect { qdisc, .. } => {
                if *qdisc == d.ingress.present {
                    return refused(format!("{dev}: ingress qdisc present: {}", !qdisc));
                }
                if d.ingress.ours {
                    return refused(format!("{dev}: filter exists"));
                }
                d.ingress.present = true;
                d.ingress.ours = true;
            }
            TcOp::DeleteRedirect { qdisc, .. } => {
                if !d.ingress.ours {
                    return refused(format!("{dev}: no filter of ours"));
                }
                d.ingress.ours = false;
                if *qdisc {
                    d.ingress = Ingress::default();
                }
            }
            TcOp::DeleteIfb { .. } => {
                s.devs.remove(&dev);
                s.missing.insert(dev);
            }
            TcOp::AddIfb { .. } => unreachable!("handled above"),
        }
        Ok(())
    }
}

impl Shaper for FakeTc {
    fn run<'a>(&'a self, ops: &'a [TcOp]) -> Fut<'a, Result<(), TcError>> {
        Box::pin(async move {
            let mut s = self.state.lock().expect("fake tc");
            for op in ops {
                if s.fail_at == Some(s.ops) {
                    s.fail_at = None;
                    return Err(TcError::Refused(format!("injected failure at {op:?}")));
                }
                s.ops += 1;
                Self::apply(&mut s, op)?;
            }
            Ok(())
        })
    }

    fn observe<'a>(&'a self, dev: &'a str) -> Fut<'a, Result<ObservedShaper, TcError>> {
        Box::pin(async move {
            let s = self.state.lock().expect("fake tc");
            if s.missing.contains(dev) {
                return Err(TcError::NoDevice(dev.to_owned()));
            }
            Ok(s.devs.get(dev).cloned().unwrap_or_else(default_state))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the contract needs besides the shaper: the devices, and someone
    /// else's root qdisc.
    trait Rig: Sync {
        fn shaper(&self) -> &dyn Shaper;
        /// Puts someone else's HTB root (handle 8001:) on `dev`, as sqm would.
        fn foreign_root(&self, dev: &str);
        /// Puts someone else's ingress qdisc with a filter on `dev`.
        fn foreign_ingress(&self, dev: &str);
    }

    const DEV: &str = "np0";
    const OTHER: &str = "np1";

    fn set(minor: u16, kbps: u32) -> TcOp {
        TcOp::SetClass {
            dev: DEV.into(),
            minor,
            kbps,
        }
    }

    fn del(minor: u16) -> TcOp {
        TcOp::DeleteClass {
            dev: DEV.into(),
            minor,
        }
    }

    fn root_of(dev: &str) -> TcOp {
        TcOp::ReplaceRoot { dev: dev.into() }
    }

    /// A device's state: the root's kind and handle, and our classes' rates.
    fn state(root: Option<(&str, &str)>, classes: &[(u16, u32)]) -> ObservedShaper {
        ObservedShaper {
            root: root.map(|(k, h)| (k.to_owned(), h.to_owned())),
            classes: classes.iter().copied().collect(),
            ..ObservedShaper::default()
        }
    }

    /// The contract both shapers keep, with the operations the engine uses.
    async fn contract(rig: &dyn Rig) {
        let tc = rig.shaper();
        // A fresh device has the kernel's default root (noqueue on a veth).
        let default = state(Some(("noqueue", "0:")), &[]);
        assert_eq!(tc.observe(DEV).await.unwrap(), default);
        // Nothing to delete, no HTB to put a class under: refused.
        let no_root = [TcOp::DeleteRoot {
            dev: DEV.into(),
            major: MAJOR,
        }];
        assert!(tc.run(&no_root).await.is_err());
        assert!(tc.run(&[set(0x102, 5000)]).await.is_err());
        assert_eq!(tc.observe(DEV).await.unwrap(), default);

        // Our root, then classes: the rates read back, whatever unit tc prints.
        tc.run(&[root_of(DEV)]).await.unwrap();
        assert_eq!(
            tc.observe(DEV).await.unwrap(),
            state(Some(("htb", "4e50:")), &[])
        );
        let classes = [
            (0x101, 100),
            (0x102, 5000),
            (0x103, 1500),
            (0x1080, 123_457),
        ];
        let ops: Vec<TcOp> = classes.iter().map(|(m, k)| set(*m, *k)).collect();
        tc.run(&ops).await.unwrap();
        let live = tc.observe(DEV).await.unwrap();
        assert!(live.root_is_ours());
        assert_eq!(live, state(Some(("htb", "4e50:")), &classes));

        // Change a rate, delete a class.
        tc.run(&[set(0x102, 2500), del(0x103)]).await.unwrap();
        let want = [(0x101, 100), (0x102, 2500), (0x1080, 123_457)];
        assert_eq!(
            tc.observe(DEV).await.unwrap(),
            state(Some(("htb", "4e50:")), &want)
        );

        // No transactions: a run stops at its first failure, and what ran before
        // it stays (the engine restores from its plan).
        let partial = [set(0x104, 4000), del(0x999), set(0x105, 3000)];
        assert!(tc.run(&partial).await.is_err());
        let want = [
            (0x101, 100),
            (0x102, 2500),
            (0x104, 4000),
            (0x1080, 123_457),
        ];
        assert_eq!(
            tc.observe(DEV).await.unwrap(),
            state(Some(("htb", "4e50:")), &want)
        );

        // Our root cannot be replaced by itself (HTB has no change operation):
        // refused, and its classes stay.
        assert!(tc.run(&[root_of(DEV)]).await.is_err());
        assert_eq!(
            tc.observe(DEV).await.unwrap(),
            state(Some(("htb", "4e50:")), &want)
        );

        // Someone else's root qdisc: seen with its kind and handle, none of its
        // classes counted as ours, and left alone by everything done on ours.
        rig.foreign_root(OTHER);
        let foreign = state(Some(("htb", "8001:")), &[]);
        assert_eq!(tc.observe(OTHER).await.unwrap(), foreign);
        assert!(!tc.observe(OTHER).await.unwrap().root_is_ours());
        // A root is only deleted by its own handle: someone else's stays.
        let by_our_handle = [TcOp::DeleteRoot {
            dev: OTHER.into(),
            major: MAJOR,
        }];
        assert!(tc.run(&by_our_handle).await.is_err());
        tc.run(&[
            set(0x106, 600),
            TcOp::DeleteRoot {
                dev: DEV.into(),
                major: MAJOR,
            },
        ])
        .await
        .unwrap();
        assert_eq!(tc.observe(OTHER).await.unwrap(), foreign);

        // The ifb: absent until added; a redirect into it from DEV's ingress,
        // and someone else's ingress filter on OTHER left in place when ours goes.
        assert!(matches!(tc.observe(IFB).await, Err(TcError::NoDevice(_))));
        let redirect = |dev: &str, qdisc| TcOp::AddRedirect {
            dev: dev.into(),
            to: IFB.into(),
            qdisc,
        };
        tc.run(&[
            TcOp::AddIfb { dev: IFB.into() },
            TcOp::ReplaceRoot { dev: IFB.into() },
            TcOp::SetClass {
                dev: IFB.into(),
                minor: 0x101,
                kbps: 2000,
            },
            redirect(DEV, true),
        ])
        .await
        .unwrap();
        let ifb = tc.observe(IFB).await.unwrap();
        assert_eq!(ifb.classes, [(0x101, 2000)].into_iter().collect());
        let with_ours = Ingress {
            present: true,
            ours: true,
            others: 0,
        };
        assert_eq!(tc.observe(DEV).await.unwrap().ingress, with_ours);
        rig.foreign_ingress(OTHER);
        tc.run(&[redirect(OTHER, false)]).await.unwrap();
        assert_eq!(
            tc.observe(OTHER).await.unwrap().ingress,
            Ingress {
                present: true,
                ours: true,
                others: 1
            }
        );
        assert_eq!(
            tc.remove_ours(OTHER).await.unwrap(),
            ["tc ingress redirect on np1"]
        );
        let theirs = Ingress {
            present: true,
            ours: false,
            others: 1,
        };
        assert_eq!(tc.observe(OTHER).await.unwrap().ingress, theirs);
        assert_eq!(tc.observe(OTHER).await.unwrap().root, foreign.root);
        tc.run(&[
            TcOp::DeleteRedirect {
                dev: DEV.into(),
                qdisc: true,
            },
            TcOp::DeleteIfb { dev: IFB.into() },
        ])
        .await
        .unwrap();
        assert_eq!(tc.observe(DEV).await.unwrap().ingress, Ingress::default());
        assert!(matches!(tc.observe(IFB).await, Err(TcError::NoDevice(_))));

        // Our root deleted: the kernel's default is back, with no classes.
        assert_eq!(tc.observe(DEV).await.unwrap(), default);
    }

    impl Rig for FakeTc {
        fn shaper(&self) -> &dyn Shaper {
            self
        }
        fn foreign_root(&self, dev: &str) {
            self.set_foreign_root(dev, "htb");
        }
        fn foreign_ingress(&self, dev: &str) {
            self.set_foreign_ingress(dev);
        }
    }

    #[tokio::test]
    async fn the_fake_keeps_the_contract() {
        contract(&FakeTc::default()).await;
    }

    struct RealRig(RealTc);

    impl Rig for RealRig {
        fn shaper(&self) -> &dyn Shaper {
            &self.0
        }
        fn foreign_root(&self, dev: &str) {
            for args in [
                &["qdisc", "add", "dev", dev, "root", "handle", "8001:", "htb"][..],
                &[
                    "class", "add", "dev", dev, "parent", "8001:", "classid", "8001:10", "htb",
                    "rate", "1mbit",
                ],
            ] {
                let out = std::process::Command::new(&self.0.program)
                    .args(args)
                    .output()
                    .unwrap();
                assert!(out.status.success(), "tc {args:?}: {out:?}");
            }
        }
        fn foreign_ingress(&self, dev: &str) {
            for args in [
                &["qdisc", "add", "dev", dev, "ingress"][..],
                &[
                    "filter", "add", "dev", dev, "parent", "ffff:", "protocol", "all", "pref",
                    "10", "u32", "match", "u32", "0", "0", "flowid", "1:1",
                ],
            ] {
                let out = std::process::Command::new(&self.0.program)
                    .args(args)
                    .output()
                    .unwrap();
                assert!(out.status.success(), "tc {args:?}: {out:?}");
            }
        }
    }

    #[test]
    fn netns_real_tc_keeps_the_contract() {
        netpilot_testkit::require(&["tc"]);
        let ns = netpilot_testkit::Netns::new("tc").unwrap();
        ns.exec(&[
            "ip", "link", "add", DEV, "type", "veth", "peer", "name", OTHER,
        ])
        .unwrap();
        // Up, as a router's devices are (a down veth shows no qdisc at all).
        for dev in [DEV, OTHER] {
            ns.exec(&["ip", "link", "set", dev, "up"]).unwrap();
        }
        ns.block_on(|| async { contract(&RealRig(RealTc::default())).await });
    }

    /// The recognition of an older agent's root against the real tc's listings: the
    /// root exactly as that agent's batch made it is taken for ours and removed by
    /// `remove_ours`; sqm-scripts' HTB `1:` (simple.qos' classes, pfifo leaves
    /// here) is not, and stays.
    #[test]
    fn netns_real_tc_tells_an_older_agents_root_from_sqms() {
        netpilot_testkit::require(&["tc"]);
        let ns = netpilot_testkit::Netns::new("tc-legacy").unwrap();
        ns.exec(&[
            "ip", "link", "add", DEV, "type", "veth", "peer", "name", OTHER,
        ])
        .unwrap();
        for dev in [DEV, OTHER] {
            ns.exec(&["ip", "link", "set", dev, "up"]).unwrap();
        }
        let old_agent = format!(
            "qdisc replace dev {DEV} root handle 1: htb\n\
             class replace dev {DEV} parent 1: classid 1:102 htb rate 5000kbit ceil 5000kbit burst 12500 cburst 12500 quantum 60000\n\
             qdisc replace dev {DEV} parent 1:102 handle 102: pfifo limit 41\n\
             class replace dev {DEV} parent 1: classid 1:1040 htb rate 700kbit ceil 700kbit burst 3028 cburst 3028 quantum 8750\n\
             qdisc replace dev {DEV} parent 1:1040 handle 1040: pfifo limit 16\n"
        );
        let sqm = format!(
            "qdisc add dev {OTHER} root handle 1: htb default 12\n\
             class add dev {OTHER} parent 1: classid 1:1 htb rate 20000kbit ceil 20000kbit\n\
             class add dev {OTHER} parent 1:1 classid 1:11 htb rate 128kbit ceil 20000kbit prio 1\n\
             class add dev {OTHER} parent 1:1 classid 1:12 htb rate 6666kbit ceil 20000kbit prio 2\n\
             class add dev {OTHER} parent 1:1 classid 1:13 htb rate 6666kbit ceil 20000kbit prio 3\n\
             qdisc add dev {OTHER} parent 1:11 handle 110: pfifo limit 1000\n\
             qdisc add dev {OTHER} parent 1:12 handle 120: pfifo limit 1000\n\
             qdisc add dev {OTHER} parent 1:13 handle 130: pfifo limit 1000\n"
        );
        for batch in [old_agent, sqm] {
            let path = std::env::temp_dir().join(format!("np-tc-{}.batch", std::process::id()));
            std::fs::write(&path, batch).unwrap();
            ns.exec(&["tc", "-batch", path.to_str().unwrap()]).unwrap();
            let _ = std::fs::remove_file(&path);
        }
        ns.block_on(|| async {
            let tc = RealTc::default();
            let old = tc.observe(DEV).await.unwrap();
            assert_eq!(old.owner(), RootOwner::NetpilotLegacy, "{old:?}");
            let theirs = tc.observe(OTHER).await.unwrap();
            assert_eq!(theirs.owner(), RootOwner::Foreign, "{theirs:?}");
            assert_eq!(
                tc.remove_ours(DEV).await.unwrap(),
                ["tc root qdisc htb 1: on np0"]
            );
            assert_eq!(tc.observe(DEV).await.unwrap().owner(), RootOwner::Default);
            assert!(tc.remove_ours(OTHER).await.unwrap().is_empty());
            assert_eq!(tc.observe(OTHER).await.unwrap(), theirs);
        });
    }

    #[test]
    fn listings_parse_into_root_and_rates() {
        let q = "qdisc htb 4e50: root refcnt 2 r2q 10 default 0 direct_packets_stat 3 direct_qlen 1000\nqdisc pfifo 100: parent 4e50:100 limit 41p\n";
        let c = "class htb 4e50:101 root leaf 101: prio 0 rate 1Mbit ceil 1Mbit burst 3028b cburst 3028b \nclass htb 4e50:100 root leaf 100: prio 0 rate 5Mbit ceil 5Mbit burst 1600b cburst 1600b \nclass htb 4e50:1040 root prio 0 rate 1500Kbit ceil 1500Kbit burst 1600b cburst 1600b \n";
        let o = parse_observed(q, c, "").unwrap();
        assert!(o.root_is_ours());
        assert_eq!(o.classes[&0x100], 5000);
        assert_eq!(o.classes[&0x101], 1000);
        assert_eq!(o.classes[&0x1040], 1500);
        let foreign = parse_observed("qdisc noqueue 0: root refcnt 2 \n", "", "").unwrap();
        assert_eq!(foreign.root, Some(("noqueue".into(), "0:".into())));
        assert!(!foreign.root_is_ours());
        assert_eq!(parse_rate_kbps("1.5Mbit").unwrap(), 1500);

        // Our filter among someone else's in an ingress qdisc.
        let q = "qdisc noqueue 0: root refcnt 2 \nqdisc ingress ffff: parent ffff:fff1 ---------------- \n";
        let f = "filter protocol all pref 10 u32 chain 0 \nfilter protocol all pref 10 u32 chain 0 fh 800: ht divisor 1 \nfilter protocol all pref 20048 u32 chain 0 \nfilter protocol all pref 20048 u32 chain 0 fh 801::800 order 2048 key ht 801 bkt 0 terminal flowid not_in_hw \n";
        let o = parse_observed(q, "", f).unwrap();
        assert_eq!(
            o.ingress,
            Ingress {
                present: true,
                ours: true,
                others: 1
            }
        );
        assert_eq!(o.owner(), RootOwner::Default);
    }

    /// An older agent's `1:` root is recognised and migrated; sqm-scripts' `1:`
    /// (simple.qos: a parent class 1:1, leaves 1:11–1:13 with their own qdiscs)
    /// or an empty `1:` is never taken for it.
    #[test]
    fn only_an_older_agents_htb_1_is_taken_for_ours() {
        let old_q = "qdisc htb 1: root refcnt 2 r2q 10 default 0x0 direct_packets_stat 0 direct_qlen 1000\nqdisc pfifo 102: parent 1:102 limit 41p\nqdisc pfifo 1040: parent 1:1040 limit 16p\n";
        let old_c = "class htb 1:102 root leaf 102: prio 0 rate 5Mbit ceil 5Mbit burst 12500b cburst 12500b \nclass htb 1:1040 root leaf 1040: prio 0 rate 700Kbit ceil 700Kbit burst 3028b cburst 3028b \n";
        let old = parse_observed(old_q, old_c, "").unwrap();
        assert!(old.legacy && !old.root_is_ours());
        assert_eq!(old.owner(), RootOwner::NetpilotLegacy);
        assert!(old.classes.is_empty(), "not classes of ours to keep");

        let sqm_q = "qdisc htb 1: root refcnt 2 r2q 10 default 0x12 direct_packets_stat 0 direct_qlen 1000\nqdisc fq_codel 120: parent 1:12 limit 1001p flows 1024\nqdisc fq_codel 130: parent 1:13 limit 1001p\nqdisc fq_codel 110: parent 1:11 limit 1001p\n";
        let sqm_c = "class htb 1:11 parent 1:1 leaf 110: prio 1 rate 128Kbit ceil 3333Kbit burst 1600b cburst 1599b \nclass htb 1:1 root rate 10Mbit ceil 10Mbit burst 1600b cburst 1600b \nclass htb 1:12 parent 1:1 leaf 120: prio 2 rate 1666Kbit ceil 9984Kbit burst 1599b cburst 1598b \nclass htb 1:13 parent 1:1 leaf 130: prio 3 rate 1666Kbit ceil 9984Kbit burst 1599b cburst 1598b \n";
        let sqm = parse_observed(sqm_q, sqm_c, "").unwrap();
        assert_eq!(sqm.owner(), RootOwner::Foreign);
        // The same with pfifo leaves (this kernel has no fq_codel): still sqm's.
        let sqm_pfifo = parse_observed(&sqm_q.replace("fq_codel", "pfifo"), sqm_c, "").unwrap();
        assert_eq!(sqm_pfifo.owner(), RootOwner::Foreign);
        // An empty 1: (anyone's, half made): not ours.
        let empty = parse_observed(
            "qdisc htb 1: root refcnt 2 r2q 10 default 0 direct_packets_stat 0\n",
            "",
            "",
        )
        .unwrap();
        assert_eq!(empty.owner(), RootOwner::Foreign);
        // Our minors, but a leaf that is not a pfifo with the minor's handle.
        let odd = parse_observed(&old_q.replace("pfifo 102:", "sfq 102:"), old_c, "").unwrap();
        assert_eq!(odd.owner(), RootOwner::Foreign);
        let hand = parse_observed(
            &old_q.replace("pfifo 102: parent 1:102", "pfifo 55: parent 1:102"),
            &old_c.replace("leaf 102:", "leaf 55:"),
            "",
        )
        .unwrap();
        assert_eq!(hand.owner(), RootOwner::Foreign);
        assert_eq!(parse_rate_kbps("10Gbit").unwrap(), 10_000_000);
        assert!(parse_rate_kbps("fast").is_err());
    }

    #[tokio::test]
    async fn the_real_tc_tells_a_missing_device_apart() {
        // Only reads: no namespace needed.
        let tc = RealTc::default();
        match tc.observe("np-nosuch0").await {
            Err(TcError::NoDevice(dev)) => assert_eq!(dev, "np-nosuch0"),
            Err(TcError::Process(e)) if e.is_not_found() => {
                assert!(std::env::var_os("CI").is_none(), "CI must have tc");
                eprintln!("SKIPPED: tc is not installed");
                return;
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            tc.remove_ours("np-nosuch0").await,
            Err(TcError::NoDevice(_))
        ));
    }

    #[test]
    fn batch_lines_are_plain_tc_commands() {
        let s = batch_lines(&[
            TcOp::ReplaceRoot {
                dev: "br-lan".into(),
            },
            TcOp::SetClass {
                dev: "br-lan".into(),
                minor: 0x101,
                kbps: 5000,
            },
            TcOp::DeleteClass {
                dev: "br-lan".into(),
                minor: 0x1040,
            },
            TcOp::DeleteRoot {
                dev: "wan".into(),
                major: LEGACY_MAJOR,
            },
            TcOp::AddIfb { dev: IFB.into() },
            TcOp::AddRedirect {
                dev: "br-lan".into(),
                to: IFB.into(),
                qdisc: true,
            },
            TcOp::DeleteRedirect {
                dev: "br-guest".into(),
                qdisc: false,
            },
        ]);
        assert_eq!(
            s,
            "qdisc replace dev br-lan root handle 4e50: htb\n\
             class replace dev br-lan parent 4e50: classid 4e50:101 htb rate 5000kbit ceil 5000kbit burst 12500 cburst 12500 quantum 60000\n\
             qdisc replace dev br-lan parent 4e50:101 handle 101: pfifo limit 41\n\
             class del dev br-lan classid 4e50:1040\n\
             qdisc del dev wan root handle 1:\n\
             qdisc add dev br-lan ingress\n\
             filter add dev br-lan parent ffff: protocol all pref 20048 u32 match u32 0 0 action mirred egress redirect dev np-up\n\
             filter del dev br-guest parent ffff: protocol all pref 20048\n"
        );
        assert_eq!(
            ip_commands(&TcOp::AddIfb { dev: IFB.into() }),
            [
                vec!["link", "add", "dev", "np-up", "type", "ifb"],
                vec!["link", "set", "dev", "np-up", "up"]
            ]
        );
    }
}
