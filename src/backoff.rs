//! The one backoff policy for everything flowledger retries: a failed step
//! (its wait is recorded as the step's `retry_in_ms`), a result callback, a
//! read or append of the log, the JetStream setup while a cluster forms, the
//! Vault token renewal, and the memory peers.
//!
//! A [`Backoff`] is plain data: attempt n waits
//! `min(base * multiplier^(n-1), max) * (1 ± jitter)`. Loops do not sleep
//! by hand: they hand the policy to [`backon`]'s `Retryable::retry`
//! (`Backoff` is a `backon::BackoffBuilder`; `.build().take(n)` limits the
//! retries), which owns the sleeping, the `when` (what is worth another
//! try) and the `notify` (the log line before each wait).

use std::time::{Duration, Instant};

/// Exponential backoff with jitter: attempt n waits
/// `min(base * multiplier^(n-1), max) * (1 ± jitter)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The wait after the first failed attempt.
    pub base: Duration,
    /// What each further failed attempt multiplies the wait by.
    pub multiplier: f64,
    /// The longest wait before jitter.
    pub max: Duration,
    /// 0.2 spreads each delay by ±20%; 0 gives the same waits every time.
    pub jitter: f64,
}

impl Backoff {
    /// `base`, doubling up to `max`, without jitter.
    pub const fn doubling(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            multiplier: 2.0,
            max,
            jitter: 0.0,
        }
    }

    /// The same policy starting from `base_ms` when given (a registry
    /// step's `backoff_ms`).
    pub fn with_base_ms(self, base_ms: Option<u64>) -> Self {
        Backoff {
            base: base_ms.map_or(self.base, Duration::from_millis),
            ..self
        }
    }

    /// The wait after failed attempt `attempt` (1-based; 0 counts as 1).
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = self.base.as_secs_f64();
        // attempts past i32::MAX keep the largest exponent (`as` would wrap
        // to a negative one: a near-zero wait)
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let raw = (base * self.multiplier.powi(exponent)).min(self.max.as_secs_f64());
        let spread = if self.jitter == 0.0 {
            1.0
        } else {
            1.0 + self.jitter * (2.0 * fastrand::f64() - 1.0)
        };
        // NaN or infinite settings give the maximum, never a panic
        Duration::try_from_secs_f64((raw * spread).max(0.0)).unwrap_or(self.max)
    }
}

/// The waits of a [`Backoff`], one per failed attempt, without end (take
/// what a loop allows with [`Iterator::take`]).
#[derive(Debug, Clone)]
pub struct Delays {
    policy: Backoff,
    attempt: u32,
}

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        self.attempt = self.attempt.saturating_add(1);
        Some(self.policy.delay(self.attempt))
    }
}

impl Backoff {
    /// The waits until `deadline`, each cut to the time left; none once it
    /// has passed (the loop then gives up with the last error).
    pub fn until(self, deadline: Instant) -> Until {
        Until {
            delays: backon::BackoffBuilder::build(self),
            deadline,
        }
    }
}

/// The waits of a [`Backoff`] until a deadline ([`Backoff::until`]).
#[derive(Debug, Clone)]
pub struct Until {
    delays: Delays,
    deadline: Instant,
}

impl Iterator for Until {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        self.delays.next().map(|d| d.min(left))
    }
}

impl backon::BackoffBuilder for Backoff {
    type Backoff = Delays;

    fn build(self) -> Delays {
        Delays {
            policy: self,
            attempt: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backon::{BackoffBuilder, Retryable};

    #[test]
    fn doubling_reaches_the_maximum_and_stays() {
        let d: Vec<_> = Backoff::doubling(Duration::from_millis(100), Duration::from_millis(500))
            .build()
            .take(6)
            .map(|d| d.as_millis())
            .collect();
        assert_eq!(d, [100, 200, 400, 500, 500, 500]);
    }

    #[test]
    fn jitter_stays_within_its_spread() {
        let p = Backoff {
            base: Duration::from_secs(5),
            multiplier: 3.0,
            max: Duration::from_secs(300),
            jitter: 0.2,
        };
        for _ in 0..100 {
            let d1 = p.delay(1).as_secs_f64();
            let d2 = p.delay(2).as_secs_f64();
            assert!((4.0..=6.0).contains(&d1), "{d1}");
            assert!((12.0..=18.0).contains(&d2), "{d2}");
        }
        let d = p.with_base_ms(Some(10)).delay(1).as_secs_f64();
        assert!((0.008..=0.012).contains(&d), "{d}");
    }

    #[test]
    fn waits_until_a_deadline_are_cut_to_the_time_left() {
        let p = Backoff::doubling(Duration::from_secs(10), Duration::from_secs(10));
        let mut until = p.until(Instant::now() + Duration::from_millis(300));
        let first = until.next().expect("time is left");
        assert!(first <= Duration::from_millis(300), "{first:?}");
        assert_eq!(p.until(Instant::now()).next(), None, "no time left");
    }

    #[tokio::test(start_paused = true)]
    async fn backon_retries_as_often_as_the_policy_allows() {
        let calls = std::sync::atomic::AtomicU32::new(0);
        let r: Result<(), &str> = (|| async {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err("down")
        })
        .retry(
            Backoff::doubling(Duration::from_millis(10), Duration::from_millis(40))
                .build()
                .take(3),
        )
        .await;
        assert_eq!(r, Err("down"));
        assert_eq!(
            calls.load(std::sync::atomic::Ordering::SeqCst),
            4,
            "one try and three retries"
        );
    }
}
