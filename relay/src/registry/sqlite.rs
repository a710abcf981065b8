//! The registry in SQLite, a single node's (`registry.sqlite3` in the data
//! directory): synchronous, one connection, used under the registry's lock.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};
use uuid::Uuid;

use super::{RouterRow, StoreError, TokenRow};

/// Forward-only migrations; `PRAGMA user_version` is the index of the last applied.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE routers (
    id            TEXT PRIMARY KEY,   -- UUID, lower-case hyphenated
    name          TEXT NOT NULL,      -- shown to the owner
    owner_user_id TEXT NOT NULL,      -- the web app's user id
    secret_hash   BLOB,               -- SHA-256 of the router secret; NULL before enrollment and after revocation
    created_at    INTEGER NOT NULL,   -- unix ms
    enrolled_at   INTEGER,            -- unix ms of the token trade
    revoked_at    INTEGER,            -- unix ms; a revoked router never connects again
    last_seen     INTEGER,            -- unix ms the link was last up
    agent_version TEXT                -- as the agent reported on its last connect
);
CREATE INDEX routers_owner ON routers(owner_user_id);
CREATE TABLE enrollment_tokens (
    token_hash BLOB PRIMARY KEY,      -- SHA-256 of the one-time token
    router_id  TEXT NOT NULL REFERENCES routers(id) ON DELETE CASCADE,
    expires_at INTEGER NOT NULL,      -- unix ms
    used_at    INTEGER                -- unix ms; set once, the token never works again
);
"#,
    // The admin list is paged oldest first, for all routers or one owner's (issue 16).
    r#"
CREATE INDEX routers_created ON routers(created_at, id);
CREATE INDEX routers_owner_created ON routers(owner_user_id, created_at, id);
"#,
];

/// The registry's file in the data directory.
pub const FILE_NAME: &str = "registry.sqlite3";

pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (creating if needed) `registry.sqlite3` in `dir` and migrates it.
    /// The file is made 0600 first (see `private`), and what an older relay left
    /// beside it is tightened.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join(FILE_NAME);
        crate::private::file(&path)?;
        for suffix in ["-wal", "-shm"] {
            crate::private::restrict(
                &dir.join(format!("{FILE_NAME}{suffix}")),
                crate::private::FILE_MODE,
            )?;
        }
        Self::from_connection(Connection::open(path)?)
    }

    pub fn open_in_memory() -> Result<Store, StoreError> {
        Self::from_connection(Connection::open_in_memory()?)
    }

    fn from_connection(conn: Connection) -> Result<Store, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mut store = Store { conn };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let version: usize = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))?
            as usize;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(())
    }

    pub fn create_router(
        &mut self,
        id: Uuid,
        name: &str,
        owner: &str,
        token_hash: &[u8; 32],
        expires_at: i64,
        now: i64,
    ) -> Result<RouterRow, StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO routers (id, name, owner_user_id, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![id.to_string(), name, owner, now],
        )?;
        tx.execute(
            "INSERT INTO enrollment_tokens (token_hash, router_id, expires_at) VALUES (?1, ?2, ?3)",
            params![&token_hash[..], id.to_string(), expires_at],
        )?;
        tx.commit()?;
        self.router(id)?.ok_or(StoreError::NotFound)
    }

    /// Trades a token for the router's secret: checks the token, marks it used and
    /// stores the secret's hash, all in one transaction.
    pub fn redeem_token(
        &mut self,
        token_hash: &[u8; 32],
        secret_hash: &[u8; 32],
        now: i64,
    ) -> Result<RouterRow, StoreError> {
        let tx = self.conn.transaction()?;
        let row: Option<(String, i64, Option<i64>)> = tx
            .query_row(
                "SELECT router_id, expires_at, used_at FROM enrollment_tokens WHERE token_hash = ?1",
                params![&token_hash[..]],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let (router_id, expires_at, used_at) = row.ok_or(StoreError::TokenInvalid)?;
        super::token_usable(used_at, expires_at, now)?;
        tx.execute(
            "UPDATE enrollment_tokens SET used_at = ?1 WHERE token_hash = ?2",
            params![now, &token_hash[..]],
        )?;
        let changed = tx.execute(
            "UPDATE routers SET secret_hash = ?1, enrolled_at = ?2 WHERE id = ?3 AND revoked_at IS NULL",
            params![&secret_hash[..], now, router_id],
        )?;
        if changed == 0 {
            return Err(StoreError::Revoked);
        }
        tx.commit()?;
        let id = Uuid::parse_str(&router_id).map_err(|_| StoreError::NotFound)?;
        self.router(id)?.ok_or(StoreError::NotFound)
    }

    /// A fresh one-time token for an existing, unrevoked router (re-enrollment after a
    /// factory reset). Earlier unused tokens stay valid until they expire.
    pub fn add_token(
        &mut self,
        id: Uuid,
        token_hash: &[u8; 32],
        expires_at: i64,
    ) -> Result<(), StoreError> {
        let row = self.router(id)?.ok_or(StoreError::NotFound)?;
        if row.revoked_at.is_some() {
            return Err(StoreError::Revoked);
        }
        self.conn.execute(
            "INSERT INTO enrollment_tokens (token_hash, router_id, expires_at) VALUES (?1, ?2, ?3)",
            params![&token_hash[..], id.to_string(), expires_at],
        )?;
        Ok(())
    }

    /// Revokes a router for good: its pending tokens are gone and it never connects
    /// again. The secret's hash stays, only so the relay tells "revoked" to the
    /// holder of the secret and to no one else (`auth::authenticate_router`).
    pub fn revoke(&mut self, id: Uuid, now: i64) -> Result<RouterRow, StoreError> {
        let tx = self.conn.transaction()?;
        let changed = tx.execute(
            "UPDATE routers SET revoked_at = COALESCE(revoked_at, ?1) WHERE id = ?2",
            params![now, id.to_string()],
        )?;
        if changed == 0 {
            return Err(StoreError::NotFound);
        }
        tx.execute(
            "DELETE FROM enrollment_tokens WHERE router_id = ?1",
            params![id.to_string()],
        )?;
        tx.commit()?;
        self.router(id)?.ok_or(StoreError::NotFound)
    }

    pub fn touch(
        &mut self,
        id: Uuid,
        now: i64,
        agent_version: Option<&str>,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE routers SET last_seen = ?1, agent_version = COALESCE(?2, agent_version) WHERE id = ?3",
            params![now, agent_version, id.to_string()],
        )?;
        Ok(())
    }

    pub fn router(&self, id: Uuid) -> Result<Option<RouterRow>, StoreError> {
        Ok(self
            .conn
            .query_row(
                &format!("{SELECT_ROUTER} WHERE id = ?1"),
                params![id.to_string()],
                router_row,
            )
            .optional()?)
    }

    pub fn routers(&self) -> Result<Vec<RouterRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!("{SELECT_ROUTER} ORDER BY created_at, id"))?;
        let rows = stmt.query_map([], router_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

impl Store {
    /// One page of the admin list, oldest first: at most `limit` routers after the
    /// position `after` (a router's `(created_at, id)`), of one owner or all. A
    /// position rather than an offset, so a router created while an operator pages
    /// does not shift the pages under them.
    pub fn routers_page(
        &self,
        owner: Option<&str>,
        after: Option<(i64, Uuid)>,
        limit: usize,
    ) -> Result<Vec<RouterRow>, StoreError> {
        let (after_at, after_id) = match after {
            Some((at, id)) => (Some(at), Some(id.to_string())),
            None => (None, None),
        };
        let mut stmt = self.conn.prepare_cached(&format!(
            "{SELECT_ROUTER} WHERE (?1 IS NULL OR owner_user_id = ?1) \
             AND (?2 IS NULL OR (created_at, id) > (?2, ?3)) \
             ORDER BY created_at, id LIMIT ?4"
        ))?;
        let rows = stmt.query_map(params![owner, after_at, after_id, limit as i64], router_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

impl Store {
    /// Every enrollment token that has not expired by `now`, used or not (what
    /// `migrate-registry` copies: a used token must stay used).
    pub fn tokens(&self, now: i64) -> Result<Vec<TokenRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT token_hash, router_id, expires_at, used_at FROM enrollment_tokens \
             WHERE expires_at > ?1 ORDER BY router_id, token_hash",
        )?;
        let rows = stmt.query_map(params![now], |r| {
            let hash: Vec<u8> = r.get(0)?;
            let id: String = r.get(1)?;
            Ok((hash, id, r.get(2)?, r.get(3)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (hash, id, expires_at, used_at) = row?;
            // A row that is not a 32-byte hash and a UUID was not written by a relay.
            let (Ok(token_hash), Ok(router_id)) =
                (<[u8; 32]>::try_from(hash.as_slice()), Uuid::parse_str(&id))
            else {
                continue;
            };
            out.push(TokenRow {
                token_hash,
                router_id,
                expires_at,
                used_at,
            });
        }
        Ok(out)
    }
}

const SELECT_ROUTER: &str = "SELECT id, name, owner_user_id, secret_hash, created_at, enrolled_at, revoked_at, last_seen, agent_version FROM routers";

fn router_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RouterRow> {
    let id: String = r.get(0)?;
    let hash: Option<Vec<u8>> = r.get(3)?;
    Ok(RouterRow {
        id: Uuid::parse_str(&id).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
        })?,
        name: r.get(1)?,
        owner_user_id: r.get(2)?,
        secret_hash: hash.and_then(|h| <[u8; 32]>::try_from(h.as_slice()).ok()),
        created_at: r.get(4)?,
        enrolled_at: r.get(5)?,
        revoked_at: r.get(6)?,
        last_seen: r.get(7)?,
        agent_version: r.get(8)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(b: u8) -> [u8; 32] {
        [b; 32]
    }

    #[test]
    fn token_is_traded_once() {
        let mut s = Store::open_in_memory().unwrap();
        let id = Uuid::new_v4();
        s.create_router(id, "home", "u1", &h(1), 1_000, 0).unwrap();
        let row = s.redeem_token(&h(1), &h(9), 10).unwrap();
        assert_eq!(row.id, id);
        assert_eq!(row.secret_hash, Some(h(9)));
        assert_eq!(row.enrolled_at, Some(10));
        assert!(matches!(
            s.redeem_token(&h(1), &h(8), 20),
            Err(StoreError::TokenUsed)
        ));
        assert!(matches!(
            s.redeem_token(&h(2), &h(8), 20),
            Err(StoreError::TokenInvalid)
        ));
        // The first secret stays.
        assert_eq!(s.router(id).unwrap().unwrap().secret_hash, Some(h(9)));
    }

    #[test]
    fn pages_follow_creation_order_from_a_position_and_filter_by_owner() {
        let mut s = Store::open_in_memory().unwrap();
        let mut ids = Vec::new();
        for i in 0..7u8 {
            let id = Uuid::new_v4();
            // Two routers per millisecond: the id breaks the tie.
            let owner = if i % 2 == 0 { "even" } else { "odd" };
            s.create_router(id, "r", owner, &h(i), 1_000, i64::from(i / 2))
                .unwrap();
            ids.push(id);
        }
        let all = s.routers().unwrap();
        let mut walked = Vec::new();
        let mut after = None;
        loop {
            let page = s.routers_page(None, after, 3).unwrap();
            walked.extend(page.iter().map(|r| r.id));
            match page.last() {
                Some(last) if page.len() == 3 => after = Some((last.created_at, last.id)),
                _ => break,
            }
        }
        assert_eq!(walked, all.iter().map(|r| r.id).collect::<Vec<_>>());
        let even = s.routers_page(Some("even"), None, 100).unwrap();
        assert_eq!(even.len(), 4);
        assert!(even.iter().all(|r| r.owner_user_id == "even"));
        let rest = s
            .routers_page(Some("even"), Some((even[1].created_at, even[1].id)), 100)
            .unwrap();
        assert_eq!(rest.len(), 2);
        assert!(ids.contains(&rest[0].id));
    }

    #[test]
    fn expired_token_is_refused() {
        let mut s = Store::open_in_memory().unwrap();
        s.create_router(Uuid::new_v4(), "home", "u1", &h(1), 1_000, 0)
            .unwrap();
        assert!(matches!(
            s.redeem_token(&h(1), &h(9), 1_000),
            Err(StoreError::TokenExpired)
        ));
    }

    #[test]
    fn re_enrollment_token_replaces_the_secret() {
        let mut s = Store::open_in_memory().unwrap();
        let id = Uuid::new_v4();
        s.create_router(id, "home", "u1", &h(1), 1_000, 0).unwrap();
        s.redeem_token(&h(1), &h(9), 10).unwrap();
        s.add_token(id, &h(2), 2_000).unwrap();
        assert_eq!(
            s.redeem_token(&h(2), &h(7), 20).unwrap().secret_hash,
            Some(h(7))
        );
        assert!(matches!(
            s.add_token(Uuid::new_v4(), &h(3), 1),
            Err(StoreError::NotFound)
        ));
        s.revoke(id, 30).unwrap();
        assert!(matches!(
            s.add_token(id, &h(4), 2_000),
            Err(StoreError::Revoked)
        ));
    }

    #[test]
    fn revoke_clears_tokens_and_keeps_the_secret_to_check() {
        let mut s = Store::open_in_memory().unwrap();
        let id = Uuid::new_v4();
        s.create_router(id, "home", "u1", &h(1), 1_000, 0).unwrap();
        s.redeem_token(&h(1), &h(2), 6).unwrap();
        let row = s.revoke(id, 7).unwrap();
        assert_eq!(row.revoked_at, Some(7));
        assert_eq!(row.secret_hash, Some(h(2)));
        assert!(matches!(
            s.redeem_token(&h(1), &h(9), 6),
            Err(StoreError::TokenInvalid)
        ));
        assert!(matches!(
            s.revoke(Uuid::new_v4(), 5),
            Err(StoreError::NotFound)
        ));
    }

    #[test]
    fn migrations_are_idempotent_on_reopen() {
        let dir = std::env::temp_dir().join(format!("np-store-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let id = Uuid::new_v4();
        {
            let mut s = Store::open(&dir).unwrap();
            s.create_router(id, "home", "u1", &h(1), 1_000, 0).unwrap();
            s.touch(id, 7, Some("0.1.0")).unwrap();
        }
        let s = Store::open(&dir).unwrap();
        let rows = s.routers().unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].last_seen, Some(7));
        assert_eq!(rows[0].agent_version.as_deref(), Some("0.1.0"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
