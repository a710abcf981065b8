//! The relay's shared state, built once in `run` and handed to every handler: config,
//! registry (SQLite plus an in-memory cache of what the hot path needs), sessions,
//! the link registry, metrics, recent reports, speed-test slots and the injected
//! clock.

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
use crate::session_store::{RedisSessions, SessionStore};
use crate::speedtest_slots::Slots;
use crate::store::{RouterRow, Store};
use crate::sync::{Locked, ReadWrite};

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

pub struct AppState {
    pub config: Config,
    pub store: Mutex<Store>,
    pub routers: RwLock<HashMap<Uuid, RouterMeta>>,
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
}

impl AppState {
    pub fn new(
        config: Config,
        store: Store,
        fingerprint: String,
        clock: Arc<dyn Clock>,
        capacity_plan: Plan,
        cluster: Option<Arc<Cluster>>,
    ) -> Result<Self, ApiError> {
        let routers = store
            .routers()?
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
            Some(c) => SessionStore::Redis(RedisSessions::new(
                c.redis.clone(),
                config.timeouts.session_idle,
                config.timeouts.router_idle,
                c.redis_timeout,
            )),
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
            store: Mutex::new(store),
            routers: RwLock::new(routers),
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
        })
    }

    pub fn router_meta(&self, id: Uuid) -> Option<RouterMeta> {
        self.routers.read_locked().get(&id).cloned()
    }

    /// Runs a registry operation under the store lock; callers that change a router
    /// refresh its cache entry with [`AppState::cache_router`].
    pub fn with_store<T>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T, crate::store::StoreError>,
    ) -> Result<T, ApiError> {
        let mut store = self.store.locked();
        Ok(f(&mut store)?)
    }

    pub fn cache_router(&self, row: &RouterRow) {
        self.routers
            .write_locked()
            .insert(row.id, RouterMeta::from(row));
    }
}
