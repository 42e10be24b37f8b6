//! Counters and the commit-to-delivery latency histogram.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

use crate::event::ResetReason;

/// [`Gap::kind`](crate::Gap::kind) of every kind, in the order of [`Metrics::gaps_by_kind`].
pub(crate) const GAP_KINDS: [&str; 4] = ["pruned", "unreadable", "rewound", "missing"];

/// [`ResetReason::kind`] of every reason, in the order of [`Metrics::resets_by_reason`].
pub(crate) const RESET_REASONS: [&str; 4] = ["malformed", "expired", "other_server_run", "ahead"];

/// Upper bounds of the latency buckets, in microseconds; a last bucket takes the rest.
const BUCKETS_US: [u64; 20] = [
    100,
    250,
    500,
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    300_000_000,
    3_600_000_000,
];

/// The live counters (shared by the listener task and the handle).
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub received: AtomicU64,
    pub delivered: AtomicU64,
    pub duplicates: AtomicU64,
    pub skipped_own_origin: AtomicU64,
    pub caught_up: AtomicU64,
    pub lagged: AtomicU64,
    pub decode_errors: AtomicU64,
    pub gaps: AtomicU64,
    pub reconnects: AtomicU64,
    pub advances: AtomicU64,
    pub forged: AtomicU64,
    pub rewinds: AtomicU64,
    pub resumes: AtomicU64,
    pub resume_queries: AtomicU64,
    pub resets: AtomicU64,
    pub prune_turns: AtomicU64,
    pub prunes: AtomicU64,
    pub rows_pruned: AtomicU64,
    /// `gaps`, by [`GAP_KINDS`].
    pub gaps_by_kind: [AtomicU64; GAP_KINDS.len()],
    /// `resets`, by [`RESET_REASONS`].
    pub resets_by_reason: [AtomicU64; RESET_REASONS.len()],
    latency: [AtomicU64; BUCKETS_US.len() + 1],
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Counts a gap reported to subscribers, in the total and by its [`Gap::kind`](crate::Gap::kind).
    pub fn count_gap(&self, kind: &str) {
        Metrics::add(&self.gaps, 1);
        if let Some(i) = GAP_KINDS.iter().position(|&known| known == kind) {
            Metrics::add(&self.gaps_by_kind[i], 1);
        }
    }

    /// Counts a resume that could not go on exactly, in the total and by its reason.
    pub fn count_reset(&self, reason: &ResetReason) {
        Metrics::add(&self.resets, 1);
        if let Some(i) = RESET_REASONS.iter().position(|&kind| kind == reason.kind()) {
            Metrics::add(&self.resets_by_reason[i], 1);
        }
    }

    /// Records the delay from `created_at` (the database's clock) to now (this host's clock);
    /// clock skew that puts it in the future counts as zero.
    pub fn record_latency(&self, created_at: SystemTime) {
        let us = SystemTime::now()
            .duration_since(created_at)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let bucket = BUCKETS_US.partition_point(|&bound| bound < us);
        self.latency[bucket].fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let buckets: Vec<u64> = self.latency.iter().map(|b| b.load(Relaxed)).collect();
        MetricsSnapshot {
            received: self.received.load(Relaxed),
            delivered: self.delivered.load(Relaxed),
            duplicates: self.duplicates.load(Relaxed),
            skipped_own_origin: self.skipped_own_origin.load(Relaxed),
            caught_up: self.caught_up.load(Relaxed),
            lagged: self.lagged.load(Relaxed),
            decode_errors: self.decode_errors.load(Relaxed),
            gaps: self.gaps.load(Relaxed),
            reconnects: self.reconnects.load(Relaxed),
            advances: self.advances.load(Relaxed),
            forged: self.forged.load(Relaxed),
            rewinds: self.rewinds.load(Relaxed),
            resumes: self.resumes.load(Relaxed),
            resume_queries: self.resume_queries.load(Relaxed),
            resets: self.resets.load(Relaxed),
            prune_turns: self.prune_turns.load(Relaxed),
            prunes: self.prunes.load(Relaxed),
            rows_pruned: self.rows_pruned.load(Relaxed),
            latency: Latency { buckets },
        }
    }
}

/// A copy of the relay's counters at one moment. All counts are since the relay was built.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MetricsSnapshot {
    /// `pg_outbox` notifications read from the connection. In worker mode one notification
    /// carries a batch of events, so this can be far below `delivered`.
    pub received: u64,
    /// Events handed to the fan-out (once per event, whatever the number of subscribers).
    pub delivered: u64,
    /// Notifications or rows dropped because the event was already delivered.
    pub duplicates: u64,
    /// Events not delivered because this relay published them (its own origin).
    pub skipped_own_origin: u64,
    /// Events delivered from the outbox table without their notification having been seen: by
    /// the catch-up after a reconnect (missed while disconnected) or by an idle sweep (a lost or
    /// undecodable notification). Rows read ahead of their notification while fetching
    /// references are not counted.
    pub caught_up: u64,
    /// Events not queued for subscribers whose buffer was full (summed over subscribers):
    /// each such subscriber reads them from the outbox once it has read its queue.
    pub lagged: u64,
    /// Notifications that did not decode (logged and skipped; the row is caught up by the next
    /// advance).
    pub decode_errors: u64,
    /// Gaps reported (rows pruned or removed before the relay read them).
    pub gaps: u64,
    /// Successful reconnections after a lost connection.
    pub reconnects: u64,
    /// Advance queries run (catch-up, batched fetches of references, sweeps).
    pub advances: u64,
    /// Notifications `outbox_publish` did not send (any role that can connect can `NOTIFY
    /// pg_outbox`): unsealed where everything is sealed, sealed with no key the database gave
    /// the relay, or naming a transaction that never committed or a row that never was. Each is
    /// dropped: subscribers hear nothing of it.
    pub forged: u64,
    /// Connections that reached a new run of the server (a restart, a crash, a failover, a
    /// restore) or saw its transaction ids go back, after which the relay read again from the
    /// floor of the history the server still holds (see [`Gap::Rewound`](crate::Gap::Rewound)).
    pub rewinds: u64,
    /// Subscriptions that asked to resume from a position
    /// ([`Relay::subscribe_from`](crate::Relay::subscribe_from)) and were answered.
    pub resumes: u64,
    /// Catch-up queries run for them: resumes that arrive together share one.
    pub resume_queries: u64,
    /// Resumes that could not go on exactly from their position and got a
    /// [`Delivery::Reset`](crate::Delivery::Reset).
    pub resets: u64,
    /// Turns this relay took at pruning ([`RelayBuilder::prune_every`](crate::RelayBuilder::prune_every)).
    pub prune_turns: u64,
    /// Turns in which it was elected and pruned (in the others, another relay pruned).
    pub prunes: u64,
    /// Rows it pruned.
    pub rows_pruned: u64,
    /// Commit-to-delivery latency of delivered events.
    pub latency: Latency,
}

/// A fixed-bucket histogram of commit-to-delivery latency (`created_at` to delivery).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Latency {
    buckets: Vec<u64>,
}

impl Latency {
    /// Each bucket's upper bound (`None`: unbounded) with how many latencies fell in it.
    #[cfg(feature = "metrics")]
    pub(crate) fn buckets(&self) -> impl Iterator<Item = (Option<Duration>, u64)> + '_ {
        self.buckets.iter().enumerate().map(|(i, &n)| {
            let bound = BUCKETS_US.get(i).map(|&us| Duration::from_micros(us));
            (bound, n)
        })
    }

    /// How many latencies were recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The latency under which a fraction `q` (0.0..=1.0) of events were delivered, as the upper
    /// bound of its bucket (so an over-estimate by at most the bucket's width); `None` before any.
    pub fn percentile(&self, q: f64) -> Option<Duration> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let us = BUCKETS_US.get(i).copied().unwrap_or(u64::MAX);
                return Some(Duration::from_micros(us));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_bucket_bounds() {
        let metrics = Metrics::default();
        assert_eq!(metrics.snapshot().latency.percentile(0.5), None);
        let now = SystemTime::now();
        for _ in 0..98 {
            metrics.record_latency(now);
        }
        metrics.record_latency(now - Duration::from_secs(2));
        metrics.record_latency(now + Duration::from_secs(5)); // skew: zero
        let latency = metrics.snapshot().latency;
        assert_eq!(latency.count(), 100);
        assert!(latency.percentile(0.5).unwrap() <= Duration::from_millis(10));
        assert!(latency.percentile(0.99).unwrap() <= Duration::from_millis(10));
        assert_eq!(
            latency.percentile(1.0),
            Some(Duration::from_micros(2_500_000))
        );
    }
}
