//! The policy engine's desired state in the agent's SQLite store: loading it at
//! start-up and writing a change as the difference between two states in one
//! transaction, with the applied generation and a bounded audit log.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use rusqlite::{params, Connection, OptionalExtension};

use super::model::{Desired, Device, Group, GroupId, ListKind, Mac, PolicyIn, Target};
use crate::store::{Store, StoreError};

/// Audit rows kept; older ones are dropped as new ones arrive.
pub const AUDIT_KEEP: i64 = 1_000;

/// Who asked for a change, as the relay forwarded it.
#[derive(Debug, Clone, Default)]
pub struct Actor {
    pub session_id: Option<String>,
    pub user_id: Option<String>,
    pub request_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub generation: u64,
    pub digest: String,
    pub applied_unix: i64,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AuditEntry {
    pub at_unix: i64,
    pub session_id: Option<String>,
    pub user_id: Option<String>,
    pub request_id: Option<String>,
    pub action: String,
    pub detail: String,
    pub result: String,
}

fn target_from_db(s: &str) -> Option<Target> {
    if let Ok(ip) = std::net::IpAddr::from_str(s) {
        return Some(Target::Ip(ip));
    }
    Mac::parse(s).ok().map(Target::Mac)
}

impl Store {
    pub fn load_policy(&mut self) -> Result<(Desired, Option<Applied>), StoreError> {
        let conn = self.conn_mut();
        let r = load(conn);
        r.map_err(|e| self.err(e))
    }

    /// Writes `next` over `prev` (what the database holds now) in one transaction.
    pub fn save_policy(
        &mut self,
        prev: &Desired,
        next: &Desired,
        applied: &Applied,
    ) -> Result<(), StoreError> {
        let r = save(self.conn_mut(), prev, next, applied);
        r.map_err(|e| self.err(e))
    }

    pub fn audit(
        &mut self,
        actor: &Actor,
        at_unix: i64,
        action: &str,
        detail: &str,
        result: &str,
    ) -> Result<(), StoreError> {
        let r = self.conn_mut().execute(
            "INSERT INTO audit_log (at_unix, session_id, user_id, request_id, action, detail, result) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![at_unix, actor.session_id, actor.user_id, actor.request_id, action, detail, result],
        ).and_then(|_| self.conn_mut().execute(
            "DELETE FROM audit_log WHERE id <= (SELECT MAX(id) FROM audit_log) - ?1",
            params![AUDIT_KEEP],
        ));
        r.map(|_| ()).map_err(|e| self.err(e))
    }

    /// The newest entries first.
    pub fn audit_tail(&mut self, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
        let r = (|| {
            let conn = self.conn_mut();
            let mut st = conn.prepare(
                "SELECT at_unix, session_id, user_id, request_id, action, detail, result FROM audit_log ORDER BY id DESC LIMIT ?1",
            )?;
            let rows = st.query_map(params![limit], |r| {
                Ok(AuditEntry {
                    at_unix: r.get(0)?,
                    session_id: r.get(1)?,
                    user_id: r.get(2)?,
                    request_id: r.get(3)?,
                    action: r.get(4)?,
                    detail: r.get(5)?,
                    result: r.get(6)?,
                })
            })?;
            rows.collect::<Result<Vec<_>, _>>()
        })();
        r.map_err(|e| self.err(e))
    }
}

fn load(conn: &mut Connection) -> rusqlite::Result<(Desired, Option<Applied>)> {
    let mut desired = Desired::default();
    {
        let mut st =
            conn.prepare("SELECT id, name, slot, policy FROM policy_groups ORDER BY id")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let id: GroupId = r.get(0)?;
            let policy_json: String = r.get(3)?;
            // Written by this module from a validated policy; a row that no longer
            // validates (hand edit) falls back to the default rather than stopping
            // the agent, and is logged.
            let policy = serde_json::from_str::<PolicyIn>(&policy_json)
                .map_err(|e| e.to_string())
                .and_then(|p| p.validate().map_err(|e| e.message))
                .unwrap_or_else(|e| {
                    tracing::error!(group = id, error = %e, "stored policy is invalid; using the default");
                    Default::default()
                });
            desired.slots.insert(id, r.get::<_, u8>(2)?);
            desired.groups.insert(
                id,
                Group {
                    id,
                    name: r.get(1)?,
                    devices: Vec::new(),
                    policy,
                },
            );
        }
    }
    {
        let mut st = conn
            .prepare("SELECT mac, group_id, ipv4, ipv6, name FROM policy_devices ORDER BY mac")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let mac: String = r.get(0)?;
            let group: GroupId = r.get(1)?;
            let Ok(mac) = Mac::parse(&mac) else { continue };
            let ip = |i: usize| -> rusqlite::Result<Option<String>> { r.get(i) };
            let device = Device {
                mac,
                ipv4: ip(2)?.and_then(|s| s.parse().ok()),
                ipv6: ip(3)?.and_then(|s| s.parse().ok()),
                name: r.get(4)?,
            };
            if let Some(g) = desired.groups.get_mut(&group) {
                g.devices.push(device);
            }
        }
    }
    {
        let mut st = conn.prepare("SELECT kind, target FROM policy_lists ORDER BY kind, target")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let kind: String = r.get(0)?;
            let target: String = r.get(1)?;
            if let (Some(kind), Some(t)) = (ListKind::parse(&kind), target_from_db(&target)) {
                super::ops::insert_sorted(desired.lists.entry(kind).or_default(), t);
            }
        }
    }
    {
        let mut st =
            conn.prepare("SELECT name, description, domains, updated_unix FROM dns_categories")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let name: String = r.get(0)?;
            let text: String = r.get(2)?;
            // Written normalised by this module; a hand-edited bad line is dropped.
            let parsed = crate::dns::list::parse_text(&text);
            if parsed.error_count > 0 {
                tracing::error!(category = %name, errors = parsed.error_count, "stored DNS category has invalid lines; they are skipped");
            }
            let c = super::categories::category(
                &name,
                &r.get::<_, String>(1)?,
                parsed.domains,
                Some(r.get(3)?),
            );
            desired.categories.insert(name, std::sync::Arc::new(c));
        }
    }
    let applied = conn
        .query_row(
            "SELECT generation, digest, applied_unix, duration_ms FROM policy_applied WHERE id = 1",
            [],
            |r| {
                Ok(Applied {
                    generation: r.get::<_, i64>(0)? as u64,
                    digest: r.get(1)?,
                    applied_unix: r.get(2)?,
                    duration_ms: r.get::<_, i64>(3)? as u64,
                })
            },
        )
        .optional()?;
    Ok((desired, applied))
}

/// Devices of the groups in `ids`.
/// Rows per device upsert: 5 parameters each, well under SQLite's 32,766.
const DEVICE_ROWS_PER_INSERT: usize = 200;

/// `INSERT … VALUES (?,?,?,?,?), … ON CONFLICT … DO UPDATE` for `rows` devices.
fn device_upsert_sql(rows: usize) -> String {
    let mut sql =
        String::from("INSERT INTO policy_devices (mac, group_id, ipv4, ipv6, name) VALUES ");
    for i in 0..rows {
        sql.push_str(if i == 0 {
            "(?,?,?,?,?)"
        } else {
            ",(?,?,?,?,?)"
        });
    }
    sql.push_str(
        " ON CONFLICT(mac) DO UPDATE SET group_id = excluded.group_id, ipv4 = excluded.ipv4, \
         ipv6 = excluded.ipv6, name = excluded.name",
    );
    sql
}

fn devices<'a>(d: &'a Desired, ids: &[GroupId]) -> BTreeMap<Mac, (GroupId, &'a Device)> {
    let mut out = BTreeMap::new();
    for (id, g) in ids
        .iter()
        .filter_map(|id| d.groups.get(id).map(|g| (*id, g)))
    {
        for dev in &g.devices {
            out.insert(dev.mac, (id, dev));
        }
    }
    out
}

fn save(
    conn: &mut Connection,
    prev: &Desired,
    next: &Desired,
    applied: &Applied,
) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        // A device that changed group changed both groups, so only the devices of
        // changed groups need comparing.
        let changed_groups: Vec<GroupId> = prev
            .groups
            .keys()
            .chain(
                next.groups
                    .keys()
                    .filter(|id| !prev.groups.contains_key(id)),
            )
            .copied()
            .filter(|id| prev.groups.get(id) != next.groups.get(id))
            .collect();
        let old = devices(prev, &changed_groups);
        let new = devices(next, &changed_groups);
        let mut del = tx.prepare_cached("DELETE FROM policy_devices WHERE mac = ?1")?;
        for mac in old.keys().filter(|m| !new.contains_key(m)) {
            del.execute(params![mac.to_string()])?;
        }
        // Removed groups first: a new group may take a freed slot (slots are unique).
        let mut gone = tx.prepare_cached("DELETE FROM policy_groups WHERE id = ?1")?;
        for id in prev
            .groups
            .keys()
            .filter(|id| !next.groups.contains_key(id))
        {
            gone.execute(params![id])?;
        }
        // Groups before the devices that reference them.
        let mut up = tx.prepare_cached(
            "INSERT INTO policy_groups (id, name, slot, policy) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(id) DO UPDATE SET name = excluded.name, slot = excluded.slot, policy = excluded.policy",
        )?;
        for (id, g) in &next.groups {
            let changed = prev
                .groups
                .get(id)
                .is_none_or(|p| p.name != g.name || p.policy != g.policy)
                || prev.slots.get(id) != next.slots.get(id);
            if changed {
                let policy =
                    serde_json::to_string(&g.policy.to_out()).unwrap_or_else(|_| "{}".into());
                up.execute(params![
                    id,
                    g.name,
                    next.slots.get(id).copied().unwrap_or(0),
                    policy
                ])?;
            }
        }
        // Many rows per statement: a full sync writes thousands of devices, and
        // per-statement costs dominate row-by-row inserts. (Not `json_each`: SQLite's
        // JSON functions are compiled out to save 50 KB on the router.)
        let rows: Vec<_> = new
            .iter()
            .filter(|(mac, v)| old.get(mac) != Some(v))
            .collect();
        for chunk in rows.chunks(DEVICE_ROWS_PER_INSERT) {
            let sql = device_upsert_sql(chunk.len());
            let mut stmt = tx.prepare_cached(&sql)?;
            let mut values: Vec<rusqlite::types::Value> = Vec::with_capacity(chunk.len() * 5);
            for (mac, (gid, d)) in chunk {
                values.push(mac.to_string().into());
                values.push(i64::from(*gid).into());
                values.push(d.ipv4.map(|a| a.to_string()).into());
                values.push(d.ipv6.map(|a| a.to_string()).into());
                values.push(d.name.clone().into());
            }
            stmt.execute(rusqlite::params_from_iter(values))?;
        }
        let set = |d: &Desired| -> BTreeSet<(ListKind, Target)> {
            let mut s = BTreeSet::new();
            for (k, ts) in &d.lists {
                for t in ts {
                    s.insert((*k, *t));
                }
            }
            s
        };
        let (was, now) = (set(prev), set(next));
        let mut ldel =
            tx.prepare_cached("DELETE FROM policy_lists WHERE kind = ?1 AND target = ?2")?;
        for (k, t) in was.difference(&now) {
            ldel.execute(params![k.as_str(), t.to_string()])?;
        }
        let mut ladd =
            tx.prepare_cached("INSERT OR IGNORE INTO policy_lists (kind, target) VALUES (?1, ?2)")?;
        for (k, t) in now.difference(&was) {
            ladd.execute(params![k.as_str(), t.to_string()])?;
        }
        // A category as shipped is not stored; one replaced or added is, whole.
        let mut cdel = tx.prepare_cached("DELETE FROM dns_categories WHERE name = ?1")?;
        for name in prev
            .categories
            .keys()
            .filter(|n| !next.categories.contains_key(*n))
        {
            cdel.execute(params![name])?;
        }
        let mut cup = tx.prepare_cached(
            "INSERT INTO dns_categories (name, description, domains, updated_unix) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(name) DO UPDATE SET description = excluded.description,
                 domains = excluded.domains, updated_unix = excluded.updated_unix",
        )?;
        for (name, c) in &next.categories {
            if prev.categories.get(name) == Some(c) {
                continue;
            }
            match c.updated_unix {
                None => {
                    cdel.execute(params![name])?;
                }
                Some(at) => {
                    let mut text = String::with_capacity(c.domains.len() * 16);
                    for d in c.domains.iter() {
                        text.push_str(d.as_str());
                        text.push('\n');
                    }
                    cup.execute(params![name, c.description, text, at])?;
                }
            }
        }
        tx.execute(
            "INSERT INTO policy_applied (id, generation, digest, applied_unix, duration_ms) VALUES (1, ?1, ?2, ?3, ?4)
             ON CONFLICT(id) DO UPDATE SET generation = excluded.generation, digest = excluded.digest,
                 applied_unix = excluded.applied_unix, duration_ms = excluded.duration_ms",
            params![applied.generation as i64, applied.digest, applied.applied_unix, applied.duration_ms as i64],
        )?;
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::{Bandwidth, Group, Policy};
    use crate::policy::ops;

    fn dev(last: u8) -> Device {
        Device {
            mac: Mac([2, 0, 0, 0, 1, last]),
            ipv4: Some(std::net::Ipv4Addr::new(192, 168, 1, last)),
            ipv6: None,
            name: Some(format!("it's \"{last}\"")),
        }
    }

    #[test]
    fn a_state_survives_a_reopen_through_moves_deletes_and_lists() {
        let dir = std::env::temp_dir().join(format!("np-persist-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let applied = |g| Applied {
            generation: g,
            digest: format!("d{g}"),
            applied_unix: 100 + g as i64,
            duration_ms: 3,
        };
        let mut store = Store::open(&dir).unwrap();
        let (empty, none) = store.load_policy().unwrap();
        assert!(none.is_none());
        let mut a = empty.clone();
        ops::normalize(&mut a).unwrap();
        let mut b = a.clone();
        let kids = Group {
            id: 3,
            name: "Kids".into(),
            devices: (1..=250).map(dev).collect(),
            policy: Policy {
                bandwidth: Bandwidth {
                    down_kbps: Some(5000),
                    up_kbps: None,
                },
                ..Policy::default()
            },
        };
        ops::sync_group(&mut b, kids).unwrap();
        ops::list_add(
            &mut b,
            ListKind::White,
            Target::Mac(Mac([2, 0, 0, 0, 1, 7])),
        )
        .unwrap();
        store.save_policy(&a, &b, &applied(1)).unwrap();
        let mut c = b.clone();
        let moved = Group {
            id: 4,
            name: "Moved".into(),
            devices: vec![dev(9)],
            policy: Policy::default(),
        };
        ops::sync_group(&mut c, moved).unwrap();
        ops::delete_group(&mut c, 3).unwrap();
        ops::list_add(
            &mut c,
            ListKind::Block,
            Target::Ip("10.0.0.9".parse().unwrap()),
        )
        .unwrap();
        store.save_policy(&b, &c, &applied(2)).unwrap();
        drop(store);

        let mut store = Store::open(&dir).unwrap();
        let (mut loaded, applied_row) = store.load_policy().unwrap();
        ops::normalize(&mut loaded).unwrap();
        // Loading sorts devices by MAC; compare as sets.
        for g in c.groups.values_mut().chain(loaded.groups.values_mut()) {
            g.devices.sort_by_key(|d| d.mac);
        }
        assert_eq!(loaded, c);
        assert_eq!(applied_row.unwrap().generation, 2);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_audit_log_is_bounded_and_newest_first() {
        let dir = std::env::temp_dir().join(format!("np-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut store = Store::open(&dir).unwrap();
        let actor = Actor {
            session_id: Some("s".into()),
            user_id: Some("alice".into()),
            request_id: None,
        };
        for i in 0..(AUDIT_KEEP + 5) {
            store
                .audit(&actor, i, "block.add", &format!("n{i}"), "ok")
                .unwrap();
        }
        let tail = store.audit_tail(3).unwrap();
        assert_eq!(tail[0].detail, format!("n{}", AUDIT_KEEP + 4));
        let count: i64 = store
            .conn_mut()
            .query_row("SELECT COUNT(*) FROM audit_log", [], |r| r.get(0))
            .unwrap();
        assert_eq!(count, AUDIT_KEEP);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
