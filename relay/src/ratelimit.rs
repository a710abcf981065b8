//! A fixed-window limiter per client ([`AddrKey`]), for enrollment attempts. A client is an IPv4
//! address or an IPv6 /64 (one customer's network: whoever holds one address of it
//! holds them all), an IPv4-mapped IPv6 address counting as its IPv4 address.
//!
//! The table is bounded: when it holds `max_keys` clients whose window is still
//! running, a client not in it is refused (fail-closed) until windows expire. The
//! alternative, evicting the oldest, would let anyone with enough addresses reset
//! their own counters; refusing newcomers costs at most one window of enrollment
//! for new clients while such a flood lasts, and clients already tracked keep their
//! own allowance.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

use crate::peer_limits::AddrKey;

/// Clients tracked at once by default: a few hundred KiB at most.
pub const DEFAULT_MAX_KEYS: usize = 10_000;

pub struct RateLimiter {
    per_window: u32,
    window: Duration,
    max_keys: usize,
    /// Window start and attempts so far, per client.
    seen: HashMap<AddrKey, (Instant, u32)>,
    /// When the oldest window in `seen` ends: until then a full table has nothing to
    /// drop, so a flood of newcomers does not rescan it on every attempt.
    next_expiry: Option<Instant>,
}

impl RateLimiter {
    pub fn new(per_window: u32, window: Duration) -> Self {
        Self::with_max_keys(per_window, window, DEFAULT_MAX_KEYS)
    }

    pub fn with_max_keys(per_window: u32, window: Duration, max_keys: usize) -> Self {
        RateLimiter {
            per_window,
            window,
            max_keys: max_keys.max(1),
            seen: HashMap::new(),
            next_expiry: None,
        }
    }

    /// Counts an attempt; false when the client is over its limit, or is new while
    /// the table is full.
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        let key = AddrKey::of(ip);
        if !self.seen.contains_key(&key) && self.seen.len() >= self.max_keys {
            self.drop_expired(now);
            if self.seen.len() >= self.max_keys {
                return false;
            }
        }
        let window = self.window;
        let entry = self.seen.entry(key).or_insert((now, 0));
        if now.saturating_duration_since(entry.0) >= window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        let allowed = entry.1 <= self.per_window;
        let ends = entry.0 + window;
        self.next_expiry = Some(self.next_expiry.map_or(ends, |e| e.min(ends)));
        allowed
    }

    /// Clients tracked now (for tests and the bound's proof).
    pub fn tracked(&self) -> usize {
        self.seen.len()
    }

    fn drop_expired(&mut self, now: Instant) {
        if self.next_expiry.is_some_and(|e| now < e) {
            return;
        }
        let window = self.window;
        self.seen
            .retain(|_, (start, _)| now.saturating_duration_since(*start) < window);
        self.next_expiry = self.seen.values().map(|(start, _)| *start + window).min();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn limits_per_address_and_window() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(2, MINUTE);
        let a = ip("192.0.2.1");
        let b = ip("192.0.2.2");
        assert!(l.allow(a, t0));
        assert!(l.allow(a, t0));
        assert!(!l.allow(a, t0));
        assert!(l.allow(b, t0));
        assert!(l.allow(a, t0 + MINUTE));
    }

    #[test]
    fn ipv6_is_limited_by_its_64() {
        // The keying itself is tested with AddrKey; here, that the limiter uses it.
        let t0 = Instant::now();
        let mut l = RateLimiter::new(2, MINUTE);
        assert!(l.allow(ip("2001:db8:1:2::1"), t0));
        assert!(l.allow(ip("2001:db8:1:2::2"), t0));
        // A third address of the same /64 shares its allowance.
        assert!(!l.allow(ip("2001:db8:1:2:dead:beef::3"), t0));
        assert!(l.allow(ip("2001:db8:1:3::1"), t0));
        assert_eq!(l.tracked(), 2);
    }

    #[test]
    fn ipv4_mapped_ipv6_counts_as_its_ipv4_address() {
        assert_eq!(
            AddrKey::of(ip("::ffff:192.0.2.7")),
            AddrKey::of(ip("192.0.2.7"))
        );
        let t0 = Instant::now();
        let mut l = RateLimiter::new(1, MINUTE);
        assert!(l.allow(ip("192.0.2.7"), t0));
        assert!(!l.allow(ip("::ffff:192.0.2.7"), t0));
        // Not the /64 of ::ffff:0:0/96, which would lump every IPv4 client together.
        assert!(l.allow(ip("::ffff:192.0.2.8"), t0));
    }

    #[test]
    fn a_full_table_refuses_newcomers_and_keeps_its_bound() {
        let t0 = Instant::now();
        let mut l = RateLimiter::with_max_keys(5, MINUTE, 3);
        for i in 1..=3 {
            assert!(l.allow(ip(&format!("192.0.2.{i}")), t0));
        }
        // A flood of new clients: all refused, the table stays at its bound.
        for i in 0..1000u32 {
            let v6 = std::net::Ipv6Addr::from((0x2001_0db8_u128 << 96) | (u128::from(i) << 64));
            assert!(!l.allow(IpAddr::V6(v6), t0 + Duration::from_secs(1)));
        }
        assert_eq!(l.tracked(), 3);
        // Tracked clients keep their own allowance meanwhile.
        assert!(l.allow(ip("192.0.2.1"), t0 + Duration::from_secs(2)));
        // Once the windows have run out, newcomers are counted again.
        assert!(l.allow(ip("198.51.100.1"), t0 + MINUTE));
        assert!(l.tracked() <= 3);
    }

    #[test]
    fn expired_windows_make_room_one_by_one() {
        let t0 = Instant::now();
        let mut l = RateLimiter::with_max_keys(5, MINUTE, 2);
        assert!(l.allow(ip("192.0.2.1"), t0));
        assert!(l.allow(ip("192.0.2.2"), t0 + Duration::from_secs(30)));
        // At t0 + 60 s the first window has ended, the second has not.
        assert!(l.allow(ip("192.0.2.3"), t0 + MINUTE));
        assert!(!l.allow(ip("192.0.2.4"), t0 + MINUTE));
        assert!(l.allow(ip("192.0.2.4"), t0 + Duration::from_secs(90)));
        assert_eq!(l.tracked(), 2);
    }
}
