//! Who holds a speed-test transfer right now: one at a time per router
//! (`SPEEDTEST_RUNNING`) and a configured number in all (`SPEEDTEST_BUSY`). A slot
//! is held by the transfer and freed when it is dropped.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use crate::error::ApiError;
use crate::sync::Locked;

/// Who holds a transfer right now. One lock for both limits: the set is small
/// (at most `concurrent` entries) and taken twice per transfer.
#[derive(Default)]
pub struct Slots {
    busy: Arc<Mutex<HashSet<Uuid>>>,
}

/// A held transfer slot; dropping it frees the slot.
pub struct Slot {
    busy: Arc<Mutex<HashSet<Uuid>>>,
    router: Uuid,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.busy.locked().remove(&self.router);
    }
}

impl Slots {
    pub fn acquire(&self, router: Uuid, max: usize) -> Result<Slot, ApiError> {
        let mut busy = self.busy.locked();
        if busy.contains(&router) {
            return Err(ApiError::SpeedtestRunning);
        }
        if busy.len() >= max {
            return Err(ApiError::SpeedtestBusy(max));
        }
        busy.insert(router);
        Ok(Slot {
            busy: self.busy.clone(),
            router,
        })
    }

    /// Transfers in progress, for `/metrics`.
    pub fn active(&self) -> usize {
        self.busy.locked().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_transfer_per_router_and_a_global_cap() {
        let slots = Slots::default();
        let (a, b, c) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        let sa = slots.acquire(a, 2).unwrap();
        assert!(matches!(
            slots.acquire(a, 2),
            Err(ApiError::SpeedtestRunning)
        ));
        let _sb = slots.acquire(b, 2).unwrap();
        assert!(matches!(
            slots.acquire(c, 2),
            Err(ApiError::SpeedtestBusy(2))
        ));
        assert_eq!(slots.active(), 2);
        drop(sa);
        assert!(slots.acquire(c, 2).is_ok());
        assert!(matches!(
            slots.acquire(a, 0),
            Err(ApiError::SpeedtestBusy(0))
        ));
    }
}
