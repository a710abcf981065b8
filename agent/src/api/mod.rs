//! The agent's HTTP API, served on the link (and optionally on a local listener):
//! one dispatcher over the shared route table. Routes whose feature has not landed
//! answer `501 NOT_IMPLEMENTED`; nothing here pretends.

pub mod dns;
pub mod health;
pub mod intake;
pub mod policy;
mod scan;
pub mod usage;
pub mod wifi;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::{Request, Response, StatusCode};
use netpilot_proto::link::{HEADER_REQUEST_ID, HEADER_SESSION_ID, HEADER_USER_ID};
use netpilot_proto::routes::{match_route, RouteError};
use netpilot_proto::{Envelope, ErrorCode, Meta};
use serde::Serialize;
use tracing::Instrument;

use crate::app::App;
use intake::{Admitted, BodyBudget, IntakeError};

pub type Body = Full<Bytes>;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Input the handler cannot accept.
    #[error("{0}")]
    InvalidParameter(String),
    /// No such path.
    #[error("no route for {0}")]
    NotFound(String),
    /// Known path, other method.
    #[error("method not allowed; allowed: {0}")]
    MethodNotAllowed(String),
    /// The route exists in the API but its feature has not landed in this agent.
    #[error("{0} is not implemented by this agent version")]
    NotImplemented(&'static str),
    /// Input the policy model refused, with its own code.
    #[error("{0}")]
    Rejected(crate::policy::model::Invalid),
    /// A group the call names does not exist.
    #[error("{0}")]
    NoSuchGroup(String),
    /// The kernel did not take a policy change; the previous state is in force.
    #[error("{0}")]
    ApplyFailed(String),
    /// A Wi-Fi change is still pending confirmation.
    #[error("{0}")]
    ChangePending(String),
    /// The router's wireless configuration cannot be read (no uci, no radios).
    #[error("{0}")]
    WifiUnavailable(String),
    /// nlbwmon is not installed, not running or not answering.
    #[error("{0}")]
    UsageUnavailable(String),
    /// nlbwmon's configuration is wrong (an unreadable protocol list).
    #[error("{0}")]
    UsageMisconfigured(String),
    /// nlbw answered something unusable.
    #[error("{0}")]
    UsageBadOutput(String),
    /// No usage recorded for the device.
    #[error("{0}")]
    NoUsage(String),
    /// A step of the usage reset failed; the message lists every one.
    #[error("{0}")]
    ResetFailed(String),
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// Bodies in flight fill the memory budget and none left room in time.
    #[error("{0}")]
    Busy(String),
    /// A speed test is already running on this router.
    #[error("a speed test is already running")]
    SpeedtestRunning,
    /// The relay serves its maximum of speed tests right now.
    #[error("the relay is busy with other speed tests; try again later")]
    SpeedtestBusy,
    /// The speed test could not be carried out against the relay.
    #[error("{0}")]
    SpeedtestFailed(String),
    /// Anything else; the detail is logged.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<crate::speedtest::SpeedtestError> for AgentError {
    fn from(e: crate::speedtest::SpeedtestError) -> Self {
        use crate::speedtest::SpeedtestError as S;
        match e {
            S::Running => AgentError::SpeedtestRunning,
            S::RelayBusy => AgentError::SpeedtestBusy,
            S::Unreachable(_) | S::Refused { .. } | S::Timeout => {
                AgentError::SpeedtestFailed(e.to_string())
            }
        }
    }
}

impl From<IntakeError> for AgentError {
    fn from(e: IntakeError) -> Self {
        match e {
            IntakeError::Busy => AgentError::Busy(e.to_string()),
            IntakeError::TooLarge(n) => AgentError::PayloadTooLarge(n),
            IntakeError::Broken(_) => AgentError::InvalidParameter(e.to_string()),
        }
    }
}

impl AgentError {
    /// The only mapping from an agent error to its code; the status follows from it.
    pub fn code(&self) -> ErrorCode {
        match self {
            AgentError::InvalidParameter(_) => ErrorCode::InvalidParameter,
            AgentError::NotFound(_) => ErrorCode::NotFound,
            AgentError::MethodNotAllowed(_) => ErrorCode::MethodNotAllowed,
            AgentError::NotImplemented(_) => ErrorCode::NotImplemented,
            AgentError::Rejected(i) => i.code,
            // Its own code: NOT_FOUND would read as "no such route".
            AgentError::NoSuchGroup(_) => ErrorCode::GroupNotFound,
            AgentError::ApplyFailed(_) => ErrorCode::ApplyFailed,
            AgentError::ChangePending(_) => ErrorCode::ChangePending,
            AgentError::WifiUnavailable(_) => ErrorCode::WifiUnavailable,
            AgentError::UsageUnavailable(_) => ErrorCode::NlbwmonUnavailable,
            AgentError::UsageMisconfigured(_) => ErrorCode::NlbwmonMisconfigured,
            AgentError::UsageBadOutput(_) => ErrorCode::NlbwmonBadOutput,
            AgentError::NoUsage(_) => ErrorCode::DeviceNotFound,
            AgentError::ResetFailed(_) => ErrorCode::UsageResetFailed,
            AgentError::PayloadTooLarge(_) => ErrorCode::PayloadTooLarge,
            AgentError::Busy(_) => ErrorCode::AgentBusy,
            AgentError::SpeedtestRunning => ErrorCode::SpeedtestRunning,
            AgentError::SpeedtestBusy => ErrorCode::SpeedtestBusy,
            // The relay (the upstream of this measurement) failed us: a gateway error.
            AgentError::SpeedtestFailed(_) => ErrorCode::SpeedtestFailed,
            AgentError::Internal(_) => ErrorCode::Internal,
        }
    }

    pub fn status(&self) -> StatusCode {
        // Every code's status is a valid one; a test in proto keeps them in 400..600.
        StatusCode::from_u16(self.code().status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

/// Answers one call; `bodies` is the agent's one budget for request bodies (the
/// link and the local listener share it).
pub async fn handle(
    app: Arc<App>,
    bodies: Arc<BodyBudget>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let request_id = header(HEADER_REQUEST_ID);
    let span = tracing::debug_span!(
        "call",
        request_id = request_id.as_deref().unwrap_or(""),
        session_id = header(HEADER_SESSION_ID).as_deref().unwrap_or(""),
        method = %req.method(),
        path = %req.uri().path(),
    );
    async move {
        let meta = || Meta {
            duration_ms: started.elapsed().as_millis() as u64,
            request_id: request_id.clone(),
        };
        let resp = match dispatch(&app, &bodies, req).await {
            Ok(Reply(status, Payload::Json(value))) => json(status, &Envelope::ok(value, meta())),
            Ok(Reply(status, Payload::Raw(content_type, text))) => Response::builder()
                .status(status)
                .header(CONTENT_TYPE, content_type)
                .body(Full::new(Bytes::from(text)))
                .expect("static response parts"),
            Err(err) => {
                let (status, code) = (err.status(), err.code());
                if status.is_server_error() && status != StatusCode::NOT_IMPLEMENTED {
                    tracing::warn!(%code, error = %err, "call failed");
                }
                json(status, &Envelope::err(code, err.to_string(), meta()))
            }
        };
        Ok(resp)
    }
    .instrument(span)
    .await
}

/// A handler's success: status and the `data` of the envelope, or a body in
/// another format (the CSV export) sent as it is.
pub struct Reply(StatusCode, Payload);

pub enum Payload {
    Json(serde_json::Value),
    Raw(&'static str, String),
}

impl Reply {
    pub fn ok(data: impl Serialize) -> Result<Reply, AgentError> {
        serde_json::to_value(data)
            .map(|v| Reply(StatusCode::OK, Payload::Json(v)))
            .map_err(|e| AgentError::Internal(e.to_string()))
    }

    pub fn raw(content_type: &'static str, body: String) -> Result<Reply, AgentError> {
        Ok(Reply(StatusCode::OK, Payload::Raw(content_type, body)))
    }
}

async fn dispatch(
    app: &Arc<App>,
    bodies: &BodyBudget,
    req: Request<Incoming>,
) -> Result<Reply, AgentError> {
    let path = req.uri().path().to_owned();
    let route = match match_route(req.method().as_str(), &path) {
        Ok(m) => m,
        Err(RouteError::NotFound) => return Err(AgentError::NotFound(path)),
        Err(RouteError::MethodNotAllowed(m)) => {
            let allowed: Vec<&str> = m.iter().map(|m| m.as_str()).collect();
            return Err(AgentError::MethodNotAllowed(allowed.join(", ")));
        }
        Err(RouteError::InvalidParam { name, reason }) => {
            return Err(AgentError::InvalidParameter(format!(
                "path parameter {name}: {reason}"
            )))
        }
    };
    // Before a byte of the body is read; held until the answer is built, so what
    // the handler makes of the body is covered too. Calls without one pass at once.
    let body = bodies.admit(req.body()).await?;
    match route.route.pattern {
        "/api/agent/health" => Reply::ok(health::health(app)),
        "/api/scan/router" => scan::router(app).await,
        "/api/scan" => scan::devices(app).await,
        "/api/speedtest" => {
            let tester = &app.speedtest;
            let args = crate::speedtest::parse_args(req.uri().query(), tester.limits())
                .map_err(|m| AgentError::InvalidParameter(m.into()))?;
            Reply::ok(tester.run(args).await?)
        }
        pattern if pattern.starts_with("/api/device-usage/") => {
            let method = route.route.method.as_str();
            let call = call(method, pattern, route.param("mac"), req, &body).await?;
            usage::handle(app, call).await
        }
        pattern if policy_route(pattern) => {
            let method = route.route.method.as_str();
            let call = call(method, pattern, route.param("id"), req, &body).await?;
            policy::handle(&app.policy, &app.offload, app.files.as_ref(), call).await
        }
        pattern if pattern.starts_with("/api/dns/") => {
            let method = route.route.method.as_str();
            let call = call(method, pattern, route.param("name"), req, &body).await?;
            dns::handle(&app.policy, call, app.policy.now()).await
        }
        pattern if pattern.starts_with("/api/wifi/") => {
            let call = call(route.route.method.as_str(), pattern, None, req, &body).await?;
            wifi::handle(&app.wifi, call).await
        }
        other => Err(AgentError::NotImplemented(other)),
    }
}

fn policy_route(pattern: &str) -> bool {
    pattern.starts_with("/api/groups")
        || matches!(
            pattern,
            "/api/infrastructure/status"
                | "/api/blocked"
                | "/api/block"
                | "/api/unblock"
                | "/api/reset"
        )
        || pattern.starts_with("/api/whitelist")
        || pattern.starts_with("/api/blacklist")
}

/// Collects a call's arguments: query string, then the JSON body over it.
async fn call(
    method: &'static str,
    pattern: &'static str,
    path_id: Option<&str>,
    req: Request<Incoming>,
    body: &Admitted<'_>,
) -> Result<policy::Call, AgentError> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let actor = crate::policy::persist::Actor {
        session_id: header(HEADER_SESSION_ID),
        user_id: header(HEADER_USER_ID).map(|u| percent_decode(&u)),
        request_id: header(HEADER_REQUEST_ID),
    };
    let mut args = serde_json::Map::new();
    for pair in req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        args.insert(
            percent_decode(k),
            serde_json::Value::String(percent_decode(v)),
        );
    }
    let bytes = body.read(req.into_body()).await?;
    if !bytes.iter().all(u8::is_ascii_whitespace) {
        match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(serde_json::Value::Object(m)) => args.extend(m),
            Ok(_) => {
                return Err(AgentError::InvalidParameter(
                    "the body must be a JSON object".into(),
                ))
            }
            Err(e) => {
                return Err(AgentError::InvalidParameter(format!(
                    "the body is not valid JSON: {e}"
                )))
            }
        }
    }
    Ok(policy::Call {
        method,
        pattern,
        path_id: path_id.map(percent_decode),
        args,
        actor,
    })
}

/// `%41` → `A`, `+` → space; invalid escapes stay as written.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .expect("static response parts")
}
