//! The device-usage endpoints: argument checking and error mapping over
//! [`crate::usage::Usage`]. Statuses come from the codes `AgentError::code` gives.

use serde_json::Value;

use super::policy::Call;
use super::{AgentError, Reply};
use crate::app::App;
use crate::policy::model::Mac;
use crate::scan::names::{self, Names};
use crate::usage::UsageError;

/// Devices per page when the caller names no `limit`, and the most it may name.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

impl From<UsageError> for AgentError {
    fn from(e: UsageError) -> Self {
        match e {
            UsageError::Unavailable { .. } => AgentError::UsageUnavailable(e.to_string()),
            UsageError::Misconfigured(_) => AgentError::UsageMisconfigured(e.to_string()),
            UsageError::BadOutput(_) => AgentError::UsageBadOutput(e.to_string()),
            UsageError::NoSuchDevice(_) => AgentError::NoUsage(e.to_string()),
            UsageError::ResetFailed(_) => AgentError::ResetFailed(e.to_string()),
            UsageError::Store(_) => AgentError::Internal(e.to_string()),
        }
    }
}

/// An unsigned integer argument within `range`, from the query string (text) or
/// the body (a number).
fn int_arg(
    call: &Call,
    name: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Option<u64>, AgentError> {
    let bad = || {
        AgentError::InvalidParameter(format!(
            "{name} must be an integer from {} to {}",
            range.start(),
            range.end()
        ))
    };
    let n = match call.args.get(name) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s.trim().parse::<u64>().map_err(|_| bad())?,
        Some(Value::Number(n)) => crate::policy::model::whole_number(n).ok_or_else(bad)?,
        Some(_) => return Err(bad()),
    };
    if range.contains(&n) {
        Ok(Some(n))
    } else {
        Err(bad())
    }
}

fn days(call: &Call, default: u64) -> Result<u32, AgentError> {
    Ok(int_arg(call, "days", 1..=365)?.unwrap_or(default) as u32)
}

/// The owner's names (from the policy) and the DHCP hostnames, for one answer.
pub async fn names(app: &App) -> Names {
    Names {
        owner: app.policy.read(names::owner_names).await,
        dhcp: names::hostnames(app.files.as_ref()),
    }
}

pub async fn handle(app: &App, call: Call) -> Result<Reply, AgentError> {
    let usage = &app.usage;
    // Every answer but these two lists devices (one await: the agent's flash pays
    // for each).
    let names = match call.pattern {
        "/api/device-usage/status" | "/api/device-usage/reset" => Names::default(),
        _ => names(app).await,
    };
    match (call.method, call.pattern) {
        ("GET", "/api/device-usage/current") => {
            let limit = int_arg(&call, "limit", 1..=MAX_LIMIT as u64)?
                .map_or(DEFAULT_LIMIT, |n| n as usize);
            let offset = int_arg(&call, "offset", 0..=u32::MAX as u64)?.unwrap_or(0) as usize;
            Reply::ok(usage.current(offset, limit, &names).await?)
        }
        ("GET", "/api/device-usage/device/{mac}") => {
            let raw = call.path_id.as_deref().unwrap_or_default();
            let mac = Mac::parse(raw).map_err(AgentError::Rejected)?;
            Reply::ok(usage.device(mac, &names).await?)
        }
        ("GET", "/api/device-usage/status") => Reply::ok(usage.status().await),
        ("GET", "/api/device-usage/history") => {
            let days = days(&call, 7)?;
            let csv = match call.args.get("format") {
                None | Some(Value::Null) => false,
                Some(Value::String(f)) if f == "json" => false,
                Some(Value::String(f)) if f == "csv" => true,
                Some(_) => {
                    return Err(AgentError::InvalidParameter(
                        "format must be json or csv".into(),
                    ))
                }
            };
            if csv {
                Reply::raw(
                    "text/csv; charset=utf-8",
                    usage.history_csv(days, &names).await?,
                )
            } else {
                Reply::ok(usage.history(days, &names).await?)
            }
        }
        ("GET", "/api/device-usage/summary") => {
            let days = days(&call, 30)?;
            Reply::ok(usage.summary(days, &names).await?)
        }
        ("POST", "/api/device-usage/reset") => {
            let keep =
                match call
                    .args
                    .get("keepHistory")
                    .or(call.args.get("keep_history"))
                {
                    None => false,
                    Some(Value::Bool(b)) => *b,
                    // `null` is refused, not read as absent: absent clears the history.
                    Some(_) => return Err(AgentError::InvalidParameter(
                        "keepHistory must be true or false (leave it out to clear the history too)"
                            .into(),
                    )),
                };
            Reply::ok(usage.reset(keep).await?)
        }
        (_, other) => Err(AgentError::NotImplemented(other)),
    }
}
