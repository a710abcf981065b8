//! The relay as one node of many (issue 16): its connection to Redis, the link
//! directory there, the change broadcast, and the pool of connections to its peers.
//! Built once in `run` when `[cluster]` is set; a single node has none of it.
//!
//! What lives where: PostgreSQL holds the durable registry (`registry`); Redis
//! holds what is shared and short-lived — sessions (`session_store`), which node
//! holds which router's link (`directory`), each node's presence, and the broadcast
//! of changes (`events`); a call for a router linked elsewhere goes to that node
//! over an authenticated, pinned HTTP/2 connection (`peers`, served by `peer_api`).

pub mod directory;
pub mod events;
pub mod peers;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;

use crate::config::cluster::ClusterConfig;
use crate::config::Secret;

/// See [`Cluster::epoch`].
const EPOCH: &str = "np:epoch";
/// Agents' latest reports per router (see [`Cluster::push_report`]).
const REPORTS_PREFIX: &str = "np:reports:";
const REPORTS_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("Redis did not answer within {0} ms")]
    Timeout(u128),
    #[error("{0}")]
    Protocol(String),
}

/// What the node counts about the cluster, for `/metrics` and `/health`.
#[derive(Default)]
pub struct ClusterMetrics {
    pub redis_ops: AtomicU64,
    pub redis_errors: AtomicU64,
    /// Sum of Redis round trips in microseconds (with `redis_ops`, the mean).
    pub redis_micros: AtomicU64,
    pub directory_lookups: AtomicU64,
    pub forwards_out: AtomicU64,
    pub forwards_out_failed: AtomicU64,
    pub forwards_in: AtomicU64,
    pub events_received: AtomicU64,
    pub links_superseded: AtomicU64,
    /// Unix ms of the last successful heartbeat (0: none yet).
    pub last_heartbeat_ms: AtomicU64,
}

impl ClusterMetrics {
    /// Appends the cluster's series to a Prometheus text page.
    pub fn render(&self, out: &mut String, peers_connected: usize) {
        use std::fmt::Write;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let counters = [
            (
                "netpilot_cluster_redis_ops_total",
                "Redis commands and scripts run.",
                get(&self.redis_ops),
            ),
            (
                "netpilot_cluster_redis_errors_total",
                "Redis commands that failed or timed out.",
                get(&self.redis_errors),
            ),
            (
                "netpilot_cluster_directory_lookups_total",
                "Link directory lookups (calls for routers linked elsewhere).",
                get(&self.directory_lookups),
            ),
            (
                "netpilot_cluster_forwards_out_total",
                "Calls forwarded to the node holding the router's link.",
                get(&self.forwards_out),
            ),
            (
                "netpilot_cluster_forwards_out_failed_total",
                "Forwarded calls whose node could not be reached.",
                get(&self.forwards_out_failed),
            ),
            (
                "netpilot_cluster_forwards_in_total",
                "Calls forwarded here by peers.",
                get(&self.forwards_in),
            ),
            (
                "netpilot_cluster_events_total",
                "Cluster change messages received.",
                get(&self.events_received),
            ),
            (
                "netpilot_cluster_links_superseded_total",
                "Links let go because the router linked to another node.",
                get(&self.links_superseded),
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {value}");
        }
        let name = "netpilot_cluster_redis_seconds_total";
        let _ = writeln!(
            out,
            "# HELP {name} Time spent waiting for Redis (with ops: the mean latency)."
        );
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(out, "{name} {}", get(&self.redis_micros) as f64 / 1e6);
        let _ = writeln!(out, "# HELP netpilot_cluster_peers_connected Peers with a pooled connection from this node.");
        let _ = writeln!(out, "# TYPE netpilot_cluster_peers_connected gauge");
        let _ = writeln!(out, "netpilot_cluster_peers_connected {peers_connected}");
        let _ = writeln!(out, "# HELP netpilot_cluster_last_heartbeat_ms Unix ms of this node's last presence renewal in Redis.");
        let _ = writeln!(out, "# TYPE netpilot_cluster_last_heartbeat_ms gauge");
        let _ = writeln!(
            out,
            "netpilot_cluster_last_heartbeat_ms {}",
            get(&self.last_heartbeat_ms)
        );
    }
}

pub struct Cluster {
    pub node_id: String,
    pub internal_address: SocketAddr,
    pub secret: Secret,
    pub redis: ConnectionManager,
    pub redis_client: redis::Client,
    pub redis_timeout: Duration,
    pub heartbeat: Duration,
    pub node_ttl: Duration,
    pub peers: peers::Peers,
    pub metrics: ClusterMetrics,
    /// This node's entries in the link directory.
    pub claims: directory::Claims,
    /// Turns true once this node's drain moved its links: the internal listener
    /// then closes peer connections gracefully (new forwarded calls are refused,
    /// unprocessed, and follow the router elsewhere).
    pub peers_stop: tokio::sync::watch::Sender<bool>,
    directory: directory::Scripts,
}

impl Cluster {
    /// Connects to Redis (failing start when it does not answer: a node that
    /// cannot check sessions would refuse every call) and prepares the peer pool,
    /// which trusts exactly the certificate whose SHA-256 is `cert_digest` (all
    /// nodes share it).
    pub async fn connect(
        cfg: &ClusterConfig,
        cert_digest: [u8; 32],
    ) -> Result<Cluster, ClusterError> {
        let client = redis::Client::open(cfg.redis_url.expose())?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.redis_timeout))
            .set_response_timeout(Some(cfg.redis_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let redis = tokio::time::timeout(
            cfg.redis_timeout * 3,
            client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| ClusterError::Timeout((cfg.redis_timeout * 3).as_millis()))??;
        Ok(Cluster {
            node_id: cfg.node_id.clone(),
            internal_address: cfg.internal_address,
            secret: cfg.secret.clone(),
            redis,
            redis_client: client,
            redis_timeout: cfg.redis_timeout,
            heartbeat: cfg.heartbeat,
            node_ttl: cfg.node_ttl,
            peers: peers::Peers::new(cert_digest, cfg.peer_connect_timeout),
            metrics: ClusterMetrics::default(),
            claims: directory::Claims::default(),
            peers_stop: tokio::sync::watch::Sender::new(false),
            directory: directory::Scripts::new(),
        })
    }

    /// Runs one Redis command or script under the timeout, counting it.
    pub(crate) async fn redis<T, F, Fut>(&self, f: F) -> Result<T, ClusterError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let started = Instant::now();
        let m = &self.metrics;
        m.redis_ops.fetch_add(1, Ordering::Relaxed);
        let out = match tokio::time::timeout(self.redis_timeout, f(self.redis.clone())).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(ClusterError::Redis(e)),
            Err(_) => Err(ClusterError::Timeout(self.redis_timeout.as_millis())),
        };
        m.redis_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        if out.is_err() {
            m.redis_errors.fetch_add(1, Ordering::Relaxed);
        }
        out
    }

    /// Renews this node's presence: peers route to it only while it is there.
    pub async fn heartbeat_once(&self, now_ms: i64) -> Result<(), ClusterError> {
        let key = directory::node_key(&self.node_id);
        let addr = self.internal_address.to_string();
        let ttl = self.node_ttl.as_millis() as u64;
        let id = self.node_id.clone();
        self.redis(|mut c| async move {
            redis::pipe()
                .cmd("SET")
                .arg(key)
                .arg(addr)
                .arg("PX")
                .arg(ttl)
                .ignore()
                .cmd("SADD")
                .arg(directory::NODES)
                .arg(id)
                .ignore()
                .query_async::<()>(&mut c)
                .await
        })
        .await?;
        self.metrics
            .last_heartbeat_ms
            .store(now_ms.max(0) as u64, Ordering::Relaxed);
        Ok(())
    }

    /// A value Redis keeps for its lifetime (set by the first node to ask): when it
    /// changes, Redis lost its data and every node enters its links again.
    pub async fn epoch(&self) -> Result<String, ClusterError> {
        let fresh = uuid::Uuid::new_v4().to_string();
        let (now,): (String,) = self
            .redis(|mut c| async move {
                redis::pipe()
                    .cmd("SET")
                    .arg(EPOCH)
                    .arg(fresh)
                    .arg("NX")
                    .ignore()
                    .cmd("GET")
                    .arg(EPOCH)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(now)
    }

    /// Keeps an agent report (JSON) among the router's latest `keep`, newest first,
    /// for the admin view on every node; forgotten after a week without reports.
    pub async fn push_report(
        &self,
        router: uuid::Uuid,
        json: String,
        keep: usize,
    ) -> Result<(), ClusterError> {
        let key = format!("{REPORTS_PREFIX}{router}");
        self.redis(|mut c| async move {
            redis::pipe()
                .cmd("LPUSH")
                .arg(&key)
                .arg(json)
                .ignore()
                .cmd("LTRIM")
                .arg(&key)
                .arg(0)
                .arg(keep.saturating_sub(1))
                .ignore()
                .cmd("PEXPIRE")
                .arg(&key)
                .arg(REPORTS_TTL.as_millis() as u64)
                .ignore()
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// The router's latest reports (JSON), newest first.
    pub async fn recent_reports(&self, router: uuid::Uuid) -> Result<Vec<String>, ClusterError> {
        let key = format!("{REPORTS_PREFIX}{router}");
        self.redis(|mut c| async move {
            redis::cmd("LRANGE")
                .arg(key)
                .arg(0)
                .arg(-1)
                .query_async(&mut c)
                .await
        })
        .await
    }

    /// Takes this node out of the directory of nodes at once (drain, shutdown), so
    /// peers stop routing here without waiting for the presence to expire.
    pub async fn leave(&self) -> Result<(), ClusterError> {
        let key = directory::node_key(&self.node_id);
        let id = self.node_id.clone();
        self.redis(|mut c| async move {
            redis::pipe()
                .cmd("DEL")
                .arg(key)
                .ignore()
                .cmd("SREM")
                .arg(directory::NODES)
                .arg(id)
                .ignore()
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// Nodes present now (id → internal address), this one included. Nodes whose
    /// presence expired are dropped from the set on the way.
    pub async fn nodes(&self) -> Result<Vec<(String, String)>, ClusterError> {
        let ids: Vec<String> = self
            .redis(|mut c| async move {
                redis::cmd("SMEMBERS")
                    .arg(directory::NODES)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| directory::node_key(id)).collect();
        let addrs: Vec<Option<String>> = self
            .redis(|mut c| async move { redis::cmd("MGET").arg(keys).query_async(&mut c).await })
            .await?;
        let mut out = Vec::new();
        let mut gone = Vec::new();
        for (id, addr) in ids.into_iter().zip(addrs) {
            match addr {
                Some(a) => out.push((id, a)),
                None => gone.push(id),
            }
        }
        if !gone.is_empty() {
            let _ = self
                .redis(|mut c| async move {
                    redis::cmd("SREM")
                        .arg(directory::NODES)
                        .arg(gone)
                        .query_async::<()>(&mut c)
                        .await
                })
                .await;
        }
        out.sort();
        Ok(out)
    }
}
