//! Request bodies under a memory budget. A router has 64–128 MB; many concurrent
//! calls with large JSON bodies once took the agent from 6 to 32 MB. A call with a
//! body first waits for room in one budget shared by every call — before a byte of
//! its body is read, so waiting calls hold nothing but what the link's flow-control
//! window lets through (see `link::serve::h2_server`) — then reads it into one
//! buffer of the declared size. Calls without a body never wait.

use std::time::Duration;

use http_body_util::BodyExt;
use tokio::sync::{Semaphore, SemaphorePermit};

/// Body bytes in flight, all calls together: the relay's default body limit, so a
/// single body the relay lets through by default is admitted alone.
pub const BUDGET_BYTES: usize = 2 * 1024 * 1024;
/// Bodies larger than this are refused; 16,384 devices of JSON fit well inside. A
/// body larger than the budget is admitted alone (it takes the whole budget).
pub const MAX_BODY: usize = 4 * 1024 * 1024;
/// How long a call may wait for room before it is told the agent is busy; well
/// inside the relay's command timeout (30 s by default), so the caller hears
/// `AGENT_BUSY` rather than a timeout.
pub const WAIT: Duration = Duration::from_secs(10);

/// Why a body was not taken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IntakeError {
    /// No room in the budget within the wait.
    #[error("the router is busy with other large requests; try again shortly")]
    Busy,
    /// Declared or found larger than [`MAX_BODY`].
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    /// The body broke off (the link dropped, a reset, a length mismatch).
    #[error("cannot read the request body: {0}")]
    Broken(String),
}

/// The budget; one per agent, shared by the link and the local listener.
#[derive(Debug)]
pub struct BodyBudget {
    room: Semaphore,
    budget: u32,
    wait: Duration,
}

/// Room held for one call's body; given back when dropped (when the call ends, so
/// what the handler builds from the body is covered too).
#[derive(Debug)]
pub struct Admitted<'a> {
    permit: Option<SemaphorePermit<'a>>,
    /// The declared size, when there is one: the buffer to read into.
    declared: Option<usize>,
}

impl Default for BodyBudget {
    fn default() -> Self {
        BodyBudget::new(BUDGET_BYTES, WAIT)
    }
}

/// What a body costs in the budget: its declared size, or (size unknown, or more
/// than the budget) the whole budget; nothing when there is no body.
pub fn cost(no_body: bool, declared: Option<u64>, budget: u32) -> u32 {
    if no_body {
        return 0;
    }
    match declared {
        Some(n) => n.clamp(1, budget as u64) as u32,
        None => budget,
    }
}

impl BodyBudget {
    pub fn new(budget_bytes: usize, wait: Duration) -> BodyBudget {
        let budget = budget_bytes.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize)) as u32;
        BodyBudget {
            room: Semaphore::new(budget as usize),
            budget,
            wait,
        }
    }

    /// Waits for room for `body`, without reading it. A declared size over
    /// [`MAX_BODY`] is refused at once.
    pub async fn admit<B: hyper::body::Body>(&self, body: &B) -> Result<Admitted<'_>, IntakeError> {
        let declared = body.size_hint().exact();
        if declared.is_some_and(|n| n > MAX_BODY as u64) {
            return Err(IntakeError::TooLarge(MAX_BODY));
        }
        let declared = declared.map(|n| n as usize);
        let n = cost(
            body.is_end_stream(),
            declared.map(|n| n as u64),
            self.budget,
        );
        if n == 0 {
            return Ok(Admitted {
                permit: None,
                declared,
            });
        }
        match tokio::time::timeout(self.wait, self.room.acquire_many(n)).await {
            Ok(Ok(permit)) => Ok(Admitted {
                permit: Some(permit),
                declared,
            }),
            // The semaphore is never closed; a closed one means nothing can be let in.
            Ok(Err(_)) | Err(_) => Err(IntakeError::Busy),
        }
    }

    /// Room left, for tests and the health view.
    pub fn available(&self) -> usize {
        self.room.available_permits()
    }
}

/// Bodies at least this large give their memory back to the system when done.
const GIVE_BACK_FROM: usize = 256 * 1024;

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if self
            .permit
            .as_ref()
            .is_some_and(|p| p.num_permits() >= GIVE_BACK_FROM)
        {
            // The permit goes first: the next caller need not wait for the trim.
            self.permit = None;
            crate::runtime::memory::give_back();
        }
    }
}

impl Admitted<'_> {
    /// Reads the whole body into one buffer (sized once when the length is
    /// declared), refusing it as soon as it passes [`MAX_BODY`].
    pub async fn read<B>(&self, mut body: B) -> Result<Vec<u8>, IntakeError>
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let mut buf = Vec::with_capacity(self.declared.unwrap_or(0).min(MAX_BODY));
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| IntakeError::Broken(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > MAX_BODY {
                    return Err(IntakeError::TooLarge(MAX_BODY));
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{Empty, Full};

    #[test]
    fn costs_follow_the_declared_size() {
        assert_eq!(cost(true, None, 100), 0);
        assert_eq!(cost(true, Some(0), 100), 0);
        assert_eq!(cost(false, Some(0), 100), 1);
        assert_eq!(cost(false, Some(40), 100), 40);
        assert_eq!(cost(false, Some(4000), 100), 100);
        assert_eq!(cost(false, None, 100), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_budget_makes_callers_wait_then_busy() {
        let budget = BodyBudget::new(100, Duration::from_secs(10));
        let big = Full::new(Bytes::from(vec![b'x'; 80]));
        let held = budget.admit(&big).await.unwrap();
        assert_eq!(budget.available(), 20);
        // A call without a body never waits.
        budget.admit(&Empty::<Bytes>::new()).await.unwrap();
        // One that does not fit waits out the wait, then hears busy.
        let started = tokio::time::Instant::now();
        let other = Full::new(Bytes::from(vec![b'y'; 30]));
        assert_eq!(budget.admit(&other).await.unwrap_err(), IntakeError::Busy);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        // Room given back lets the next one in, and it reads its body whole.
        drop(held);
        let admitted = budget.admit(&other).await.unwrap();
        assert_eq!(admitted.read(other).await.unwrap(), vec![b'y'; 30]);
    }

    #[tokio::test]
    async fn oversized_bodies_are_refused_declared_or_not() {
        let budget = BodyBudget::default();
        let declared = Full::new(Bytes::from(vec![0u8; MAX_BODY + 1]));
        assert_eq!(
            budget.admit(&declared).await.unwrap_err(),
            IntakeError::TooLarge(MAX_BODY)
        );
        // Undeclared: takes the whole budget, and is cut once past the limit.
        let chunked = Chunks(5, MAX_BODY / 4);
        let admitted = budget.admit(&chunked).await.unwrap();
        assert_eq!(budget.available(), 0);
        assert_eq!(
            admitted.read(chunked).await.unwrap_err(),
            IntakeError::TooLarge(MAX_BODY)
        );
        drop(admitted);
        assert_eq!(budget.available(), BUDGET_BYTES);
    }

    /// `.0` chunks of `.1` bytes with no declared length (HTTP/1.1 chunked).
    struct Chunks(usize, usize);

    impl hyper::body::Body for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
            if self.0 == 0 {
                return std::task::Poll::Ready(None);
            }
            self.0 -= 1;
            let chunk = Bytes::from(vec![0u8; self.1]);
            std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(chunk))))
        }
    }
}
