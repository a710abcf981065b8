//! The API rig: a relay, a router enrolled for its owner and that router's agent,
//! started the way the scenario needs, and sessions that call the relay's API for
//! that router. Built step by step, so a test reads like its scenario:
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use netpilot_tests::ApiRig;
//! use serde_json::json;
//! // The common start: alice's simulated router, online.
//! let rig = ApiRig::simulated().await?;
//! // Or with the relay and the agent set up for the scenario.
//! let rig = ApiRig::builder()
//!     .relay_config("[timeouts]\nsession_idle = \"600ms\"\n")
//!     .agent_args(&["--simulate", "--wifi-settle", "1s"])
//!     .start()
//!     .await?;
//! let alice = rig.session("alice").await?;
//! let r = alice.get("/api/scan/router").await; // ?sessionId=…&routerId=… added
//! let r = alice.post("/api/block", json!({"mac": "02:00:00:00:01:05"})).await; // ids added
//! # Ok(()) }
//! ```
//!
//! In the namespace lab ([`ApiRigBuilder::in_lab`]) the agent runs in the router
//! namespace with the lab's LAN and WAN devices and its local API, which tests
//! call through [`crate::lab::Lab::api`]; it cannot reach the relay from there, so
//! it is enrolled but never online.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use serde_json::{json, Value};

use crate::lab::{Lab, LAN_IF, WAN_IF};
use crate::{q, start_session, Agent, Client, EnrolledRouter, Relay, RelayOptions, Reply};

/// How long a started agent may take to come online.
const ONLINE_WITHIN: Duration = Duration::from_secs(10);

/// What to start; [`ApiRigBuilder::start`] starts it.
#[derive(Clone)]
pub struct ApiRigBuilder {
    relay_config: String,
    owner: String,
    /// `None`: `--simulate`, or nothing in a lab.
    agent_args: Option<Vec<String>>,
    netns: Option<String>,
}

impl Default for ApiRigBuilder {
    fn default() -> Self {
        ApiRigBuilder {
            relay_config: String::new(),
            owner: "alice".into(),
            agent_args: None,
            netns: None,
        }
    }
}

impl ApiRigBuilder {
    /// Extra relay configuration (whole TOML sections, e.g. `[timeouts]`).
    pub fn relay_config(mut self, toml: &str) -> Self {
        self.relay_config = toml.to_owned();
        self
    }

    /// Who owns the router (default `alice`).
    pub fn owner(mut self, user: &str) -> Self {
        self.owner = user.to_owned();
        self
    }

    /// The agent's own arguments, instead of the default (`--simulate`, or none in
    /// a lab); the test flags for fast reconnects are always added.
    pub fn agent_args(mut self, args: &[&str]) -> Self {
        self.agent_args = Some(args.iter().map(|a| a.to_string()).collect());
        self
    }

    /// Runs the real agent (not simulated) in the lab's router namespace on its
    /// LAN and WAN devices, with its local API on a free port there; agent
    /// arguments come on top.
    pub fn in_lab(mut self, lab: &Lab) -> Self {
        self.netns = Some(lab.router.name().to_owned());
        self
    }

    /// Starts the relay, creates and enrolls the router, starts its agent and,
    /// outside a lab, waits until the router is online.
    pub async fn start(self) -> anyhow::Result<ApiRig> {
        let relay = Relay::start(RelayOptions {
            config: self.relay_config.clone(),
        })
        .await?;
        let router = relay.enrolled_router(&self.owner).await?;
        let agent = self.start_agent(&relay, &router).await?;
        Ok(ApiRig {
            relay,
            router,
            agent,
            setup: self,
        })
    }

    async fn start_agent(&self, relay: &Relay, router: &EnrolledRouter) -> anyhow::Result<Agent> {
        let args: Vec<&str> = match (&self.agent_args, &self.netns) {
            (Some(args), _) => args.iter().map(String::as_str).collect(),
            (None, None) => vec!["--simulate"],
            (None, Some(_)) => vec![],
        };
        match &self.netns {
            Some(ns) => {
                let mut all = vec![
                    "--lan-if",
                    LAN_IF,
                    "--wan-if",
                    WAN_IF,
                    "--api-listen",
                    "127.0.0.1:0",
                ];
                all.extend(args);
                Agent::start_in(ns, router, &all).await
            }
            None => {
                let agent = Agent::start(router, &args).await?;
                relay
                    .wait_online(&router.router_id, true, ONLINE_WITHIN)
                    .await?;
                Ok(agent)
            }
        }
    }
}

/// A relay, one enrolled router and its running agent.
pub struct ApiRig {
    pub relay: Relay,
    pub router: EnrolledRouter,
    pub agent: Agent,
    setup: ApiRigBuilder,
}

impl ApiRig {
    pub fn builder() -> ApiRigBuilder {
        ApiRigBuilder::default()
    }

    /// The most common start: alice's simulated router, online.
    pub async fn simulated() -> anyhow::Result<ApiRig> {
        Self::builder().start().await
    }

    /// The router's id.
    pub fn router_id(&self) -> &str {
        &self.router.router_id
    }

    /// The agent's local API (started in a lab, or with `--api-listen`).
    pub fn local_api(&self) -> SocketAddr {
        self.agent
            .api_addr
            .expect("the agent prints its local API address")
    }

    /// A session of `user` on the rig's router, with its own client.
    pub async fn session(&self, user: &str) -> anyhow::Result<Session> {
        Session::start(&self.relay.client().await?, user, &self.router.router_id).await
    }

    /// Kills the agent (if it still runs) and starts it again the same way, on the
    /// same state directory.
    pub async fn restart_agent(&mut self) -> anyhow::Result<()> {
        self.agent.kill().await;
        self.agent = self.setup.start_agent(&self.relay, &self.router).await?;
        Ok(())
    }

    /// Stops the agent as the init script does (SIGTERM: it writes what it holds
    /// back and exits) and starts it again on the same state directory.
    pub async fn restart_agent_gracefully(&mut self) -> anyhow::Result<()> {
        let status = self.agent.terminate().await?;
        anyhow::ensure!(status.success(), "agent exited with {status} on SIGTERM");
        self.agent = self.setup.start_agent(&self.relay, &self.router).await?;
        Ok(())
    }
}

/// A user's session on one router: calls to the relay's routed API with the
/// session and router ids filled in. A call that gets no HTTP answer at all panics
/// (say which); every answer, error statuses included, is returned.
#[derive(Clone)]
pub struct Session {
    pub client: Client,
    pub id: String,
    pub router_id: String,
}

impl Session {
    /// Starts a session of `user` on `router_id` through `client`.
    pub async fn start(client: &Client, user: &str, router_id: &str) -> anyhow::Result<Session> {
        Ok(Session {
            id: start_session(client, user, router_id).await?,
            client: client.clone(),
            router_id: router_id.to_owned(),
        })
    }

    /// `path` with this session's ids in its query.
    pub fn q(&self, path: &str) -> String {
        q(path, &self.id, &self.router_id)
    }

    /// `GET path?sessionId=…&routerId=…`.
    pub async fn get(&self, path: &str) -> Reply {
        let url = self.q(path);
        self.client
            .get(&url)
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e:#}"))
    }

    /// `DELETE path?sessionId=…&routerId=…`.
    pub async fn delete(&self, path: &str) -> Reply {
        let url = self.q(path);
        self.client
            .delete(&url)
            .await
            .unwrap_or_else(|e| panic!("DELETE {url}: {e:#}"))
    }

    /// `POST path` with `body` (a JSON object) plus the session's ids.
    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.send("POST", path, body).await
    }

    /// `method path` with `body` (a JSON object) plus the session's ids.
    pub async fn send(&self, method: &str, path: &str, mut body: Value) -> Reply {
        body["sessionId"] = json!(self.id);
        body["routerId"] = json!(self.router_id);
        self.client
            .call(
                method,
                path,
                Some(Bytes::from(body.to_string())),
                Some("application/json"),
            )
            .await
            .with_context(|| format!("{method} {path}"))
            .unwrap_or_else(|e| panic!("{e:#}"))
    }
}
