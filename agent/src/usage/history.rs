//! The agent's own daily per-device totals, kept because nlbwmon's database lives on
//! tmpfs and is lost at reboot. [`Ledger`] is the pure accounting: it turns
//! nlbwmon's cumulative per-period counters into per-day increments, treating any
//! drop (reboot, nlbwmon reset, new period) as a counter reset whose already
//! counted part is kept. The tables (migration 4) hold the flushed days and the
//! counters already counted, so an agent restart does not count them twice.

use std::collections::{BTreeMap, HashMap};

use rusqlite::{params, OptionalExtension};

use crate::policy::model::Mac;
use crate::store::{Store, StoreError};

/// Bytes in one direction pair: (downloaded, uploaded).
pub type Pair = (u64, u64);

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ledger {
    /// nlbwmon's counters at the last observation: already counted.
    pub baseline: HashMap<Mac, Pair>,
    /// nlbwmon's current period (`-c list`'s newest), when known.
    pub period: Option<String>,
    /// Increments not yet written, by (local date, MAC).
    pub pending: BTreeMap<(String, Mac), Pair>,
}

impl Ledger {
    /// Folds one reading of nlbwmon's counters in, attributing growth to `day`;
    /// returns the devices whose counters grew.
    pub fn observe(
        &mut self,
        day: &str,
        period: Option<&str>,
        counters: impl Iterator<Item = (Mac, Pair)>,
    ) -> Vec<Mac> {
        let mut grew = Vec::new();
        if let Some(p) = period {
            if self.period.as_deref().is_some_and(|old| old != p) {
                // A new period starts nlbwmon's counters from zero.
                self.baseline.clear();
            }
            self.period = Some(p.to_owned());
        }
        let mut next = HashMap::with_capacity(self.baseline.len());
        for (mac, (rx, tx)) in counters {
            let (brx, btx) = self.baseline.get(&mac).copied().unwrap_or((0, 0));
            // A drop in either direction is a reset: everything now showing is new.
            let (drx, dtx) = if rx < brx || tx < btx {
                (rx, tx)
            } else {
                (rx - brx, tx - btx)
            };
            if drx > 0 || dtx > 0 {
                let e = self.pending.entry((day.to_owned(), mac)).or_default();
                e.0 = e.0.saturating_add(drx);
                e.1 = e.1.saturating_add(dtx);
                grew.push(mac);
            }
            next.insert(mac, (rx, tx));
        }
        // A device missing from the reading was reset with nlbwmon's database.
        self.baseline = next;
        grew
    }
}

/// SQLite stores signed 64-bit integers; counters beyond that are clamped.
fn to_sql(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn mac_of(s: &str) -> Option<Mac> {
    Mac::parse(s).ok()
}

/// The counted counters and period as last flushed.
pub fn load(store: &mut Store) -> Result<Ledger, StoreError> {
    let mut ledger = Ledger::default();
    let conn = store.conn_mut();
    let r = (|| {
        let mut stmt = conn.prepare("SELECT mac, rx_bytes, tx_bytes FROM usage_baseline")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        for row in rows {
            let (mac, rx, tx) = row?;
            if let Some(m) = mac_of(&mac) {
                ledger
                    .baseline
                    .insert(m, (rx.max(0) as u64, tx.max(0) as u64));
            }
        }
        ledger.period = conn
            .query_row(
                "SELECT value FROM agent_meta WHERE key = 'usage_period'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        Ok(())
    })();
    r.map_err(|e| store.err(e))?;
    Ok(ledger)
}

/// Writes the pending increments and the counted counters in one transaction and
/// drops days before `keep_from` (a local date). Clears `pending` on success.
pub fn flush(store: &mut Store, ledger: &mut Ledger, keep_from: &str) -> Result<(), StoreError> {
    let conn = store.conn_mut();
    let r = (|| {
        let tx = conn.transaction()?;
        {
            let mut up = tx.prepare(
                "INSERT INTO usage_daily (day, mac, rx_bytes, tx_bytes) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(day, mac) DO UPDATE SET
                   rx_bytes = min(rx_bytes + excluded.rx_bytes, 9223372036854775807),
                   tx_bytes = min(tx_bytes + excluded.tx_bytes, 9223372036854775807)",
            )?;
            for ((day, mac), (rx, txb)) in &ledger.pending {
                up.execute(params![day, mac.to_string(), to_sql(*rx), to_sql(*txb)])?;
            }
            tx.execute("DELETE FROM usage_baseline", [])?;
            let mut base = tx.prepare(
                "INSERT INTO usage_baseline (mac, rx_bytes, tx_bytes) VALUES (?1, ?2, ?3)",
            )?;
            for (mac, (rx, txb)) in &ledger.baseline {
                base.execute(params![mac.to_string(), to_sql(*rx), to_sql(*txb)])?;
            }
            match &ledger.period {
                Some(p) => tx.execute(
                    "INSERT INTO agent_meta (key, value) VALUES ('usage_period', ?1)
                     ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    params![p],
                )?,
                None => tx.execute("DELETE FROM agent_meta WHERE key = 'usage_period'", [])?,
            };
            tx.execute("DELETE FROM usage_daily WHERE day < ?1", params![keep_from])?;
        }
        tx.commit()
    })();
    r.map_err(|e| store.err(e))?;
    ledger.pending.clear();
    Ok(())
}

/// Stored days from `from` (a local date) on, with the pending increments added.
pub fn days(
    store: &mut Store,
    pending: &BTreeMap<(String, Mac), Pair>,
    from: &str,
) -> Result<BTreeMap<(String, Mac), Pair>, StoreError> {
    let mut out: BTreeMap<(String, Mac), Pair> = BTreeMap::new();
    let conn = store.conn_mut();
    let r = (|| {
        let mut stmt =
            conn.prepare("SELECT day, mac, rx_bytes, tx_bytes FROM usage_daily WHERE day >= ?1")?;
        let rows = stmt.query_map(params![from], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        for row in rows {
            let (day, mac, rx, tx) = row?;
            if let Some(m) = mac_of(&mac) {
                out.insert((day, m), (rx.max(0) as u64, tx.max(0) as u64));
            }
        }
        Ok(())
    })();
    r.map_err(|e| store.err(e))?;
    for ((day, mac), (rx, tx)) in pending.range((from.to_owned(), Mac([0; 6]))..) {
        let e = out.entry((day.clone(), *mac)).or_default();
        e.0 = e.0.saturating_add(*rx);
        e.1 = e.1.saturating_add(*tx);
    }
    Ok(out)
}

/// Forgets every stored day and counted counter (the reset endpoint).
pub fn clear(store: &mut Store) -> Result<(), StoreError> {
    let conn = store.conn_mut();
    let r = conn.execute_batch(
        "DELETE FROM usage_daily; DELETE FROM usage_baseline;
         DELETE FROM agent_meta WHERE key = 'usage_period';",
    );
    r.map_err(|e| store.err(e))
}

/// Local date `YYYY-MM-DD` of a Unix time at a UTC offset (seconds east).
pub fn date_of(unix: i64, offset: i32) -> String {
    crate::runtime::clock::ymd((unix + offset as i64).div_euclid(86_400))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> Mac {
        Mac([2, 0, 0, 0, 1, n])
    }

    #[test]
    fn growth_is_counted_once_and_drops_are_resets() {
        let mut l = Ledger::default();
        l.observe(
            "2026-11-20",
            Some("2026-11-01"),
            [(mac(1), (100, 10))].into_iter(),
        );
        l.observe(
            "2026-11-20",
            Some("2026-11-01"),
            [(mac(1), (150, 10))].into_iter(),
        );
        assert_eq!(l.pending[&("2026-11-20".into(), mac(1))], (150, 10));
        // The counters drop (nlbwmon lost its database): the 30/5 now showing are new.
        l.observe(
            "2026-11-21",
            Some("2026-11-01"),
            [(mac(1), (30, 5))].into_iter(),
        );
        assert_eq!(l.pending[&("2026-11-21".into(), mac(1))], (30, 5));
        assert_eq!(l.pending[&("2026-11-20".into(), mac(1))], (150, 10));
        // A new period restarts from zero even when the new counter is higher.
        l.observe(
            "2026-12-01",
            Some("2026-12-01"),
            [(mac(1), (40, 6))].into_iter(),
        );
        assert_eq!(l.pending[&("2026-12-01".into(), mac(1))], (40, 6));
        // A device that vanished and came back is counted from zero.
        l.observe("2026-12-01", Some("2026-12-01"), std::iter::empty());
        let grew = l.observe(
            "2026-12-01",
            Some("2026-12-01"),
            [(mac(1), (7, 1)), (mac(2), (0, 0))].into_iter(),
        );
        assert_eq!(l.pending[&("2026-12-01".into(), mac(1))], (47, 7));
        assert_eq!(grew, [mac(1)], "only counters that grew");
    }

    #[test]
    fn dates_are_civil_and_local() {
        assert_eq!(date_of(1_795_996_800, 0), "2026-11-30");
        // 23:30 UTC on the 29th is already the 30th one hour east.
        assert_eq!(date_of(1_795_995_000, 0), "2026-11-29");
        assert_eq!(date_of(1_795_995_000, 3600), "2026-11-30");
        assert_eq!(date_of(-1, 0), "1969-12-31");
    }
}
