//! The shaper seam: NetPilot's root HTB qdisc and its classes on one device, changed
//! through one `tc -batch` per step and read back with `tc class show`. tc has no
//! transactions, so the engine orders the steps and restores on failure; this module
//! only runs them. [`FakeTc`] keeps the same state in memory.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use super::nft::Fut;
use crate::runtime::process::{self, ProcessError};

/// Handle major of NetPilot's root qdisc (`1:`), the classes are `1:<minor>`: the one
/// definition, which the compiler and `cleanup` use too.
pub const MAJOR: u16 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcOp {
    /// Put NetPilot's HTB at the root (replacing whatever was there; refused
    /// when it is already there: HTB has no change operation).
    ReplaceRoot {
        dev: String,
    },
    /// Remove NetPilot's root; the kernel's default qdisc comes back.
    DeleteRoot {
        dev: String,
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
}

/// What the device has now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObservedShaper {
    /// Kind and handle of the root qdisc, e.g. `("htb", "1:")`.
    pub root: Option<(String, String)>,
    /// Class minor → rate in kbit/s, for classes under NetPilot's major.
    pub classes: BTreeMap<u16, u32>,
}

impl ObservedShaper {
    pub fn root_is_ours(&self) -> bool {
        matches!(&self.root, Some((kind, handle)) if kind == "htb" && *handle == format!("{MAJOR}:"))
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
    /// Removes the root qdisc of `dev` only when it is NetPilot's (HTB, handle
    /// `MAJOR:`), so the kernel's default comes back; someone else's root stays.
    /// Returns whether there was one of ours.
    fn remove_root<'a>(&'a self, dev: &'a str) -> Fut<'a, Result<bool, TcError>>;
}

pub struct RealTc {
    pub program: String,
    pub timeout: Duration,
}

impl Default for RealTc {
    fn default() -> Self {
        RealTc {
            program: "tc".into(),
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

/// One `tc -batch` line per operation. Device names are validated at start-up
/// (letters, digits, `.-_@`), so nothing here needs quoting.
pub fn batch_lines(ops: &[TcOp]) -> String {
    let mut s = String::new();
    for op in ops {
        match op {
            TcOp::ReplaceRoot { dev } => s.push_str(&format!(
                "qdisc replace dev {dev} root handle {MAJOR}: htb\n"
            )),
            TcOp::DeleteRoot { dev } => s.push_str(&format!("qdisc del dev {dev} root\n")),
            TcOp::SetClass { dev, minor, kbps } => {
                let burst = burst_bytes(*kbps);
                // An explicit quantum keeps HTB quiet about r2q at very low and
                // very high rates.
                let quantum = (*kbps as u64 * 1000 / 8 / 10).clamp(1514, 60_000);
                s.push_str(&format!(
                    "class replace dev {dev} parent {MAJOR}: classid {MAJOR}:{minor:x} htb rate {kbps}kbit ceil {kbps}kbit burst {burst} cburst {burst} quantum {quantum}\n"
                ));
                s.push_str(&format!(
                    "qdisc replace dev {dev} parent {MAJOR}:{minor:x} handle {minor:x}: pfifo limit {}\n",
                    leaf_limit(*kbps)
                ));
            }
            TcOp::DeleteClass { dev, minor } => {
                s.push_str(&format!("class del dev {dev} classid {MAJOR}:{minor:x}\n"))
            }
        }
    }
    s
}

impl Shaper for RealTc {
    fn run<'a>(&'a self, ops: &'a [TcOp]) -> Fut<'a, Result<(), TcError>> {
        Box::pin(async move {
            if ops.is_empty() {
                return Ok(());
            }
            let lines = batch_lines(ops);
            process::run(
                &[&self.program, "-batch", "-"],
                Some(lines.as_bytes()),
                self.timeout,
            )
            .await?;
            Ok(())
        })
    }

    fn observe<'a>(&'a self, dev: &'a str) -> Fut<'a, Result<ObservedShaper, TcError>> {
        Box::pin(async move {
            let qdiscs = self.show("qdisc", dev).await?;
            let classes = self.show("class", dev).await?;
            parse_observed(&qdiscs, &classes)
        })
    }

    fn remove_root<'a>(&'a self, dev: &'a str) -> Fut<'a, Result<bool, TcError>> {
        Box::pin(async move {
            let qdiscs = self.show("qdisc", dev).await?;
            if !parse_observed(&qdiscs, "")?.root_is_ours() {
                return Ok(false);
            }
            self.run(&[TcOp::DeleteRoot {
                dev: dev.to_owned(),
            }])
            .await?;
            Ok(true)
        })
    }
}

impl RealTc {
    /// `tc <what> show dev <dev>`, with a missing device told apart from a failure.
    async fn show(&self, what: &str, dev: &str) -> Result<String, TcError> {
        let argv = [&self.program, what, "show", "dev", dev];
        match process::run(&argv, None, self.timeout).await {
            Ok(out) => Ok(out),
            Err(ProcessError::Failed { stderr, .. }) if stderr.contains("Cannot find device") => {
                Err(TcError::NoDevice(dev.to_owned()))
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Parses `tc qdisc show dev X` and `tc class show dev X` (this iproute2 prints no
/// JSON for HTB classes).
pub fn parse_observed(qdiscs: &str, classes: &str) -> Result<ObservedShaper, TcError> {
    let mut out = ObservedShaper::default();
    for line in qdiscs.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.first() == Some(&"qdisc") && w.get(3) == Some(&"root") {
            out.root = Some((w[1].to_owned(), w[2].to_owned()));
        }
    }
    if !out.root_is_ours() {
        return Ok(out);
    }
    for line in classes.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.first() != Some(&"class") || w.get(1) != Some(&"htb") {
            continue;
        }
        let id = w.get(2).ok_or_else(|| TcError::Parse(line.to_owned()))?;
        let Some((major, minor)) = id.split_once(':') else {
            return Err(TcError::Parse(line.to_owned()));
        };
        if major != MAJOR.to_string() {
            continue;
        }
        let minor = u16::from_str_radix(minor, 16).map_err(|_| TcError::Parse(line.to_owned()))?;
        let rate = w
            .iter()
            .position(|x| *x == "rate")
            .and_then(|i| w.get(i + 1))
            .ok_or_else(|| TcError::Parse(line.to_owned()))?;
        out.classes.insert(minor, parse_rate_kbps(rate)?);
    }
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
/// put there; our root cannot replace itself; a run stops at its first failure,
/// keeping what ran before it. The same contract test runs against it and the real
/// tc.
#[derive(Default)]
pub struct FakeTc {
    state: Mutex<FakeTcState>,
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
        let mut s = self.state.lock().expect("fake tc");
        s.devs.insert(
            dev.to_owned(),
            ObservedShaper {
                root: Some((kind.to_owned(), "8001:".to_owned())),
                classes: BTreeMap::new(),
            },
        );
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
                let (TcOp::ReplaceRoot { dev }
                | TcOp::DeleteRoot { dev }
                | TcOp::SetClass { dev, .. }
                | TcOp::DeleteClass { dev, .. }) = op;
                if s.missing.contains(dev) {
                    return Err(TcError::NoDevice(dev.clone()));
                }
                match op {
                    TcOp::ReplaceRoot { dev } => {
                        if s.devs.get(dev).is_some_and(ObservedShaper::root_is_ours) {
                            return Err(TcError::Refused(format!(
                                "{dev}: change operation not supported by htb"
                            )));
                        }
                        s.devs.insert(
                            dev.clone(),
                            ObservedShaper {
                                root: Some(("htb".into(), format!("{MAJOR}:"))),
                                classes: BTreeMap::new(),
                            },
                        );
                    }
                    TcOp::DeleteRoot { dev } => {
                        if s.devs.remove(dev).is_none() {
                            return Err(TcError::Refused(format!("{dev}: no root qdisc")));
                        }
                    }
                    TcOp::SetClass { dev, minor, kbps } => {
                        let d = s
                            .devs
                            .get_mut(dev)
                            .filter(|d| d.root_is_ours())
                            .ok_or_else(|| TcError::Refused(format!("{dev}: no htb root")))?;
                        d.classes.insert(*minor, *kbps);
                    }
                    TcOp::DeleteClass { dev, minor } => {
                        let d = s
                            .devs
                            .get_mut(dev)
                            .ok_or_else(|| TcError::Refused(format!("{dev}: no root")))?;
                        if d.classes.remove(minor).is_none() {
                            return Err(TcError::Refused(format!("{dev}: no class {minor:x}")));
                        }
                    }
                }
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
            Ok(s.devs.get(dev).cloned().unwrap_or_else(|| ObservedShaper {
                root: Some(("noqueue".into(), "0:".into())),
                classes: BTreeMap::new(),
            }))
        })
    }

    fn remove_root<'a>(&'a self, dev: &'a str) -> Fut<'a, Result<bool, TcError>> {
        Box::pin(async move {
            let ours = self.observe(dev).await?.root_is_ours();
            if ours {
                self.run(&[TcOp::DeleteRoot {
                    dev: dev.to_owned(),
                }])
                .await?;
            }
            Ok(ours)
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
        }
    }

    /// The contract both shapers keep, with the operations the engine uses.
    async fn contract(rig: &dyn Rig) {
        let tc = rig.shaper();
        // A fresh device has the kernel's default root (noqueue on a veth).
        let default = state(Some(("noqueue", "0:")), &[]);
        assert_eq!(tc.observe(DEV).await.unwrap(), default);
        // Nothing to delete, no HTB to put a class under: refused.
        let no_root = [TcOp::DeleteRoot { dev: DEV.into() }];
        assert!(tc.run(&no_root).await.is_err());
        assert!(tc.run(&[set(0x102, 5000)]).await.is_err());
        assert_eq!(tc.observe(DEV).await.unwrap(), default);

        // Our root, then classes: the rates read back, whatever unit tc prints.
        tc.run(&[root_of(DEV)]).await.unwrap();
        assert_eq!(
            tc.observe(DEV).await.unwrap(),
            state(Some(("htb", "1:")), &[])
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
        assert_eq!(live, state(Some(("htb", "1:")), &classes));

        // Change a rate, delete a class.
        tc.run(&[set(0x102, 2500), del(0x103)]).await.unwrap();
        let want = [(0x101, 100), (0x102, 2500), (0x1080, 123_457)];
        assert_eq!(
            tc.observe(DEV).await.unwrap(),
            state(Some(("htb", "1:")), &want)
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
            state(Some(("htb", "1:")), &want)
        );

        // Our root cannot be replaced by itself (HTB has no change operation):
        // refused, and its classes stay.
        assert!(tc.run(&[root_of(DEV)]).await.is_err());
        assert_eq!(
            tc.observe(DEV).await.unwrap(),
            state(Some(("htb", "1:")), &want)
        );

        // Someone else's root qdisc: seen with its kind and handle, none of its
        // classes counted as ours, and left alone by everything done on ours.
        rig.foreign_root(OTHER);
        let foreign = state(Some(("htb", "8001:")), &[]);
        assert_eq!(tc.observe(OTHER).await.unwrap(), foreign);
        assert!(!tc.observe(OTHER).await.unwrap().root_is_ours());
        tc.run(&[set(0x106, 600), TcOp::DeleteRoot { dev: DEV.into() }])
            .await
            .unwrap();
        assert_eq!(tc.observe(OTHER).await.unwrap(), foreign);

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

    #[test]
    fn listings_parse_into_root_and_rates() {
        let q = "qdisc htb 1: root refcnt 2 r2q 10 default 0 direct_packets_stat 3 direct_qlen 1000\nqdisc pfifo 100: parent 1:100 limit 41p\n";
        let c = "class htb 1:101 root leaf 101: prio 0 rate 1Mbit ceil 1Mbit burst 3028b cburst 3028b \nclass htb 1:100 root leaf 100: prio 0 rate 5Mbit ceil 5Mbit burst 1600b cburst 1600b \nclass htb 1:1040 root prio 0 rate 1500Kbit ceil 1500Kbit burst 1600b cburst 1600b \n";
        let o = parse_observed(q, c).unwrap();
        assert!(o.root_is_ours());
        assert_eq!(o.classes[&0x100], 5000);
        assert_eq!(o.classes[&0x101], 1000);
        assert_eq!(o.classes[&0x1040], 1500);
        let foreign = parse_observed("qdisc noqueue 0: root refcnt 2 \n", "").unwrap();
        assert_eq!(foreign.root, Some(("noqueue".into(), "0:".into())));
        assert!(!foreign.root_is_ours());
        assert_eq!(parse_rate_kbps("1.5Mbit").unwrap(), 1500);
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
            tc.remove_root("np-nosuch0").await,
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
        ]);
        assert_eq!(
            s,
            "qdisc replace dev br-lan root handle 1: htb\n\
             class replace dev br-lan parent 1: classid 1:101 htb rate 5000kbit ceil 5000kbit burst 12500 cburst 12500 quantum 60000\n\
             qdisc replace dev br-lan parent 1:101 handle 101: pfifo limit 41\n\
             class del dev br-lan classid 1:1040\n"
        );
    }
}
