//! The registry of live agent links: one h2 client handle per connected router,
//! entered by the task that runs the link (`agent_link`) and looked up by every
//! forwarded call. Registration is guarded by a generation number so the cleanup of
//! a replaced link never removes the link that replaced it. The link task takes a
//! link out the moment it fails, including when it goes silent (`link_health`), so
//! the registry is also the answer to "is this router online".
//!
//! Newest wins; but two agents with one identity (a copied state directory) replace
//! each other over and over. The registry remembers, per router, when its live link
//! was replaced, so that pattern shows: counted, warned about, and in the admin view.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::link_health::LinkHealth;
use crate::sync::Locked;
use bytes::Bytes;
use std::sync::Arc;
use tokio::sync::oneshot;
use uuid::Uuid;

/// What a call needs of a link: its h2 handle, and its health to ask first.
#[derive(Clone)]
pub struct LinkSender {
    pub send: h2::client::SendRequest<Bytes>,
    pub health: Arc<LinkHealth>,
}

struct Entry {
    generation: u64,
    sender: LinkSender,
    agent_version: String,
    connected_at: SystemTime,
    /// Dropping or sending closes the link task's connection.
    close: Option<oneshot::Sender<()>>,
}

#[derive(Default)]
pub struct Links {
    map: Mutex<HashMap<Uuid, Entry>>,
    next_generation: AtomicU64,
    /// Routers whose live link was replaced recently; only those have an entry.
    replaced: Mutex<HashMap<Uuid, Replacements>>,
    /// Woken whenever a link leaves (a drain waits for them).
    shrunk: tokio::sync::Notify,
}

/// Replacements within this window count towards a suspected duplicate identity.
pub const REPLACEMENT_WINDOW: Duration = Duration::from_secs(60);
/// This many replacements within the window: two agents probably share an identity
/// (one agent that lost its connection replaces a dead link now and then, not
/// three times a minute).
pub const SUSPECT_AFTER: usize = 3;

#[derive(Default)]
struct Replacements {
    /// When the router's live link was replaced, oldest first, within the window.
    at: VecDeque<Instant>,
    last_warned: Option<Instant>,
}

impl Replacements {
    fn prune(&mut self, now: Instant) {
        while self
            .at
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= REPLACEMENT_WINDOW)
        {
            self.at.pop_front();
        }
    }
}

/// What registering a link that replaced a live one tells the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replaced {
    /// Replacements of this router's link within the window, this one included.
    pub recent: usize,
    /// Suspected duplicate identity, and no warning about it within the window:
    /// warn now (so the log gets one line a minute, not one per flap).
    pub warn: bool,
}

/// The admin view of a router's replacements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplacementInfo {
    pub recent: usize,
    pub duplicate_identity_suspected: bool,
}

/// What the admin list shows about a live link.
#[derive(Debug, Clone)]
pub struct LinkInfo {
    pub agent_version: String,
    pub connected_at: SystemTime,
}

impl Links {
    /// Registers a new link; an older link of the same router is closed (newest wins).
    /// Returns the generation to pass to [`Links::remove`], the close signal, and
    /// whether a live link was replaced.
    pub fn register(
        &self,
        router: Uuid,
        sender: LinkSender,
        agent_version: String,
        now: Instant,
    ) -> (u64, oneshot::Receiver<()>, Option<Replaced>) {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        let old = self.map.locked().insert(
            router,
            Entry {
                generation,
                sender,
                agent_version,
                connected_at: SystemTime::now(),
                close: Some(tx),
            },
        );
        let mut replaced = None;
        if let Some(mut old) = old {
            // A link already dead (its agent reconnected first) is not two agents.
            if !old.sender.health.is_gone() {
                replaced = Some(self.note_replacement(router, now));
            }
            if let Some(close) = old.close.take() {
                let _ = close.send(());
            }
        }
        (generation, rx, replaced)
    }

    fn note_replacement(&self, router: Uuid, now: Instant) -> Replaced {
        let mut replaced = self.replaced.locked();
        // Forget routers that have been quiet for a window, so the map stays small.
        replaced.retain(|_, r| {
            r.prune(now);
            !r.at.is_empty()
        });
        let r = replaced.entry(router).or_default();
        r.at.push_back(now);
        let recent = r.at.len();
        let warn = recent >= SUSPECT_AFTER
            && r.last_warned
                .is_none_or(|t| now.saturating_duration_since(t) >= REPLACEMENT_WINDOW);
        if warn {
            r.last_warned = Some(now);
        }
        Replaced { recent, warn }
    }

    /// How often the router's live link was replaced within the window before `now`.
    pub fn replacements(&self, router: Uuid, now: Instant) -> ReplacementInfo {
        let mut replaced = self.replaced.locked();
        let recent = replaced.get_mut(&router).map_or(0, |r| {
            r.prune(now);
            r.at.len()
        });
        ReplacementInfo {
            recent,
            duplicate_identity_suspected: recent >= SUSPECT_AFTER,
        }
    }

    /// Removes the link if it is still the given generation.
    pub fn remove(&self, router: Uuid, generation: u64) -> bool {
        let mut map = self.map.locked();
        if map.get(&router).is_some_and(|e| e.generation == generation) {
            map.remove(&router);
            self.shrunk.notify_waiters();
            true
        } else {
            false
        }
    }

    /// Closes and removes a router's link at once (revocation, shutdown).
    pub fn close(&self, router: Uuid) -> bool {
        let entry = self.map.locked().remove(&router);
        self.shrunk.notify_waiters();
        match entry {
            Some(mut e) => {
                if let Some(close) = e.close.take() {
                    let _ = close.send(());
                }
                true
            }
            None => false,
        }
    }

    /// Takes a router's link out of the registry without closing it (cluster mode:
    /// the router linked to another node, so calls go there from now on while the
    /// ones in flight here finish). Returns the generation and the close signal, to
    /// fire once they had their time.
    pub fn supersede(&self, router: Uuid) -> Option<(u64, oneshot::Sender<()>)> {
        let mut e = self.map.locked().remove(&router)?;
        self.shrunk.notify_waiters();
        Some((e.generation, e.close.take()?))
    }

    /// The generation of a router's link, if it has one here.
    pub fn generation(&self, router: Uuid) -> Option<u64> {
        self.map.locked().get(&router).map(|e| e.generation)
    }

    pub fn close_all(&self) {
        let drained: Vec<Entry> = self.map.locked().drain().map(|(_, e)| e).collect();
        self.shrunk.notify_waiters();
        for mut e in drained {
            if let Some(close) = e.close.take() {
                let _ = close.send(());
            }
        }
    }

    /// A handle to send calls on, if the router is connected and its link usable.
    pub fn sender(&self, router: Uuid) -> Option<LinkSender> {
        let map = self.map.locked();
        map.get(&router)
            .filter(|e| !e.sender.health.is_gone())
            .map(|e| e.sender.clone())
    }

    pub fn info(&self, router: Uuid) -> Option<LinkInfo> {
        let map = self.map.locked();
        map.get(&router)
            .filter(|e| !e.sender.health.is_gone())
            .map(|e| LinkInfo {
                agent_version: e.agent_version.clone(),
                connected_at: e.connected_at,
            })
    }

    /// Routers with a usable link now.
    pub fn live_ids(&self) -> Vec<Uuid> {
        let map = self.map.locked();
        map.iter()
            .filter(|(_, e)| !e.sender.health.is_gone())
            .map(|(id, _)| *id)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.map.locked().len()
    }

    /// Every usable link's handle, to tell them all something (a drain).
    pub fn live_senders(&self) -> Vec<LinkSender> {
        let map = self.map.locked();
        map.values()
            .filter(|e| !e.sender.health.is_gone())
            .map(|e| e.sender.clone())
            .collect()
    }

    /// Resolves after a link leaves, if awaited (or `enable`d) before it left.
    pub fn shrunk(&self) -> tokio::sync::futures::Notified<'_> {
        self.shrunk.notified()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_replacements_are_suspected_and_warned_once_a_window() {
        let links = Links::default();
        let r = Uuid::new_v4();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(
            links.note_replacement(r, at(0)),
            Replaced {
                recent: 1,
                warn: false
            }
        );
        links.note_replacement(r, at(10));
        assert!(!links.replacements(r, at(11)).duplicate_identity_suspected);
        assert_eq!(
            links.note_replacement(r, at(20)),
            Replaced {
                recent: 3,
                warn: true
            }
        );
        assert_eq!(
            links.replacements(r, at(21)),
            ReplacementInfo {
                recent: 3,
                duplicate_identity_suspected: true
            }
        );
        // Still flapping: counted, not warned again within the window.
        assert!(!links.note_replacement(r, at(30)).warn);
        assert!(!links.note_replacement(r, at(70)).warn);
        assert_eq!(
            links.note_replacement(r, at(82)),
            Replaced {
                recent: 3,
                warn: true
            }
        );
        // Quiet for a window: forgotten.
        assert_eq!(links.replacements(r, at(200)), ReplacementInfo::default());
        assert_eq!(
            links.replacements(Uuid::new_v4(), at(0)),
            ReplacementInfo::default()
        );
    }
}
