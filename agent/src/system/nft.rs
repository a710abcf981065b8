//! The firewall seam: NetPilot's nftables table applied as one `nft -f` transaction
//! and read back as JSON. [`RealNft`] drives the `nft` binary; [`FakeNft`] keeps the
//! table in memory with nft's all-or-nothing semantics, for unit tests and the
//! simulated router.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use crate::runtime::process::{self, ProcessError};

pub use super::Fut;

/// NetPilot's own nftables table (DESIGN §5), never fw4's: the one definition that
/// the compiler, the engine and `cleanup` use.
pub const FAMILY: &str = "inet";
pub const TABLE: &str = "netpilot";

/// What a read-back shows of the table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObservedTable {
    pub comment: Option<String>,
    /// Rules per chain.
    pub chains: BTreeMap<String, usize>,
    /// Elements per set or map, in the compiler's notation (`key` or `key : goto c`).
    pub elements: BTreeMap<String, BTreeSet<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("cannot read nft's JSON listing: {0}")]
    Parse(String),
    /// The fake's stand-in for a kernel refusal.
    #[error("nft refused the transaction: {0}")]
    Refused(String),
}

pub trait Firewall: Send + Sync {
    /// Runs a whole script as one transaction.
    fn apply<'a>(&'a self, script: &'a str) -> Fut<'a, Result<(), NftError>>;
    /// The table as the kernel has it; `None` when there is no such table.
    fn observe(&self) -> Fut<'_, Result<Option<ObservedTable>, NftError>>;
    /// Only the table's chain names: cheap, as it fetches no set elements.
    fn chains(&self) -> Fut<'_, Result<Option<BTreeSet<String>>, NftError>>;
    /// Deletes the whole table in one command; `false` when there was none.
    fn delete_table(&self) -> Fut<'_, Result<bool, NftError>>;
}

pub struct RealNft {
    pub program: String,
    pub timeout: Duration,
}

impl Default for RealNft {
    fn default() -> Self {
        RealNft {
            program: "nft".into(),
            timeout: Duration::from_secs(30),
        }
    }
}

/// nft reads time-of-day and dates in its own local time; the compiler writes UTC.
const ENV: &[(&str, &str)] = &[("TZ", "UTC0")];

impl Firewall for RealNft {
    fn apply<'a>(&'a self, script: &'a str) -> Fut<'a, Result<(), NftError>> {
        Box::pin(async move {
            process::run_with_env(
                &[&self.program, "-f", "-"],
                Some(script.as_bytes()),
                self.timeout,
                ENV,
            )
            .await?;
            Ok(())
        })
    }

    fn observe(&self) -> Fut<'_, Result<Option<ObservedTable>, NftError>> {
        Box::pin(async move {
            let argv = [&self.program, "-j", "-s", "list", "table", FAMILY, TABLE];
            match process::run_with_env(&argv, None, self.timeout, ENV).await {
                Ok(out) => parse_listing(&out).map(Some),
                Err(e) if no_such_table(&e) => Ok(None),
                Err(e) => Err(e.into()),
            }
        })
    }

    fn chains(&self) -> Fut<'_, Result<Option<BTreeSet<String>>, NftError>> {
        Box::pin(async move {
            let argv = [&self.program, "-j", "list", "chains", FAMILY];
            let out = process::run_with_env(&argv, None, self.timeout, ENV).await?;
            parse_chains(&out)
        })
    }

    fn delete_table(&self) -> Fut<'_, Result<bool, NftError>> {
        Box::pin(async move {
            // One command rather than list-then-delete: nothing can slip in between.
            let argv = [&self.program, "delete", "table", FAMILY, TABLE];
            match process::run_with_env(&argv, None, self.timeout, ENV).await {
                Ok(_) => Ok(true),
                Err(e) if no_such_table(&e) => Ok(false),
                Err(e) => Err(e.into()),
            }
        })
    }
}

/// nft's answer for a table that does not exist (ENOENT from the kernel).
fn no_such_table(e: &ProcessError) -> bool {
    matches!(e, ProcessError::Failed { stderr, .. } if stderr.contains("No such file or directory"))
}

/// The chains of our table in `nft -j list chains` output; `None` without any.
pub fn parse_chains(json: &str) -> Result<Option<BTreeSet<String>>, NftError> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| NftError::Parse(e.to_string()))?;
    let items = v["nftables"]
        .as_array()
        .ok_or_else(|| NftError::Parse("no \"nftables\" array".into()))?;
    let chains = set_of(
        items
            .iter()
            .filter_map(|i| i.get("chain"))
            .filter(|c| c["table"] == TABLE && c["family"] == FAMILY)
            .filter_map(|c| c["name"].as_str().map(str::to_owned)),
    );
    Ok((!chains.is_empty()).then_some(chains))
}

/// Collects by inserting: `collect()` into a B-tree sorts first, and every sort
/// instance costs kilobytes of the router's flash.
pub fn set_of(items: impl IntoIterator<Item = String>) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    for i in items {
        set.insert(i);
    }
    set
}

/// Reduces `nft -j list table` to what the engine compares.
pub fn parse_listing(json: &str) -> Result<ObservedTable, NftError> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| NftError::Parse(e.to_string()))?;
    let items = v["nftables"]
        .as_array()
        .ok_or_else(|| NftError::Parse("no \"nftables\" array".into()))?;
    let mut out = ObservedTable::default();
    for item in items {
        if let Some(c) = item.get("chain") {
            let name = c["name"].as_str().unwrap_or_default().to_owned();
            out.chains.entry(name).or_insert(0);
        } else if let Some(r) = item.get("rule") {
            if let Some(c) = r["comment"].as_str().filter(|c| c.starts_with("netpilot ")) {
                out.comment = Some(c.to_owned());
            }
            let name = r["chain"].as_str().unwrap_or_default().to_owned();
            *out.chains.entry(name).or_insert(0) += 1;
        } else if let Some(s) = item.get("set").or_else(|| item.get("map")) {
            let name = s["name"].as_str().unwrap_or_default().to_owned();
            let mut elems = BTreeSet::new();
            for e in s["elem"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
                elems.insert(element_text(e)?);
            }
            out.elements.insert(name, elems);
        }
    }
    Ok(out)
}

fn element_text(e: &serde_json::Value) -> Result<String, NftError> {
    match e {
        serde_json::Value::Array(pair) if pair.len() == 2 => {
            Ok(format!("{} : {}", scalar(&pair[0])?, verdict(&pair[1])?))
        }
        other => scalar(other),
    }
}

fn scalar(v: &serde_json::Value) -> Result<String, NftError> {
    match v {
        serde_json::Value::String(s) => Ok(s.clone()),
        // Marks come back as numbers; the compiler writes them as 0x%08x.
        serde_json::Value::Number(n) => n
            .as_u64()
            .map(|n| format!("0x{n:08x}"))
            .ok_or_else(|| NftError::Parse(format!("element {n}"))),
        other => Err(NftError::Parse(format!("unexpected element {other}"))),
    }
}

fn verdict(v: &serde_json::Value) -> Result<String, NftError> {
    for kind in ["goto", "jump"] {
        if let Some(t) = v.get(kind).and_then(|j| j["target"].as_str()) {
            return Ok(format!("{kind} {t}"));
        }
    }
    match v {
        serde_json::Value::String(s) => Ok(s.clone()),
        // A verdict without a target reads back as `{"return": null}`.
        serde_json::Value::Object(o) if o.len() == 1 && o.values().all(|x| x.is_null()) => {
            Ok(o.keys().next().cloned().unwrap_or_default())
        }
        other => scalar(other),
    }
}

/// An in-memory table that accepts the compiler's own script forms with nft's
/// transaction semantics: a script applies completely or not at all, and deleting
/// an element that is not there fails it.
#[derive(Default)]
pub struct FakeNft {
    state: Mutex<FakeState>,
}

#[derive(Default, Clone)]
struct FakeState {
    table: Option<FakeTable>,
    fail_next: usize,
    applies: usize,
}

#[derive(Clone, Default)]
struct FakeTable {
    structure: String,
    /// Per set: element key → the whole element.
    elements: BTreeMap<String, BTreeMap<String, String>>,
    flushed: bool,
}

fn key_of(e: &str) -> &str {
    e.split_once(" : ").map_or(e, |(k, _)| k)
}

impl FakeNft {
    /// The next `n` applies (or table deletions) fail as if the kernel refused them.
    pub fn fail_next(&self, n: usize) {
        self.state.lock().expect("fake nft").fail_next = n;
    }

    /// Transactions applied so far.
    pub fn applies(&self) -> usize {
        self.state.lock().expect("fake nft").applies
    }

    /// What `nft flush table` by someone else does: every rule gone.
    pub fn flush_behind_our_back(&self) {
        if let Some(t) = &mut self.state.lock().expect("fake nft").table {
            t.flushed = true;
        }
    }

    pub fn delete_behind_our_back(&self) {
        self.state.lock().expect("fake nft").table = None;
    }

    fn run(state: &mut FakeState, script: &str) -> Result<(), NftError> {
        let prefix = format!("table {FAMILY} {TABLE}");
        let mut lines = script.lines().peekable();
        while let Some(line) = lines.next() {
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            if line == format!("{prefix} {{}}") {
                state.table.get_or_insert_with(FakeTable::default);
            } else if line == format!("delete table {FAMILY} {TABLE}") {
                if state.table.take().is_none() {
                    return Err(NftError::Refused("no such table".into()));
                }
            } else if line == format!("{prefix} {{") {
                let mut structure = format!("{line}\n");
                for l in lines.by_ref() {
                    structure.push_str(l);
                    structure.push('\n');
                    if l == "}" {
                        break;
                    }
                }
                let t = state.table.get_or_insert_with(FakeTable::default);
                t.structure = structure;
                t.flushed = false;
                for (name, elems) in inline_elements(&t.structure) {
                    let mut by_key = BTreeMap::new();
                    for e in elems {
                        by_key.insert(key_of(&e).to_owned(), e);
                    }
                    t.elements.insert(name, by_key);
                }
            } else if let Some(rest) = line
                .strip_prefix("add element ")
                .or_else(|| line.strip_prefix("delete element "))
            {
                let add = line.starts_with("add");
                let rest = rest
                    .strip_prefix(&format!("{FAMILY} {TABLE} "))
                    .ok_or_else(|| NftError::Refused(format!("not our table: {line}")))?;
                let (set, list) = rest
                    .split_once(" { ")
                    .ok_or_else(|| NftError::Refused(format!("syntax: {line}")))?;
                let list = list.trim_end_matches(" }");
                let table = state
                    .table
                    .as_mut()
                    .ok_or_else(|| NftError::Refused("no such table".into()))?;
                let elems = table.elements.entry(set.to_owned()).or_default();
                for e in list.split(", ") {
                    let key = key_of(e);
                    if add {
                        match elems.get(key) {
                            Some(have) if have != e => {
                                return Err(NftError::Refused(format!("{set}: {key} exists")))
                            }
                            _ => {
                                elems.insert(key.to_owned(), e.to_owned());
                            }
                        }
                    } else if elems.remove(key).is_none() {
                        return Err(NftError::Refused(format!("{set}: no element {e}")));
                    }
                }
            } else {
                return Err(NftError::Refused(format!("fake nft cannot parse {line:?}")));
            }
        }
        Ok(())
    }
}

impl Firewall for FakeNft {
    fn chains(&self) -> Fut<'_, Result<Option<BTreeSet<String>>, NftError>> {
        Box::pin(async move {
            let state = self.state.lock().expect("fake nft");
            Ok(state
                .table
                .as_ref()
                .map(|t| set_of(rule_counts(&t.structure).into_keys())))
        })
    }

    fn apply<'a>(&'a self, script: &'a str) -> Fut<'a, Result<(), NftError>> {
        Box::pin(async move {
            let mut state = self.state.lock().expect("fake nft");
            if state.fail_next > 0 {
                state.fail_next -= 1;
                return Err(NftError::Refused("injected failure".into()));
            }
            let mut next = state.clone();
            Self::run(&mut next, script)?;
            next.applies += 1;
            *state = next;
            Ok(())
        })
    }

    fn delete_table(&self) -> Fut<'_, Result<bool, NftError>> {
        Box::pin(async move {
            let mut state = self.state.lock().expect("fake nft");
            if state.fail_next > 0 {
                state.fail_next -= 1;
                return Err(NftError::Refused("injected failure".into()));
            }
            Ok(state.table.take().is_some())
        })
    }

    fn observe(&self) -> Fut<'_, Result<Option<ObservedTable>, NftError>> {
        Box::pin(async move {
            let state = self.state.lock().expect("fake nft");
            Ok(state.table.as_ref().map(|t| {
                let mut chains = rule_counts(&t.structure);
                if t.flushed {
                    chains.values_mut().for_each(|n| *n = 0);
                }
                let mut elements = BTreeMap::new();
                for (name, m) in &t.elements {
                    elements.insert(name.clone(), set_of(m.values().cloned()));
                }
                ObservedTable {
                    comment: comment_of(&t.structure),
                    chains,
                    elements,
                }
            }))
        })
    }
}

/// The digest comment (`comment "netpilot …"` on a rule) of a compiled structure.
pub fn comment_of(structure: &str) -> Option<String> {
    structure.lines().find_map(|l| {
        let (_, rest) = l.split_once("comment \"netpilot ")?;
        Some(format!("netpilot {}", rest.strip_suffix('"')?))
    })
}

/// Rules per chain of a compiled structure (the compiler writes one rule per line).
pub fn rule_counts(structure: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    let mut current: Option<String> = None;
    for l in structure.lines() {
        let t = l.trim();
        if let Some(name) = t.strip_prefix("chain ").and_then(|r| r.strip_suffix(" {")) {
            out.insert(name.to_owned(), 0);
            current = Some(name.to_owned());
        } else if t == "}" {
            current = None;
        } else if let Some(c) = &current {
            if !(t.is_empty() || t.starts_with('#') || t.starts_with("type ")) {
                *out.get_mut(c).expect("chain inserted") += 1;
            }
        }
    }
    out
}

/// Sets and maps of a compiled structure with the elements written inline (and the
/// empty ones), as a read-back would show them.
pub fn inline_elements(structure: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out = BTreeMap::new();
    let mut current: Option<String> = None;
    for l in structure.lines() {
        let t = l.trim();
        if let Some(name) = t
            .strip_prefix("map ")
            .or_else(|| t.strip_prefix("set "))
            .and_then(|r| r.strip_suffix(" {"))
        {
            out.insert(name.to_owned(), BTreeSet::new());
            current = Some(name.to_owned());
        } else if t == "}" {
            current = None;
        } else if let (Some(c), Some(list)) = (
            &current,
            t.strip_prefix("elements = { ")
                .and_then(|r| r.strip_suffix(" }")),
        ) {
            let set = out.get_mut(c).expect("set inserted");
            for e in list.split(", ") {
                set.insert(e.to_owned());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_real_listing_reduces_to_counts_and_elements() {
        // Captured from nft 1.0.6 on this project's kernel.
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "inet", "name": "netpilot", "handle": 1}}, {"map": {"family": "inet", "name": "dev_group", "table": "netpilot", "type": "ether_addr", "handle": 2, "map": "verdict", "elem": [["02:4e:50:00:00:11", {"goto": {"target": "g2_up"}}]]}}, {"map": {"family": "inet", "name": "ct_group", "table": "netpilot", "type": "mark", "handle": 3, "map": "verdict", "elem": [[65536, {"goto": {"target": "g1_down"}}]]}}, {"set": {"family": "inet", "name": "block_mac", "table": "netpilot", "type": "ether_addr", "handle": 4}}, {"chain": {"family": "inet", "table": "netpilot", "name": "forward", "handle": 1, "type": "filter", "hook": "forward", "prio": -5, "policy": "accept"}}, {"chain": {"family": "inet", "table": "netpilot", "name": "to_lan", "handle": 7}}, {"rule": {"family": "inet", "table": "netpilot", "chain": "forward", "handle": 5, "comment": "netpilot 0123456789abcdef", "expr": []}}, {"rule": {"family": "inet", "table": "netpilot", "chain": "forward", "handle": 6, "expr": []}}]}"#;
        let t = parse_listing(json).unwrap();
        assert_eq!(t.comment.as_deref(), Some("netpilot 0123456789abcdef"));
        assert_eq!(t.chains["forward"], 2);
        assert_eq!(t.chains["to_lan"], 0);
        assert!(t.elements["dev_group"].contains("02:4e:50:00:00:11 : goto g2_up"));
        assert!(t.elements["ct_group"].contains("0x00010000 : goto g1_down"));
        assert!(t.elements["block_mac"].is_empty());
        assert!(matches!(
            parse_listing("{\"nftables\": 3"),
            Err(NftError::Parse(_))
        ));
    }

    #[test]
    fn chain_listings_name_only_our_chains() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"chain": {"family": "inet", "table": "fw4", "name": "forward", "handle": 1}}, {"chain": {"family": "inet", "table": "netpilot", "name": "forward", "handle": 3, "type": "filter", "hook": "forward", "prio": -5, "policy": "accept"}}, {"chain": {"family": "inet", "table": "netpilot", "name": "g1_up", "handle": 4}}]}"#;
        let chains = parse_chains(json).unwrap().unwrap();
        assert_eq!(chains.into_iter().collect::<Vec<_>>(), ["forward", "g1_up"]);
        let none = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "x", "json_schema_version": 1}}]}"#;
        assert_eq!(parse_chains(none).unwrap(), None);
    }

    #[tokio::test]
    async fn the_fake_is_all_or_nothing() {
        let nft = FakeNft::default();
        let script = "table inet netpilot {}\ndelete table inet netpilot\ntable inet netpilot {\n\tset s {\n\t\ttype ether_addr\n\t}\n\tchain c {\n\t\tdrop\n\t}\n}\nadd element inet netpilot s { 02:00:00:00:00:01 }\n";
        nft.apply(script).await.unwrap();
        let t = nft.observe().await.unwrap().unwrap();
        assert_eq!(t.chains["c"], 1);
        assert_eq!(t.elements["s"].len(), 1);
        // The add would succeed but the delete of a missing element fails the whole.
        let bad = "add element inet netpilot s { 02:00:00:00:00:02 }\ndelete element inet netpilot s { 02:00:00:00:00:09 }\n";
        assert!(nft.apply(bad).await.is_err());
        assert_eq!(nft.observe().await.unwrap().unwrap().elements["s"].len(), 1);
        nft.flush_behind_our_back();
        assert_eq!(nft.observe().await.unwrap().unwrap().chains["c"], 0);
    }
}
