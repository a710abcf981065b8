//! The relay's shared state, built once in `run` and handed to every handler: config,
//! registry (SQLite or PostgreSQL, plus an in-memory cache of what the hot path
//! needs, kept current across a cluster's nodes), sessions,
//! the link registry, metrics, recent reports, speed-test slots, the MAC vendor
//! registry and the injected clock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::Instant;
use uuid::Uuid;

use crate::auth::RouterMeta;
use crate::capacity::{Capacity, Plan};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::drain::Drain;
use crate::error::ApiError;
use crate::inflight::{AnswerBudget, CallSlots};
use crate::link_registry::Links;
use crate::metrics::Metrics;
use crate::peer_limits::LogThrottle;
use crate::ratelimit::RateLimiter;
use crate::recent_reports::Reports;
use crate::registry::{Registry, RouterRow};
use crate::session_store::{RedisSessions, SessionStore};
use crate::speedtest_slots::Slots;
use crate::sync::{Locked, ReadWrite};
use crate::vendors::Vendors;

/// Time as the relay sees it. Injected so tests can drive it.
pub trait Clock: Send + Sync + 'static {
    /// Wall-clock unix milliseconds, for stored timestamps and token expiry.
    fn now_ms(&self) -> i64;
    /// Monotonic time, for sessions and timeouts.
    fn instant(&self) -> Instant;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
    fn instant(&self) -> Instant {
        Instant::now()
    }
}

// Here, where the registry and its cache meet: auth, below both, knows no rows.
impl From<&RouterRow> for RouterMeta {
    fn from(r: &RouterRow) -> Self {
        RouterMeta {
            owner_user_id: r.owner_user_id.clone(),
            secret_hash: r.secret_hash,
            revoked: r.revoked_at.is_some(),
        }
    }
}

/// Registry look-ups on behalf of agent requests not yet authenticated, per second,
/// all agents together. At start every node loads every router, so look-ups are
/// only for routers new since the last poll; the cap keeps a flood of made-up router
/// ids or wrong secrets from turning into a flood of PostgreSQL queries.
pub const AGENT_LOOKUPS_PER_SECOND: u32 = 100;

pub struct AppState {
    pub config: Config,
    pub registry: Registry,
    pub routers: RwLock<HashMap<Uuid, RouterMeta>>,
    /// One bucket for all agents (see [`AGENT_LOOKUPS_PER_SECOND`]).
    agent_lookups: Mutex<RateLimiter>,
    pub sessions: SessionStore,
    pub links: Links,
    pub metrics: Metrics,
    pub enroll_limiter: Mutex<RateLimiter>,
    /// The latest agent reports per router (`POST /agent/v1/report`).
    pub reports: Reports,
    /// Speed-test transfers in progress (one per router, a global cap).
    pub speedtests: Slots,
    /// Calls in flight per router, and the bytes of all router answers in flight.
    pub call_slots: CallSlots,
    pub answer_budget: AnswerBudget,
    pub fingerprint: String,
    pub clock: Arc<dyn Clock>,
    /// Connections and links within the open-file limit, the API reserve, the
    /// link-accept rate (issue 16, item 7).
    pub capacity: Capacity,
    pub capacity_plan: Plan,
    /// One "link refused" line a second during a reconnect storm.
    pub link_refusal_log: LogThrottle,
    /// Cluster mode (issue 16): Redis, the link directory and the peers; `None` on
    /// a single node.
    pub cluster: Option<Arc<Cluster>>,
    /// Whether the node drains (SIGTERM) and what the drain did (issue 16 item 5).
    pub drain: Drain,
    /// The MAC vendor registry device answers are enriched from (issue 17);
    /// `None` when `[vendors] enabled = false`.
    pub vendors: Option<Arc<Vendors>>,
}

impl AppState {
    /// `routers` fills the cache: every router in the registry.
    pub fn new(
        config: Config,
        registry: Registry,
        routers: &[RouterRow],
        fingerprint: String,
        clock: Arc<dyn Clock>,
        capacity_plan: Plan,
        cluster: Option<Arc<Cluster>>,
    ) -> Result<Self, ApiError> {
        let routers = routers
            .iter()
            .map(|r| (r.id, RouterMeta::from(r)))
            .collect();
        let sessions = match &cluster {
            None => {
                let clock = clock.clone();
                SessionStore::memory(
                    config.timeouts.session_idle,
                    config.timeouts.router_idle,
                    Arc::new(move || clock.instant()),
                )
            }
            Some(c) => SessionStore::Redis(Box::new(RedisSessions::new(
                c.redis.clone(),
                config.timeouts.session_idle,
                config.timeouts.router_idle,
                c.redis_timeout,
            ))),
        };
        let limiter = RateLimiter::with_max_keys(
            config.enroll_per_minute,
            std::time::Duration::from_secs(60),
            config.enroll_max_clients,
        );
        let call_slots = CallSlots::new(
            config.forwarding.calls_per_router,
            config.forwarding.calls_queued_per_router,
        );
        let answer_budget = AnswerBudget::new(config.forwarding.answer_budget_bytes);
        let capacity = Capacity::new(
            &capacity_plan,
            config.capacity.max_link_accepts_per_second,
            clock.instant(),
        );
        Ok(AppState {
            capacity,
            capacity_plan,
            link_refusal_log: LogThrottle::new(std::time::Duration::from_secs(1)),
            call_slots,
            answer_budget,
            config,
            registry,
            routers: RwLock::new(routers),
            agent_lookups: Mutex::new(RateLimiter::with_max_keys(
                AGENT_LOOKUPS_PER_SECOND,
                std::time::Duration::from_secs(1),
                1,
            )),
            sessions,
            links: Links::default(),
            metrics: Metrics::default(),
            enroll_limiter: Mutex::new(limiter),
            reports: Reports::default(),
            speedtests: Default::default(),
            fingerprint,
            clock,
            cluster,
            drain: Drain::default(),
            vendors: None,
        })
    }

    /// The vendor registry loaded at start (`None`: enrichment off).
    pub fn with_vendors(mut self, vendors: Option<Arc<Vendors>>) -> Self {
        self.vendors = vendors;
        self
    }

    pub fn router_meta(&self, id: Uuid) -> Option<RouterMeta> {
        self.routers.read_locked().get(&id).cloned()
    }

    /// The router as the cache knows it; in a cluster, a router the cache lacks
    /// (created on another node since the last poll) is looked up in the registry
    /// first, so it is never "not found" only because it is new. A single node's
    /// cache holds every router and answers alone.
    pub async fn router_meta_or_load(&self, id: Uuid) -> Result<Option<RouterMeta>, ApiError> {
        if let Some(meta) = self.router_meta(id) {
            return Ok(Some(meta));
        }
        if !self.registry.is_shared() {
            return Ok(None);
        }
        Ok(self.registry.router(id).await?.map(|row| {
            self.cache_router(&row);
            RouterMeta::from(&row)
        }))
    }

    /// `auth::authenticate_router` against the cache, for a cluster node whose
    /// cache may lag the registry: a router it has not seen is loaded first, and a
    /// secret the cached entry refuses is checked once more against the registry —
    /// the router may have enrolled (again) through another node since the last
    /// poll. A single node's cache is the registry, and answers alone. Past
    /// [`AGENT_LOOKUPS_PER_SECOND`] the cache answers alone too.
    pub async fn authenticate_agent(
        &self,
        req: &hyper::Request<hyper::body::Incoming>,
    ) -> Result<Uuid, ApiError> {
        let claimed = crate::auth::claimed_router_id(req).filter(|_| self.registry.is_shared());
        if let Some(id) = claimed {
            if self.router_meta(id).is_none() && self.may_look_up() {
                self.router_meta_or_load(id).await?;
            }
        }
        match crate::auth::authenticate_router(req, |id| self.router_meta(id)) {
            Err(ApiError::Unauthorized) => match claimed {
                Some(id) if self.may_look_up() => {
                    self.refresh_router(id).await?;
                    crate::auth::authenticate_router(req, |id| self.router_meta(id))
                }
                _ => Err(ApiError::Unauthorized),
            },
            other => other,
        }
    }

    fn may_look_up(&self) -> bool {
        // One key: the bucket is global, not per address.
        self.agent_lookups.locked().allow(
            std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            self.clock.instant(),
        )
    }

    /// Re-reads one router from the registry and applies it here: what another
    /// node changed (the cluster's broadcast calls this on every node).
    pub async fn refresh_router(&self, id: Uuid) -> Result<(), ApiError> {
        match self.registry.router(id).await? {
            Some(row) => self.apply_router(&row),
            // Not written by any relay (routers are never deleted); forget it.
            None => {
                self.routers.write_locked().remove(&id);
                self.links.close(id);
            }
        }
        Ok(())
    }

    /// Puts what the registry says of a router into the cache; a revoked router's
    /// link on this node closes at once. A revocation is for good, so a row read
    /// before it (a poll's snapshot that this node's own revocation overtook) never
    /// takes it back.
    pub fn apply_router(&self, row: &RouterRow) {
        {
            let mut routers = self.routers.write_locked();
            let mut meta = RouterMeta::from(row);
            if routers.get(&row.id).is_some_and(|m| m.revoked) {
                meta.revoked = true;
            }
            routers.insert(row.id, meta);
        }
        if row.revoked_at.is_some() && self.links.close(row.id) {
            tracing::info!(router_id = %row.id, "link closed: the router was revoked on another node");
        }
    }

    pub fn cache_router(&self, row: &RouterRow) {
        self.routers
            .write_locked()
            .insert(row.id, RouterMeta::from(row));
    }
}
