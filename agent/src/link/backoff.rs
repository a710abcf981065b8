//! Reconnect delays and which relay to dial: exponential backoff with full jitter (a
//! uniform pick between zero and the exponential ceiling), reset after a healthy
//! link; the first retry after a lost link spread over `reconnect_spread` so a fleet
//! does not come back in the same second; the relay list walked in order, staying on
//! the one that works. Pure: the caller supplies the random numbers and the
//! durations.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct BackoffConfig {
    pub base: Duration,
    pub cap: Duration,
    /// A link that stayed up this long resets the backoff.
    pub healthy_after: Duration,
    /// The first connection waits a random delay up to this, so a fleet does not
    /// reconnect in the same second after a relay restart or a power cut.
    pub start_delay_max: Duration,
    /// The first retry after a lost link waits a random delay up to this: 100,000
    /// routers losing one relay at once arrive over this window, not in one second.
    /// The price: a router may stay offline this long after a relay restart.
    pub reconnect_spread: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
            healthy_after: Duration::from_secs(60),
            start_delay_max: Duration::from_secs(10),
            reconnect_spread: Duration::from_secs(30),
        }
    }
}

#[derive(Debug)]
pub struct Backoff {
    config: BackoffConfig,
    failures: u32,
}

impl Backoff {
    pub fn new(config: BackoffConfig) -> Self {
        Backoff {
            config,
            failures: 0,
        }
    }

    /// The ceiling for the next wait: base·2^failures, at most the cap.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(20)).unwrap_or(u32::MAX);
        self.config.base.saturating_mul(factor).min(self.config.cap)
    }

    /// The next delay for a uniform random `r` in [0, 1); counts one more failure.
    pub fn next_delay(&mut self, r: f64) -> Duration {
        let d = self.ceiling().mul_f64(r.clamp(0.0, 1.0));
        self.failures = self.failures.saturating_add(1);
        d
    }

    /// Called when a link ends: a link that lasted long enough starts over.
    pub fn link_ended(&mut self, lasted: Duration) {
        if lasted >= self.config.healthy_after {
            self.failures = 0;
        }
    }

    pub fn start_delay(&self, r: f64) -> Duration {
        self.config.start_delay_max.mul_f64(r.clamp(0.0, 1.0))
    }
}

/// How the last attempt ended, for [`Retry::after`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// A link was up this long, then lost: the relay (or the way to it) went away.
    Lost { lasted: Duration },
    /// The dial or the upgrade failed: this relay is down, refusing, or unreachable.
    Failed,
    /// The relay refused the link (`LINKS_BUSY` with `Retry-After`, or
    /// `RELAY_DRAINING`): the next relay at once; a round refused throughout waits
    /// at least the longest `Retry-After` (at most the backoff cap).
    Refused { retry_after: Duration },
    /// The link was dropped on purpose (the WAN came back, `reconnect`): same relay,
    /// at once.
    Redial,
    /// The link's relay drained and no other relay took the link while it did: the
    /// next relay at once, the drained one last.
    GoElsewhere,
}

/// The retry policy over a list of relays: which one to dial next and after how
/// long. A relay that works is kept (sticky); a failure moves to the next one at
/// once, and only a whole round of failures waits the backoff, so a dead relay
/// costs one connect attempt, not a backoff period.
#[derive(Debug)]
pub struct Retry {
    backoff: Backoff,
    relays: usize,
    current: usize,
    /// Relays that failed in a row since the last link or full round.
    failed: usize,
    /// The longest `Retry-After` of this round's refusals.
    retry_after: Duration,
}

impl Retry {
    pub fn new(config: BackoffConfig, relays: usize) -> Self {
        Retry {
            backoff: Backoff::new(config),
            relays: relays.max(1),
            current: 0,
            failed: 0,
            retry_after: Duration::ZERO,
        }
    }

    /// The link moved to relay `i` while up (a drain): stay there from now on.
    pub fn moved_to(&mut self, i: usize) {
        self.current = i % self.relays;
        self.failed = 0;
        self.retry_after = Duration::ZERO;
    }

    /// The index of the relay to dial next.
    pub fn current(&self) -> usize {
        self.current
    }

    /// Moves on after `attempt`; the wait before the next dial, for a uniform
    /// random `r` in [0, 1).
    pub fn after(&mut self, attempt: Attempt, r: f64) -> Duration {
        match attempt {
            Attempt::Lost { lasted } => {
                self.backoff.link_ended(lasted);
                self.failed = 0;
                self.retry_after = Duration::ZERO;
                // Every router of a lost relay gets here in the same instant: spread
                // them, and never wait less than a flapping link's backoff.
                let spread = self.backoff.config.reconnect_spread;
                self.backoff
                    .next_delay(r)
                    .max(spread.mul_f64(r.clamp(0.0, 1.0)))
            }
            Attempt::Redial => Duration::ZERO,
            Attempt::GoElsewhere => {
                self.failed = 1;
                self.retry_after = Duration::ZERO;
                self.rotate();
                Duration::ZERO
            }
            Attempt::Failed => self.refused(Duration::ZERO, r),
            Attempt::Refused { retry_after } => self.refused(retry_after, r),
        }
    }

    fn refused(&mut self, retry_after: Duration, r: f64) -> Duration {
        let cap = self.backoff.config.cap;
        self.retry_after = self.retry_after.max(retry_after.min(cap));
        self.failed += 1;
        self.rotate();
        if self.failed < self.relays {
            return Duration::ZERO;
        }
        self.failed = 0;
        let wait = std::mem::take(&mut self.retry_after);
        self.backoff.next_delay(r).max(wait)
    }

    fn rotate(&mut self) {
        self.current = (self.current + 1) % self.relays;
    }
}

/// A uniform random number in [0, 1) from the system's generator.
pub fn random_unit() -> f64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn ceiling_doubles_to_the_cap() {
        let mut b = Backoff::new(BackoffConfig::default());
        let ceilings: Vec<u64> = (0..9)
            .map(|_| {
                let c = b.ceiling().as_secs();
                b.next_delay(0.5);
                c
            })
            .collect();
        assert_eq!(ceilings, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn full_jitter_spans_zero_to_ceiling() {
        let mut b = Backoff::new(BackoffConfig::default());
        for _ in 0..3 {
            b.next_delay(0.0);
        }
        assert_eq!(b.next_delay(0.0), Duration::ZERO);
        let mut b2 = Backoff::new(BackoffConfig::default());
        for _ in 0..3 {
            b2.next_delay(0.0);
        }
        assert_eq!(
            b2.next_delay(0.999_999),
            Duration::from_secs(8).mul_f64(0.999_999)
        );
    }

    #[test]
    fn healthy_link_resets_short_one_does_not() {
        let mut b = Backoff::new(BackoffConfig::default());
        for _ in 0..5 {
            b.next_delay(0.5);
        }
        b.link_ended(30 * S);
        assert_eq!(b.ceiling(), 32 * S);
        b.link_ended(60 * S);
        assert_eq!(b.ceiling(), S);
    }

    #[test]
    fn many_failures_do_not_overflow() {
        let mut b = Backoff::new(BackoffConfig::default());
        for _ in 0..10_000 {
            b.next_delay(1.0);
        }
        assert_eq!(b.ceiling(), 60 * S);
    }

    /// A small seeded generator (xorshift64*), so the distribution tests are
    /// deterministic.
    fn seeded(mut x: u64) -> impl FnMut() -> f64 {
        move || {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    fn spread(secs: u64) -> BackoffConfig {
        BackoffConfig {
            reconnect_spread: Duration::from_secs(secs),
            ..BackoffConfig::default()
        }
    }

    #[test]
    fn first_retry_after_a_lost_link_is_spread_over_the_window() {
        let mut rng = seeded(0x5eed);
        let window = 30 * S;
        let mut per_second = [0u32; 30];
        let n = 100_000;
        for _ in 0..n {
            let mut r = Retry::new(spread(30), 1);
            let d = r.after(Attempt::Lost { lasted: 3600 * S }, rng());
            assert!(d < window, "{d:?}");
            per_second[d.as_secs() as usize] += 1;
        }
        // Uniform: each second holds about 1/30 of the fleet, never 1/10 of it.
        let (lo, hi) = (n / 30 * 9 / 10, n / 30 * 11 / 10);
        for (s, c) in per_second.iter().enumerate() {
            assert!((lo..=hi).contains(c), "second {s}: {c} of {n}");
        }
    }

    #[test]
    fn the_window_bounds_come_from_r() {
        let mut r = Retry::new(spread(30), 2);
        assert_eq!(
            r.after(Attempt::Lost { lasted: 90 * S }, 0.0),
            Duration::ZERO
        );
        let mut r = Retry::new(spread(30), 2);
        assert_eq!(r.after(Attempt::Lost { lasted: 90 * S }, 0.5), 15 * S);
        // No spread configured: today's backoff, within its 1 s ceiling.
        let mut r = Retry::new(spread(0), 2);
        assert!(r.after(Attempt::Lost { lasted: 90 * S }, 0.999) < S);
    }

    #[test]
    fn a_flapping_link_waits_at_least_its_backoff() {
        let mut r = Retry::new(spread(2), 1);
        for _ in 0..6 {
            r.after(Attempt::Failed, 0.5);
        }
        // Ceiling 64 s → cap 60 s; r = 0.5 → 30 s, more than the 2 s window.
        assert_eq!(r.after(Attempt::Lost { lasted: S }, 0.5), 30 * S);
    }

    #[test]
    fn failures_rotate_in_order_and_only_a_full_round_waits() {
        let mut r = Retry::new(spread(30), 3);
        let mut seen = vec![r.current()];
        let mut waits = Vec::new();
        for _ in 0..6 {
            waits.push(r.after(Attempt::Failed, 0.5));
            seen.push(r.current());
        }
        assert_eq!(seen, [0, 1, 2, 0, 1, 2, 0]);
        // Rounds back off 0.5 s, then 1 s (ceilings 1 s, 2 s).
        let z = Duration::ZERO;
        assert_eq!(waits, [z, z, S / 2, z, z, S]);
    }

    #[test]
    fn a_working_relay_is_kept() {
        let mut r = Retry::new(spread(30), 3);
        r.after(Attempt::Failed, 0.5);
        assert_eq!(r.current(), 1);
        // Lost after working, redialled: still the same relay.
        r.after(Attempt::Lost { lasted: 90 * S }, 0.5);
        assert_eq!(r.current(), 1);
        assert_eq!(r.after(Attempt::Redial, 0.5), Duration::ZERO);
        assert_eq!(r.current(), 1);
        // The lost link reset the round: two more failures do not wait yet.
        assert_eq!(r.after(Attempt::Failed, 0.5), Duration::ZERO);
        assert_eq!(r.after(Attempt::Failed, 0.5), Duration::ZERO);
        assert_eq!(r.current(), 0);
    }

    #[test]
    fn go_elsewhere_moves_on_without_waiting() {
        let mut r = Retry::new(spread(30), 2);
        assert_eq!(r.after(Attempt::GoElsewhere, 0.9), Duration::ZERO);
        assert_eq!(r.current(), 1);
        // The other relay failing too completes the round: now it backs off.
        assert!(r.after(Attempt::Failed, 0.9) > Duration::ZERO);
        // One relay that keeps saying "elsewhere" cannot make a busy loop.
        let mut one = Retry::new(spread(30), 1);
        assert_eq!(one.after(Attempt::GoElsewhere, 0.9), Duration::ZERO);
        assert!(one.after(Attempt::Failed, 0.9) > Duration::ZERO);
    }

    #[test]
    fn refusals_move_on_at_once_and_a_refused_round_waits_the_longest_retry_after() {
        let mut r = Retry::new(spread(30), 3);
        let busy = |s| Attempt::Refused { retry_after: s * S };
        assert_eq!(r.after(busy(2), 0.1), Duration::ZERO);
        assert_eq!(r.current(), 1);
        // Draining: no Retry-After, still the next relay at once.
        assert_eq!(r.after(busy(0), 0.1), Duration::ZERO);
        assert_eq!(r.current(), 2);
        // Every relay refused: at least the longest Retry-After (2 s), though the
        // backoff alone would be 0.1 s.
        assert_eq!(r.after(busy(1), 0.1), 2 * S);
        assert_eq!(r.current(), 0);
        // The wait is the round's: the next round starts from nothing.
        assert_eq!(r.after(Attempt::Failed, 0.1), Duration::ZERO);
        assert_eq!(r.after(Attempt::Failed, 0.1), Duration::ZERO);
        assert!(r.after(Attempt::Failed, 0.1) < S);
        // A relay asking for an hour gets the backoff cap (60 s).
        let mut one = Retry::new(spread(30), 1);
        assert_eq!(one.after(busy(3600), 0.1), 60 * S);
        // A backoff longer than Retry-After wins.
        let mut one = Retry::new(spread(30), 1);
        for _ in 0..6 {
            one.after(Attempt::Failed, 0.5);
        }
        assert_eq!(one.after(busy(2), 0.5), 30 * S);
    }

    #[test]
    fn two_draining_relays_cannot_make_a_busy_loop() {
        let mut r = Retry::new(spread(30), 2);
        let draining = Attempt::Refused {
            retry_after: Duration::ZERO,
        };
        assert_eq!(r.after(draining, 0.5), Duration::ZERO);
        assert!(r.after(draining, 0.5) > Duration::ZERO);
    }

    #[test]
    fn a_link_moved_by_a_drain_stays_on_its_new_relay() {
        let mut r = Retry::new(spread(30), 3);
        r.after(Attempt::Refused { retry_after: 5 * S }, 0.5);
        r.moved_to(2);
        assert_eq!(r.current(), 2);
        // The move started a new round: the earlier refusal is forgotten.
        assert_eq!(r.after(Attempt::Failed, 0.1), Duration::ZERO);
        assert_eq!(r.after(Attempt::Failed, 0.1), Duration::ZERO);
        assert!(r.after(Attempt::Failed, 0.1) < S);
    }

    #[test]
    fn random_unit_is_in_range() {
        for _ in 0..100 {
            let r = random_unit();
            assert!((0.0..1.0).contains(&r));
        }
    }
}
