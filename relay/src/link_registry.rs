//! The registry of live agent links: one h2 client handle per connected router,
//! entered by the task that runs the link (`agent_link`) and looked up by every
//! forwarded call. Registration is guarded by a generation number so the cleanup of
//! a replaced link never removes the link that replaced it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http2::SendRequest;
use tokio::sync::oneshot;
use uuid::Uuid;

pub type LinkSender = SendRequest<Full<Bytes>>;

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
}

/// What the admin list shows about a live link.
#[derive(Debug, Clone)]
pub struct LinkInfo {
    pub agent_version: String,
    pub connected_at: SystemTime,
}

impl Links {
    /// Registers a new link; an older link of the same router is closed (newest wins).
    /// Returns the generation to pass to [`Links::remove`] and the close signal.
    pub fn register(
        &self,
        router: Uuid,
        sender: LinkSender,
        agent_version: String,
    ) -> (u64, oneshot::Receiver<()>) {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        let old = self.map.lock().expect("links lock").insert(
            router,
            Entry {
                generation,
                sender,
                agent_version,
                connected_at: SystemTime::now(),
                close: Some(tx),
            },
        );
        if let Some(mut old) = old {
            if let Some(close) = old.close.take() {
                let _ = close.send(());
            }
        }
        (generation, rx)
    }

    /// Removes the link if it is still the given generation.
    pub fn remove(&self, router: Uuid, generation: u64) -> bool {
        let mut map = self.map.lock().expect("links lock");
        if map.get(&router).is_some_and(|e| e.generation == generation) {
            map.remove(&router);
            true
        } else {
            false
        }
    }

    /// Closes and removes a router's link at once (revocation, shutdown).
    pub fn close(&self, router: Uuid) -> bool {
        let entry = self.map.lock().expect("links lock").remove(&router);
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

    pub fn close_all(&self) {
        let drained: Vec<Entry> = self
            .map
            .lock()
            .expect("links lock")
            .drain()
            .map(|(_, e)| e)
            .collect();
        for mut e in drained {
            if let Some(close) = e.close.take() {
                let _ = close.send(());
            }
        }
    }

    /// A handle to send calls on, if the router is connected and its link usable.
    pub fn sender(&self, router: Uuid) -> Option<LinkSender> {
        let map = self.map.lock().expect("links lock");
        map.get(&router)
            .filter(|e| !e.sender.is_closed())
            .map(|e| e.sender.clone())
    }

    pub fn info(&self, router: Uuid) -> Option<LinkInfo> {
        let map = self.map.lock().expect("links lock");
        map.get(&router)
            .filter(|e| !e.sender.is_closed())
            .map(|e| LinkInfo {
                agent_version: e.agent_version.clone(),
                connected_at: e.connected_at,
            })
    }

    pub fn len(&self) -> usize {
        self.map.lock().expect("links lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
