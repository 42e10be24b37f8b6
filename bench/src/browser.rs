//! Commit-to-browser latency (issue 17): a page in headless Chromium follows one user's events
//! over SSE from a replica of the example app (`examples/sse`, through `pg_outbox_sse`), next to
//! a `pg_outbox_client` relay in this process subscribed to the same user, in the same run.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use pg_outbox_client::{Delivery, RelayBuilder, Topic};
use pg_outbox_tests::browser::{events, Chromium, Replica, Reports};
use pg_outbox_tests::Cluster;
use uuid::Uuid;

use crate::report::{quantile, Table};
use crate::Options;

const PUBLISHERS: u32 = 4;

pub async fn run(cluster: &Cluster, options: &Options) -> Vec<Table> {
    let mut table = Table::new(
        "Commit-to-browser latency over SSE, next to commit-to-relay",
        &[
            "events/s",
            "events",
            "relay p50 ms",
            "relay p99 ms",
            "browser p50 ms",
            "browser p99 ms",
            "browser p99 / relay p99",
        ],
    );
    table.note = format!(
        "{PUBLISHERS} publishers pace one-event transactions for one user to the rate for {} s. \
         Relay: a pg_outbox_client relay in the benchmark's process, subscribed to that user. \
         Browser: a page in headless Chromium whose EventSource follows the same user's events \
         from one replica of the SSE example app (its own relay, pg_outbox_sse), timed when the \
         page's message handler runs. Both start at the row's created_at (clock_timestamp() in \
         outbox_publish, before the commit), on the same machine's clock; default relay \
         settings (fetch_interval 25 ms). Goal: browser p99 at most 1.2 × relay p99.",
        options.latency_time().as_secs()
    );
    if Chromium::path().is_none() {
        table.note += " Skipped: no Chromium (scripts/setup.sh installs it).";
        return vec![table];
    }
    let rates: &[u32] = if options.smoke { &[100] } else { &[100, 1000] };
    for &rate in rates {
        let m = measure(cluster, options, rate).await;
        table.row(vec![
            rate.to_string(),
            m.events.to_string(),
            ms(quantile(&m.relay, 0.50)),
            ms(quantile(&m.relay, 0.99)),
            ms(quantile(&m.browser, 0.50)),
            ms(quantile(&m.browser, 0.99)),
            format!(
                "{:.2}",
                quantile(&m.browser, 0.99) / quantile(&m.relay, 0.99)
            ),
        ]);
    }
    vec![table]
}

fn ms(value: f64) -> String {
    format!("{value:.1}")
}

/// Latencies in milliseconds, each side's.
struct Measured {
    events: usize,
    relay: Vec<f64>,
    browser: Vec<f64>,
}

async fn measure(cluster: &Cluster, options: &Options, rate: u32) -> Measured {
    cluster.psql("postgres", "TRUNCATE event_outbox");
    let db = cluster.connection_string("postgres");
    let user = format!("bench-browser-{rate}");
    let replica = Replica::start(&db, "bench", &[]).await;
    let reports = Reports::start().await;
    let chromium = Chromium::open(&format!(
        "http://{}/?user={user}&report={}",
        replica.address(),
        reports.url()
    ));
    reports
        .wait(
            "that its EventSource is open",
            Duration::from_secs(60),
            |items| items.iter().any(|item| item["type"] == "open"),
        )
        .await;

    let relay = RelayBuilder::new(cluster.config("postgres", "postgres"))
        .application_name("bench_browser_relay")
        .subscriber_buffer(1 << 20)
        .build()
        .expect("build the relay");
    let mut subscription = relay.subscribe_to(Topic::all().user(user.clone()));
    relay.start().await.expect("start the relay");
    let relay_seen: Arc<Mutex<Vec<(Uuid, f64)>>> = Arc::default();
    let sink = Arc::clone(&relay_seen);
    let reader = tokio::spawn(async move {
        while let Some(delivery) = subscription.next().await {
            if let Delivery::Event(event) = delivery {
                let latency = millis_between(event.created_at(), SystemTime::now());
                if let Ok(mut seen) = sink.lock() {
                    seen.push((event.id(), latency));
                }
            }
        }
    });

    let published = publish(cluster, &user, rate, options.latency_time()).await;
    let expected: HashSet<String> = published.iter().map(Uuid::to_string).collect();
    reports
        .wait("every event published", Duration::from_secs(60), |items| {
            events(items)
                .filter(|event| event["id"].as_str().is_some_and(|id| expected.contains(id)))
                .count()
                >= expected.len()
        })
        .await;
    drop(chromium);
    relay.shutdown().await;
    let _ = reader.await;
    drop(replica);

    let browser: Vec<f64> = events(&reports.items())
        .filter_map(|event| {
            let created_us = event["created_at_us"].as_f64()?;
            let at_ms = event["at_ms"].as_f64()?;
            Some(at_ms - created_us / 1000.0)
        })
        .collect();
    let relay: HashMap<Uuid, f64> = relay_seen
        .lock()
        .map(|seen| seen.iter().copied().collect())
        .unwrap_or_default();
    Measured {
        events: published.len(),
        relay: relay.into_values().collect(),
        browser,
    }
}

/// Paces one-event transactions for `user` to `rate` a second over [`PUBLISHERS`]
/// connections for `duration`; returns the ids committed.
async fn publish(cluster: &Cluster, user: &str, rate: u32, duration: Duration) -> Vec<Uuid> {
    let interval = Duration::from_secs_f64(f64::from(PUBLISHERS) / f64::from(rate));
    let start = Instant::now() + Duration::from_millis(200);
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let client = cluster.connect("postgres").await;
        let statement = client
            .prepare("SELECT outbox_publish('chat', $1, '{\"text\": \"hello, browser\"}')")
            .await
            .expect("prepare outbox_publish");
        let user = user.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut ids: Vec<Uuid> = Vec::new();
            let offset = interval.mul_f64(f64::from(p) / f64::from(PUBLISHERS));
            let mut n = 0u32;
            loop {
                let due = start + offset + interval * n;
                if due.duration_since(start) >= duration {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                if let Ok(row) = client.query_one(&statement, &[&user]).await {
                    ids.push(row.get(0));
                }
                n += 1;
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.extend(task.await.unwrap_or_default());
    }
    ids
}

/// Milliseconds from `from` to `to`; negative when `to` came first.
fn millis_between(from: SystemTime, to: SystemTime) -> f64 {
    let at = |time: SystemTime| {
        time.duration_since(UNIX_EPOCH)
            .map_or(0.0, |since| since.as_secs_f64() * 1000.0)
    };
    at(to) - at(from)
}
