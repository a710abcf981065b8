//! Whether an agent link is alive, known without waiting out a call. A WAN that dies
//! without FIN or RST leaves the socket open and silent: calls would wait the whole
//! command timeout and the idle PING would call it dead only a minute later. So the
//! link's bytes are stamped as they arrive, and a call on a link that has been quiet
//! asks the link task for an h2 PING first; no answer within the probe timeout and
//! the link task closes the link (calls answer 503, the router shows offline).
//!
//! One PING is in flight per link at a time (h2 allows one), so concurrent calls
//! share it; the same loop also sends the idle keep-alive PINGs.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// What the link task last knew: PINGs answered so far, or the link gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pulse {
    Beats(u64),
    Gone,
}

/// One link's liveness, shared by its task, its registry entry and its calls.
pub struct LinkHealth {
    epoch: Instant,
    /// Milliseconds after `epoch` when the agent's last bytes arrived.
    last_rx_ms: AtomicU64,
    probe: Notify,
    pulse: watch::Sender<Pulse>,
}

/// When the PING loop sends, and how long an answer may take.
#[derive(Debug, Clone, Copy)]
pub struct PingRules {
    /// Quiet this long: an idle keep-alive PING.
    pub ping_interval: Duration,
    /// How long an idle PING may go unanswered.
    pub idle_timeout: Duration,
    /// How long a PING a call asked for may go unanswered.
    pub probe_timeout: Duration,
}

impl PingRules {
    pub fn from_timeouts(t: &crate::config::Timeouts) -> Self {
        PingRules {
            ping_interval: t.ping_interval,
            idle_timeout: t.dead_after - t.ping_interval,
            // A probe never waits longer than the idle PING would.
            probe_timeout: t.probe_timeout.min(t.dead_after - t.ping_interval),
        }
    }
}

/// Why the PING loop ended.
#[derive(Debug)]
pub enum Silence {
    /// A PING went unanswered this long.
    Unanswered(Duration),
    /// The connection failed under the PING.
    Lost(h2::Error),
}

impl LinkHealth {
    pub fn new() -> Arc<Self> {
        Arc::new(LinkHealth {
            epoch: Instant::now(),
            last_rx_ms: AtomicU64::new(0),
            probe: Notify::new(),
            pulse: watch::channel(Pulse::Beats(0)).0,
        })
    }

    fn received(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        // A busy link reads often within one millisecond: skipping the unchanged
        // store keeps the cache line shared with the calls that read it.
        if self.last_rx_ms.load(Ordering::Relaxed) != ms {
            self.last_rx_ms.store(ms, Ordering::Relaxed);
        }
    }

    /// How long nothing has arrived from the agent.
    pub fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_rx_ms.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }

    pub fn is_gone(&self) -> bool {
        *self.pulse.borrow() == Pulse::Gone
    }

    /// The link task is done with this link (closed, replaced, silent, lost).
    pub fn mark_gone(&self) {
        self.pulse.send_replace(Pulse::Gone);
    }

    /// Resolves once the link is known dead, for as long as a call waits on it:
    /// whenever the agent has been quiet for `probe_after` (at once, if it already
    /// has), a PING is asked for; an unanswered one ends the wait (and the link).
    /// Run beside the call, never before it, so a call on a healthy link waits for
    /// nothing but its answer.
    pub async fn until_silent(&self, probe_after: Duration, probe_timeout: Duration) {
        loop {
            if self.is_gone() {
                return;
            }
            let quiet = self.quiet_for();
            if quiet < probe_after {
                tokio::time::sleep(probe_after - quiet).await;
                continue;
            }
            if !self.probe(probe_timeout).await {
                return;
            }
        }
    }

    /// Asks the link task for a PING (or shares the one in flight); true when it is
    /// answered, false when the link is gone.
    async fn probe(&self, probe_timeout: Duration) -> bool {
        let mut pulse = self.pulse.subscribe();
        let seen = *pulse.borrow_and_update();
        if seen == Pulse::Gone {
            return false;
        }
        self.probe.notify_one();
        // The link task gives the verdict; this bound only covers a task that died
        // without one.
        let verdict = tokio::time::timeout(
            probe_timeout + Duration::from_secs(1),
            pulse.wait_for(|p| *p != seen),
        )
        .await;
        matches!(verdict, Ok(Ok(p)) if *p != Pulse::Gone)
    }

    /// The link's PING loop, for as long as the link lives: a PING when the link
    /// has been quiet for the ping interval, or at once when a call asks. Returns
    /// when a PING goes unanswered or the connection fails.
    pub async fn ping_loop(&self, mut pinger: h2::PingPong, rules: PingRules) -> Silence {
        loop {
            let timeout = self.wait_for_ping(rules).await;
            let sent = Instant::now();
            let mut deadline = sent + timeout;
            let mut ping = std::pin::pin!(pinger.ping(h2::Ping::opaque()));
            loop {
                tokio::select! {
                    r = &mut ping => match r {
                        Ok(_) => {
                            self.pulse.send_modify(|p| {
                                if let Pulse::Beats(n) = p {
                                    *n += 1;
                                }
                            });
                            break;
                        }
                        Err(e) => return Silence::Lost(e),
                    },
                    _ = tokio::time::sleep_until(deadline) => {
                        return Silence::Unanswered(sent.elapsed());
                    }
                    // A call waits on the idle PING: it gets the probe's deadline.
                    _ = self.probe.notified() => {
                        deadline = deadline.min(Instant::now() + rules.probe_timeout);
                    }
                }
            }
        }
    }

    /// Waits until a PING is due; returns how long its answer may take.
    async fn wait_for_ping(&self, rules: PingRules) -> Duration {
        loop {
            let quiet = self.quiet_for();
            if quiet >= rules.ping_interval {
                return rules.idle_timeout;
            }
            tokio::select! {
                _ = tokio::time::sleep(rules.ping_interval - quiet) => {}
                _ = self.probe.notified() => return rules.probe_timeout,
            }
        }
    }
}

/// The link's byte stream, stamping the link's health with every read.
pub struct Watched<T> {
    inner: T,
    health: Arc<LinkHealth>,
}

impl<T> Watched<T> {
    pub fn new(inner: T, health: Arc<LinkHealth>) -> Self {
        health.received();
        Watched { inner, health }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.health.received();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: PingRules = PingRules {
        ping_interval: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(60),
        probe_timeout: Duration::from_millis(300),
    };

    /// A client link over an in-memory pipe, its PING loop running as the link
    /// task runs it (the link gone when the loop ends). `answer`: an h2 server
    /// serves the far end; otherwise nothing ever reads it (a silent WAN).
    async fn link(answer: bool) -> (Arc<LinkHealth>, tokio::task::JoinHandle<Silence>) {
        let (near, far) = tokio::io::duplex(64 * 1024);
        if answer {
            tokio::spawn(async move {
                let mut server = h2::server::handshake(far).await.unwrap();
                while server.accept().await.is_some() {}
            });
        } else {
            tokio::spawn(async move {
                let _far = far;
                std::future::pending::<()>().await;
            });
        }
        let health = LinkHealth::new();
        let (_send, mut conn) = h2::client::handshake(Watched::new(near, health.clone()))
            .await
            .unwrap();
        let pinger = conn.ping_pong().unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
            drop(_send);
        });
        let h = health.clone();
        let task = tokio::spawn(async move {
            let silence = h.ping_loop(pinger, RULES).await;
            h.mark_gone();
            silence
        });
        (health, task)
    }

    #[tokio::test]
    async fn an_answered_probe_lets_calls_through_and_counts_as_received() {
        let (health, _task) = link(true).await;
        let before = health.quiet_for();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(health.probe(RULES.probe_timeout).await);
        assert!(health.quiet_for() < before + Duration::from_millis(50));
        assert!(!health.is_gone());
        // Quiet for less than probe_after: nothing to wait for.
        let waited = tokio::time::timeout(
            Duration::from_millis(200),
            health.until_silent(Duration::from_secs(60), RULES.probe_timeout),
        )
        .await;
        assert!(waited.is_err(), "a healthy link was called silent");
    }

    #[tokio::test]
    async fn concurrent_calls_share_one_unanswered_probe_and_the_link_ends() {
        let (health, task) = link(false).await;
        let started = Instant::now();
        let calls: Vec<_> = (0..3)
            .map(|_| {
                let h = health.clone();
                tokio::spawn(
                    async move { h.until_silent(Duration::ZERO, RULES.probe_timeout).await },
                )
            })
            .collect();
        for c in calls {
            c.await.unwrap();
        }
        let took = started.elapsed();
        assert!(
            took >= RULES.probe_timeout && took < Duration::from_secs(1),
            "{took:?}"
        );
        assert!(matches!(task.await.unwrap(), Silence::Unanswered(_)));
        assert!(health.is_gone());
        assert!(!health.probe(RULES.probe_timeout).await);
    }
}
