//! The retry schedule: exponential with jitter, capped.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[queue.retry]` in config.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Backoff {
    /// Wait after the first failed attempt, in milliseconds.
    pub base_ms: u64,
    /// Longest wait, in milliseconds.
    pub max_ms: u64,
    /// Random spread, as a fraction of the wait (0.2 = ±20%), so retries do not stampede.
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { base_ms: 2_000, max_ms: 120_000, jitter: 0.2 }
    }
}

impl Backoff {
    /// The wait after attempt number `attempt` (1-based) failed.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self.base_ms.saturating_mul(1u64 << attempt.saturating_sub(1).min(30));
        let capped = exp.min(self.max_ms) as f64;
        let spread = capped * self.jitter.clamp(0.0, 1.0);
        let ms = capped - spread + fastrand::f64() * 2.0 * spread;
        Duration::from_millis(ms.max(0.0) as u64)
    }

    /// The wait after attempt `attempt` failed when the backend asked for `hint` (a rate
    /// limit's `Retry-After`): the longer of the two, the hint capped at `max_ms`.
    pub fn delay_with_hint(&self, attempt: u32, hint: Option<Duration>) -> Duration {
        let backoff = self.delay(attempt);
        match hint {
            Some(h) => backoff.max(h.min(Duration::from_millis(self.max_ms))),
            None => backoff,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_then_caps() {
        let b = Backoff { base_ms: 100, max_ms: 1_000, jitter: 0.0 };
        let d: Vec<u64> = (1..=6).map(|a| b.delay(a).as_millis() as u64).collect();
        assert_eq!(d, [100, 200, 400, 800, 1_000, 1_000]);
        let j = Backoff { jitter: 0.5, ..b };
        for _ in 0..100 {
            let ms = j.delay(1).as_millis();
            assert!((50..=150).contains(&ms), "{ms}");
        }
    }

    #[test]
    fn a_hint_waits_longer_than_the_backoff_but_not_past_the_cap() {
        let b = Backoff { base_ms: 100, max_ms: 1_000, jitter: 0.0 };
        let ms = |attempt, hint: Option<u64>| b.delay_with_hint(attempt, hint.map(Duration::from_millis)).as_millis();
        assert_eq!(ms(1, None), 100);
        assert_eq!(ms(1, Some(700)), 700);
        assert_eq!(ms(3, Some(10)), 400, "a short hint does not shorten the backoff");
        assert_eq!(ms(1, Some(60_000)), 1_000, "capped at max_ms");
    }
}
