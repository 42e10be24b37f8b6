//! The relay's metrics in the [`metrics`](::metrics) facade (feature `metrics`), for whatever
//! exporter the app installed: Prometheus (`metrics-exporter-prometheus`), OpenTelemetry, ...
//!
//! A task copies the relay's own counters to the facade once a second (and once more when the
//! relay stops), rather than the hot path recording each event twice: delivering costs the same
//! with the feature as without, and a scrape is at most a second behind
//! [`Relay::metrics`](crate::Relay::metrics).
//!
//! Names follow Prometheus' conventions, each with the label `relay` (the relay's
//! `application_name`); no label carries a user id, a channel or anything else unbounded:
//!
//! | name | type | what |
//! |---|---|---|
//! | `pg_outbox_relay_notifications_received_total` | counter | `pg_outbox` notifications read |
//! | `pg_outbox_relay_events_delivered_total` | counter | events handed to the subscribers |
//! | `pg_outbox_relay_events_caught_up_total` | counter | of those, read from the table without their notification |
//! | `pg_outbox_relay_events_duplicate_total` | counter | notifications or rows already delivered |
//! | `pg_outbox_relay_events_own_origin_total` | counter | events this relay published, not delivered |
//! | `pg_outbox_relay_events_lagged_total` | counter | events not queued for slow subscribers, which read them from the outbox |
//! | `pg_outbox_relay_decode_errors_total` | counter | notifications or rows that did not decode |
//! | `pg_outbox_relay_forged_notifications_total` | counter | notifications `outbox_publish` did not send (dropped) |
//! | `pg_outbox_relay_gaps_total{kind}` | counter | gaps reported, by [`Gap::kind`](crate::Gap::kind) |
//! | `pg_outbox_relay_resumes_total` | counter | subscriptions resumed from a position |
//! | `pg_outbox_relay_resets_total{reason}` | counter | resumes that could not go on exactly, by [`ResetReason::kind`](crate::ResetReason::kind) |
//! | `pg_outbox_relay_queries_total{query}` | counter | `advance` and `resume` queries run |
//! | `pg_outbox_relay_reconnects_total` | counter | connections made again after a loss |
//! | `pg_outbox_relay_rewinds_total` | counter | new runs of the server read again from their floor |
//! | `pg_outbox_relay_health{state}` | gauge | 1 for the current [`Health`] (`not_started`, `listening`, `reconnecting`, `stopped`), 0 for the others |
//! | `pg_outbox_relay_subscriptions` | gauge | open subscriptions |
//! | `pg_outbox_relay_queued_events` | gauge | events waiting in the subscriptions' queues |
//! | `pg_outbox_relay_lag_seconds` | histogram | commit (`created_at`) to delivery, each event at its bucket's upper bound ([`LAG_SECONDS_BUCKETS`]) |

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Weak;
use std::time::Duration;

use ::metrics::{describe_counter, describe_gauge, describe_histogram, Counter, Gauge, Histogram};
use tokio::sync::watch;

use crate::health::Health;
use crate::metrics::{MetricsSnapshot, GAP_KINDS, RESET_REASONS};
use crate::shared::Shared;

/// How often the relay's counters are copied to the facade.
const INTERVAL: Duration = Duration::from_secs(1);

/// The bounds, in seconds, of the relay's own latency buckets (the last bucket is unbounded):
/// give them to the exporter for `pg_outbox_relay_lag_seconds` (e.g.
/// `PrometheusBuilder::set_buckets_for_metric`) so that its buckets are exact.
pub const LAG_SECONDS_BUCKETS: [f64; 20] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
];

const HEALTH_STATES: [&str; 4] = ["not_started", "listening", "reconnecting", "stopped"];

fn state(health: &Health) -> &'static str {
    match health {
        Health::NotStarted => "not_started",
        Health::Listening => "listening",
        Health::Reconnecting { .. } => "reconnecting",
        Health::Stopped => "stopped",
    }
}

/// The facade's handles for one relay.
struct Handles {
    received: Counter,
    delivered: Counter,
    caught_up: Counter,
    duplicates: Counter,
    own_origin: Counter,
    lagged: Counter,
    decode_errors: Counter,
    forged: Counter,
    gaps: [Counter; GAP_KINDS.len()],
    resumes: Counter,
    resets: [Counter; RESET_REASONS.len()],
    advances: Counter,
    resume_queries: Counter,
    reconnects: Counter,
    rewinds: Counter,
    health: [Gauge; HEALTH_STATES.len()],
    subscriptions: Gauge,
    queued: Gauge,
    lag: Histogram,
}

impl Handles {
    fn register(relay: &str) -> Handles {
        describe();
        let counter = |name: &'static str| ::metrics::counter!(name, "relay" => relay.to_owned());
        let labelled = |name: &'static str, label: &'static str, value: &'static str| ::metrics::counter!(name, "relay" => relay.to_owned(), label => value);
        let gauge = |name: &'static str| ::metrics::gauge!(name, "relay" => relay.to_owned());
        Handles {
            received: counter("pg_outbox_relay_notifications_received_total"),
            delivered: counter("pg_outbox_relay_events_delivered_total"),
            caught_up: counter("pg_outbox_relay_events_caught_up_total"),
            duplicates: counter("pg_outbox_relay_events_duplicate_total"),
            own_origin: counter("pg_outbox_relay_events_own_origin_total"),
            lagged: counter("pg_outbox_relay_events_lagged_total"),
            decode_errors: counter("pg_outbox_relay_decode_errors_total"),
            forged: counter("pg_outbox_relay_forged_notifications_total"),
            gaps: GAP_KINDS.map(|kind| labelled("pg_outbox_relay_gaps_total", "kind", kind)),
            resumes: counter("pg_outbox_relay_resumes_total"),
            resets: RESET_REASONS
                .map(|reason| labelled("pg_outbox_relay_resets_total", "reason", reason)),
            advances: labelled("pg_outbox_relay_queries_total", "query", "advance"),
            resume_queries: labelled("pg_outbox_relay_queries_total", "query", "resume"),
            reconnects: counter("pg_outbox_relay_reconnects_total"),
            rewinds: counter("pg_outbox_relay_rewinds_total"),
            health: HEALTH_STATES.map(|state| {
                ::metrics::gauge!("pg_outbox_relay_health", "relay" => relay.to_owned(), "state" => state)
            }),
            subscriptions: gauge("pg_outbox_relay_subscriptions"),
            queued: gauge("pg_outbox_relay_queued_events"),
            lag: ::metrics::histogram!("pg_outbox_relay_lag_seconds", "relay" => relay.to_owned()),
        }
    }
}

/// The help texts exporters show next to each name.
fn describe() {
    describe_counter!(
        "pg_outbox_relay_notifications_received_total",
        "pg_outbox notifications read from the LISTEN connection"
    );
    describe_counter!(
        "pg_outbox_relay_events_delivered_total",
        "Events handed to the relay's subscribers, once each"
    );
    describe_counter!(
        "pg_outbox_relay_events_caught_up_total",
        "Delivered events read from the outbox without their notification (after a reconnect, or by a sweep)"
    );
    describe_counter!(
        "pg_outbox_relay_events_duplicate_total",
        "Notifications or rows dropped because the event was already delivered"
    );
    describe_counter!(
        "pg_outbox_relay_events_own_origin_total",
        "Events this relay published itself, not delivered"
    );
    describe_counter!(
        "pg_outbox_relay_events_lagged_total",
        "Events dropped for subscribers whose buffer was full"
    );
    describe_counter!(
        "pg_outbox_relay_decode_errors_total",
        "Notifications or rows that did not decode"
    );
    describe_counter!(
        "pg_outbox_relay_forged_notifications_total",
        "Notifications naming a transaction no snapshot could see"
    );
    describe_counter!(
        "pg_outbox_relay_gaps_total",
        "Gaps reported to subscribers, by kind"
    );
    describe_counter!(
        "pg_outbox_relay_resumes_total",
        "Subscriptions resumed from a position"
    );
    describe_counter!(
        "pg_outbox_relay_resets_total",
        "Resumes that could not go on exactly, by reason"
    );
    describe_counter!(
        "pg_outbox_relay_queries_total",
        "Queries the relay ran on its query connection"
    );
    describe_counter!(
        "pg_outbox_relay_reconnects_total",
        "Connections made again after a loss"
    );
    describe_counter!(
        "pg_outbox_relay_rewinds_total",
        "New runs of the server the relay read again from their floor"
    );
    describe_gauge!(
        "pg_outbox_relay_health",
        "1 for the relay's current state, 0 for the others"
    );
    describe_gauge!("pg_outbox_relay_subscriptions", "Open subscriptions");
    describe_gauge!(
        "pg_outbox_relay_queued_events",
        "Events waiting in the subscriptions' queues"
    );
    describe_histogram!(
        "pg_outbox_relay_lag_seconds",
        ::metrics::Unit::Seconds,
        "Commit (created_at) to delivery"
    );
}

/// Copies one snapshot's counters, keeping the latency buckets already recorded in `recorded`.
fn export(handles: &Handles, snapshot: &MetricsSnapshot, recorded: &mut Vec<u64>) {
    handles.received.absolute(snapshot.received);
    handles.delivered.absolute(snapshot.delivered);
    handles.caught_up.absolute(snapshot.caught_up);
    handles.duplicates.absolute(snapshot.duplicates);
    handles.own_origin.absolute(snapshot.skipped_own_origin);
    handles.lagged.absolute(snapshot.lagged);
    handles.decode_errors.absolute(snapshot.decode_errors);
    handles.forged.absolute(snapshot.forged);
    handles.resumes.absolute(snapshot.resumes);
    handles.advances.absolute(snapshot.advances);
    handles.resume_queries.absolute(snapshot.resume_queries);
    handles.reconnects.absolute(snapshot.reconnects);
    handles.rewinds.absolute(snapshot.rewinds);
    let buckets: Vec<(Option<Duration>, u64)> = snapshot.latency.buckets().collect();
    recorded.resize(buckets.len(), 0);
    for ((bound, count), recorded) in buckets.into_iter().zip(recorded.iter_mut()) {
        let new = count.saturating_sub(*recorded);
        if new > 0 {
            // The unbounded bucket's samples go just past the last bound.
            let seconds = bound.map_or(LAG_SECONDS_BUCKETS[19] * 2.0, |b| b.as_secs_f64());
            handles
                .lag
                .record_many(seconds, usize::try_from(new).unwrap_or(usize::MAX));
            *recorded = count;
        }
    }
}

/// Copies a labelled counter's values, one per label value, in the order of its handles.
fn copy_labelled(counts: &[AtomicU64], handles: &[Counter]) {
    for (count, handle) in counts.iter().zip(handles) {
        handle.absolute(count.load(Relaxed));
    }
}

/// Copies the relay's metrics to the facade every [`INTERVAL`] until it stops, then once more.
pub(crate) async fn run(shared: Weak<Shared>, relay: String, mut health: watch::Receiver<Health>) {
    let handles = Handles::register(&relay);
    let mut recorded = Vec::new();
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = health.wait_for(|health| matches!(health, Health::Stopped)) => true,
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        export(&handles, &shared.metrics.snapshot(), &mut recorded);
        copy_labelled(&shared.metrics.gaps_by_kind, &handles.gaps);
        copy_labelled(&shared.metrics.resets_by_reason, &handles.resets);
        let now = state(&shared.health.borrow());
        for (state, gauge) in HEALTH_STATES.iter().zip(&handles.health) {
            gauge.set(if *state == now { 1.0 } else { 0.0 });
        }
        let (subscriptions, queued) = shared.fanout.load();
        handles.subscriptions.set(subscriptions as f64);
        handles.queued.set(queued as f64);
        if stopping {
            return;
        }
    }
}
