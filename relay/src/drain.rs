//! Graceful drain (issue 16, items 5 and 6): on SIGTERM the node keeps serving
//! while its agents move to another relay, so a rolling restart costs no router a
//! backoff period. While draining, `/health` answers 503 (load balancers stop
//! sending new connections), a new link upgrade is refused with `RELAY_DRAINING`,
//! and every live link is told to go elsewhere with `POST` [`DRAIN_PATH`] on the
//! link itself (the relay is the link's HTTP/2 client, and h2 gives a client no
//! graceful close the agent's server would see). The agent dials its next relay,
//! and only once that link is up closes this one gracefully, so calls in flight on
//! it finish. The node is done when no link is left, or at `timeouts.drain`.
//!
//! Node-local: nothing here knows of other nodes; in a cluster the agents' relay
//! lists name the other nodes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use hyper::{Method, Request};
use netpilot_proto::link::DRAIN_PATH;

use crate::link_registry::{LinkSender, Links};

/// Whether this node drains, and what its drain did, for `/health`, the link
/// upgrade and the metrics.
#[derive(Default)]
pub struct Drain {
    draining: AtomicBool,
    /// Links sent the drain message (an agent may have ignored it).
    pub told: AtomicU64,
    /// Links that left on their own during the drain.
    pub left: AtomicU64,
    /// Links still there when the drain ended (no other relay, or the deadline),
    /// closed by the shutdown.
    pub cut: AtomicU64,
}

impl Drain {
    /// Enters draining; true the first time.
    pub fn start(&self) -> bool {
        !self.draining.swap(true, Ordering::SeqCst)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

/// How long one link may take to answer the drain message. The answer only says
/// the agent heard it; the move itself is watched through the registry.
pub const TELL_WITHIN: Duration = Duration::from_secs(5);

/// When the `i`-th of `n` links is told, counted from the drain's start: spread
/// evenly over the first third of the drain, so a node with 100,000 links does not
/// send them all to the next relay in the same second (its link-accept rate would
/// refuse most), and the last still has two thirds of the drain to move.
pub fn tell_at(i: usize, n: usize, drain: Duration) -> Duration {
    if n <= 1 {
        return Duration::ZERO;
    }
    (drain / 3).mul_f64(i as f64 / n as f64)
}

/// Sends the drain message on one link; the agent's status, or why not.
pub async fn tell(sender: LinkSender) -> Result<u16, String> {
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("http://agent{DRAIN_PATH}"))
        .body(())
        .expect("static request parts");
    let call = async {
        let mut send = sender.send.ready().await?;
        let (resp, _) = send.send_request(req, true)?;
        Ok::<_, h2::Error>(resp.await?.status().as_u16())
    };
    match tokio::time::timeout(TELL_WITHIN, call).await {
        Ok(Ok(status)) => Ok(status),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {TELL_WITHIN:?}")),
    }
}

/// Tells every live link to go elsewhere (paced by [`tell_at`]) and waits until
/// every link that can move has left, or `deadline` has passed; counts what
/// happened in `drain`. A link whose agent has no other relay (or predates the
/// drain message) stays until the shutdown closes it: waiting for it would only
/// delay the restart.
pub async fn links(links: &Links, drain: &Drain, deadline: Duration) {
    let started = tokio::time::Instant::now();
    let senders = links.live_senders();
    let n = senders.len();
    tracing::info!(
        links = n,
        ?deadline,
        "draining: telling agent links to go elsewhere"
    );
    let mut tells = tokio::task::JoinSet::new();
    for (i, sender) in senders.into_iter().enumerate() {
        let at = started + tell_at(i, n, deadline);
        tells.spawn(async move {
            tokio::time::sleep_until(at).await;
            tell(sender).await
        });
    }
    // Links that will not move: they stay until the shutdown closes them.
    let mut staying = 0usize;
    let ended = loop {
        let shrunk = links.shrunk();
        tokio::pin!(shrunk);
        // Armed before the check: a link leaving right after it still wakes this.
        shrunk.as_mut().enable();
        if links.len() <= staying && tells.is_empty() {
            break true;
        }
        tokio::select! {
            Some(r) = tells.join_next() => match r {
                Ok(Ok(MOVING)) => {
                    drain.told.fetch_add(1, Ordering::Relaxed);
                }
                // 409: the agent has no other relay; 404: it predates the drain
                // message. Either stays, then fails over as after a crash.
                Ok(Ok(status)) => {
                    staying += 1;
                    tracing::debug!(status, "agent link stays until the shutdown");
                }
                Ok(Err(e)) => {
                    staying += 1;
                    tracing::debug!(error = %e, "drain message not delivered");
                }
                Err(_) => staying += 1,
            },
            _ = &mut shrunk => {}
            _ = tokio::time::sleep_until(started + deadline) => break false,
        }
    };
    let left = n.saturating_sub(links.len()) as u64;
    drain.left.fetch_add(left, Ordering::Relaxed);
    let cut = links.len() as u64;
    drain.cut.fetch_add(cut, Ordering::Relaxed);
    let told = drain.told.load(Ordering::Relaxed);
    let took_ms = started.elapsed().as_millis() as u64;
    if ended {
        tracing::info!(
            links_left = left,
            links_staying = cut,
            told,
            took_ms,
            "drain done: every agent link that could move has gone elsewhere"
        );
    } else {
        tracing::warn!(
            links_left = left,
            links_cut = cut,
            told,
            took_ms,
            "drain deadline reached: cutting the agent links still here"
        );
    }
}

/// The agent's answer to the drain message when it dials another relay.
pub const MOVING: u16 = 202;

/// The drain's lines of the Prometheus scrape.
pub fn render(drain: &Drain, out: &mut String) {
    use std::fmt::Write;
    let _ = writeln!(
        out,
        "# HELP netpilot_draining 1 while the node drains (SIGTERM), else 0."
    );
    let _ = writeln!(out, "# TYPE netpilot_draining gauge");
    let _ = writeln!(out, "netpilot_draining {}", u8::from(drain.is_draining()));
    let _ = writeln!(
        out,
        "# HELP netpilot_drain_links_total Agent links during drains: told to go elsewhere, left, cut at the end."
    );
    let _ = writeln!(out, "# TYPE netpilot_drain_links_total counter");
    for (outcome, v) in [
        ("told", &drain.told),
        ("left", &drain.left),
        ("cut", &drain.cut),
    ] {
        let _ = writeln!(
            out,
            "netpilot_drain_links_total{{outcome=\"{outcome}\"}} {}",
            v.load(Ordering::Relaxed)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link_health::LinkHealth;
    use std::sync::Arc;
    use uuid::Uuid;

    /// How the fake agent at the far end of a link answers the drain message.
    #[derive(Clone, Copy)]
    enum Agent {
        /// 202, then leaves (its link task takes it out of the registry).
        Moves,
        /// 202, and never leaves.
        Lingers,
        /// 409: no other relay.
        Stays,
    }

    /// A link over an in-memory pipe, registered in `links`, its far end an h2
    /// server playing `agent`.
    async fn link(links: &Arc<Links>, agent: Agent) {
        let (near, far) = tokio::io::duplex(64 * 1024);
        let router = Uuid::new_v4();
        let (send, conn) = h2::client::handshake(near).await.unwrap();
        tokio::spawn(conn);
        let sender = LinkSender {
            send,
            health: LinkHealth::new(),
        };
        let (generation, closed, _) =
            links.register(router, sender, "test".into(), tokio::time::Instant::now());
        let links = links.clone();
        tokio::spawn(async move {
            // Held: dropping it is how the relay closes a link.
            let _closed = closed;
            let mut server = h2::server::handshake(far).await.unwrap();
            while let Some(Ok((req, mut respond))) = server.accept().await {
                assert_eq!(req.uri().path(), DRAIN_PATH);
                let status = match agent {
                    Agent::Stays => 409,
                    _ => MOVING,
                };
                let resp = hyper::Response::builder().status(status).body(()).unwrap();
                respond.send_response(resp, true).unwrap();
                if let Agent::Moves = agent {
                    links.remove(router, generation);
                }
            }
            std::future::pending::<()>().await;
        });
    }

    fn counts(d: &Drain) -> [u64; 3] {
        [&d.told, &d.left, &d.cut].map(|c| c.load(Ordering::Relaxed))
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_links_that_move_not_for_those_that_stay() {
        let links = Arc::new(Links::default());
        link(&links, Agent::Moves).await;
        link(&links, Agent::Stays).await;
        link(&links, Agent::Moves).await;
        let drain = Drain::default();
        let started = tokio::time::Instant::now();
        super::links(&links, &drain, Duration::from_secs(30)).await;
        // Three links told over the first 10 s: the last at 6.7 s, long before 30 s.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(counts(&drain), [2, 2, 1], "told, left, cut");
        assert_eq!(links.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_link_that_says_it_moves_and_does_not_is_cut_at_the_deadline() {
        let links = Arc::new(Links::default());
        link(&links, Agent::Lingers).await;
        let drain = Drain::default();
        let started = tokio::time::Instant::now();
        super::links(&links, &drain, Duration::from_secs(30)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert_eq!(counts(&drain), [1, 0, 1], "told, left, cut");
    }

    #[tokio::test]
    async fn no_link_no_wait() {
        let drain = Drain::default();
        super::links(&Links::default(), &drain, Duration::from_secs(30)).await;
        assert_eq!(counts(&drain), [0, 0, 0]);
    }

    #[test]
    fn tells_are_spread_over_the_first_third() {
        let d = Duration::from_secs(30);
        assert_eq!(tell_at(0, 1, d), Duration::ZERO);
        assert_eq!(tell_at(0, 4, d), Duration::ZERO);
        assert_eq!(tell_at(2, 4, d), Duration::from_secs(5));
        assert!(tell_at(99_999, 100_000, d) < Duration::from_secs(10));
    }

    #[test]
    fn starts_once() {
        let d = Drain::default();
        assert!(!d.is_draining());
        assert!(d.start());
        assert!(!d.start());
        assert!(d.is_draining());
    }
}
