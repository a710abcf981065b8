//! Who may hold a connection before saying who they are: the per-address cap on
//! connections not yet authenticated (IPv4 by address, IPv6 by /64, since one host
//! commonly holds a whole /64), the handle a request uses to take its connection
//! out of that count once it presents a valid credential, and the throttle that
//! keeps "limit reached" log lines from flooding the log during an attack.
//! Pure bookkeeping: no I/O, time passed in.

use crate::sync::Locked;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The key one address's unauthenticated connections are counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddrKey {
    V4([u8; 4]),
    /// The upper 64 bits: a host picks freely among the 2^64 addresses of its prefix.
    V6Prefix64(u64),
}

impl AddrKey {
    pub fn of(ip: IpAddr) -> AddrKey {
        match ip {
            IpAddr::V4(v4) => AddrKey::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                // A dual-stack socket shows IPv4 peers as ::ffff:a.b.c.d; they are
                // the same clients as on an IPv4 socket.
                Some(v4) => AddrKey::V4(v4.octets()),
                None => AddrKey::V6Prefix64((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

impl std::fmt::Display for AddrKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AddrKey::V4(o) => write!(f, "{}", std::net::Ipv4Addr::from(*o)),
            AddrKey::V6Prefix64(p) => write!(f, "{}/64", Ipv6Addr::from(u128::from(*p) << 64)),
        }
    }
}

/// Counts unauthenticated connections per [`AddrKey`]; an entry lives only while
/// its count is above zero, so the table is bounded by the connections open.
pub struct UnauthenticatedPerAddress {
    max: usize,
    counts: Mutex<HashMap<AddrKey, usize>>,
}

impl UnauthenticatedPerAddress {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(UnauthenticatedPerAddress {
            max,
            counts: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a new connection from `ip`, or `None` when that address already
    /// holds the maximum of unauthenticated connections.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<UnauthenticatedSlot> {
        let key = AddrKey::of(ip);
        let mut counts = self.counts.locked();
        let n = counts.entry(key).or_default();
        if *n >= self.max {
            if *n == 0 {
                counts.remove(&key);
            }
            return None;
        }
        *n += 1;
        Some(UnauthenticatedSlot {
            table: self.clone(),
            key,
        })
    }

    /// Unauthenticated connections counted for `ip`'s key.
    pub fn count(&self, ip: IpAddr) -> usize {
        let counts = self.counts.locked();
        counts.get(&AddrKey::of(ip)).copied().unwrap_or(0)
    }

    /// Distinct keys with at least one unauthenticated connection.
    pub fn keys(&self) -> usize {
        self.counts.locked().len()
    }

    fn release(&self, key: AddrKey) {
        let mut counts = self.counts.locked();
        if let Some(n) = counts.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&key);
            }
        }
    }
}

/// One connection's place in the per-address count; released when dropped.
pub struct UnauthenticatedSlot {
    table: Arc<UnauthenticatedPerAddress>,
    key: AddrKey,
}

impl Drop for UnauthenticatedSlot {
    fn drop(&mut self) {
        self.table.release(self.key);
    }
}

/// Carried in every request's extensions: the connection's slot in the
/// unauthenticated count, given up the first time a request on it presents a
/// valid credential. Later requests on the same connection find it already gone.
#[derive(Clone, Default)]
pub struct ConnAuth(Arc<Mutex<Option<UnauthenticatedSlot>>>);

impl ConnAuth {
    pub fn new(slot: UnauthenticatedSlot) -> ConnAuth {
        ConnAuth(Arc::new(Mutex::new(Some(slot))))
    }

    /// The connection has proven who it is: it no longer counts against its address.
    pub fn authenticated(&self) {
        let slot = self.0.locked().take();
        drop(slot);
    }

    pub fn is_authenticated(&self) -> bool {
        self.0.locked().is_none()
    }
}

/// At most one log line per `every` for a repeated event; the line reports how
/// many events were left unlogged since the previous one.
pub struct LogThrottle {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogThrottle {
    pub fn new(every: Duration) -> LogThrottle {
        LogThrottle {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(suppressed)` when this event should be logged (with the count of
    /// events swallowed since the last line), `None` when it is swallowed.
    pub fn hit(&self, now: Instant) -> Option<u64> {
        let mut st = self.state.locked();
        let due =
            st.0.is_none_or(|last| now.duration_since(last) >= self.every);
        if due {
            let suppressed = st.1;
            *st = (Some(now), 0);
            Some(suppressed)
        } else {
            st.1 += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_is_keyed_by_its_64_prefix_and_ipv4_by_address() {
        assert_eq!(
            AddrKey::of(ip("2001:db8:1:2:aaaa::1")),
            AddrKey::of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"))
        );
        assert_ne!(
            AddrKey::of(ip("2001:db8:1:2::1")),
            AddrKey::of(ip("2001:db8:1:3::1"))
        );
        assert_ne!(AddrKey::of(ip("10.0.0.1")), AddrKey::of(ip("10.0.0.2")));
        assert_eq!(
            AddrKey::of(ip("::ffff:192.0.2.7")),
            AddrKey::of(ip("192.0.2.7"))
        );
        assert_eq!(
            AddrKey::of(ip("2001:db8:1:2::1")).to_string(),
            "2001:db8:1:2::/64"
        );
        assert_eq!(AddrKey::of(ip("::ffff:192.0.2.7")).to_string(), "192.0.2.7");
    }

    #[test]
    fn cap_counts_per_key_and_frees_on_drop_or_authentication() {
        let t = UnauthenticatedPerAddress::new(2);
        let a1 = t.try_acquire(ip("2001:db8::1")).unwrap();
        let a2 = t.try_acquire(ip("2001:db8::2")).unwrap();
        // The same /64: full.
        assert!(t.try_acquire(ip("2001:db8::ffff")).is_none());
        // Another /64 and IPv4 are counted apart.
        let _b = t.try_acquire(ip("2001:db8:0:1::1")).unwrap();
        let _c = t.try_acquire(ip("192.0.2.1")).unwrap();
        assert_eq!(t.count(ip("2001:db8::9")), 2);
        drop(a1);
        let a3 = t.try_acquire(ip("2001:db8::3")).unwrap();
        let auth = ConnAuth::new(a3);
        assert!(!auth.is_authenticated());
        auth.authenticated();
        auth.clone().authenticated();
        assert!(auth.is_authenticated());
        assert_eq!(t.count(ip("2001:db8::9")), 1);
        drop(a2);
        assert_eq!(t.count(ip("2001:db8::9")), 0);
        // Empty entries are removed: the table holds only addresses with connections.
        assert_eq!(t.keys(), 2);
    }

    #[test]
    fn zero_cap_refuses_without_keeping_an_entry() {
        let t = UnauthenticatedPerAddress::new(0);
        assert!(t.try_acquire(ip("192.0.2.1")).is_none());
        assert_eq!(t.keys(), 0);
    }

    #[test]
    fn log_throttle_logs_once_per_period_with_the_suppressed_count() {
        let th = LogThrottle::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(th.hit(t0), Some(0));
        assert_eq!(th.hit(t0 + Duration::from_millis(10)), None);
        assert_eq!(th.hit(t0 + Duration::from_millis(900)), None);
        assert_eq!(th.hit(t0 + Duration::from_millis(1000)), Some(2));
        assert_eq!(th.hit(t0 + Duration::from_millis(1500)), None);
        assert_eq!(th.hit(t0 + Duration::from_secs(5)), Some(1));
    }
}
