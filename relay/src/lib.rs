//! NetPilot relay: enrolls and authenticates routers, holds web-app sessions, and
//! routes each REST call to the router's agent over its reverse HTTP/2 link.

pub mod admin;
pub mod agent_link;
pub mod answer;
pub mod api;
pub mod auth;
pub mod capacity;
pub mod cluster;
pub mod cluster_sync;
pub mod config;
pub mod conn_activity;
pub mod drain;
pub mod enroll;
pub mod error;
pub mod forward;
pub mod http;
pub mod inflight;
pub mod link_health;
pub mod link_registry;
pub mod metrics;
pub mod metrics_http;
pub mod peer_api;
pub mod peer_limits;
pub mod private;
pub mod ratelimit;
pub mod recent_reports;
pub mod registry;
pub mod report;
pub mod server;
pub mod session_api;
pub mod session_store;
pub mod sessions;
pub mod speedtest;
pub mod speedtest_slots;
pub mod state;
pub mod sync;
pub mod tls;
pub mod vendors;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::state::{AppState, Clock};

/// What `run` reports once it is listening, for the operator and for tests.
#[derive(Debug, Clone)]
pub struct Ready {
    pub addr: std::net::SocketAddr,
    pub fingerprint: String,
    pub cert_path: std::path::PathBuf,
    /// Where `metrics_listen` bound, when it is set.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// Opens the registry and TLS identity, then serves `listener` until `shutdown`.
/// `on_ready` is called once everything is in place.
pub async fn run(
    mut config: Config,
    listener: TcpListener,
    clock: Arc<dyn Clock>,
    on_ready: impl FnOnce(Ready),
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    private::dir(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let tls = tls::load_or_create(
        config.tls_cert.as_deref(),
        config.tls_key.as_deref(),
        &config.data_dir,
        &config.tls_names,
    )?;
    if tls.generated {
        tracing::info!(cert = %tls.cert_path.display(), "created a self-signed certificate");
    }
    // The relay's own key (an operator's key file is the operator's to protect).
    if config.tls_cert.is_none() || config.tls_key.is_none() {
        let key = config.data_dir.join(tls::GENERATED_KEY);
        private::restrict(&key, private::FILE_MODE)
            .with_context(|| format!("cannot make {} private", key.display()))?;
    }
    tracing::info!(fingerprint = %tls.fingerprint, "relay certificate SHA-256 fingerprint");
    let registry = open_registry(&config).await?;
    let start = registry
        .changes(registry::Watermark::START)
        .await
        .context("cannot read the registry")?;
    let nofile = capacity::nofile_limit().context("cannot read the open-file limit")?;
    let plan = capacity::plan(
        nofile,
        capacity::Wanted {
            max_connections: config.max_connections,
            max_links: config.capacity.max_links,
            reserved_api_connections: config.capacity.reserved_api_connections,
            set: config.capacity.set,
        },
    )?;
    for w in &plan.warnings {
        tracing::warn!("{w}");
    }
    for n in &plan.notes {
        tracing::info!("{n}");
    }
    tracing::info!(
        open_file_limit = nofile,
        max_connections = plan.max_connections,
        max_links = plan.max_links,
        reserved_api_connections = plan.reserved_api_connections,
        "capacity"
    );
    // Cluster mode: the internal listener first, so a node configured with port 0
    // (tests) advertises the port it got.
    let internal = match &config.cluster {
        None => None,
        Some(c) => Some(peer_api::bind(c.internal_listen).await.with_context(|| {
            format!(
                "cannot listen on {} (cluster.internal_listen)",
                c.internal_listen
            )
        })?),
    };
    let cluster = match &mut config.cluster {
        None => None,
        Some(c) => {
            if c.internal_address.port() == 0 {
                if let Some(l) = &internal {
                    c.internal_address.set_port(l.local_addr()?.port());
                }
            }
            let cluster = cluster::Cluster::connect(c, tls.digest)
                .await
                .with_context(|| format!("cluster node {}: cannot reach Redis", c.node_id))?;
            tracing::info!(node = %c.node_id, internal = %c.internal_address, "cluster mode");
            Some(Arc::new(cluster))
        }
    };
    let vendors = load_vendors(&config.vendors)?;
    let state = Arc::new(
        AppState::new(
            config,
            registry,
            &start.routers,
            tls.fingerprint.clone(),
            clock,
            plan,
            cluster,
        )?
        .with_vendors(vendors),
    );
    // Cluster mode: the internal listener peers forward calls to, and the
    // background work (presence, change broadcast, directory upkeep).
    let cluster_tasks = match internal {
        None => Vec::new(),
        Some(internal) => {
            if let Some(cl) = &state.cluster {
                cl.heartbeat_once(state.clock.now_ms())
                    .await
                    .context("cannot announce this node in Redis")?;
            }
            vec![
                tokio::spawn(peer_api::serve(state.clone(), internal, tls.config.clone())),
                tokio::spawn(cluster_sync::run(state.clone())),
            ]
        }
    };
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening");
    let metrics = match state.config.metrics_listen {
        Some(at) => {
            let l = metrics_http::bind(at).await?;
            let bound = l.local_addr()?;
            tracing::info!(addr = %bound, "serving /metrics without the API key");
            let task = tokio::spawn(metrics_http::serve(
                state.clone(),
                l,
                state.config.timeouts.handshake,
            ));
            Some((bound, task))
        }
        None => None,
    };

    let sweeper = tokio::spawn(sweep(state.clone()));
    let poller = state
        .registry
        .is_shared()
        .then(|| tokio::spawn(poll_registry(state.clone(), start.next)));
    on_ready(Ready {
        addr,
        fingerprint: tls.fingerprint,
        cert_path: tls.cert_path,
        metrics_addr: metrics.as_ref().map(|(a, _)| *a),
    });
    server::serve(state.clone(), listener, tls.config, shutdown).await;
    if let Some(c) = &state.cluster {
        if let Err(e) = c.leave().await {
            tracing::warn!(error = %e, "cannot leave the cluster's node list");
        }
    }
    for t in cluster_tasks {
        t.abort();
    }
    sweeper.abort();
    if let Some(p) = poller {
        p.abort();
    }
    if let Some((_, task)) = metrics {
        task.abort();
    }
    Ok(())
}

/// The MAC vendor registry (issue 17): the embedded one under the operator's files,
/// or nothing when enrichment is off. A file that cannot be read or has a bad row
/// stops the relay here, naming the file, the line and why.
pub fn load_vendors(
    config: &config::vendors::VendorsConfig,
) -> anyhow::Result<Option<Arc<vendors::Vendors>>> {
    if !config.enabled {
        tracing::info!("MAC vendor lookup off ([vendors] enabled = false)");
        return Ok(None);
    }
    let v = vendors::Vendors::load(&config.files)?;
    tracing::info!(
        embedded_entries = v.embedded_entries(),
        file_entries = v.file_entries(),
        files = config.files.len(),
        "MAC vendor lookup on"
    );
    Ok(Some(Arc::new(v)))
}

/// A single node's registry is SQLite in its data directory; a cluster node's is
/// the PostgreSQL all nodes share (migrated here if it is behind).
async fn open_registry(config: &Config) -> anyhow::Result<registry::Registry> {
    match &config.cluster {
        None => Ok(registry::Registry::sqlite(
            registry::Store::open(&config.data_dir).context("cannot open the registry")?,
        )),
        Some(cluster) => {
            let pg =
                registry::PgRegistry::open(cluster.postgres_url.expose(), cluster.postgres_timeout)
                    .await
                    .context("cannot open the registry in PostgreSQL (cluster.postgres_url)")?;
            tracing::info!(
                schema_version = registry::postgres::SCHEMA_VERSION,
                "registry in PostgreSQL"
            );
            Ok(registry::Registry::Postgres(pg))
        }
    }
}

/// A cluster node re-reads the routers other nodes changed every
/// `cluster.registry_poll`: the safety net under the change broadcast, so a
/// revocation a node missed still closes its link within one interval.
async fn poll_registry(state: Arc<AppState>, mut since: registry::Watermark) {
    let Some(every) = state.config.cluster.as_ref().map(|c| c.registry_poll) else {
        return;
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match state.registry.changes(since).await {
            Ok(changes) => {
                for row in &changes.routers {
                    state.apply_router(row);
                }
                since = changes.next;
            }
            Err(e) => tracing::warn!(error = %e, "cannot poll the registry for changes"),
        }
    }
}

/// Removes expired sessions and idle router attachments in the background. Expiry
/// is also checked on every lookup, so this only frees memory on time.
async fn sweep(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(state.config.timeouts.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let swept = state.sessions.sweep();
        if swept.sessions + swept.attachments > 0 {
            tracing::debug!(
                sessions = swept.sessions,
                attachments = swept.attachments,
                "swept"
            );
        }
    }
}
