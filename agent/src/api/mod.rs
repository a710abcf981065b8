//! The agent's HTTP API, served on the link (and optionally on a local listener):
//! one dispatcher over the shared route table. Routes whose feature has not landed
//! answer `501 NOT_IMPLEMENTED`; nothing here pretends.

mod health;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::{Request, Response, StatusCode};
use netpilot_proto::envelope::code;
use netpilot_proto::link::{HEADER_REQUEST_ID, HEADER_SESSION_ID};
use netpilot_proto::routes::{match_route, RouteError};
use netpilot_proto::{Envelope, Meta};
use serde::Serialize;
use tracing::Instrument;

use crate::app::App;
use crate::system::sysinfo;

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
    /// Anything else; the detail is logged.
    #[error("internal error: {0}")]
    Internal(String),
}

impl AgentError {
    /// The only mapping from an agent error to HTTP status and code.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            AgentError::InvalidParameter(_) => (StatusCode::BAD_REQUEST, code::INVALID_PARAMETER),
            AgentError::NotFound(_) => (StatusCode::NOT_FOUND, code::NOT_FOUND),
            AgentError::MethodNotAllowed(_) => {
                (StatusCode::METHOD_NOT_ALLOWED, code::METHOD_NOT_ALLOWED)
            }
            AgentError::NotImplemented(_) => (StatusCode::NOT_IMPLEMENTED, code::NOT_IMPLEMENTED),
            AgentError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, code::INTERNAL),
        }
    }
}

pub async fn handle(app: Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
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
        let resp = match dispatch(&app, req).await {
            Ok(Reply(status, value)) => json(status, &Envelope::ok(value, meta())),
            Err(err) => {
                let (status, code) = err.status_and_code();
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

/// A handler's success: status and the `data` of the envelope.
pub struct Reply(StatusCode, serde_json::Value);

impl Reply {
    pub fn ok(data: impl Serialize) -> Result<Reply, AgentError> {
        serde_json::to_value(data)
            .map(|v| Reply(StatusCode::OK, v))
            .map_err(|e| AgentError::Internal(e.to_string()))
    }
}

async fn dispatch(app: &Arc<App>, req: Request<Incoming>) -> Result<Reply, AgentError> {
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
    match route.route.pattern {
        "/api/agent/health" => Reply::ok(health::health(app)),
        "/api/scan/router" => {
            let files = app.files.clone();
            let info = tokio::task::spawn_blocking(move || sysinfo::collect(files.as_ref()))
                .await
                .map_err(|e| AgentError::Internal(e.to_string()))?;
            Reply::ok(info)
        }
        other => Err(AgentError::NotImplemented(other)),
    }
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .expect("static response parts")
}
