//! A relay cluster for the tests: a Redis and a PostgreSQL of its own and N relay
//! processes in cluster mode on `127.0.0.1:0`, each with its internal listener on
//! port 0, sharing one certificate (agents pin it) and the registry in PostgreSQL.
//! Routers asked for at start are enrolled on a single relay first and moved into
//! PostgreSQL with `migrate-registry`, as a deployment grows into a cluster. Nodes
//! are started, killed and restarted one by one, as an operator would.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::json;

use crate::engines::{Postgres, Redis};
use crate::{Agent, Client, EnrolledRouter, Launch, Relay, RelayOptions, API_KEY};

/// The node-to-node secret of test clusters.
pub const CLUSTER_SECRET: &str = "test-cluster-secret-0123456789abcdef";

/// Presence renewed often and forgotten soon, so tests see a dead node quickly.
const FAST_PRESENCE: &str = "heartbeat = \"200ms\"\nnode_ttl = \"1s\"\n";

pub struct ClusterRig {
    pub redis: Redis,
    pub postgres: Postgres,
    pub postgres_url: String,
    pub nodes: Vec<Relay>,
    /// The certificate and key every node presents.
    cert: PathBuf,
    key: PathBuf,
    /// Extra TOML after each node's `[cluster]` section (whole sections).
    extra: String,
    _dir: Arc<tempfile::TempDir>,
}

impl ClusterRig {
    /// Starts Redis, PostgreSQL and `n` nodes, with a router enrolled for each of
    /// `owners` (in order); `extra` is appended to every node's config (whole
    /// sections, e.g. `[timeouts]`).
    pub async fn start(
        n: usize,
        extra: &str,
        owners: &[&str],
    ) -> anyhow::Result<(ClusterRig, Vec<EnrolledRouter>)> {
        let dir = Arc::new(tempfile::tempdir()?);
        let redis = Redis::start().await?;
        let postgres = Postgres::start().await?;
        let postgres_url = postgres.create_database("netpilot").await?;
        // The certificate and the routers: made by a single relay, as a deployment
        // that grows into a cluster has them; its registry is what the nodes share.
        let mut maker = Relay::start_single(RelayOptions::default()).await?;
        let mut routers = Vec::new();
        for owner in owners {
            routers.push(maker.enrolled_router(owner).await?);
        }
        maker.terminate().await?;
        // Grown into a cluster as an operator would: the registry moved into
        // PostgreSQL with `migrate-registry`.
        if !owners.is_empty() {
            let config = dir.path().join("migrate.toml");
            std::fs::write(&config, format!("api_key = \"{API_KEY}\"\n"))?;
            let out = tokio::process::Command::new(crate::binary("netpilot-relay"))
                .arg("migrate-registry")
                .arg("--config")
                .arg(&config)
                .arg("--data-dir")
                .arg(&maker.data_dir)
                .env("NETPILOT_POSTGRES_URL", &postgres_url)
                .env_remove("NETPILOT_API_KEY")
                .output()
                .await?;
            if !out.status.success() {
                bail!(
                    "migrate-registry failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let cert = dir.path().join("cluster-cert.pem");
        let key = dir.path().join("cluster-key.pem");
        std::fs::copy(maker.data_dir.join("tls/relay-cert.pem"), &cert)?;
        std::fs::copy(maker.data_dir.join("tls/relay-key.pem"), &key)?;
        let mut rig = ClusterRig {
            redis,
            postgres,
            postgres_url,
            nodes: Vec::new(),
            cert,
            key,
            extra: extra.to_owned(),
            _dir: dir,
        };
        for i in 0..n {
            let node = rig.spawn_node(i, "127.0.0.1:0".parse()?).await?;
            rig.nodes.push(node);
        }
        Ok((rig, routers))
    }

    fn config(&self, i: usize) -> String {
        format!(
            "api_key = \"{API_KEY}\"\n\
             [tls]\ncert = \"{}\"\nkey = \"{}\"\n\
             [cluster]\nnode_id = \"node-{i}\"\npostgres_url = \"{}\"\nredis_url = \"{}\"\n\
             internal_listen = \"127.0.0.1:0\"\nsecret = \"{CLUSTER_SECRET}\"\n{FAST_PRESENCE}\n{}",
            self.cert.display(),
            self.key.display(),
            self.postgres_url,
            self.redis.url(),
            self.extra,
        )
    }

    async fn spawn_node(&self, i: usize, listen: std::net::SocketAddr) -> anyhow::Result<Relay> {
        let dir = Arc::new(tempfile::tempdir()?);
        let data_dir = dir.path().join("relay");
        let config_file = dir.path().join("relay.toml");
        std::fs::write(&config_file, self.config(i))?;
        Relay::spawn(dir, data_dir, config_file, listen, Launch::default())
            .await
            .with_context(|| format!("cannot start node-{i}"))
    }

    /// The cluster topology of [`crate::TOPOLOGY_ENV`]: two nodes, with no router
    /// yet; node 0 answers the test, node 1 takes its agents.
    pub async fn as_relay(extra: &str) -> anyhow::Result<Relay> {
        let (mut rig, _) = ClusterRig::start(2, extra, &[]).await?;
        let mut node = rig.nodes.remove(0);
        node.agent_url = Some(rig.nodes[0].url());
        node._cluster = Some(Arc::new(rig));
        Ok(node)
    }

    /// Node `i` killed with SIGKILL (no goodbye: its presence expires on its own).
    pub async fn kill(&mut self, i: usize) {
        self.nodes[i].kill().await;
    }

    /// Node `i` started again on its address (after `kill` or `terminate`).
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        let addr = self.nodes[i].addr;
        self.nodes[i].kill().await;
        self.nodes[i] = self.spawn_node(i, addr).await?;
        Ok(())
    }

    /// Node `i` stopped as a deploy stops it (SIGTERM: it drains), waited for, and
    /// started again on its address; returns how long the drain took.
    pub async fn rolling_restart(&mut self, i: usize) -> anyhow::Result<Duration> {
        let addr = self.nodes[i].addr;
        let t = std::time::Instant::now();
        self.nodes[i].sigterm()?;
        let status = self.nodes[i].wait_exit(Duration::from_secs(60)).await?;
        if !status.success() {
            bail!(
                "node-{i} exited with {status} after SIGTERM:\n{}",
                self.nodes[i].log()
            );
        }
        let drained = t.elapsed();
        self.nodes[i] = self.spawn_node(i, addr).await?;
        Ok(drained)
    }

    /// A router created through node `via` and enrolled there.
    pub async fn enrolled_router(&self, via: usize, owner: &str) -> anyhow::Result<EnrolledRouter> {
        self.nodes[via].enrolled_router(owner).await
    }

    /// `--relay URL` for every node, in order: an agent's relay list.
    pub fn relay_args(&self) -> Vec<String> {
        self.nodes
            .iter()
            .flat_map(|n| ["--relay".to_owned(), n.url()])
            .collect()
    }

    /// Starts an agent for `router` with the node list, first `first` (it stays
    /// on the first that works).
    pub async fn agent(&self, router: &EnrolledRouter, first: usize) -> anyhow::Result<Agent> {
        let mut args: Vec<String> = vec!["--simulate".into()];
        let n = self.nodes.len();
        for k in 0..n {
            args.push("--relay".into());
            args.push(self.nodes[(first + k) % n].url());
        }
        args.extend(["--reconnect-spread".into(), "200ms".into()]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        Agent::start(router, &refs).await
    }

    /// A REST client of node `i`.
    pub async fn client(&self, i: usize) -> anyhow::Result<Client> {
        self.nodes[i].client().await
    }

    /// Waits until node `i`'s admin view says which node holds the router's link
    /// (`None`: offline).
    pub async fn wait_holder(
        &self,
        i: usize,
        router_id: &str,
        holder: Option<usize>,
        within: Duration,
    ) -> anyhow::Result<()> {
        let c = self.client(i).await?;
        let want = match holder {
            Some(h) => json!(format!("node-{h}")),
            None => json!(null),
        };
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let r = c.get(&format!("/api/admin/routers/{router_id}")).await?;
            if r.body["data"]["node"] == want && r.body["data"]["online"] == json!(holder.is_some())
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "router {router_id} not held by {want} within {within:?} (asked node-{i}): {}",
                    r.body
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
