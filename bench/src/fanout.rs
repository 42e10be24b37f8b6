//! Figure 4: how fast one relay delivers to 1,000 local subscribers, against how fast events
//! are published.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use pg_outbox_client::{Delivery, Relay};
use pg_outbox_tests::Cluster;

use crate::pgbench::{tps_at, Run};
use crate::report::Table;
use crate::Options;

const SUBSCRIBERS: usize = 1000;
const EVENTS_PER_TX: u32 = 10;

pub async fn run(cluster: &Cluster, options: &Options) -> Vec<Table> {
    cluster.psql("postgres", "TRUNCATE event_outbox");
    let relay = Relay::builder(cluster.config("postgres", "postgres"))
        .application_name("bench_fanout")
        .subscriber_buffer(1 << 20)
        .build()
        .expect("build the relay");
    let delivered = Arc::new(AtomicU64::new(0));
    let lagged = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for _ in 0..SUBSCRIBERS {
        let mut subscription = relay.subscribe("chat");
        let (delivered, lagged) = (Arc::clone(&delivered), Arc::clone(&lagged));
        readers.push(tokio::spawn(async move {
            while let Some(item) = subscription.next().await {
                match item {
                    Delivery::Event(_) => delivered.fetch_add(1, Ordering::Relaxed),
                    Delivery::Lagged { missed } => lagged.fetch_add(missed, Ordering::Relaxed),
                    _ => 0,
                };
            }
        }));
    }
    relay.start().await.expect("start the relay");

    let run = Run {
        script: "publish_batch.sql".into(),
        clients: 8,
        duration: options.run_time(),
        options: "-c pg_outbox.notify_mode=worker -c pg_outbox.notify_payload=inline".into(),
        variables: vec![("batch".into(), EVENTS_PER_TX.to_string())],
    };
    let started = Instant::now();
    let (bindir, root, port) = (
        cluster.bindir().to_owned(),
        cluster.root().to_owned(),
        cluster.port(),
    );
    let tx_per_second = tokio::task::spawn_blocking(move || tps_at(&bindir, &root, port, &run))
        .await
        .expect("the publishing run");
    let published_for = started.elapsed();
    let published: i64 = cluster
        .psql("postgres", "SELECT count(*) FROM event_outbox")
        .parse()
        .unwrap_or(0);
    let expected = published.max(0) as u64 * SUBSCRIBERS as u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while delivered.load(Ordering::Relaxed) + lagged.load(Ordering::Relaxed) < expected
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let delivered_for = started.elapsed();
    relay.shutdown().await;
    for reader in readers {
        let _ = reader.await;
    }

    let publish_rate = tx_per_second * f64::from(EVENTS_PER_TX);
    let delivered = delivered.load(Ordering::Relaxed);
    let per_subscriber = delivered as f64 / SUBSCRIBERS as f64 / delivered_for.as_secs_f64();
    let mut table = Table::new("One relay, 1,000 subscribers", &["", "value"]);
    table.note = format!(
        "8 pgbench clients publish {EVENTS_PER_TX} inline events per transaction \
         (notify_mode = worker) for {} s; one relay in the benchmark process delivers each event \
         to {SUBSCRIBERS} subscribers of its channel.",
        published_for.as_secs()
    );
    table.row(vec![
        "events published per second".into(),
        format!("{publish_rate:.0}"),
    ]);
    table.row(vec![
        "events delivered per second, to each subscriber (until the last one had everything)"
            .into(),
        format!(
            "{per_subscriber:.0} ({:.2}× the publish rate)",
            per_subscriber / publish_rate
        ),
    ]);
    table.row(vec![
        "deliveries per second, all subscribers".into(),
        format!("{:.0}", delivered as f64 / delivered_for.as_secs_f64()),
    ]);
    table.row(vec![
        "events lagged (dropped for a slow subscriber)".into(),
        lagged.load(Ordering::Relaxed).to_string(),
    ]);
    vec![table]
}
