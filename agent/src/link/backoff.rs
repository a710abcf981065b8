//! Reconnect delays: exponential backoff with full jitter (a uniform pick between
//! zero and the exponential ceiling), reset after a healthy link. Pure: the caller
//! supplies the random numbers.

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
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
            healthy_after: Duration::from_secs(60),
            start_delay_max: Duration::from_secs(10),
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

    #[test]
    fn random_unit_is_in_range() {
        for _ in 0..100 {
            let r = random_unit();
            assert!((0.0..1.0).contains(&r));
        }
    }
}
