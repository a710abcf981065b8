//! The latest agent reports of every router, kept in memory for the admin router
//! view (`POST /agent/v1/report` fills it). A relay restart forgets them, like
//! sessions; memory is bounded at [`KEEP_PER_ROUTER`] per enrolled router.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::sync::Locked;
use netpilot_proto::link::AgentEvent;
use serde::Serialize;
use uuid::Uuid;

/// Reports kept per router, newest first in the admin view.
pub const KEEP_PER_ROUTER: usize = 16;

/// A report as the relay keeps and shows it: the agent's event and when the relay
/// received it (the agent's clock may be unset, so both are kept).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct StoredReport {
    #[serde(flatten)]
    pub event: AgentEvent,
    pub received_at: String,
}

/// The latest reports of every router.
#[derive(Default)]
pub struct Reports {
    by_router: Mutex<HashMap<Uuid, VecDeque<StoredReport>>>,
}

impl Reports {
    pub fn push(&self, router: Uuid, report: StoredReport) {
        let mut map = self.by_router.locked();
        let list = map.entry(router).or_default();
        if list.len() == KEEP_PER_ROUTER {
            list.pop_back();
        }
        list.push_front(report);
    }

    /// Newest first.
    pub fn recent(&self, router: Uuid) -> Vec<StoredReport> {
        self.by_router
            .locked()
            .get(&router)
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_per_router() {
        let reports = Reports::default();
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        for i in 0..KEEP_PER_ROUTER + 4 {
            let event = AgentEvent {
                kind: "wifi_change".into(),
                id: "c1".into(),
                state: "confirmed".into(),
                detail: None,
                at: i as u64,
            };
            reports.push(
                a,
                StoredReport {
                    event,
                    received_at: String::new(),
                },
            );
        }
        let recent = reports.recent(a);
        assert_eq!(recent.len(), KEEP_PER_ROUTER);
        assert_eq!(recent[0].event.at, (KEEP_PER_ROUTER + 3) as u64);
        assert!(reports.recent(b).is_empty());
    }
}
