//! The change broadcast between nodes, on one Redis pub/sub channel: a router's
//! link came up somewhere (`linked`), a router was revoked (`revoked`) or changed
//! in the registry (`changed`). Messages are hints that make nodes act at once;
//! nothing depends on every one arriving (the registry poll and the directory's
//! generations catch up after a missed one).

use uuid::Uuid;

use super::{Cluster, ClusterError};

pub const CHANNEL: &str = "np:events";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `node` now holds the router's link, claimed with `generation`.
    Linked {
        router: Uuid,
        generation: u64,
        node: String,
    },
    /// The router was revoked: close its link wherever it is.
    Revoked { router: Uuid },
    /// The router's registry row changed (enrolled, new token): re-read it.
    Changed { router: Uuid },
}

impl Event {
    pub fn encode(&self) -> String {
        match self {
            Event::Linked {
                router,
                generation,
                node,
            } => format!("linked {router} {generation} {node}"),
            Event::Revoked { router } => format!("revoked {router}"),
            Event::Changed { router } => format!("changed {router}"),
        }
    }

    pub fn parse(text: &str) -> Option<Event> {
        let mut parts = text.split(' ');
        let kind = parts.next()?;
        let router = Uuid::parse_str(parts.next()?).ok()?;
        let event = match kind {
            "linked" => Event::Linked {
                router,
                generation: parts.next()?.parse().ok()?,
                node: parts.next()?.to_owned(),
            },
            "revoked" => Event::Revoked { router },
            "changed" => Event::Changed { router },
            _ => return None,
        };
        parts.next().is_none().then_some(event)
    }
}

impl Cluster {
    /// Tells every node (this one included) about a change.
    pub async fn publish(&self, event: &Event) -> Result<(), ClusterError> {
        let text = event.encode();
        self.redis(|mut c| async move {
            redis::cmd("PUBLISH")
                .arg(CHANNEL)
                .arg(text)
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// A subscription to the channel; the caller reads messages until it ends
    /// (Redis gone) and then subscribes again.
    pub async fn subscribe(&self) -> Result<redis::aio::PubSub, ClusterError> {
        let mut pubsub =
            tokio::time::timeout(self.redis_timeout * 3, self.redis_client.get_async_pubsub())
                .await
                .map_err(|_| ClusterError::Timeout((self.redis_timeout * 3).as_millis()))??;
        pubsub.subscribe(CHANNEL).await?;
        Ok(pubsub)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_read_back_and_garbage_is_ignored() {
        let router = Uuid::new_v4();
        for e in [
            Event::Linked {
                router,
                generation: 7,
                node: "relay-b".into(),
            },
            Event::Revoked { router },
            Event::Changed { router },
        ] {
            assert_eq!(Event::parse(&e.encode()), Some(e));
        }
        for bad in [
            "",
            "linked",
            "linked x 1 a",
            &format!("linked {router} x a"),
            &format!("revoked {router} extra"),
            &format!("renamed {router}"),
        ] {
            assert_eq!(Event::parse(bad), None, "{bad:?}");
        }
    }
}
