//! What forwarded calls hold while they run: a slot among a router's calls in flight
//! (or a place in its queue for one), and bytes of the one budget for router answers, all routers together. Both are
//! released when their guard drops, however the call ends (answered, cut, timed out,
//! or the client went away), so a malicious agent cannot keep either.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::sync::Locked;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

/// Calls in flight per router, at most `per_router` each; up to `queue` more wait
/// for a slot (a burst from the web app is served in turn, not refused), and any
/// beyond those are refused.
pub struct CallSlots {
    per_router: usize,
    queue: usize,
    /// Only routers with a call in flight or waiting have an entry, so the map stays
    /// as small as the calls running.
    routers: Arc<Mutex<HashMap<Uuid, RouterCalls>>>,
}

struct RouterCalls {
    slots: Arc<Semaphore>,
    /// Calls in flight and waiting.
    holders: usize,
}

/// A call's place: in flight, or waiting for a slot ([`Ticket::slot`]).
#[derive(Debug)]
pub struct Ticket {
    routers: Arc<Mutex<HashMap<Uuid, RouterCalls>>>,
    router: Uuid,
    slots: Arc<Semaphore>,
}

/// One call's slot; dropping it frees the slot.
#[derive(Debug)]
pub struct CallSlot {
    _permit: OwnedSemaphorePermit,
    _ticket: Ticket,
}

impl std::fmt::Debug for RouterCalls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterCalls")
            .field("holders", &self.holders)
            .finish()
    }
}

impl CallSlots {
    pub fn new(per_router: usize, queue: usize) -> CallSlots {
        CallSlots {
            per_router,
            queue,
            routers: Arc::default(),
        }
    }

    /// A place among `router`'s calls, or `None` when its slots and queue are full.
    pub fn enter(&self, router: Uuid) -> Option<Ticket> {
        let mut routers = self.routers.locked();
        let calls = routers.entry(router).or_insert_with(|| RouterCalls {
            slots: Arc::new(Semaphore::new(self.per_router)),
            holders: 0,
        });
        if calls.holders >= self.per_router + self.queue {
            return None;
        }
        calls.holders += 1;
        Some(Ticket {
            routers: self.routers.clone(),
            router,
            slots: calls.slots.clone(),
        })
    }

    /// No forwarded call is in flight or waiting, for any router.
    pub fn is_idle(&self) -> bool {
        self.routers.locked().is_empty()
    }

    /// Calls in flight or waiting for `router`.
    pub fn holders(&self, router: Uuid) -> usize {
        let routers = self.routers.locked();
        routers.get(&router).map_or(0, |c| c.holders)
    }
}

impl Ticket {
    /// Waits for a slot (callers bound the wait by the call's deadline).
    pub async fn slot(self) -> CallSlot {
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("call slots are never closed");
        CallSlot {
            _permit: permit,
            _ticket: self,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut routers = self.routers.locked();
        if let Some(calls) = routers.get_mut(&self.router) {
            calls.holders -= 1;
            if calls.holders == 0 {
                routers.remove(&self.router);
            }
        }
    }
}

/// The bytes of router answers the relay holds at once, all calls together.
pub struct AnswerBudget {
    inner: Arc<BudgetInner>,
}

struct BudgetInner {
    total: usize,
    used: AtomicUsize,
}

/// What one answer holds of the budget; dropping it gives the bytes back.
pub struct Charge {
    inner: Arc<BudgetInner>,
    held: usize,
}

impl AnswerBudget {
    pub fn new(total: usize) -> AnswerBudget {
        AnswerBudget {
            inner: Arc::new(BudgetInner {
                total,
                used: AtomicUsize::new(0),
            }),
        }
    }

    /// An empty charge to add an answer's chunks to as they arrive.
    pub fn charge(&self) -> Charge {
        Charge {
            inner: self.inner.clone(),
            held: 0,
        }
    }

    /// Bytes held right now (the `/metrics` gauge).
    pub fn used(&self) -> usize {
        self.inner.used.load(Ordering::Relaxed)
    }
}

impl Charge {
    /// Takes `n` more bytes; false (and nothing taken) when the budget has not them.
    pub fn add(&mut self, n: usize) -> bool {
        let total = self.inner.total;
        let ok = self
            .inner
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&u| u <= total)
            })
            .is_ok();
        if ok {
            self.held += n;
        }
        ok
    }

    /// Gives back everything held so far (a streamed chunk once handed on).
    pub fn release(&mut self) {
        self.inner.used.fetch_sub(self.held, Ordering::AcqRel);
        self.held = 0;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_router_gets_its_slots_then_its_queue_then_none() {
        let slots = CallSlots::new(2, 1);
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let s1 = slots.enter(a).unwrap().slot().await;
        let _s2 = slots.enter(a).unwrap().slot().await;
        // The third waits for a slot; the fourth is refused.
        let waiting = slots.enter(a).unwrap();
        assert!(slots.enter(a).is_none());
        // Another router is not affected.
        let _b1 = slots.enter(b).unwrap().slot().await;
        let mut third = Box::pin(waiting.slot());
        assert!(futures_poll(&mut third).is_none(), "no slot free yet");
        drop(s1);
        let _s3 = third.await;
        assert_eq!(slots.holders(a), 2);
        let _w = slots.enter(a).unwrap();
        assert!(slots.enter(a).is_none());
    }

    /// Polls a future once.
    fn futures_poll<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        match std::pin::Pin::new(f).poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }

    #[tokio::test]
    async fn slots_leave_no_entry_behind() {
        let slots = CallSlots::new(1, 4);
        let r = Uuid::new_v4();
        drop(slots.enter(r).unwrap().slot().await);
        drop(slots.enter(r).unwrap());
        assert!(slots.routers.lock().unwrap().is_empty());
    }

    #[test]
    fn the_budget_is_shared_and_given_back() {
        let budget = AnswerBudget::new(100);
        let mut a = budget.charge();
        let mut b = budget.charge();
        assert!(a.add(60));
        assert!(!b.add(50), "over the budget");
        assert!(b.add(40));
        assert_eq!(budget.used(), 100);
        a.release();
        assert_eq!(budget.used(), 40);
        assert!(a.add(60));
        drop(a);
        drop(b);
        assert_eq!(budget.used(), 0);
        assert!(!budget.charge().add(101));
    }
}
