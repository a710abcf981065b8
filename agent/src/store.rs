//! The agent's own state in SQLite (`state.sqlite3` in the state directory): WAL,
//! forward-only migrations keyed on `PRAGMA user_version`, and a consistent copy of
//! the database taken before any migration runs on an existing file. It keeps
//! the agent's own bookkeeping and the policy engine's desired state.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};

use crate::runtime::private;

pub const FILE_NAME: &str = "state.sqlite3";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Opening or migrating failed (corrupt file, full or read-only flash, …).
    #[error("state database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// The state directory or the database file cannot be made private.
    #[error("cannot make {path} private: {source}")]
    Private {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file was written by a newer agent.
    #[error("state database {path} has schema version {found}, newer than this agent's {known}; upgrade the agent")]
    TooNew {
        path: PathBuf,
        found: u32,
        known: u32,
    },
}

/// Forward-only; entry N takes the schema from version N to N+1.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE agent_meta (
    key   TEXT PRIMARY KEY,  -- e.g. 'starts', 'first_start_unix'
    value TEXT NOT NULL
);
"#,
    // The policy engine's desired state (see policy::persist).
    r#"
CREATE TABLE policy_groups (
    id      INTEGER PRIMARY KEY,
    name    TEXT NOT NULL,
    slot    INTEGER NOT NULL UNIQUE CHECK (slot BETWEEN 1 AND 250), -- ct mark bits 16-23, tc classes
    policy  TEXT NOT NULL    -- JSON, the API's response shape
);
INSERT INTO policy_groups (id, name, slot, policy) VALUES (0, 'Guests', 1, '{}');
CREATE TABLE policy_devices (
    mac      TEXT PRIMARY KEY,  -- normalised aa:bb:cc:dd:ee:ff
    group_id INTEGER NOT NULL REFERENCES policy_groups(id) DEFERRABLE INITIALLY DEFERRED,
    ipv4     TEXT,
    ipv6     TEXT,
    name     TEXT
) WITHOUT ROWID; -- keyed by MAC only: one B-tree write per device, not two
CREATE TABLE policy_lists (
    kind   TEXT NOT NULL CHECK (kind IN ('block', 'blacklist', 'whitelist')),
    target TEXT NOT NULL,       -- normalised MAC or IP address
    PRIMARY KEY (kind, target)
) WITHOUT ROWID;
CREATE TABLE policy_applied (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    generation  INTEGER NOT NULL,
    digest      TEXT NOT NULL,
    applied_unix INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL
);
CREATE TABLE audit_log (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at_unix    INTEGER NOT NULL,
    session_id TEXT,
    user_id    TEXT,
    request_id TEXT,
    action     TEXT NOT NULL,
    detail     TEXT NOT NULL,
    result     TEXT NOT NULL
);
"#,
    // Wi-Fi changes under safe apply (see wifi::persist).
    r#"
CREATE TABLE wifi_changes (
    id            TEXT PRIMARY KEY,  -- random hex, the API's change id
    action        TEXT NOT NULL,     -- enable, disable, ssid, password
    detail        TEXT NOT NULL,     -- what changed, for people; never a password
    reload        TEXT,              -- the radio `wifi reload` takes; NULL for all
    created_unix  INTEGER NOT NULL,
    deadline_unix INTEGER NOT NULL,  -- rolled back when not confirmed by then
    state         TEXT NOT NULL CHECK (state IN ('pending', 'confirmed', 'rolled_back', 'failed')),
    settled_unix  INTEGER,           -- when it left 'pending'
    outcome       TEXT,              -- why it failed or was rolled back
    reported      INTEGER NOT NULL DEFAULT 0, -- the final state reached the relay
    snapshot      TEXT NOT NULL      -- `uci export wireless` before the change (holds keys, as
                                     -- /etc/config/wireless does); emptied once settled
);
"#,
    // Device usage history (see usage::history).
    r#"
CREATE TABLE usage_daily (
    day      TEXT NOT NULL,     -- the router's local date, YYYY-MM-DD
    mac      TEXT NOT NULL,     -- normalised aa:bb:cc:dd:ee:ff
    rx_bytes INTEGER NOT NULL,  -- downloaded by the device that day
    tx_bytes INTEGER NOT NULL,  -- uploaded by the device that day
    PRIMARY KEY (day, mac)
) WITHOUT ROWID;
CREATE TABLE usage_baseline (
    mac      TEXT PRIMARY KEY,  -- nlbwmon's counters at the last flush, already counted
    rx_bytes INTEGER NOT NULL,
    tx_bytes INTEGER NOT NULL
) WITHOUT ROWID;
"#,
    // DNS category lists replaced or added through the API (see policy::persist);
    // the shipped ones are not stored.
    r#"
CREATE TABLE dns_categories (
    name         TEXT PRIMARY KEY,
    description  TEXT NOT NULL,
    domains      TEXT NOT NULL,     -- normalised names, one per line, sorted
    updated_unix INTEGER NOT NULL
) WITHOUT ROWID;
"#,
    // When each device was last seen (see scan::seen).
    r#"
CREATE TABLE device_seen (
    mac       TEXT PRIMARY KEY,  -- normalised aa:bb:cc:dd:ee:ff
    last_seen INTEGER NOT NULL   -- Unix seconds
) WITHOUT ROWID;
"#,
];

/// The state directory 0700 and the database 0600 before SQLite opens it (SQLite
/// gives its `-wal` and `-shm` files the database's own mode); what an older agent
/// left looser — the files beside the database, its backups — is tightened, once,
/// with a log line.
fn make_private(state_dir: &Path, db: &Path) -> Result<(), StoreError> {
    let err = |path: &Path| {
        let path = path.to_owned();
        move |source| StoreError::Private { path, source }
    };
    let mut changed = Vec::new();
    if let Some(t) = private::dir(state_dir).map_err(err(state_dir))? {
        changed.push((state_dir.to_owned(), t));
    }
    if let Some(t) = private::file(db).map_err(err(db))? {
        changed.push((db.to_owned(), t));
    }
    let beside = std::fs::read_dir(state_dir).map_err(err(state_dir))?;
    for entry in beside.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(FILE_NAME) && name != FILE_NAME {
            let path = entry.path();
            if let Some(t) = private::restrict(&path, private::FILE_MODE).map_err(err(&path))? {
                changed.push((path, t));
            }
        }
    }
    for (path, t) in changed {
        tracing::warn!(path = %path.display(), mode = %t, "tightened permissions: the agent's state is private");
    }
    Ok(())
}

pub struct Store {
    conn: Connection,
    path: PathBuf,
}

/// Where the state database is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// `state.sqlite3` in this state directory.
    Dir(PathBuf),
    /// A fresh database in memory for each opening: a simulated router that keeps
    /// nothing (many in one bench process).
    Memory,
}

impl Store {
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        Self::open_with(state_dir, MIGRATIONS)
    }

    pub fn open_at(location: &Location) -> Result<Store, StoreError> {
        match location {
            Location::Dir(dir) => Store::open(dir),
            Location::Memory => {
                let path = PathBuf::from(":memory:");
                let conn = Connection::open_in_memory().map_err(|source| StoreError::Sqlite {
                    path: path.clone(),
                    source,
                })?;
                let mut store = Store { conn, path };
                store.migrate(MIGRATIONS)?;
                Ok(store)
            }
        }
    }

    fn open_with(state_dir: &Path, migrations: &[&str]) -> Result<Store, StoreError> {
        let path = state_dir.join(FILE_NAME);
        make_private(state_dir, &path)?;
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        // Checks the file is a database at all before anything else touches it.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        let mut store = Store { conn, path };
        store.migrate(migrations)?;
        Ok(store)
    }

    /// For the modules that keep their tables here (`policy::persist`).
    pub(crate) fn conn_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }

    pub(crate) fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    pub fn schema_version(&self) -> Result<u32, StoreError> {
        self.conn
            .pragma_query_value(None, "user_version", |r| r.get::<_, u32>(0))
            .map_err(|e| self.err(e))
    }

    fn migrate(&mut self, migrations: &[&str]) -> Result<(), StoreError> {
        let version = self.schema_version()?;
        let known = migrations.len() as u32;
        if version > known {
            return Err(StoreError::TooNew {
                path: self.path.clone(),
                found: version,
                known,
            });
        }
        if version == known {
            return Ok(());
        }
        if version > 0 {
            // A consistent copy, so a failed or buggy migration can be undone by hand.
            let backup = self.path.with_extension(format!("sqlite3.v{version}.bak"));
            let _ = std::fs::remove_file(&backup);
            self.conn
                .execute("VACUUM INTO ?1", params![backup.to_string_lossy()])
                .map_err(|e| self.err(e))?;
            // A copy of the same secrets: as private as the database.
            private::restrict(&backup, private::FILE_MODE).map_err(|source| {
                StoreError::Private {
                    path: backup.clone(),
                    source,
                }
            })?;
        }
        for (i, sql) in migrations.iter().enumerate().skip(version as usize) {
            let tx = self.conn.transaction().map_err(|e| StoreError::Sqlite {
                path: self.path.clone(),
                source: e,
            })?;
            let step = tx
                .execute_batch(sql)
                .and_then(|_| tx.pragma_update(None, "user_version", (i + 1) as u32))
                .and_then(|_| tx.commit());
            step.map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// One value of `agent_meta`.
    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.conn
            .query_row(
                "SELECT value FROM agent_meta WHERE key = ?1",
                params![key],
                |r| r.get::<_, String>(0),
            )
            .optional()
            .map_err(|source| StoreError::Sqlite {
                path: self.path.clone(),
                source,
            })
    }

    /// Sets (`Some`) or removes (`None`) one value of `agent_meta`.
    pub fn set_meta(&mut self, key: &str, value: Option<&str>) -> Result<(), StoreError> {
        let r = match value {
            Some(v) => self.conn.execute(
                "INSERT INTO agent_meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![key, v],
            ),
            None => self
                .conn
                .execute("DELETE FROM agent_meta WHERE key = ?1", params![key]),
        };
        r.map(drop).map_err(|source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        })
    }

    /// Counts one more start of the agent and returns the total.
    pub fn record_start(&mut self, now_unix: u64) -> Result<u64, StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        let starts: u64 = tx
            .query_row(
                "SELECT value FROM agent_meta WHERE key = 'starts'",
                [],
                |r| r.get::<_, String>(0),
            )
            .optional()
            .map_err(err)?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
            + 1;
        tx.execute(
            "INSERT INTO agent_meta (key, value) VALUES ('starts', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![starts.to_string()],
        )
        .map_err(err)?;
        tx.execute(
            "INSERT OR IGNORE INTO agent_meta (key, value) VALUES ('first_start_unix', ?1)",
            params![now_unix.to_string()],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(starts)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh directory for a test's state database.
    pub(crate) fn temp_dir() -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "np-store-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn starts_are_counted_across_reopens() {
        let dir = temp_dir();
        assert_eq!(Store::open(&dir).unwrap().record_start(100).unwrap(), 1);
        let mut s = Store::open(&dir).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as u32);
        assert_eq!(s.record_start(200).unwrap(), 2);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_newer_schema_is_refused_and_garbage_is_reported() {
        let dir = temp_dir();
        {
            let s = Store::open(&dir).unwrap();
            s.conn.pragma_update(None, "user_version", 99).unwrap();
        }
        assert!(matches!(
            Store::open(&dir),
            Err(StoreError::TooNew { found: 99, .. })
        ));
        let dir2 = temp_dir();
        std::fs::write(dir2.join(FILE_NAME), vec![0x5a; 4096]).unwrap();
        let err = Store::open(&dir2).err().expect("garbage must not open");
        assert!(err.to_string().contains(FILE_NAME), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
        std::fs::remove_dir_all(dir2).unwrap();
    }

    #[test]
    fn an_upgrade_backs_the_file_up_first() {
        let dir = temp_dir();
        Store::open(&dir).unwrap().record_start(7).unwrap();
        let mut next = MIGRATIONS.to_vec();
        next.push("CREATE TABLE later (x INTEGER);");
        let known = MIGRATIONS.len() as u32;
        let s = Store::open_with(&dir, &next).unwrap();
        assert_eq!(s.schema_version().unwrap(), known + 1);
        let backup = dir.join(format!("state.sqlite3.v{known}.bak"));
        let old = Connection::open(&backup).unwrap();
        let v: u32 = old
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, known);
        let starts: String = old
            .query_row("SELECT value FROM agent_meta WHERE key='starts'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(starts, "1");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
