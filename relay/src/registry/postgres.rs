//! The registry in PostgreSQL, shared by every node of a cluster (issue 16, item 2).
//! A small deadpool pool of tokio-postgres connections; every operation is bounded
//! by `cluster.postgres_timeout` (pool wait, connect and statements together), so a
//! database that is down or cut off answers `Unavailable` in time, never a hang.
//!
//! Schema changes are versioned migrations recorded in `schema_migrations`, run at
//! start in one transaction under an advisory lock, so nodes starting together
//! migrate exactly once; a database newer than this binary is refused.
//!
//! Each router row carries `change_xid`, the id of the transaction that last changed
//! what the router cache holds (owner, secret, revocation). Other nodes poll for
//! rows at or above the oldest transaction still running when they last looked
//! (`changes`), which catches every commit whatever order transactions finish in —
//! a plain counter would skip a row whose transaction took a lower number but
//! committed after the poll.

use std::fmt::Write as _;
use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::{NoTls, Row};
use uuid::Uuid;

use super::{Changes, RouterRow, StoreError, TokenRow, Watermark};

/// Forward-only migrations; version `i + 1` is `MIGRATIONS[i]`.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE routers (
    id            UUID PRIMARY KEY,
    name          TEXT NOT NULL,      -- shown to the owner
    owner_user_id TEXT NOT NULL,      -- the web app's user id
    secret_hash   BYTEA,              -- SHA-256 of the router secret; NULL before enrollment
    created_at    BIGINT NOT NULL,    -- unix ms
    enrolled_at   BIGINT,             -- unix ms of the token trade
    revoked_at    BIGINT,             -- unix ms; a revoked router never connects again
    last_seen     BIGINT,             -- unix ms the link was last up
    agent_version TEXT,               -- as the agent reported on its last connect
    -- The transaction that last changed what nodes cache (see the module doc).
    change_xid    BIGINT NOT NULL DEFAULT (pg_current_xact_id()::text::bigint)
);
CREATE INDEX routers_created ON routers(created_at, id);
CREATE INDEX routers_owner_created ON routers(owner_user_id, created_at, id);
CREATE INDEX routers_change ON routers(change_xid);
CREATE TABLE enrollment_tokens (
    token_hash BYTEA PRIMARY KEY,     -- SHA-256 of the one-time token
    router_id  UUID NOT NULL REFERENCES routers(id) ON DELETE CASCADE,
    expires_at BIGINT NOT NULL,       -- unix ms
    used_at    BIGINT                 -- unix ms; set once, the token never works again
);
CREATE INDEX enrollment_tokens_router ON enrollment_tokens(router_id);
"#];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Taken by every node's migration transaction; any constant no other program on
/// the database uses ("NetPilot" in ASCII).
const MIGRATION_LOCK: i64 = 0x4e65_7450_696c_6f74;

/// Migrations may wait behind another node's; longer than any statement.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);

/// Connections per node: calls reach PostgreSQL only to create, enroll, revoke,
/// record last-seen and page the admin list; auth reads the cache.
const POOL_SIZE: usize = 16;

const SELECT_ROUTER: &str = "SELECT id, name, owner_user_id, secret_hash, created_at, \
     enrolled_at, revoked_at, last_seen, agent_version FROM routers";

/// Sets `change_xid` in an UPDATE: this transaction changed what nodes cache.
const CHANGED: &str = "change_xid = pg_current_xact_id()::text::bigint";

pub struct PgRegistry {
    pool: Pool,
    timeout: Duration,
    stats: Stats,
}

/// What `/metrics` shows of the registry: operations by outcome and their time.
#[derive(Default)]
struct Stats {
    /// Answered, including refusals such as a used token.
    ok: AtomicU64,
    /// PostgreSQL refused the statement (a bug or a schema problem).
    error: AtomicU64,
    /// Not reached, or no answer within the timeout.
    unavailable: AtomicU64,
    micros: AtomicU64,
}

impl PgRegistry {
    /// Connects (failing if PostgreSQL cannot be reached within `timeout`) and
    /// migrates the schema. NoTls: the URL should name a Unix socket or a private
    /// network (see the README).
    pub async fn open(url: &str, timeout: Duration) -> Result<PgRegistry, StoreError> {
        let config = tokio_postgres::Config::from_str(url)
            .map_err(|e| StoreError::Unavailable(format!("invalid PostgreSQL URL: {e}")))?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .build()
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let registry = PgRegistry {
            pool,
            timeout,
            stats: Stats::default(),
        };
        registry.migrate().await?;
        Ok(registry)
    }

    /// The schema version the database is at (0 before the first migration).
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        self.bounded(async {
            let c = self.client().await?;
            let exists: bool = c
                .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
                .await?
                .get(0);
            if !exists {
                return Ok(0);
            }
            Ok(c.query_one(
                "SELECT COALESCE(max(version), 0)::bigint FROM schema_migrations",
                &[],
            )
            .await?
            .get(0))
        })
        .await
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let work = async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            // Held to the commit: a node starting beside this one waits here and
            // then finds the schema current.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (\
                 version BIGINT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
            )
            .await?;
            let found: i64 = tx
                .query_one(
                    "SELECT COALESCE(max(version), 0)::bigint FROM schema_migrations",
                    &[],
                )
                .await?
                .get(0);
            if found > SCHEMA_VERSION {
                return Err(StoreError::SchemaTooNew {
                    found,
                    known: SCHEMA_VERSION,
                });
            }
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
                tx.batch_execute(sql).await?;
                tx.execute(
                    "INSERT INTO schema_migrations (version) VALUES ($1)",
                    &[&(i as i64 + 1)],
                )
                .await?;
                tracing::info!(version = i + 1, "registry schema migrated");
            }
            tx.commit().await?;
            Ok(())
        };
        match tokio::time::timeout(MIGRATION_TIMEOUT.max(self.timeout), work).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable(format!(
                "migrations did not finish within {} s",
                MIGRATION_TIMEOUT.max(self.timeout).as_secs()
            ))),
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool.get().await.map_err(|e| match e {
            PoolError::Backend(e) => StoreError::from(e),
            other => StoreError::Unavailable(other.to_string()),
        })
    }

    /// One operation within `timeout`, or `Unavailable`; counted for `/metrics`.
    async fn bounded<T>(
        &self,
        op: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let start = Instant::now();
        let r = match tokio::time::timeout(self.timeout, op).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable(format!(
                "no answer within {} ms",
                self.timeout.as_millis()
            ))),
        };
        let s = &self.stats;
        let outcome = match &r {
            Err(StoreError::Unavailable(_)) => &s.unavailable,
            Err(StoreError::Postgres(_)) => &s.error,
            _ => &s.ok,
        };
        outcome.fetch_add(1, Ordering::Relaxed);
        s.micros
            .fetch_add(start.elapsed().as_micros() as u64, Ordering::Relaxed);
        r
    }

    /// The registry's lines of the Prometheus scrape.
    pub fn render_metrics(&self, out: &mut String) {
        let s = &self.stats;
        let _ = writeln!(
            out,
            "# HELP netpilot_registry_operations_total PostgreSQL registry operations, by outcome."
        );
        let _ = writeln!(out, "# TYPE netpilot_registry_operations_total counter");
        let mut count = 0;
        for (outcome, v) in [
            ("ok", &s.ok),
            ("error", &s.error),
            ("unavailable", &s.unavailable),
        ] {
            let n = v.load(Ordering::Relaxed);
            count += n;
            let _ = writeln!(
                out,
                "netpilot_registry_operations_total{{outcome=\"{outcome}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP netpilot_registry_operation_seconds Time of PostgreSQL registry operations."
        );
        let _ = writeln!(out, "# TYPE netpilot_registry_operation_seconds summary");
        let _ = writeln!(
            out,
            "netpilot_registry_operation_seconds_sum {}",
            s.micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "netpilot_registry_operation_seconds_count {count}");
    }

    pub async fn create_router(
        &self,
        id: Uuid,
        name: &str,
        owner: &str,
        token_hash: &[u8; 32],
        expires_at: i64,
        now: i64,
    ) -> Result<RouterRow, StoreError> {
        self.bounded(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            let row = tx
                .query_one(
                    &format!(
                        "INSERT INTO routers (id, name, owner_user_id, created_at) \
                         VALUES ($1, $2, $3, $4) RETURNING {RETURNING}"
                    ),
                    &[&id, &name, &owner, &now],
                )
                .await?;
            tx.execute(
                "INSERT INTO enrollment_tokens (token_hash, router_id, expires_at) \
                 VALUES ($1, $2, $3)",
                &[&&token_hash[..], &id, &expires_at],
            )
            .await?;
            tx.commit().await?;
            router_row(&row)
        })
        .await
    }

    /// The token's row is locked for the transaction: a second node redeeming the
    /// same token waits, then reads it used.
    pub async fn redeem_token(
        &self,
        token_hash: &[u8; 32],
        secret_hash: &[u8; 32],
        now: i64,
    ) -> Result<RouterRow, StoreError> {
        self.bounded(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            let token = tx
                .query_opt(
                    "SELECT router_id, expires_at, used_at FROM enrollment_tokens \
                     WHERE token_hash = $1 FOR UPDATE",
                    &[&&token_hash[..]],
                )
                .await?
                .ok_or(StoreError::TokenInvalid)?;
            let router_id: Uuid = token.get(0);
            let expires_at: i64 = token.get(1);
            let used_at: Option<i64> = token.get(2);
            super::token_usable(used_at, expires_at, now)?;
            tx.execute(
                "UPDATE enrollment_tokens SET used_at = $1 WHERE token_hash = $2",
                &[&now, &&token_hash[..]],
            )
            .await?;
            // Dropped without a commit, the transaction rolls back and the token
            // stays unused, as SQLite's does.
            let row = tx
                .query_opt(
                    &format!(
                        "UPDATE routers SET secret_hash = $1, enrolled_at = $2, {CHANGED} \
                         WHERE id = $3 AND revoked_at IS NULL RETURNING {RETURNING}"
                    ),
                    &[&&secret_hash[..], &now, &router_id],
                )
                .await?
                .ok_or(StoreError::Revoked)?;
            tx.commit().await?;
            router_row(&row)
        })
        .await
    }

    pub async fn add_token(
        &self,
        id: Uuid,
        token_hash: &[u8; 32],
        expires_at: i64,
    ) -> Result<(), StoreError> {
        self.bounded(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            // Shared lock: a revocation committing meanwhile cannot leave a token
            // behind for a revoked router.
            let revoked: Option<i64> = tx
                .query_opt(
                    "SELECT revoked_at FROM routers WHERE id = $1 FOR SHARE",
                    &[&id],
                )
                .await?
                .ok_or(StoreError::NotFound)?
                .get(0);
            if revoked.is_some() {
                return Err(StoreError::Revoked);
            }
            tx.execute(
                "INSERT INTO enrollment_tokens (token_hash, router_id, expires_at) \
                 VALUES ($1, $2, $3)",
                &[&&token_hash[..], &id, &expires_at],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    pub async fn revoke(&self, id: Uuid, now: i64) -> Result<RouterRow, StoreError> {
        self.bounded(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            let row = tx
                .query_opt(
                    &format!(
                        "UPDATE routers SET revoked_at = COALESCE(revoked_at, $1), {CHANGED} \
                         WHERE id = $2 RETURNING {RETURNING}"
                    ),
                    &[&now, &id],
                )
                .await?
                .ok_or(StoreError::NotFound)?;
            tx.execute("DELETE FROM enrollment_tokens WHERE router_id = $1", &[&id])
                .await?;
            tx.commit().await?;
            router_row(&row)
        })
        .await
    }

    /// Last-seen is not what nodes cache, so it leaves `change_xid` alone (a
    /// fleet's links coming and going would otherwise flood every node's poll).
    pub async fn touch(
        &self,
        id: Uuid,
        now: i64,
        agent_version: Option<&str>,
    ) -> Result<(), StoreError> {
        self.bounded(async {
            self.client()
                .await?
                .execute(
                    "UPDATE routers SET last_seen = $1, \
                     agent_version = COALESCE($2, agent_version) WHERE id = $3",
                    &[&now, &agent_version, &id],
                )
                .await?;
            Ok(())
        })
        .await
    }

    pub async fn router(&self, id: Uuid) -> Result<Option<RouterRow>, StoreError> {
        self.bounded(async {
            self.client()
                .await?
                .query_opt(&format!("{SELECT_ROUTER} WHERE id = $1"), &[&id])
                .await?
                .as_ref()
                .map(router_row)
                .transpose()
        })
        .await
    }

    pub async fn routers(&self) -> Result<Vec<RouterRow>, StoreError> {
        self.bounded(async {
            self.client()
                .await?
                .query(&format!("{SELECT_ROUTER} ORDER BY created_at, id"), &[])
                .await?
                .iter()
                .map(router_row)
                .collect()
        })
        .await
    }

    pub async fn routers_page(
        &self,
        owner: Option<&str>,
        after: Option<(i64, Uuid)>,
        limit: usize,
    ) -> Result<Vec<RouterRow>, StoreError> {
        let (after_at, after_id) = (after.map(|a| a.0), after.map(|a| a.1));
        let limit = limit as i64;
        self.bounded(async {
            self.client()
                .await?
                .query(
                    &format!(
                        "{SELECT_ROUTER} WHERE ($1::text IS NULL OR owner_user_id = $1) \
                         AND ($2::bigint IS NULL OR (created_at, id) > ($2, $3::uuid)) \
                         ORDER BY created_at, id LIMIT $4"
                    ),
                    &[&owner, &after_at, &after_id, &limit],
                )
                .await?
                .iter()
                .map(router_row)
                .collect()
        })
        .await
    }

    /// Routers whose cached fields changed at or after `since`, and where to ask
    /// from next: the oldest transaction still running now. Rows of transactions
    /// that finish later carry an id at or above it, so no commit is missed; the
    /// few rows read twice are applied twice, harmlessly.
    pub async fn changes(&self, since: Watermark) -> Result<Changes, StoreError> {
        self.bounded(async {
            let mut c = self.client().await?;
            // One snapshot for the horizon and the rows.
            let tx = c
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let next: i64 = tx
                .query_one(
                    "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
                    &[],
                )
                .await?
                .get(0);
            let rows = tx
                .query(
                    &format!("{SELECT_ROUTER} WHERE change_xid >= $1 ORDER BY change_xid"),
                    &[&since.0],
                )
                .await?;
            tx.commit().await?;
            Ok(Changes {
                routers: rows.iter().map(router_row).collect::<Result<_, _>>()?,
                next: Watermark(next),
            })
        })
        .await
    }

    /// Copies one router from another registry (`migrate-registry`) within `tx`:
    /// `true` when it was inserted, `false` when the same router is already here;
    /// a different router of the same id is a `Conflict`.
    async fn import_router(
        tx: &deadpool_postgres::Transaction<'_>,
        r: &RouterRow,
    ) -> Result<bool, StoreError> {
        let hash = r.secret_hash.map(|h| h.to_vec());
        let inserted = tx
            .execute(
                "INSERT INTO routers (id, name, owner_user_id, secret_hash, created_at, \
                 enrolled_at, revoked_at, last_seen, agent_version) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (id) DO NOTHING",
                &[
                    &r.id,
                    &r.name,
                    &r.owner_user_id,
                    &hash,
                    &r.created_at,
                    &r.enrolled_at,
                    &r.revoked_at,
                    &r.last_seen,
                    &r.agent_version,
                ],
            )
            .await?;
        if inserted == 1 {
            return Ok(true);
        }
        let here = tx
            .query_one(&format!("{SELECT_ROUTER} WHERE id = $1"), &[&r.id])
            .await?;
        if router_row(&here)?.same_router(r) {
            Ok(false)
        } else {
            Err(StoreError::Conflict(r.id))
        }
    }

    /// Copies routers and tokens from a single node's SQLite (`migrate-registry`)
    /// in one transaction: all or nothing, and a second run copies nothing twice.
    /// Returns how many routers and tokens were new here.
    pub async fn import(
        &self,
        routers: &[RouterRow],
        tokens: &[TokenRow],
    ) -> Result<(usize, usize), StoreError> {
        let work = async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            let mut new_routers = 0;
            for r in routers {
                if Self::import_router(&tx, r).await? {
                    new_routers += 1;
                }
            }
            let mut new_tokens = 0;
            for t in tokens {
                new_tokens += tx
                    .execute(
                        "INSERT INTO enrollment_tokens (token_hash, router_id, expires_at, \
                         used_at) VALUES ($1, $2, $3, $4) ON CONFLICT (token_hash) DO NOTHING",
                        &[&&t.token_hash[..], &t.router_id, &t.expires_at, &t.used_at],
                    )
                    .await? as usize;
            }
            tx.commit().await?;
            Ok((new_routers, new_tokens))
        };
        // A whole registry in one transaction: far longer than one statement.
        match tokio::time::timeout(MIGRATION_TIMEOUT.max(self.timeout), work).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable("the copy did not finish".into())),
        }
    }
}

const RETURNING: &str = "id, name, owner_user_id, secret_hash, created_at, enrolled_at, \
     revoked_at, last_seen, agent_version";

fn router_row(r: &Row) -> Result<RouterRow, StoreError> {
    router_columns(r).map_err(StoreError::Postgres)
}

fn router_columns(r: &Row) -> Result<RouterRow, tokio_postgres::Error> {
    let hash: Option<Vec<u8>> = r.try_get(3)?;
    Ok(RouterRow {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        owner_user_id: r.try_get(2)?,
        secret_hash: hash.and_then(|h| <[u8; 32]>::try_from(h.as_slice()).ok()),
        created_at: r.try_get(4)?,
        enrolled_at: r.try_get(5)?,
        revoked_at: r.try_get(6)?,
        last_seen: r.try_get(7)?,
        agent_version: r.try_get(8)?,
    })
}
