//! The policy endpoints: groups, their policies, the infrastructure status, and the
//! block/whitelist/blacklist views — all thin handlers over the one engine. Devices
//! in these answers are named as everywhere else (`scan::names`).

use std::collections::{BTreeMap, HashMap};

use netpilot_proto::ErrorCode;
use serde::Serialize;
use serde_json::Value;

use super::{AgentError, Reply};
use crate::policy::engine::{ApplyReport, Engine, EngineError};
use crate::policy::model::{
    self, Desired, GroupId, GroupIn, Internet, ListKind, Mac, PolicyIn, PolicyOut, Target,
};
use crate::policy::ops;
use crate::policy::persist::Actor;
use crate::scan::names::{self, NameSource, Names};
use crate::system::files::Files;

/// A request as the handlers see it: path parameters, query and JSON body merged
/// with the body winning, as the relay's legacy forms allow either.
pub struct Call {
    pub method: &'static str,
    pub pattern: &'static str,
    pub path_id: Option<String>,
    pub args: serde_json::Map<String, Value>,
    pub actor: Actor,
}

impl Call {
    fn str_arg(&self, name: &str) -> Result<Option<&str>, AgentError> {
        match self.args.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(AgentError::InvalidParameter(format!(
                "{name} must be a string, got {other}"
            ))),
        }
    }

    fn target(&self) -> Result<Target, AgentError> {
        Ok(Target::from_parts(
            self.str_arg("ip")?,
            self.str_arg("mac")?,
        )?)
    }

    fn group_id(&self) -> Result<GroupId, AgentError> {
        let raw = self.path_id.as_deref().unwrap_or_default();
        Ok(model::group_id(&Value::String(raw.to_owned()))?)
    }
}

impl From<model::Invalid> for AgentError {
    fn from(e: model::Invalid) -> Self {
        AgentError::Rejected(e)
    }
}

impl From<EngineError> for AgentError {
    fn from(e: EngineError) -> Self {
        match &e {
            EngineError::Invalid(i) => AgentError::Rejected(i.clone()),
            EngineError::NoSuchGroup(id) => {
                AgentError::NoSuchGroup(format!("group {id} does not exist"))
            }
            EngineError::Observe(_)
            | EngineError::Step(_)
            | EngineError::Verify(_)
            | EngineError::Unrepaired(_) => AgentError::ApplyFailed(e.to_string()),
            EngineError::Store(_) => AgentError::Internal(e.to_string()),
        }
    }
}

#[derive(Serialize)]
pub struct GroupOut {
    id: GroupId,
    name: String,
    devices: Vec<GroupDeviceOut>,
    policy: PolicyOut,
    /// The conntrack-mark value and tc class the group's traffic carries.
    mark: String,
    class: String,
}

/// A group's device: as stored (`ip`, `ipv6`), named like every device. `name`
/// falls back to the DHCP hostname, so a client writing a group back sends `name`
/// only where `name_source` is `owner`.
#[derive(Serialize)]
struct GroupDeviceOut {
    mac: Mac,
    ip: Option<String>,
    ipv6: Option<String>,
    name: Option<String>,
    name_source: Option<NameSource>,
    hostname: Option<String>,
    randomized: bool,
}

pub fn group_out(d: &Desired, id: GroupId, dhcp: &HashMap<Mac, String>) -> Option<GroupOut> {
    let g = d.groups.get(&id)?;
    let slot = d.slots.get(&id).copied().unwrap_or(0);
    Some(GroupOut {
        id,
        name: g.name.clone(),
        devices: g
            .devices
            .iter()
            .map(|x| {
                let hostname = dhcp.get(&x.mac).cloned();
                let id = names::identity(&x.mac, x.name.as_deref(), hostname.as_deref());
                GroupDeviceOut {
                    mac: x.mac,
                    ip: x.ipv4.map(|a| a.to_string()),
                    ipv6: x.ipv6.map(|a| a.to_string()),
                    name: id.name,
                    name_source: id.name_source,
                    hostname,
                    randomized: id.randomized,
                }
            })
            .collect(),
        policy: g.policy.to_out(),
        mark: format!("0x{:08x}", crate::policy::compile::mark_of(slot)),
        class: crate::policy::compile::classid(crate::policy::compile::base_class(slot)),
    })
}

// Typed answers rather than json! maps: the router's flash pays for every
// expanded macro.
#[derive(Serialize)]
struct GroupList {
    groups: Vec<GroupOut>,
    generation: u64,
}

#[derive(Serialize)]
struct GroupChange {
    group: Option<GroupOut>,
    apply: ApplyReport,
}

#[derive(Serialize)]
struct SyncAllResult {
    groups: usize,
    devices: usize,
    apply: ApplyReport,
}

#[derive(Serialize)]
struct Done {
    #[serde(skip_serializing_if = "Option::is_none")]
    deleted: Option<GroupId>,
    message: String,
    apply: ApplyReport,
}

#[derive(Serialize)]
struct InfraStatus {
    status: crate::policy::engine::Status,
    recent_changes: Vec<crate::policy::persist::AuditEntry>,
    /// fw4's flow offloading and what established flows escape.
    offloading: crate::offload::OffloadStatus,
}

#[derive(Serialize)]
struct DeviceList {
    entries: Vec<Entry>,
    count: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    active: Option<bool>,
}

#[derive(Serialize)]
struct ListChange {
    message: String,
    target: String,
    changed: bool,
    blocked_by: Vec<String>,
    apply: ApplyReport,
}

#[derive(Serialize)]
struct BlockedList {
    blocked: Vec<Entry>,
    count: usize,
    whitelist_active: bool,
    whitelist_entries: usize,
}

/// Deserialises one part of the body with a precise message.
fn parse<T: serde::de::DeserializeOwned>(what: &str, v: &Value) -> Result<T, AgentError> {
    serde_json::from_value(v.clone())
        .map_err(|e| AgentError::InvalidParameter(format!("{what}: {e}")))
}

pub async fn handle(
    engine: &Engine,
    offload: &crate::offload::Offload,
    files: &dyn Files,
    call: Call,
) -> Result<Reply, AgentError> {
    let dhcp = || names::hostnames(files);
    match (call.method, call.pattern) {
        ("GET", "/api/groups") => {
            let dhcp = dhcp();
            let d = engine.desired().await;
            let groups: Vec<GroupOut> = d
                .groups
                .keys()
                .filter_map(|id| group_out(&d, *id, &dhcp))
                .collect();
            Reply::ok(GroupList {
                groups,
                generation: engine.status().generation,
            })
        }
        ("GET", "/api/groups/{id}") => {
            let id = call.group_id()?;
            let d = engine.desired().await;
            let g = group_out(&d, id, &dhcp())
                .ok_or_else(|| AgentError::NoSuchGroup(format!("group {id} does not exist")))?;
            Reply::ok(g)
        }
        ("POST", "/api/groups/sync") => {
            let raw = call
                .args
                .get("group")
                .cloned()
                .unwrap_or_else(|| Value::Object(call.args.clone()));
            let group = parse::<GroupIn>("group", &raw)?.validate(None)?;
            let id = group.id;
            let (_, report) = engine
                .change(&call.actor, &format!("groups.sync group {id}"), |d| {
                    ops::sync_group(d, group)
                })
                .await?;
            let d = engine.desired().await;
            Reply::ok(GroupChange {
                group: group_out(&d, id, &dhcp()),
                apply: report,
            })
        }
        ("POST", "/api/groups/sync-all") => {
            let raw = call.args.get("groups").ok_or_else(|| {
                AgentError::InvalidParameter("groups is required (a list of groups)".into())
            })?;
            let list = raw
                .as_array()
                .ok_or_else(|| AgentError::InvalidParameter("groups must be a list".into()))?;
            if list.len() > model::MAX_GROUPS {
                return Err(model::Invalid {
                    code: ErrorCode::LimitExceeded,
                    message: format!(
                        "{} groups; a router holds at most {}",
                        list.len(),
                        model::MAX_GROUPS
                    ),
                }
                .into());
            }
            let total: usize = list
                .iter()
                .map(|g| {
                    g.get("devices")
                        .and_then(Value::as_array)
                        .map_or(0, Vec::len)
                })
                .sum();
            // Refused before any per-device work: the limit is the answer, quickly.
            if total > model::MAX_DEVICES {
                return Err(model::too_many_devices(total).into());
            }
            let mut groups = Vec::with_capacity(list.len());
            for (i, g) in list.iter().enumerate() {
                let g = parse::<GroupIn>(&format!("groups[{i}]"), g)?.validate(None)?;
                groups.push(g);
            }
            let n = groups.len();
            let (_, report) = engine
                .change(
                    &call.actor,
                    &format!("groups.sync-all {n} groups, {total} devices"),
                    |d| ops::sync_all(d, groups),
                )
                .await?;
            let d = engine.desired().await;
            Reply::ok(SyncAllResult {
                groups: d.groups.len(),
                devices: d.groups.values().map(|g| g.devices.len()).sum(),
                apply: report,
            })
        }
        ("PUT", "/api/groups/{id}/policy") => {
            let id = call.group_id()?;
            let raw = call
                .args
                .get("policy")
                .cloned()
                .unwrap_or_else(|| Value::Object(call.args.clone()));
            let policy = parse::<PolicyIn>("policy", &raw)?.validate()?;
            let (_, report) = engine
                .change(&call.actor, &format!("groups.policy group {id}"), |d| {
                    ops::set_policy(d, id, policy)
                })
                .await?;
            let d = engine.desired().await;
            Reply::ok(GroupChange {
                group: group_out(&d, id, &dhcp()),
                apply: report,
            })
        }
        ("DELETE", "/api/groups/{id}") => {
            let id = call.group_id()?;
            let ((), report) = engine
                .change(&call.actor, &format!("groups.delete group {id}"), |d| {
                    ops::delete_group(d, id)
                })
                .await?;
            Reply::ok(Done {
                deleted: Some(id),
                message: format!("group {id} deleted; its devices are guests now"),
                apply: report,
            })
        }
        ("GET", "/api/infrastructure/status") => {
            let status = engine.status();
            let audit = engine.audit_tail(20).await?;
            Reply::ok(InfraStatus {
                status,
                recent_changes: audit,
                offloading: offload.status(),
            })
        }
        ("GET", "/api/blocked") => {
            let d = engine.desired().await;
            Reply::ok(blocked_view(&d, &Names::read(&d, files)))
        }
        ("POST", "/api/block") => list_change(engine, &call, ListKind::Block, true).await,
        ("POST", "/api/unblock") => list_change(engine, &call, ListKind::Block, false).await,
        ("GET", "/api/whitelist") => list_view(engine, files, ListKind::White).await,
        ("POST", "/api/whitelist/add") => list_change(engine, &call, ListKind::White, true).await,
        ("POST", "/api/whitelist/remove") => {
            list_change(engine, &call, ListKind::White, false).await
        }
        ("GET", "/api/blacklist") => list_view(engine, files, ListKind::Black).await,
        ("POST", "/api/blacklist/add") => list_change(engine, &call, ListKind::Black, true).await,
        ("POST", "/api/blacklist/remove") => {
            list_change(engine, &call, ListKind::Black, false).await
        }
        ("POST", "/api/reset") => {
            let ((), report) = engine
                .change(&call.actor, "reset", |d| {
                    ops::reset(d);
                    Ok(())
                })
                .await?;
            Reply::ok(Done {
                deleted: None,
                message: "All NetPilot rules, classes, groups and lists removed; enrollment kept"
                    .into(),
                apply: report,
            })
        }
        (_, other) => Err(AgentError::NotImplemented(other)),
    }
}

/// A list entry; a MAC entry names its device (an address entry names none: the
/// device behind an address changes).
#[derive(Serialize)]
struct Entry {
    target: String,
    kind: &'static str,
    mac: Option<Mac>,
    name: Option<String>,
    name_source: Option<NameSource>,
    randomized: Option<bool>,
    /// `/api/blocked` only: why it is blocked.
    #[serde(skip_serializing_if = "Option::is_none")]
    reasons: Option<Vec<String>>,
}

fn entry(t: &Target, names: &Names) -> Entry {
    let (kind, mac) = match t {
        Target::Mac(m) => ("mac", Some(*m)),
        Target::Ip(_) => ("ip", None),
    };
    let id = mac.map(|m| names.of(&m));
    Entry {
        target: t.to_string(),
        kind,
        mac,
        randomized: id.as_ref().map(|i| i.randomized),
        name_source: id.as_ref().and_then(|i| i.name_source),
        name: id.and_then(|i| i.name),
        reasons: None,
    }
}

async fn list_view(
    engine: &Engine,
    files: &dyn Files,
    kind: ListKind,
) -> Result<Reply, AgentError> {
    let d = engine.desired().await;
    let names = Names::read(&d, files);
    let entries: Vec<Entry> = d
        .lists
        .get(&kind)
        .map_or(Vec::new(), |l| l.iter().map(|t| entry(t, &names)).collect());
    // The web app needs to know a whitelist is doing something.
    let active = (kind == ListKind::White).then_some(!entries.is_empty());
    Reply::ok(DeviceList {
        count: entries.len(),
        entries,
        active,
    })
}

async fn list_change(
    engine: &Engine,
    call: &Call,
    kind: ListKind,
    add: bool,
) -> Result<Reply, AgentError> {
    let target = call.target()?;
    let verb = if add { "add" } else { "remove" };
    let (changed, report) = engine
        .change(
            &call.actor,
            &format!("{}.{verb} {target}", kind.as_str()),
            |d| {
                if add {
                    ops::list_add(d, kind, target)
                } else {
                    Ok(ops::list_remove(d, kind, target))
                }
            },
        )
        .await?;
    let d = engine.desired().await;
    let still = d.blocked_reasons(&target);
    let message = match (kind, add, changed) {
        (ListKind::Block, true, true) => format!("{target} blocked"),
        (ListKind::Block, true, false) => format!("{target} was already blocked"),
        (ListKind::Block, false, true) => format!("{target} unblocked"),
        (ListKind::Block, false, false) => format!("{target} was not on the block list"),
        (k, true, true) => format!("{target} added to the {}", k.as_str()),
        (k, true, false) => format!("{target} is already on the {}", k.as_str()),
        (k, false, true) => format!("{target} removed from the {}", k.as_str()),
        (k, false, false) => format!("{target} was not on the {}", k.as_str()),
    };
    Reply::ok(ListChange {
        message,
        target: target.to_string(),
        changed,
        blocked_by: still,
        apply: report,
    })
}

fn blocked_view(d: &Desired, names: &Names) -> BlockedList {
    let mut rows: BTreeMap<String, (Entry, Vec<String>)> = BTreeMap::new();
    for kind in [ListKind::Block, ListKind::Black] {
        for t in d.lists.get(&kind).map(Vec::as_slice).unwrap_or(&[]) {
            rows.entry(t.to_string())
                .or_insert_with(|| (entry(t, names), Vec::new()))
                .1
                .push(kind.as_str().to_owned());
        }
    }
    for g in d
        .groups
        .values()
        .filter(|g| g.policy.internet == Internet::Block)
    {
        for dev in &g.devices {
            let t = Target::Mac(dev.mac);
            rows.entry(t.to_string())
                .or_insert_with(|| (entry(&t, names), Vec::new()))
                .1
                .push(format!("group {}", g.id));
        }
    }
    let blocked: Vec<Entry> = rows
        .into_values()
        .map(|(e, reasons)| Entry {
            reasons: Some(reasons),
            ..e
        })
        .collect();
    let whitelist = d.lists.get(&ListKind::White).map_or(0, Vec::len);
    BlockedList {
        count: blocked.len(),
        blocked,
        whitelist_active: whitelist > 0,
        whitelist_entries: whitelist,
    }
}
