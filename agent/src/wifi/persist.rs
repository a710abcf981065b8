//! Wi-Fi changes in the agent's SQLite store (`wifi_changes`): written before uci
//! is touched, so a restart during the grace period finds the change and its
//! snapshot and resumes the wait or rolls back. Only the newest rows are kept.

use rusqlite::{params, OptionalExtension, Row};
use serde::Serialize;

use crate::store::{Store, StoreError};

/// Changes kept; older settled ones are dropped.
pub const KEEP: i64 = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Applied; waiting for a report to reach the relay within the grace period.
    Pending,
    /// The relay was reached after the change: it stays.
    Confirmed,
    /// The previous configuration was restored (not confirmed in time, or the
    /// reload failed).
    RolledBack,
    /// uci refused the change; the configuration never changed.
    Failed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Confirmed => "confirmed",
            State::RolledBack => "rolled_back",
            State::Failed => "failed",
        }
    }

    fn parse(s: &str) -> State {
        match s {
            "pending" => State::Pending,
            "confirmed" => State::Confirmed,
            "rolled_back" => State::RolledBack,
            _ => State::Failed,
        }
    }
}

/// A change as stored. The snapshot holds Wi-Fi keys: `Debug` leaves it out.
#[derive(Clone, PartialEq, Eq)]
pub struct Change {
    pub id: String,
    pub action: String,
    pub detail: String,
    pub reload: Option<String>,
    pub created_unix: i64,
    pub deadline_unix: i64,
    pub state: State,
    pub settled_unix: Option<i64>,
    pub outcome: Option<String>,
    pub reported: bool,
    pub snapshot: String,
}

impl std::fmt::Debug for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Change")
            .field("id", &self.id)
            .field("action", &self.action)
            .field("state", &self.state)
            .field("deadline_unix", &self.deadline_unix)
            .field("reported", &self.reported)
            .finish_non_exhaustive()
    }
}

/// A change as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChangeView {
    pub id: String,
    pub action: String,
    pub detail: String,
    pub state: State,
    pub created_unix: i64,
    /// Rolled back automatically when not confirmed by then.
    pub deadline_unix: i64,
    pub settled_unix: Option<i64>,
    pub outcome: Option<String>,
    /// The final state has been reported to the relay.
    pub reported: bool,
}

impl Change {
    pub fn view(&self) -> ChangeView {
        ChangeView {
            id: self.id.clone(),
            action: self.action.clone(),
            detail: self.detail.clone(),
            state: self.state,
            created_unix: self.created_unix,
            deadline_unix: self.deadline_unix,
            settled_unix: self.settled_unix,
            outcome: self.outcome.clone(),
            reported: self.reported,
        }
    }
}

const COLUMNS: &str = "id, action, detail, reload, created_unix, deadline_unix, state, settled_unix, outcome, reported, snapshot";

fn row(r: &Row<'_>) -> rusqlite::Result<Change> {
    Ok(Change {
        id: r.get(0)?,
        action: r.get(1)?,
        detail: r.get(2)?,
        reload: r.get(3)?,
        created_unix: r.get(4)?,
        deadline_unix: r.get(5)?,
        state: State::parse(&r.get::<_, String>(6)?),
        settled_unix: r.get(7)?,
        outcome: r.get(8)?,
        reported: r.get::<_, i64>(9)? != 0,
        snapshot: r.get(10)?,
    })
}

impl Store {
    pub fn wifi_insert(&mut self, c: &Change) -> Result<(), StoreError> {
        let r = self.conn_mut().execute(
            &format!("INSERT INTO wifi_changes ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"),
            params![c.id, c.action, c.detail, c.reload, c.created_unix, c.deadline_unix, c.state.as_str(),
                    c.settled_unix, c.outcome, c.reported as i64, c.snapshot],
        ).and_then(|_| self.conn_mut().execute(
            "DELETE FROM wifi_changes WHERE state != 'pending' AND reported = 1 AND rowid <= (SELECT MAX(rowid) FROM wifi_changes) - ?1",
            params![KEEP],
        ));
        r.map(|_| ()).map_err(|e| self.err(e))
    }

    /// Moves a change to a final state; its snapshot is no longer needed then.
    pub fn wifi_settle(
        &mut self,
        id: &str,
        state: State,
        at_unix: i64,
        outcome: Option<&str>,
        reported: bool,
    ) -> Result<(), StoreError> {
        let r = self.conn_mut().execute(
            "UPDATE wifi_changes SET state = ?2, settled_unix = ?3, outcome = ?4, reported = ?5, snapshot = '' WHERE id = ?1",
            params![id, state.as_str(), at_unix, outcome, reported as i64],
        );
        r.map(|_| ()).map_err(|e| self.err(e))
    }

    pub fn wifi_reported(&mut self, id: &str) -> Result<(), StoreError> {
        let r = self.conn_mut().execute(
            "UPDATE wifi_changes SET reported = 1 WHERE id = ?1",
            params![id],
        );
        r.map(|_| ()).map_err(|e| self.err(e))
    }

    /// Changes with work left: pending ones, and final states not yet reported.
    pub fn wifi_open(&mut self) -> Result<Vec<Change>, StoreError> {
        let r = (|| {
            let conn = self.conn_mut();
            let mut st = conn.prepare(&format!(
                "SELECT {COLUMNS} FROM wifi_changes WHERE state = 'pending' OR reported = 0 ORDER BY rowid"
            ))?;
            let rows = st.query_map([], row)?;
            rows.collect::<Result<Vec<_>, _>>()
        })();
        r.map_err(|e| self.err(e))
    }

    pub fn wifi_latest(&mut self) -> Result<Option<Change>, StoreError> {
        let r = self
            .conn_mut()
            .query_row(
                &format!("SELECT {COLUMNS} FROM wifi_changes ORDER BY rowid DESC LIMIT 1"),
                [],
                row,
            )
            .optional();
        r.map_err(|e| self.err(e))
    }

    pub fn wifi_get(&mut self, id: &str) -> Result<Option<Change>, StoreError> {
        let r = self
            .conn_mut()
            .query_row(
                &format!("SELECT {COLUMNS} FROM wifi_changes WHERE id = ?1"),
                params![id],
                row,
            )
            .optional();
        r.map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_survive_a_reopen_and_settle_drops_the_snapshot() {
        let dir = std::env::temp_dir().join(format!("np-wifi-persist-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let c = Change {
            id: "abc".into(),
            action: "ssid".into(),
            detail: "ssid \"x\" on default_radio0".into(),
            reload: Some("radio0".into()),
            created_unix: 100,
            deadline_unix: 190,
            state: State::Pending,
            settled_unix: None,
            outcome: None,
            reported: false,
            snapshot: "package wireless\n".into(),
        };
        {
            let mut s = Store::open(&dir).unwrap();
            assert!(s.schema_version().unwrap() >= 3, "the Wi-Fi migration ran");
            s.wifi_insert(&c).unwrap();
        }
        let mut s = Store::open(&dir).unwrap();
        assert_eq!(s.wifi_open().unwrap(), std::slice::from_ref(&c));
        s.wifi_settle("abc", State::RolledBack, 200, Some("not confirmed"), false)
            .unwrap();
        let got = s.wifi_latest().unwrap().unwrap();
        assert_eq!(got.state, State::RolledBack);
        assert_eq!(got.snapshot, "");
        assert_eq!(s.wifi_open().unwrap().len(), 1, "unreported");
        s.wifi_reported("abc").unwrap();
        assert!(s.wifi_open().unwrap().is_empty());
        assert!(!format!("{c:?}").contains("package"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
