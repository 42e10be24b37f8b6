//! How long a relay waits before each reconnect attempt: exponential, capped, and jittered so
//! that the replicas of an app that lost the server together do not all come back at once.

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, SystemTime};

/// The delay before reconnect attempt `attempt` (1-based): `min · 2^(attempt-1)` capped at
/// `max`, then jittered into its upper half by `entropy`.
pub(crate) fn backoff_delay(attempt: u32, min: Duration, max: Duration, entropy: u64) -> Duration {
    let factor = 1u32
        .checked_shl(attempt.saturating_sub(1))
        .unwrap_or(u32::MAX);
    let base = min.saturating_mul(factor).min(max);
    let half = base / 2;
    let jitter_nanos = match u64::try_from(half.as_nanos()) {
        Ok(0) | Err(_) => 0,
        Ok(span) => entropy % (span + 1),
    };
    half + Duration::from_nanos(jitter_nanos)
}

/// Entropy for jitter without a random-number crate: the standard library's randomly keyed
/// hasher over the clock and a salt.
pub(crate) fn entropy(salt: u64) -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    hasher.write_u128(now);
    hasher.write_u64(salt);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn backoff_doubles_within_bounds_with_jitter() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(60));
        for attempt in 1..40 {
            let full = min
                .saturating_mul(1u32.checked_shl(attempt - 1).unwrap_or(u32::MAX))
                .min(max);
            for e in [0, 1, u64::MAX / 3, u64::MAX] {
                let d = backoff_delay(attempt, min, max, e);
                assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
            }
        }
        assert_eq!(backoff_delay(1, min, max, 0), Duration::from_millis(500));
        assert_eq!(backoff_delay(40, min, max, 0), Duration::from_secs(30));
    }

    #[test]
    fn replicas_retrying_together_spread_over_the_upper_half() {
        // What many replicas that lost the server at once compute for the same attempt.
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(60));
        let delays: Vec<Duration> = (0..64)
            .map(|_| backoff_delay(3, min, max, entropy(3)))
            .collect();
        assert!(delays
            .iter()
            .all(|d| *d >= Duration::from_secs(2) && *d <= Duration::from_secs(4)));
        let distinct: HashSet<Duration> = delays.iter().copied().collect();
        assert!(distinct.len() >= 32, "{} distinct delays", distinct.len());
        let spread = *delays.iter().max().unwrap() - *delays.iter().min().unwrap();
        assert!(spread >= Duration::from_secs(1), "spread only {spread:?}");
    }
}
