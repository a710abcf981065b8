//! `netpilot-agent enroll`: trade a one-time token for the router's id and secret
//! and store them with the relay URL and how to trust the relay.

use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::Request;
use netpilot_proto::link::{EnrollRequest, EnrollResponse, ENROLL_PATH};
use netpilot_proto::Envelope;

use crate::link::dial::{http1, DialError, RelayAddr, RelayBody, Relays};
use crate::link::identity::{Identity, IdentityError};
use crate::link::tls::{client_config, TlsError, Trust};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// Already enrolled; enrolling again needs `--force`.
    #[error("already enrolled as router {0}; pass --force to enroll again")]
    AlreadyEnrolled(String),
    /// The trust settings are unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The relay could not be reached.
    #[error(transparent)]
    Dial(#[from] DialError),
    /// The HTTP exchange failed.
    #[error("enrollment request failed: {0}")]
    Http(String),
    /// The relay said no.
    #[error("relay refused enrollment: {code}: {message}")]
    Refused { code: String, message: String },
    /// The relay's answer holds values it never issues; nothing was stored.
    #[error("the relay's answer is unusable ({0}); nothing was stored")]
    BadAnswer(String),
    /// Storing the identity failed.
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

pub struct EnrollArgs<'a> {
    pub relay_url: &'a str,
    pub token: &'a str,
    pub trust: Trust,
    pub state_dir: &'a Path,
    pub force: bool,
}

pub async fn enroll(args: EnrollArgs<'_>) -> Result<Identity, EnrollError> {
    if !args.force {
        if let Ok(existing) = Identity::load(args.state_dir) {
            return Err(EnrollError::AlreadyEnrolled(existing.router_id));
        }
    }
    let relays = Relays::new(RelayAddr::parse(args.relay_url)?, []);
    let relay = relays.get(0);
    let tls = client_config(&args.trust)?;
    // A token works once: never spend it on a state directory that cannot keep it.
    Identity::check_writable(args.state_dir)?;
    let mut sender = http1(&relays, 0, tls, Duration::from_secs(15)).await?;
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned());
    let body = serde_json::to_vec(&EnrollRequest {
        token: args.token.trim().to_owned(),
        hostname,
        agent_version: Some(env!("CARGO_PKG_VERSION").to_owned()),
    })
    .expect("request serialises");
    let req = Request::builder()
        .method("POST")
        .uri(ENROLL_PATH)
        .header(HOST, &relay.authority)
        .header(CONTENT_TYPE, "application/json")
        .body(RelayBody::full(body))
        .expect("static request parts");
    let result = async {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| EnrollError::Http(e.to_string()))?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|e| EnrollError::Http(e.to_string()))?
            .to_bytes();
        let env: Envelope<EnrollResponse> = serde_json::from_slice(&bytes)
            .map_err(|e| EnrollError::Http(format!("{status}: unreadable answer: {e}")))?;
        match (env.data, env.error) {
            (Some(data), _) if status.is_success() => Ok(data),
            (_, Some(err)) => Err(EnrollError::Refused {
                code: err.code,
                message: err.message,
            }),
            _ => Err(EnrollError::Http(format!("{status} without data"))),
        }
    }
    .await;
    // Dropping the sender ends the connection's task.
    drop(sender);
    let data = result?;
    let identity = Identity {
        router_id: data.router_id,
        router_secret: data.router_secret,
        relay_url: args.relay_url.trim_end_matches('/').to_owned(),
        trust: args.trust,
        name: data.name,
    };
    // Stored, a bad value would stop every later start of the agent instead.
    identity.check().map_err(EnrollError::BadAnswer)?;
    identity.save(args.state_dir)?;
    Ok(identity)
}
