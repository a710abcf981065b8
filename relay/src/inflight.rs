//! What forwarded calls hold while they run: a slot among a router's calls in flight,
//! and bytes of the one budget for router answers, all routers together. Both are
//! released when their guard drops, however the call ends (answered, cut, timed out,
//! or the client went away), so a malicious agent cannot keep either.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use uuid::Uuid;

/// Calls in flight per router, at most `per_router` each.
pub struct CallSlots {
    per_router: usize,
    /// Only routers with a call in flight have an entry, so the map stays as small
    /// as the calls running.
    counts: Arc<Mutex<HashMap<Uuid, usize>>>,
}

/// One call's slot; dropping it frees the slot.
#[derive(Debug)]
pub struct CallSlot {
    counts: Arc<Mutex<HashMap<Uuid, usize>>>,
    router: Uuid,
}

impl CallSlots {
    pub fn new(per_router: usize) -> CallSlots {
        CallSlots {
            per_router,
            counts: Arc::default(),
        }
    }

    /// A slot for one more call to `router`, or `None` when it has its maximum.
    pub fn try_take(&self, router: Uuid) -> Option<CallSlot> {
        let mut counts = self.counts.lock().expect("call slots lock");
        let n = counts.entry(router).or_default();
        if *n >= self.per_router {
            return None;
        }
        *n += 1;
        Some(CallSlot {
            counts: self.counts.clone(),
            router,
        })
    }

    pub fn in_flight(&self, router: Uuid) -> usize {
        let counts = self.counts.lock().expect("call slots lock");
        counts.get(&router).copied().unwrap_or(0)
    }
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().expect("call slots lock");
        if let Some(n) = counts.get_mut(&self.router) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.router);
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

    #[test]
    fn a_router_gets_its_maximum_and_then_none() {
        let slots = CallSlots::new(2);
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let s1 = slots.try_take(a).unwrap();
        let _s2 = slots.try_take(a).unwrap();
        assert!(slots.try_take(a).is_none());
        // Another router is not affected.
        let _b1 = slots.try_take(b).unwrap();
        drop(s1);
        assert_eq!(slots.in_flight(a), 1);
        let _s3 = slots.try_take(a).unwrap();
        assert!(slots.try_take(a).is_none());
    }

    #[test]
    fn slots_leave_no_entry_behind() {
        let slots = CallSlots::new(1);
        let r = Uuid::new_v4();
        drop(slots.try_take(r).unwrap());
        assert!(slots.counts.lock().unwrap().is_empty());
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
