//! Which node holds which router's link, in Redis. A node that brings a link up
//! claims the router with a fresh generation (one counter for the whole cluster)
//! and announces it; a newer claim always overwrites an older one, and a node lets
//! go of its entry only if it is still its own claim (the same generation and
//! node), so a node that lost the router to another never erases the newer entry.
//! After Redis lost its data, a node puts back its live links only where the entry
//! is missing, never over someone else's.
//!
//! A node's presence (`np:node:<id>` → its internal address) expires unless it is
//! renewed: an entry that names a node no longer present is a router whose link
//! died with its node.

use redis::Script;
use uuid::Uuid;

use super::{events, Cluster, ClusterError};

/// The directory claims of this node's live links: router → (link generation in
/// this process, claim generation in Redis), for releasing and re-asserting them.
#[derive(Default)]
pub struct Claims {
    pub map: std::sync::Mutex<std::collections::HashMap<Uuid, (u64, u64)>>,
}

pub const NODE_PREFIX: &str = "np:node:";
/// Keys per MGET when reading many routers' entries.
const MGET_KEYS: usize = 5_000;
/// The set of node ids that have announced themselves.
pub const NODES: &str = "np:nodes";
const LINK_PREFIX: &str = "np:link:";
const GENERATION: &str = "np:linkgen";

pub fn node_key(node: &str) -> String {
    format!("{NODE_PREFIX}{node}")
}

fn link_key(router: Uuid) -> String {
    format!("{LINK_PREFIX}{router}")
}

/// Where a router's link is, as the directory says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// No node holds a link for it.
    Nobody,
    /// This node (its link may have just closed).
    Here,
    /// Another node, present, at its internal address.
    Node { id: String, addr: String },
    /// A node that is no longer present (killed, partitioned from Redis).
    Gone { id: String },
}

// KEYS: link key, generation counter. ARGV: node, router, events channel.
const CLAIM: &str = r#"
local g = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], g .. ' ' .. ARGV[1])
redis.call('PUBLISH', ARGV[3], 'linked ' .. ARGV[2] .. ' ' .. g .. ' ' .. ARGV[1])
return g
"#;

// KEYS: link key. ARGV: generation, node. Deletes only our own claim.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] .. ' ' .. ARGV[2] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"#;

// KEYS: link key. ARGV: node key prefix. Returns false or {node, address or ''}.
const LOOKUP: &str = r#"
local v = redis.call('GET', KEYS[1])
if not v then return false end
local node = string.match(v, '^%d+ (.+)$')
if not node then return false end
local addr = redis.call('GET', ARGV[1] .. node)
return {node, addr or ''}
"#;

// KEYS: link key. ARGV: generation, node. Puts our claim back only if none exists.
const REASSERT: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ARGV[2], 'NX') then return 1 end
return 0
"#;

pub(super) struct Scripts {
    claim: Script,
    release: Script,
    lookup: Script,
    reassert: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Scripts {
            claim: Script::new(CLAIM),
            release: Script::new(RELEASE),
            lookup: Script::new(LOOKUP),
            reassert: Script::new(REASSERT),
        }
    }
}

impl Cluster {
    /// Which present node holds each router's link (`None`: no link, or its node
    /// is gone): two round trips for any number of routers.
    pub async fn holders(&self, routers: &[Uuid]) -> Result<Vec<Option<String>>, ClusterError> {
        if routers.is_empty() {
            return Ok(Vec::new());
        }
        // In slices, so no one command carries a whole fleet's keys.
        let mut entries: Vec<Option<String>> = Vec::with_capacity(routers.len());
        for chunk in routers.chunks(MGET_KEYS) {
            let keys: Vec<String> = chunk.iter().map(|r| link_key(*r)).collect();
            let got: Vec<Option<String>> = self
                .redis(
                    |mut c| async move { redis::cmd("MGET").arg(keys).query_async(&mut c).await },
                )
                .await?;
            entries.extend(got);
        }
        let present: std::collections::HashSet<String> =
            self.nodes().await?.into_iter().map(|(id, _)| id).collect();
        Ok(entries
            .into_iter()
            .map(|e| {
                let node = e?.split_once(' ')?.1.to_owned();
                present.contains(&node).then_some(node)
            })
            .collect())
    }

    /// Enters this node as the holder of `router`'s link; returns the claim's
    /// generation, for [`Cluster::release`].
    pub async fn claim(&self, router: Uuid) -> Result<u64, ClusterError> {
        let node = self.node_id.clone();
        self.redis(|mut c| async move {
            self.directory
                .claim
                .key(link_key(router))
                .key(GENERATION)
                .arg(node)
                .arg(router.to_string())
                .arg(events::CHANNEL)
                .invoke_async(&mut c)
                .await
        })
        .await
    }

    /// Removes this node's claim on `router`, if it is still the current one.
    pub async fn release(&self, router: Uuid, generation: u64) -> Result<bool, ClusterError> {
        self.on_own_claim(&self.directory.release, router, generation)
            .await
    }

    /// Puts a live link's claim back where the entry is missing (Redis restarted).
    pub async fn reassert(&self, router: Uuid, generation: u64) -> Result<bool, ClusterError> {
        self.on_own_claim(&self.directory.reassert, router, generation)
            .await
    }

    /// Runs a script over this node's claim `generation` on `router`; whether it
    /// changed the entry.
    async fn on_own_claim(
        &self,
        script: &Script,
        router: Uuid,
        generation: u64,
    ) -> Result<bool, ClusterError> {
        let node = self.node_id.clone();
        let done: i64 = self
            .redis(|mut c| async move {
                script
                    .key(link_key(router))
                    .arg(generation)
                    .arg(node)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(done == 1)
    }

    /// Where `router`'s link is: one round trip for the entry and its node.
    pub async fn lookup(&self, router: Uuid) -> Result<Holder, ClusterError> {
        self.metrics
            .directory_lookups
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let found: Option<(String, String)> = self
            .redis(|mut c| async move {
                self.directory
                    .lookup
                    .key(link_key(router))
                    .arg(NODE_PREFIX)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(match found {
            None => Holder::Nobody,
            Some((id, _)) if id == self.node_id => Holder::Here,
            Some((id, addr)) if addr.is_empty() => Holder::Gone { id },
            Some((id, addr)) => Holder::Node { id, addr },
        })
    }
}
