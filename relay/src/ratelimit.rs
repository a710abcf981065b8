//! A fixed-window limiter per client address, for enrollment attempts. Bounded: old
//! windows are dropped when the table grows.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

pub struct RateLimiter {
    per_window: u32,
    window: Duration,
    seen: HashMap<IpAddr, (Instant, u32)>,
}

const MAX_TRACKED: usize = 10_000;

impl RateLimiter {
    pub fn new(per_window: u32, window: Duration) -> Self {
        RateLimiter {
            per_window,
            window,
            seen: HashMap::new(),
        }
    }

    /// Counts an attempt; false when the address is over its limit.
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.seen.len() >= MAX_TRACKED {
            let window = self.window;
            self.seen
                .retain(|_, (start, _)| now.saturating_duration_since(*start) < window);
        }
        let entry = self.seen.entry(ip).or_insert((now, 0));
        if now.saturating_duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        entry.1 += 1;
        entry.1 <= self.per_window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_address_and_window() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(2, Duration::from_secs(60));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(l.allow(a, t0));
        assert!(l.allow(a, t0));
        assert!(!l.allow(a, t0));
        assert!(l.allow(b, t0));
        assert!(l.allow(a, t0 + Duration::from_secs(60)));
    }
}
