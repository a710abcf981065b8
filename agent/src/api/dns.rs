//! The DNS category endpoints: list the categories, show one, replace one (or add
//! a new one), delete an added one or put a shipped one back. Groups choose categories in their policy; the engine applies a
//! replaced list to every group using it, like any other policy change.

use netpilot_proto::ErrorCode;
use serde::Serialize;
use serde_json::Value;

use super::policy::Call;
use super::{AgentError, Reply};
use crate::dns::list::{self, ParsedList};
use crate::policy::engine::{ApplyReport, Engine};
use crate::policy::model::{Category, Desired, GroupId, Invalid};
use crate::policy::{categories, ops};

/// A description is shown, never written into a resolver's configuration.
const MAX_DESCRIPTION_BYTES: usize = 200;

#[derive(Serialize)]
struct CategoryOut {
    name: String,
    description: String,
    /// Shipped with the agent (possibly replaced since).
    builtin: bool,
    /// Replaced or added through the API; `false`: the shipped list.
    modified: bool,
    updated_unix: Option<i64>,
    domains: usize,
    /// Groups whose policy blocks this category.
    used_by: Vec<GroupId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    list: Option<Vec<String>>,
}

fn out(d: &Desired, c: &Category, with_list: bool) -> CategoryOut {
    CategoryOut {
        name: c.name.clone(),
        description: c.description.clone(),
        builtin: c.builtin,
        modified: c.updated_unix.is_some(),
        updated_unix: c.updated_unix,
        domains: c.domains.len(),
        used_by: d
            .groups
            .values()
            .filter(|g| g.policy.dns.categories.contains(&c.name))
            .map(|g| g.id)
            .collect(),
        list: with_list.then(|| c.domains.iter().map(|x| x.as_str().to_owned()).collect()),
    }
}

#[derive(Serialize)]
struct Listing {
    categories: Vec<CategoryOut>,
    doh: DohOut,
}

#[derive(Serialize)]
struct DohOut {
    names: usize,
    ipv4: usize,
    ipv6: usize,
}

#[derive(Serialize)]
struct Removed {
    name: String,
    /// A shipped category is not deleted: it is back to the list it shipped with.
    restored: bool,
    apply: ApplyReport,
}

#[derive(Serialize)]
struct Replaced {
    category: CategoryOut,
    duplicates: usize,
    apply: ApplyReport,
}

fn rejected(code: ErrorCode, message: String) -> AgentError {
    AgentError::Rejected(Invalid { code, message })
}

fn name_of(call: &Call) -> Result<String, AgentError> {
    let name = call.path_id.as_deref().unwrap_or_default().to_owned();
    crate::dns::categories::validate_name(&name)
        .map_err(|e| rejected(ErrorCode::InvalidCategory, e))?;
    Ok(name)
}

/// The list from the body: `domains` (an array of names) or `list` (text in the
/// list format, one entry per line), not both.
fn parse_body(call: &Call) -> Result<ParsedList, AgentError> {
    let given = |k: &str| call.args.get(k).filter(|v| !v.is_null());
    let parsed = match (given("domains"), given("list")) {
        (Some(Value::Array(items)), None) => {
            let mut names = Vec::with_capacity(items.len());
            for (i, v) in items.iter().enumerate() {
                match v {
                    Value::String(s) => names.push(s.clone()),
                    other => {
                        return Err(rejected(
                            ErrorCode::InvalidDomain,
                            format!("domains[{i}] must be a string, got {other}"),
                        ))
                    }
                }
            }
            list::parse_items(&names)
        }
        (None, Some(Value::String(text))) => list::parse_text(text),
        (Some(_), Some(_)) => {
            return Err(AgentError::InvalidParameter(
                "give either domains (an array) or list (text), not both".into(),
            ))
        }
        _ => {
            return Err(AgentError::InvalidParameter(
                "the body needs domains (an array of names) or list (text, one per line)".into(),
            ))
        }
    };
    if parsed.over_limit {
        let why = parsed
            .errors
            .last()
            .map(|e| e.to_string())
            .unwrap_or_default();
        return Err(rejected(ErrorCode::LimitExceeded, why));
    }
    if parsed.error_count > 0 {
        let shown: Vec<String> = parsed
            .errors
            .iter()
            .map(|e| format!("line {}: {}", e.line, e.reason))
            .collect();
        let more = parsed.error_count.saturating_sub(parsed.errors.len());
        return Err(rejected(
            ErrorCode::InvalidDomain,
            format!(
                "{} entr{} refused, nothing changed: {}{}",
                parsed.error_count,
                if parsed.error_count == 1 { "y" } else { "ies" },
                shown.join("; "),
                if more > 0 {
                    format!("; and {more} more")
                } else {
                    String::new()
                }
            ),
        ));
    }
    Ok(parsed)
}

/// The body's description, else the category's current one (shipped categories
/// always exist, so theirs is kept).
fn description(call: &Call, current: Option<&Category>) -> Result<String, AgentError> {
    match call.args.get("description") {
        None | Some(Value::Null) => Ok(current.map(|c| c.description.clone()).unwrap_or_default()),
        Some(Value::String(s)) => {
            let s = s.trim();
            if s.len() > MAX_DESCRIPTION_BYTES || s.chars().any(char::is_control) {
                return Err(AgentError::InvalidParameter(format!(
                    "description must be at most {MAX_DESCRIPTION_BYTES} bytes without control characters"
                )));
            }
            Ok(s.to_owned())
        }
        Some(other) => Err(AgentError::InvalidParameter(format!(
            "description must be a string, got {other}"
        ))),
    }
}

pub async fn handle(engine: &Engine, call: Call, now_unix: i64) -> Result<Reply, AgentError> {
    match (call.method, call.pattern) {
        ("GET", "/api/dns/categories") => {
            let doh = &engine.dns_config().doh;
            let listing = engine
                .read(|d| Listing {
                    categories: d.categories.values().map(|c| out(d, c, false)).collect(),
                    doh: DohOut {
                        names: doh.names.len(),
                        ipv4: doh.v4.len(),
                        ipv6: doh.v6.len(),
                    },
                })
                .await;
            Reply::ok(listing)
        }
        ("GET", "/api/dns/categories/{name}") => {
            let name = name_of(&call)?;
            let found = engine
                .read(|d| d.categories.get(&name).map(|c| out(d, c, true)))
                .await;
            let found = found.ok_or_else(|| {
                rejected(
                    ErrorCode::UnknownCategory,
                    format!("DNS category {name:?} does not exist"),
                )
            })?;
            Reply::ok(found)
        }
        ("PUT", "/api/dns/categories/{name}") => {
            let name = name_of(&call)?;
            let parsed = parse_body(&call)?;
            let current = engine.read(|d| d.categories.get(&name).cloned()).await;
            let description = description(&call, current.as_deref())?;
            // The same list again changes nothing (and keeps its timestamp), like
            // any other change that changes nothing.
            let unchanged = current.as_deref().is_some_and(|c| {
                c.updated_unix.is_some()
                    && c.description == description
                    && *c.domains == parsed.domains
            });
            let stamp = match &current {
                Some(c) if unchanged => c.updated_unix,
                _ => Some(now_unix),
            };
            let category = categories::category(&name, &description, parsed.domains, stamp);
            let what = format!("dns.category {name}: {} domains", category.domains.len());
            let ((), report) = engine
                .change(&call.actor, &what, |d| ops::set_category(d, category))
                .await?;
            let shown = engine
                .read(|d| d.categories.get(&name).map(|c| out(d, c, false)))
                .await
                .ok_or_else(|| AgentError::Internal("category vanished".into()))?;
            Reply::ok(Replaced {
                category: shown,
                duplicates: parsed.duplicates,
                apply: report,
            })
        }
        ("DELETE", "/api/dns/categories/{name}") => {
            let name = name_of(&call)?;
            let ((), report) = engine
                .change(&call.actor, &format!("dns.category.delete {name}"), |d| {
                    ops::remove_category(d, &name)
                })
                .await?;
            Reply::ok(Removed {
                restored: crate::dns::categories::builtin(&name).is_some(),
                name,
                apply: report,
            })
        }
        (_, other) => Err(AgentError::NotImplemented(other)),
    }
}
