//! Reconnect delays: exponential backoff with "equal jitter".
//!
//! Why: after a peer restarts or the network comes back, every node that knew
//! it redials. Without jitter they would all retry in lock-step; without an
//! exponential cap an unreachable peer would be hammered. The dialer in
//! `endpoint.rs` asks [`delay`] for the pause before attempt `n` (0-based).
//!
//! Rule: `base = min(backoff_max, backoff_min * 2^n)`, and the delay is drawn
//! uniformly from `[base/2, base]`. With the defaults (200 ms, 30 s) the
//! expected pauses are 150 ms, 300 ms, 600 ms, … capped at 22.5 s on average.

use std::time::Duration;

use rand::Rng;

/// Pause before reconnect attempt `attempt` (0-based); see the module doc.
pub(crate) fn delay<R: Rng + ?Sized>(
    attempt: u32,
    min: Duration,
    max: Duration,
    rng: &mut R,
) -> Duration {
    let max = max.max(min);
    let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
    let base = min.checked_mul(factor).unwrap_or(max).min(max);
    let half = base / 2;
    let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    let extra = if nanos == 0 {
        0
    } else {
        rng.random_range(0..=nanos)
    };
    half + Duration::from_nanos(extra)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn grows_then_caps_with_jitter_in_range() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        for attempt in 0..64 {
            let base = (min * 2u32.saturating_pow(attempt.min(20))).min(max);
            let d = delay(attempt, min, max, &mut rng);
            assert!(
                d >= base / 2 && d <= base,
                "attempt {attempt}: {d:?} vs {base:?}"
            );
        }
        assert!(delay(0, Duration::ZERO, Duration::ZERO, &mut rng).is_zero());
    }

    #[test]
    fn seeded_rng_is_deterministic() {
        let min = Duration::from_millis(10);
        let max = Duration::from_secs(1);
        let a: Vec<_> = {
            let mut r = rand::rngs::StdRng::seed_from_u64(1);
            (0..8).map(|i| delay(i, min, max, &mut r)).collect()
        };
        let b: Vec<_> = {
            let mut r = rand::rngs::StdRng::seed_from_u64(1);
            (0..8).map(|i| delay(i, min, max, &mut r)).collect()
        };
        assert_eq!(a, b);
    }
}
