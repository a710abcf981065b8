//! When each device was last seen, kept across restarts. Discovery (a device
//! online in a scan) and usage (its counters grew) both mark devices here; every
//! answer that shows `last_seen` reads it. Flash wears, so marks land in SQLite in
//! batches: one transaction when the oldest unwritten mark is `WRITE_EVERY` old
//! (and at shutdown), so a device's time is written at most that often. Devices not
//! seen for `RETENTION` are forgotten, and at most `MAX_DEVICES` are kept (a LAN of
//! random MACs must not grow the agent without bound): the oldest go first.

use std::collections::HashMap;
use std::sync::Mutex;

use rusqlite::params;

use crate::policy::model::Mac;
use crate::store::{Store, StoreError};

/// A crash loses at most this much of a device's time (seconds).
pub const WRITE_EVERY: u64 = 300;
pub const RETENTION: u64 = 90 * 86_400;
pub const MAX_DEVICES: usize = 2048;

#[derive(Default)]
struct Times {
    /// MAC → last seen (Unix seconds), and whether that is not written yet.
    at: HashMap<Mac, (u64, bool)>,
    /// When the oldest unwritten mark was made.
    dirty_since: Option<u64>,
}

pub struct Seen {
    times: Mutex<Times>,
    store: Mutex<Store>,
}

impl Seen {
    /// Reads what was kept, forgetting what is past retention at `now`.
    pub fn open(mut store: Store, now: u64) -> Result<Seen, StoreError> {
        let mut at = HashMap::new();
        let conn = store.conn_mut();
        let r = (|| {
            conn.execute(
                "DELETE FROM device_seen WHERE last_seen < ?1",
                params![now.saturating_sub(RETENTION) as i64],
            )?;
            let mut stmt = conn.prepare("SELECT mac, last_seen FROM device_seen")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (mac, t) = row?;
                if let Ok(m) = Mac::parse(&mac) {
                    at.insert(m, (t.max(0) as u64, false));
                }
            }
            Ok(())
        })();
        r.map_err(|e| store.err(e))?;
        Ok(Seen {
            times: Mutex::new(Times {
                at,
                ..Times::default()
            }),
            store: Mutex::new(store),
        })
    }

    /// The device's last-seen time, if it was ever seen (within retention).
    pub fn get(&self, mac: &Mac) -> Option<u64> {
        self.times.lock().expect("seen").at.get(mac).map(|e| e.0)
    }

    /// Marks `macs` seen at `now`, and writes the marks when the oldest unwritten
    /// one is `WRITE_EVERY` old. A failed write is logged; the marks stay in
    /// memory and go with the next one.
    pub fn mark(&self, macs: &[Mac], now: u64) {
        let mut t = self.times.lock().expect("seen");
        for mac in macs {
            t.at.insert(*mac, (now, true));
            t.dirty_since.get_or_insert(now);
        }
        if t.dirty_since
            .is_some_and(|since| now.saturating_sub(since) >= WRITE_EVERY)
        {
            self.write(&mut t, now);
        }
    }

    /// Writes every unwritten mark now (shutdown).
    pub fn flush(&self, now: u64) {
        let mut t = self.times.lock().expect("seen");
        if t.dirty_since.is_some() {
            self.write(&mut t, now);
        }
    }

    fn write(&self, t: &mut Times, now: u64) {
        // Past the cap, the devices seen longest ago are forgotten (one at a time:
        // the excess is what came since the last write, and a sort would cost the
        // router's flash more than this loop costs its CPU).
        let horizon = now.saturating_sub(RETENTION);
        t.at.retain(|_, e| e.0 >= horizon);
        while t.at.len() > MAX_DEVICES {
            let oldest = t.at.iter().min_by_key(|(_, e)| e.0).map(|(m, _)| *m);
            if let Some(m) = oldest {
                t.at.remove(&m);
            }
        }
        let mut store = self.store.lock().expect("seen store");
        let conn = store.conn_mut();
        let r = (|| {
            let tx = conn.transaction()?;
            {
                let mut up = tx.prepare(
                    "INSERT INTO device_seen (mac, last_seen) VALUES (?1, ?2)
                     ON CONFLICT(mac) DO UPDATE SET last_seen = excluded.last_seen",
                )?;
                for (mac, (s, _)) in t.at.iter().filter(|(_, e)| e.1) {
                    up.execute(params![mac.to_string(), *s as i64])?;
                }
            }
            tx.execute(
                "DELETE FROM device_seen WHERE last_seen < ?1 OR mac NOT IN
                 (SELECT mac FROM device_seen ORDER BY last_seen DESC LIMIT ?2)",
                params![horizon as i64, MAX_DEVICES as i64],
            )?;
            tx.commit()
        })();
        match r {
            Ok(()) => {
                t.at.values_mut().for_each(|e| e.1 = false);
                t.dirty_since = None;
            }
            Err(e) => tracing::warn!(error = %store.err(e), "device last-seen times not written"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Location;

    fn mac(n: u16) -> Mac {
        Mac([0x3c, 0xa9, 0xf4, 0, (n >> 8) as u8, n as u8])
    }

    fn stored(dir: &std::path::Path) -> HashMap<Mac, u64> {
        let mut s = Store::open(dir).unwrap();
        let mut stmt = s
            .conn_mut()
            .prepare("SELECT mac, last_seen FROM device_seen")
            .unwrap();
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .unwrap();
        rows.map(|r| {
            let (m, t) = r.unwrap();
            (Mac::parse(&m).unwrap(), t as u64)
        })
        .collect()
    }

    #[test]
    fn marks_are_written_in_batches_at_most_every_write_every_and_survive_a_restart() {
        let dir = crate::store::tests::temp_dir();
        let seen = Seen::open(Store::open(&dir).unwrap(), 1000).unwrap();
        seen.mark(&[mac(1)], 1000);
        seen.mark(&[mac(1), mac(2)], 1000 + WRITE_EVERY - 1);
        assert_eq!(seen.get(&mac(1)), Some(1000 + WRITE_EVERY - 1));
        assert!(
            stored(&dir).is_empty(),
            "nothing written before WRITE_EVERY"
        );
        seen.mark(&[mac(3)], 1000 + WRITE_EVERY);
        let on_disk = stored(&dir);
        assert_eq!(on_disk.len(), 3, "one transaction holds every mark so far");
        assert_eq!(on_disk[&mac(1)], 1000 + WRITE_EVERY - 1);
        // A new batch starts with the next mark; shutdown writes it early.
        seen.mark(&[mac(1)], 2000);
        assert_eq!(stored(&dir)[&mac(1)], 1000 + WRITE_EVERY - 1);
        seen.flush(2001);
        drop(seen);
        let again = Seen::open(Store::open(&dir).unwrap(), 3000).unwrap();
        assert_eq!(again.get(&mac(1)), Some(2000));
        assert_eq!(again.get(&mac(3)), Some(1000 + WRITE_EVERY));
        assert_eq!(again.get(&mac(9)), None);
    }

    #[test]
    fn retention_and_the_cap_forget_the_oldest() {
        let dir = crate::store::tests::temp_dir();
        let seen = Seen::open(Store::open(&dir).unwrap(), 10).unwrap();
        seen.mark(&[mac(0)], 10);
        seen.flush(10);
        // Past retention at the next start: forgotten on disk and in memory.
        let seen = Seen::open(Store::open(&dir).unwrap(), 11 + RETENTION).unwrap();
        assert_eq!(seen.get(&mac(0)), None);
        let t0 = 20 + RETENTION;
        for n in 0..MAX_DEVICES as u16 + 5 {
            seen.mark(&[mac(n)], t0 + n as u64);
        }
        seen.flush(t0 + 10_000);
        let on_disk = stored(&dir);
        assert_eq!(on_disk.len(), MAX_DEVICES);
        assert!(!on_disk.contains_key(&mac(4)) && on_disk.contains_key(&mac(5)));
        assert_eq!(seen.get(&mac(0)), None, "the oldest left memory too");
    }

    #[test]
    fn an_in_memory_store_keeps_times_for_the_run() {
        let seen = Seen::open(Store::open_at(&Location::Memory).unwrap(), 5).unwrap();
        seen.mark(&[mac(7)], 5);
        assert_eq!(seen.get(&mac(7)), Some(5));
    }
}
