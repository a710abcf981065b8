//! A node at its limits still serves the web app (issue 16, item 7).
//!
//! Three pieces, all bookkeeping without I/O except [`raise_nofile`]:
//! - [`plan`]: fits the configured caps into the process's open-file limit, so the
//!   relay refuses work itself instead of meeting `EMFILE` at `accept`;
//! - [`Capacity`]: one file-descriptor budget shared by client connections and agent
//!   links. A link upgrade is refused (503 `LINKS_BUSY`) while fewer than
//!   `reserved_api_connections` descriptors are left, so agents are shed before the
//!   web app and operators, whose connections may take the budget to its end;
//! - [`TokenBucket`]: link upgrades accepted at a bounded rate, so a reconnect storm
//!   of thousands of agents does not starve API calls of CPU and the registry lock.
//!
//! The caps are per node: in a cluster each node keeps its own, and the load
//! balancer spreads the refused agents' retries over the others.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::sync::Locked;

/// Descriptors kept out of the budget for everything that is not a client socket:
/// the SQLite registry (database, WAL, shared memory), stdio and the log, the
/// listeners, the metrics listener's own connections (it serves a handful of
/// scrapers), the runtime's epoll and wake-up descriptors, certificate reads, and
/// the short window in which an upgraded connection and its link both hold a slot.
pub const FD_HEADROOM: usize = 256;

/// Below this the relay would serve almost nothing; better to say so at start.
pub const MIN_FD_BUDGET: usize = 64;

/// What a refused link upgrade tells the agent, in seconds. The agent backs off
/// with its own jittered exponential delay; the header is for other clients and
/// for operators reading a trace.
pub const RETRY_AFTER_RATE: u64 = 2;
pub const RETRY_AFTER_FULL: u64 = 30;

/// The caps in force after [`plan`], and what was changed to get there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Client connections and links together.
    pub fd_budget: usize,
    pub max_connections: usize,
    pub max_links: usize,
    pub reserved_api_connections: usize,
    /// One line per cap the operator set and that was lowered: a warning.
    pub warnings: Vec<String>,
    /// One line per default that was lowered: information, since a default that
    /// follows the machine's limit is what the operator asked for by setting none.
    pub notes: Vec<String>,
}

/// The configured caps as they come from the config file.
#[derive(Debug, Clone, Copy)]
pub struct Wanted {
    pub max_connections: usize,
    pub max_links: usize,
    pub reserved_api_connections: usize,
    pub set: crate::config::SetByOperator,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error(
        "the open-file limit is {nofile}: too low for a relay (need at least {need}); \
         raise the hard limit (systemd: LimitNOFILE=65536; shell: ulimit -Hn)"
    )]
    TooLow { nofile: u64, need: usize },
}

/// Fits the caps into `nofile` (the soft open-file limit after [`raise_nofile`]).
/// Connections may use the whole budget; links stop `reserved_api_connections`
/// short of it, so the reserve is always there for API connections.
pub fn plan(nofile: u64, wanted: Wanted) -> Result<Plan, PlanError> {
    let nofile_usize = usize::try_from(nofile).unwrap_or(usize::MAX);
    let fd_budget = nofile_usize.saturating_sub(FD_HEADROOM);
    if fd_budget < MIN_FD_BUDGET {
        return Err(PlanError::TooLow {
            nofile,
            need: FD_HEADROOM + MIN_FD_BUDGET,
        });
    }
    let (mut warnings, mut notes) = (Vec::new(), Vec::new());
    let mut say = |set: bool, line: String| {
        if set {
            warnings.push(line)
        } else {
            notes.push(line)
        }
    };
    let mut reserved = wanted.reserved_api_connections;
    // A reserve that is most of the budget would leave no room for links at all.
    if reserved > fd_budget / 2 {
        reserved = fd_budget / 2;
        say(
            wanted.set.reserved_api_connections,
            format!(
                "capacity.reserved_api_connections lowered from {} to {reserved}: half of the \
             {fd_budget} descriptors the open-file limit {nofile} leaves for clients",
                wanted.reserved_api_connections
            ),
        );
    }
    let mut max_connections = wanted.max_connections;
    if max_connections > fd_budget {
        max_connections = fd_budget;
        say(
            wanted.set.max_connections,
            format!(
                "limits.max_connections lowered from {} to {max_connections}: the open-file \
             limit is {nofile} and {FD_HEADROOM} descriptors stay for the registry, logs \
             and listeners",
                wanted.max_connections
            ),
        );
    }
    let link_room = fd_budget - reserved;
    let mut max_links = wanted.max_links;
    if max_links > link_room {
        max_links = link_room;
        say(
            wanted.set.max_links,
            format!(
                "capacity.max_links lowered from {} to {max_links}: the open-file limit is \
             {nofile}, {FD_HEADROOM} descriptors stay for the relay itself and {reserved} \
             for API connections",
                wanted.max_links
            ),
        );
    }
    Ok(Plan {
        fd_budget,
        max_connections,
        max_links,
        reserved_api_connections: reserved,
        warnings,
        notes,
    })
}

/// The soft and hard open-file limits before and after raising the soft one.
#[derive(Debug, Clone, Copy)]
pub struct NofileRaise {
    pub before: u64,
    pub after: u64,
    pub hard: u64,
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit: a shell start
/// often has a soft limit of 1,024 while the hard one is far higher, and a relay
/// holds one descriptor per router.
pub fn raise_nofile() -> std::io::Result<NofileRaise> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(std::io::Error::from)?;
    }
    let (after, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    Ok(NofileRaise {
        before: soft,
        after,
        hard,
    })
}

/// The soft open-file limit in force now.
pub fn nofile_limit() -> std::io::Result<u64> {
    use nix::sys::resource::{getrlimit, Resource};
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    Ok(soft)
}

/// Why a link upgrade was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkRefusal {
    /// `capacity.max_links` links are up.
    Full,
    /// The descriptor budget is down to the API reserve.
    Reserve,
    /// Over `capacity.max_link_accepts_per_second`.
    Rate,
}

impl LinkRefusal {
    pub fn reason(self) -> &'static str {
        match self {
            LinkRefusal::Full => "max_links",
            LinkRefusal::Reserve => "api_reserve",
            LinkRefusal::Rate => "accept_rate",
        }
    }

    pub fn retry_after_secs(self) -> u64 {
        match self {
            LinkRefusal::Rate => RETRY_AFTER_RATE,
            LinkRefusal::Full | LinkRefusal::Reserve => RETRY_AFTER_FULL,
        }
    }
}

/// A link's hold on the budget; released when the link ends.
pub struct LinkSlot {
    _link: OwnedSemaphorePermit,
    _fd: OwnedSemaphorePermit,
}

/// A client connection's hold on the budget; released when it closes.
pub struct ConnSlot {
    _conn: OwnedSemaphorePermit,
    _fd: OwnedSemaphorePermit,
}

/// Why a connection was dropped at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnRefusal {
    MaxConnections,
    FdBudget,
}

/// The node's budget of client sockets: connections (before any upgrade) and links.
pub struct Capacity {
    budget: usize,
    fds: Arc<Semaphore>,
    connections: Arc<Semaphore>,
    links: Arc<Semaphore>,
    reserved: usize,
    accepts: Mutex<TokenBucket>,
    refused: [AtomicUsize; 3],
}

impl Capacity {
    pub fn new(plan: &Plan, link_accepts_per_second: u32, now: Instant) -> Capacity {
        Capacity {
            budget: plan.fd_budget,
            fds: Arc::new(Semaphore::new(plan.fd_budget)),
            connections: Arc::new(Semaphore::new(plan.max_connections)),
            links: Arc::new(Semaphore::new(plan.max_links)),
            reserved: plan.reserved_api_connections,
            accepts: Mutex::new(TokenBucket::new(link_accepts_per_second, now)),
            refused: Default::default(),
        }
    }

    /// A slot for a connection just accepted, or why there is none.
    pub fn try_connection(&self) -> Result<ConnSlot, ConnRefusal> {
        let conn = self
            .connections
            .clone()
            .try_acquire_owned()
            .map_err(|_| ConnRefusal::MaxConnections)?;
        let fd = self
            .fds
            .clone()
            .try_acquire_owned()
            .map_err(|_| ConnRefusal::FdBudget)?;
        Ok(ConnSlot {
            _conn: conn,
            _fd: fd,
        })
    }

    /// A slot for a new agent link, or why it is refused. The cheap checks come
    /// first so refusals during a storm do not spend the rate's tokens.
    pub fn try_link(&self, now: Instant) -> Result<LinkSlot, LinkRefusal> {
        let r = self.admit_link(now);
        if let Err(why) = r {
            self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn admit_link(&self, now: Instant) -> Result<LinkSlot, LinkRefusal> {
        if self.links.available_permits() == 0 {
            return Err(LinkRefusal::Full);
        }
        // The upgrading connection still holds its own slot, which it gives back
        // once upgraded: the reserve is counted beside it.
        if self.fds.available_permits() <= self.reserved {
            return Err(LinkRefusal::Reserve);
        }
        if !self.accepts.locked().try_take(now) {
            return Err(LinkRefusal::Rate);
        }
        let link = self
            .links
            .clone()
            .try_acquire_owned()
            .map_err(|_| LinkRefusal::Full)?;
        let fd = self
            .fds
            .clone()
            .try_acquire_owned()
            .map_err(|_| LinkRefusal::Reserve)?;
        Ok(LinkSlot {
            _link: link,
            _fd: fd,
        })
    }

    /// Link upgrades refused so far, by reason.
    pub fn refused(&self) -> [(LinkRefusal, u64); 3] {
        [LinkRefusal::Full, LinkRefusal::Reserve, LinkRefusal::Rate]
            .map(|r| (r, self.refused[r as usize].load(Ordering::Relaxed) as u64))
    }

    /// Descriptors of the budget in use (connections and links), and the budget.
    pub fn fds_in_use(&self) -> (usize, usize) {
        (
            self.budget.saturating_sub(self.fds.available_permits()),
            self.budget,
        )
    }
}

/// Tokens refill at `rate` a second up to one second's worth; one per link accepted.
/// A rate of zero turns the limit off.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(per_second: u32, now: Instant) -> TokenBucket {
        TokenBucket {
            rate: f64::from(per_second),
            tokens: f64::from(per_second),
            last: now,
        }
    }

    pub fn try_take(&mut self, now: Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last);
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.rate).min(self.rate.max(1.0));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The longest the accept loop pauses after a failed accept (`EMFILE`, `ENFILE`,
/// `ENOBUFS`): long enough not to spin, short enough that the web app's next
/// connection gets in as soon as a descriptor is free.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted(c: usize, l: usize, r: usize) -> Wanted {
        let all = crate::config::SetByOperator {
            max_connections: true,
            max_links: true,
            reserved_api_connections: true,
        };
        Wanted {
            max_connections: c,
            max_links: l,
            reserved_api_connections: r,
            set: all,
        }
    }

    #[test]
    fn a_large_limit_changes_nothing() {
        let p = plan(1_048_576, wanted(50_000, 50_000, 256)).unwrap();
        assert_eq!(p.max_connections, 50_000);
        assert_eq!(p.max_links, 50_000);
        assert_eq!(p.reserved_api_connections, 256);
        assert_eq!(p.fd_budget, 1_048_576 - FD_HEADROOM);
        assert!(p.warnings.is_empty() && p.notes.is_empty());
    }

    #[test]
    fn lowered_defaults_are_notes_and_lowered_settings_warnings() {
        let mut w = wanted(50_000, 100_000, 256);
        w.set.max_links = false;
        let p = plan(65_536, w).unwrap();
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        assert_eq!(p.notes.len(), 1);
        assert_eq!(p.max_links, 65_536 - 256 - 256);
        w.set.max_links = true;
        assert_eq!(plan(65_536, w).unwrap().warnings.len(), 1);
    }

    #[test]
    fn a_small_limit_lowers_both_caps_and_keeps_the_reserve_for_api() {
        let p = plan(1024, wanted(50_000, 50_000, 256)).unwrap();
        assert_eq!(p.fd_budget, 768);
        assert_eq!(p.max_connections, 768);
        assert_eq!(p.max_links, 768 - 256);
        assert_eq!(p.warnings.len(), 2);
        assert!(p.warnings[0].contains("max_connections lowered from 50000 to 768"));
        assert!(p.warnings[1].contains("max_links lowered from 50000 to 512"));
    }

    #[test]
    fn the_reserve_is_at_most_half_and_a_tiny_limit_is_an_error() {
        let p = plan(456, wanted(100, 100, 1000)).unwrap();
        assert_eq!(p.reserved_api_connections, 100);
        assert_eq!(p.max_links, 100);
        assert!(p.warnings[0].contains("reserved_api_connections lowered"));
        assert!(matches!(
            plan(300, wanted(10, 10, 1)),
            Err(PlanError::TooLow { nofile: 300, .. })
        ));
    }

    #[test]
    fn links_are_refused_at_the_reserve_while_connections_still_get_in() {
        let now = Instant::now();
        let p = Plan {
            fd_budget: 10,
            max_connections: 10,
            max_links: 10,
            reserved_api_connections: 4,
            warnings: vec![],
            notes: vec![],
        };
        let cap = Capacity::new(&p, 0, now);
        let links: Vec<_> = (0..6).map(|_| cap.try_link(now).unwrap()).collect();
        assert_eq!(cap.try_link(now).err(), Some(LinkRefusal::Reserve));
        let conns: Vec<_> = (0..4).map(|_| cap.try_connection().unwrap()).collect();
        assert_eq!(cap.try_connection().err(), Some(ConnRefusal::FdBudget));
        drop(conns);
        drop(links);
        assert_eq!(cap.fds_in_use(), (0, 10));
        assert_eq!(cap.refused()[1], (LinkRefusal::Reserve, 1));
    }

    #[test]
    fn links_have_their_own_cap() {
        let now = Instant::now();
        let p = plan(100_000, wanted(100, 2, 10)).unwrap();
        let cap = Capacity::new(&p, 0, now);
        let _a = cap.try_link(now).unwrap();
        let _b = cap.try_link(now).unwrap();
        assert_eq!(cap.try_link(now).err(), Some(LinkRefusal::Full));
    }

    #[test]
    fn the_bucket_allows_a_second_of_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, t0);
        assert_eq!((0..20).filter(|_| b.try_take(t0)).count(), 10);
        // 100 ms: one token.
        let t1 = t0 + Duration::from_millis(100);
        assert!(b.try_take(t1));
        assert!(!b.try_take(t1));
        // A long pause refills one second's worth, not more.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..20).filter(|_| b.try_take(t2)).count(), 10);
        let mut off = TokenBucket::new(0, t0);
        assert!((0..1000).all(|_| off.try_take(t0)));
    }

    #[test]
    fn the_rate_refuses_after_the_burst() {
        let t0 = Instant::now();
        let p = plan(100_000, wanted(100, 100, 10)).unwrap();
        let cap = Capacity::new(&p, 3, t0);
        let held: Vec<_> = (0..3).map(|_| cap.try_link(t0).unwrap()).collect();
        assert_eq!(cap.try_link(t0).err(), Some(LinkRefusal::Rate));
        assert!(cap.try_link(t0 + Duration::from_millis(400)).is_ok());
        drop(held);
    }
}
