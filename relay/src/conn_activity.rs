//! What a served connection is doing, as its connection task needs to know it: has
//! the first request arrived (it must, within the first-request deadline), and how
//! many calls are in flight (an HTTP/2 connection with none for `timeouts.h2_idle`
//! is closed). A call counts from the moment its request head is parsed until its
//! response body is finished or dropped, so a streamed answer keeps its
//! connection alive as long as it flows.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::Either;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::watch;

/// The calls in flight on one connection. Cheap to clone into every call.
#[derive(Clone)]
pub struct Activity(Arc<watch::Sender<usize>>);

/// What the connection task watches: every call's start and end.
pub struct ActivityWatch(watch::Receiver<usize>);

impl Activity {
    pub fn new() -> (Activity, ActivityWatch) {
        let (tx, rx) = watch::channel(0);
        (Activity(Arc::new(tx)), ActivityWatch(rx))
    }

    /// A call starts; it ends when the returned guard is dropped.
    pub fn begin(&self) -> CallGuard {
        self.0.send_modify(|n| *n += 1);
        CallGuard(self.clone())
    }
}

/// One call in flight; dropping it ends the call.
pub struct CallGuard(Activity);

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.0 .0.send_modify(|n| *n -= 1);
    }
}

impl ActivityWatch {
    /// Resolves when the first call starts. Never resolves once the connection
    /// (every [`Activity`] clone) is gone: its own future ends the task then.
    pub async fn first_call(&mut self) {
        if self.0.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Resolves once no call has been in flight for `idle`.
    pub async fn idle_for(&mut self, idle: Duration) {
        loop {
            let open = *self.0.borrow_and_update();
            let changed = if open > 0 {
                Ok(self.0.changed().await)
            } else {
                tokio::time::timeout(idle, self.0.changed()).await
            };
            match changed {
                Err(_) => return,
                Ok(Ok(())) => continue,
                Ok(Err(_)) => std::future::pending::<()>().await,
            }
        }
    }
}

/// A response body that holds its call's guard until the body is done.
pub struct Tracked {
    inner: crate::http::Body,
    _call: CallGuard,
}

impl Tracked {
    pub fn new(inner: crate::http::Body, call: CallGuard) -> Tracked {
        Tracked { inner, _call: call }
    }
}

/// Why a tracked body ended early (a cut stream). A named error polled out of each
/// side by hand, not `Either`'s own boxed-error impl: hyper's bound on that boxed
/// error inside the spawned connection task trips the compiler's higher-ranked
/// lifetime check ("implementation of `From` is not general enough").
#[derive(Debug)]
pub struct BodyCut(crate::http::BoxError);

impl std::fmt::Display for BodyCut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BodyCut {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

impl Body for Tracked {
    type Data = bytes::Bytes;
    type Error = BodyCut;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match &mut self.get_mut().inner {
            Either::Left(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            Either::Right(stream) => Pin::new(stream).poll_frame(cx).map_err(BodyCut),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_the_last_call_to_end() {
        let (activity, mut watch) = Activity::new();
        let call = activity.begin();
        watch.first_call().await;
        let idle = Duration::from_secs(5);
        // A call in flight for far longer than `idle` keeps the connection.
        let r = tokio::time::timeout(Duration::from_secs(60), watch.idle_for(idle)).await;
        assert!(r.is_err());
        drop(call);
        let start = tokio::time::Instant::now();
        watch.idle_for(idle).await;
        assert!(start.elapsed() >= idle);
    }

    #[tokio::test(start_paused = true)]
    async fn a_tracked_body_holds_its_call_until_dropped() {
        let (activity, mut watch) = Activity::new();
        let body = Tracked::new(
            crate::http::full(bytes::Bytes::from_static(b"x")),
            activity.begin(),
        );
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            watch.idle_for(Duration::from_secs(1)),
        )
        .await;
        assert!(r.is_err(), "idle while a body is unsent");
        drop(body);
        watch.idle_for(Duration::from_secs(1)).await;
    }
}
