//! The client's `metrics` feature: what a Prometheus scrape of the app shows is the relay's own
//! snapshot, under Prometheus' names, parsed by a real text-format parser.

use std::collections::HashMap;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use pg_outbox_client::export::LAG_SECONDS_BUCKETS;
use pg_outbox_client::{Delivery, Topic};
use pg_outbox_tests::relay::{relay, Collector};
use pg_outbox_tests::{Cluster, WAIT};
use prometheus_parse::{Scrape, Value};

/// One scrape, by metric name and then by its labels other than `relay` (as `k=v,...`).
fn scrape(handle: &PrometheusHandle) -> HashMap<String, HashMap<String, Value>> {
    let text = handle.render();
    let scrape = Scrape::parse(text.lines().map(|line| Ok(line.to_owned())))
        .unwrap_or_else(|err| panic!("the scrape does not parse ({err}):\n{text}"));
    let mut metrics: HashMap<String, HashMap<String, Value>> = HashMap::new();
    for sample in scrape.samples {
        assert_eq!(
            sample.labels.get("relay"),
            Some("relay_metrics"),
            "{}",
            sample.metric
        );
        let mut labels: Vec<String> = sample
            .labels
            .iter()
            .filter(|(name, _)| name.as_str() != "relay")
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        labels.sort();
        metrics
            .entry(sample.metric)
            .or_default()
            .insert(labels.join(","), sample.value);
    }
    metrics
}

fn number(metrics: &HashMap<String, HashMap<String, Value>>, name: &str, labels: &str) -> f64 {
    match metrics
        .get(name)
        .and_then(|by_labels| by_labels.get(labels))
    {
        Some(Value::Counter(n) | Value::Gauge(n) | Value::Untyped(n)) => *n,
        other => panic!("{name}{{{labels}}}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_shows_the_relays_own_counters() {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("pg_outbox_relay_lag_seconds".into()),
            &LAG_SECONDS_BUCKETS,
        )
        .unwrap()
        .install_recorder()
        .unwrap();
    let cluster = Cluster::start();
    let relay = relay(&cluster, "relay_metrics").build().unwrap();
    let all = Collector::spawn(relay.subscribe_to(Topic::all()));
    relay.start().await.unwrap();

    cluster.psql(
        "postgres",
        "DO $$ BEGIN FOR g IN 1..20 LOOP \
           PERFORM outbox_publish('chat', 'u' || g, '{}'); COMMIT; \
         END LOOP; END $$",
    );
    // A forged reference (counted as forged, no gap) and a resume from a malformed position (a
    // reset): the labelled counters.
    let far: u64 = cluster
        .psql("postgres", "SELECT pg_current_xact_id()")
        .parse::<u64>()
        .unwrap()
        + 1_000_000;
    let document = format!(
        r#"{{"v":1,"id":"00000000-0000-0000-0000-00000000f00d","channel":"chat","user_id":"u1","origin":null,"xid":{far},"created_at_us":1795827481361761}}"#
    );
    cluster.psql(
        "postgres",
        &format!("SELECT pg_notify('pg_outbox', '{document}')"),
    );
    let mut resumed = relay.subscribe_from(Topic::all(), "not a position");
    assert!(matches!(resumed.recv().await, Some(Delivery::Reset { .. })));
    let snapshot = cluster
        .wait_for("the relay's counts", WAIT, || async {
            let snapshot = relay.metrics();
            (snapshot.delivered == 20 && snapshot.forged == 1 && snapshot.resets == 1)
                .then_some(snapshot)
        })
        .await;
    assert_eq!(all.ids().len(), 20);

    // Copied once a second: wait for the copy of these counts.
    let metrics = cluster
        .wait_for("a scrape with the relay's counts", WAIT, || async {
            let metrics = scrape(&handle);
            let caught_up = metrics
                .get("pg_outbox_relay_events_delivered_total")
                .is_some_and(|_| {
                    number(&metrics, "pg_outbox_relay_events_delivered_total", "") == 20.0
                })
                && number(&metrics, "pg_outbox_relay_resets_total", "reason=malformed") == 1.0;
            caught_up.then_some(metrics)
        })
        .await;
    let after = relay.metrics();
    for (name, labels, value) in [
        (
            "pg_outbox_relay_events_delivered_total",
            "",
            snapshot.delivered,
        ),
        (
            "pg_outbox_relay_events_caught_up_total",
            "",
            snapshot.caught_up,
        ),
        (
            "pg_outbox_relay_events_duplicate_total",
            "",
            snapshot.duplicates,
        ),
        (
            "pg_outbox_relay_events_own_origin_total",
            "",
            snapshot.skipped_own_origin,
        ),
        ("pg_outbox_relay_events_lagged_total", "", snapshot.lagged),
        (
            "pg_outbox_relay_decode_errors_total",
            "",
            snapshot.decode_errors,
        ),
        (
            "pg_outbox_relay_forged_notifications_total",
            "",
            snapshot.forged,
        ),
        ("pg_outbox_relay_gaps_total", "kind=missing", 0),
        ("pg_outbox_relay_gaps_total", "kind=pruned", 0),
        ("pg_outbox_relay_resumes_total", "", snapshot.resumes),
        ("pg_outbox_relay_resets_total", "reason=malformed", 1),
        ("pg_outbox_relay_resets_total", "reason=expired", 0),
        ("pg_outbox_relay_reconnects_total", "", snapshot.reconnects),
        ("pg_outbox_relay_rewinds_total", "", snapshot.rewinds),
    ] {
        assert_eq!(
            number(&metrics, name, labels),
            value as f64,
            "{name}{{{labels}}}"
        );
    }
    assert_eq!(snapshot.gaps, 0);
    // Still counting (idle sweeps): between the two snapshots.
    for (name, labels, before, after) in [
        (
            "pg_outbox_relay_notifications_received_total",
            "",
            snapshot.received,
            after.received,
        ),
        (
            "pg_outbox_relay_queries_total",
            "query=advance",
            snapshot.advances,
            after.advances,
        ),
    ] {
        let scraped = number(&metrics, name, labels);
        assert!(
            (before as f64..=after as f64).contains(&scraped),
            "{name}{{{labels}}}: {scraped} not within {before}..={after}"
        );
    }
    assert_eq!(
        number(&metrics, "pg_outbox_relay_health", "state=listening"),
        1.0
    );
    assert_eq!(
        number(&metrics, "pg_outbox_relay_health", "state=reconnecting"),
        0.0
    );
    assert_eq!(number(&metrics, "pg_outbox_relay_subscriptions", ""), 2.0);
    match metrics
        .get("pg_outbox_relay_lag_seconds")
        .and_then(|h| h.get(""))
    {
        Some(Value::Histogram(buckets)) => {
            let count = buckets.iter().map(|b| b.count).fold(0.0, f64::max);
            assert_eq!(count, snapshot.latency.count() as f64, "{buckets:?}");
            assert_eq!(buckets.len(), LAG_SECONDS_BUCKETS.len() + 1, "{buckets:?}");
        }
        other => panic!("pg_outbox_relay_lag_seconds: {other:?}"),
    }

    relay.shutdown().await;
    cluster
        .wait_for("the stopped relay's last copy", WAIT, || async {
            let metrics = scrape(&handle);
            (number(&metrics, "pg_outbox_relay_health", "state=stopped") == 1.0).then_some(())
        })
        .await;
}
