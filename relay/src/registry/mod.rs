//! The relay's durable registry: routers, their owners, enrollment tokens and the
//! hash of each router's secret (only hashes are stored). One interface, two
//! backends: SQLite in the data directory for a single node (`sqlite`), PostgreSQL
//! shared by every node of a cluster (`postgres`, issue 16). Every operation takes
//! `now` (unix milliseconds) so expiry is tested with plain values, and both
//! backends answer every operation alike (the shared suite in
//! `tests/tests/registry.rs` runs the same cases against each).

pub mod postgres;
pub mod sqlite;

use std::sync::Mutex;

use uuid::Uuid;

use crate::error::ApiError;
use crate::sync::Locked;

pub use postgres::PgRegistry;
pub use sqlite::{Store, FILE_NAME};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed (open, migrate, query).
    #[error("registry database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database file cannot be made private (0600).
    #[error("registry database file: {0}")]
    Private(#[from] std::io::Error),
    /// PostgreSQL answered with an error of its own (a constraint, a bad statement).
    #[error("registry database: {}", .0.as_db_error().map_or_else(|| .0.to_string(), |d| d.to_string()))]
    Postgres(tokio_postgres::Error),
    /// PostgreSQL cannot be reached or did not answer within `cluster.postgres_timeout`.
    #[error("registry database unavailable: {0}")]
    Unavailable(String),
    /// The database's schema is newer than this binary knows: a newer relay
    /// migrated it, and this one must not write to it.
    #[error(
        "the registry database is at schema version {found}, this relay knows up to \
         {known}: run a relay at least as new as the one that migrated it"
    )]
    SchemaTooNew { found: i64, known: i64 },
    /// `migrate-registry` found a router in PostgreSQL that differs from the
    /// SQLite row of the same id, and does not overwrite it.
    #[error("router {0} is already in PostgreSQL with different values; nothing was copied")]
    Conflict(Uuid),
    /// The enrollment token is unknown.
    #[error("enrollment token is not valid")]
    TokenInvalid,
    /// The enrollment token was already traded for a secret.
    #[error("enrollment token was already used")]
    TokenUsed,
    /// The enrollment token's expiry has passed.
    #[error("enrollment token has expired")]
    TokenExpired,
    /// The router exists but was revoked.
    #[error("router was revoked")]
    Revoked,
    /// No router has this id.
    #[error("router not found")]
    NotFound,
}

impl From<tokio_postgres::Error> for StoreError {
    /// A server's own error (SQLSTATE) is a fault in the statement; anything else
    /// (a closed connection, I/O) means the database is not there.
    fn from(e: tokio_postgres::Error) -> Self {
        if e.as_db_error().is_some() {
            StoreError::Postgres(e)
        } else {
            StoreError::Unavailable(e.to_string())
        }
    }
}

/// One row of `routers`, as the relay uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterRow {
    pub id: Uuid,
    pub name: String,
    pub owner_user_id: String,
    /// SHA-256 of the router secret; `None` until enrolled and after revocation.
    pub secret_hash: Option<[u8; 32]>,
    pub created_at: i64,
    pub enrolled_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub last_seen: Option<i64>,
    pub agent_version: Option<String>,
}

impl RouterRow {
    /// The same router as far as the registry's meaning goes: `last_seen` and
    /// `agent_version` move on while a router runs and are not compared.
    pub fn same_router(&self, other: &RouterRow) -> bool {
        self.id == other.id
            && self.name == other.name
            && self.owner_user_id == other.owner_user_id
            && self.secret_hash == other.secret_hash
            && self.created_at == other.created_at
            && self.enrolled_at == other.enrolled_at
            && self.revoked_at == other.revoked_at
    }
}

/// Whether a token found in the registry can still be traded: once, before it
/// expires (both backends ask the same).
fn token_usable(used_at: Option<i64>, expires_at: i64, now: i64) -> Result<(), StoreError> {
    if used_at.is_some() {
        return Err(StoreError::TokenUsed);
    }
    if now >= expires_at {
        return Err(StoreError::TokenExpired);
    }
    Ok(())
}

/// One row of `enrollment_tokens` (what `migrate-registry` copies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub token_hash: [u8; 32],
    pub router_id: Uuid,
    pub expires_at: i64,
    pub used_at: Option<i64>,
}

/// Where the router cache stands against the registry: the routers changed since
/// the last read come with the mark to ask from next time (`Registry::changes`).
#[derive(Debug)]
pub struct Changes {
    pub routers: Vec<RouterRow>,
    pub next: Watermark,
}

/// An opaque position in the registry's change history; `Watermark::START` reads
/// every router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watermark(pub(crate) i64);

impl Watermark {
    pub const START: Watermark = Watermark(i64::MIN);
}

/// The registry a relay runs on: SQLite for a single node, PostgreSQL in a cluster.
pub enum Registry {
    Sqlite(Mutex<Store>),
    Postgres(PgRegistry),
}

impl Registry {
    pub fn sqlite(store: Store) -> Registry {
        Registry::Sqlite(Mutex::new(store))
    }

    /// Whether other nodes may change routers behind this one's back (the cache
    /// then looks up what it misses and polls for changes).
    pub fn is_shared(&self) -> bool {
        matches!(self, Registry::Postgres(_))
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
        match self {
            Registry::Sqlite(s) => s
                .locked()
                .create_router(id, name, owner, token_hash, expires_at, now),
            Registry::Postgres(p) => {
                p.create_router(id, name, owner, token_hash, expires_at, now)
                    .await
            }
        }
    }

    /// Trades a token for the router's secret, once: of two nodes racing with the
    /// same token exactly one wins.
    pub async fn redeem_token(
        &self,
        token_hash: &[u8; 32],
        secret_hash: &[u8; 32],
        now: i64,
    ) -> Result<RouterRow, StoreError> {
        match self {
            Registry::Sqlite(s) => s.locked().redeem_token(token_hash, secret_hash, now),
            Registry::Postgres(p) => p.redeem_token(token_hash, secret_hash, now).await,
        }
    }

    pub async fn add_token(
        &self,
        id: Uuid,
        token_hash: &[u8; 32],
        expires_at: i64,
    ) -> Result<(), StoreError> {
        match self {
            Registry::Sqlite(s) => s.locked().add_token(id, token_hash, expires_at),
            Registry::Postgres(p) => p.add_token(id, token_hash, expires_at).await,
        }
    }

    pub async fn revoke(&self, id: Uuid, now: i64) -> Result<RouterRow, StoreError> {
        match self {
            Registry::Sqlite(s) => s.locked().revoke(id, now),
            Registry::Postgres(p) => p.revoke(id, now).await,
        }
    }

    pub async fn touch(
        &self,
        id: Uuid,
        now: i64,
        agent_version: Option<&str>,
    ) -> Result<(), StoreError> {
        match self {
            Registry::Sqlite(s) => s.locked().touch(id, now, agent_version),
            Registry::Postgres(p) => p.touch(id, now, agent_version).await,
        }
    }

    pub async fn router(&self, id: Uuid) -> Result<Option<RouterRow>, StoreError> {
        match self {
            Registry::Sqlite(s) => s.locked().router(id),
            Registry::Postgres(p) => p.router(id).await,
        }
    }

    pub async fn routers(&self) -> Result<Vec<RouterRow>, StoreError> {
        match self {
            Registry::Sqlite(s) => s.locked().routers(),
            Registry::Postgres(p) => p.routers().await,
        }
    }

    /// One page of the admin list, oldest first (see `Store::routers_page`).
    pub async fn routers_page(
        &self,
        owner: Option<&str>,
        after: Option<(i64, Uuid)>,
        limit: usize,
    ) -> Result<Vec<RouterRow>, StoreError> {
        match self {
            Registry::Sqlite(s) => s.locked().routers_page(owner, after, limit),
            Registry::Postgres(p) => p.routers_page(owner, after, limit).await,
        }
    }

    /// The registry's lines of the Prometheus scrape (a single node's SQLite has none).
    pub fn render_metrics(&self, out: &mut String) {
        if let Registry::Postgres(p) = self {
            p.render_metrics(out);
        }
    }

    /// Routers changed since `since` (every router from `Watermark::START`). SQLite
    /// has one writer, this node, so it has no history: it answers every router
    /// from the start and nothing after.
    pub async fn changes(&self, since: Watermark) -> Result<Changes, StoreError> {
        match self {
            Registry::Sqlite(s) => Ok(Changes {
                routers: if since == Watermark::START {
                    s.locked().routers()?
                } else {
                    Vec::new()
                },
                next: Watermark(0),
            }),
            Registry::Postgres(p) => p.changes(since).await,
        }
    }
}

/// Token and revocation failures keep their own codes, so the router's owner knows
/// what to do; the database's detail is logged, not sent. A registry that cannot
/// be reached is a 503 the caller may retry, never a hang (`REGISTRY_UNAVAILABLE`).
impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::TokenInvalid => ApiError::TokenInvalid,
            StoreError::TokenUsed => ApiError::TokenUsed,
            StoreError::TokenExpired => ApiError::TokenExpired,
            StoreError::Revoked => ApiError::RouterRevoked,
            StoreError::NotFound => ApiError::RouterNotFound(String::new()),
            StoreError::Unavailable(e) => ApiError::RegistryUnavailable(e),
            StoreError::Sqlite(e) => ApiError::Internal(e.to_string()),
            StoreError::Private(e) => ApiError::Internal(e.to_string()),
            StoreError::Postgres(e) => ApiError::Internal(e.to_string()),
            e @ (StoreError::SchemaTooNew { .. } | StoreError::Conflict(_)) => {
                ApiError::Internal(e.to_string())
            }
        }
    }
}
