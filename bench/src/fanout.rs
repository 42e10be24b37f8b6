//! Figure 4: how fast one relay delivers to 1,000 local subscribers, against how fast events
//! are published: every subscriber wanting every event (the worst case), and one subscriber per
//! user with each event addressed to one of them (a replica holding one SSE connection per user).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use pg_outbox_client::{Delivery, RelayBuilder, Subscription, Topic};
use pg_outbox_tests::Cluster;

use crate::pgbench::{tps_at, Run};
use crate::report::Table;
use crate::Options;

const SUBSCRIBERS: usize = 1000;
const EVENTS_PER_TX: u32 = 10;

#[derive(Clone, Copy)]
enum Audience {
    /// 1,000 subscribers of the channel: each event goes to all of them.
    Everyone,
    /// One subscriber per user, events spread over the 1,000 users: each goes to one.
    OnePerUser,
}

impl Audience {
    fn name(self) -> &'static str {
        match self {
            Audience::Everyone => "1,000 subscribers of the channel, every event to all of them",
            Audience::OnePerUser => "1,000 subscribers, one per user, each event to its user's",
        }
    }

    fn subscribers_per_event(self) -> u64 {
        match self {
            Audience::Everyone => SUBSCRIBERS as u64,
            Audience::OnePerUser => 1,
        }
    }
}

pub async fn run(cluster: &Cluster, options: &Options) -> Vec<Table> {
    let mut table = Table::new(
        "One relay, 1,000 subscribers",
        &[
            "subscribers",
            "events published/s",
            "events delivered/s",
            "vs publish rate",
            "deliveries/s",
            "lagged",
        ],
    );
    table.note = format!(
        "8 pgbench clients publish {EVENTS_PER_TX} inline events per transaction \
         (notify_mode = worker) as fast as they can for {} s; one relay in the benchmark process \
         delivers them. Publish rate: events over the span of their created_at; delivery rate: \
         the same events over the span from the first delivery to the last (a relay that keeps \
         up scores 1.0×). Deliveries: (event, subscriber) pairs per second.",
        options.run_time().as_secs()
    );
    for audience in [Audience::Everyone, Audience::OnePerUser] {
        let measured = measure(cluster, options, audience).await;
        table.row(vec![
            audience.name().into(),
            format!("{:.0}", measured.published_per_second),
            format!("{:.0}", measured.delivered_per_second),
            format!(
                "{:.2}×",
                measured.delivered_per_second / measured.published_per_second
            ),
            format!(
                "{:.0}",
                measured.delivered_per_second * audience.subscribers_per_event() as f64
            ),
            measured.lagged.to_string(),
        ]);
    }
    vec![table]
}

struct Measured {
    published_per_second: f64,
    delivered_per_second: f64,
    lagged: u64,
}

/// Microseconds since the epoch, for first/last delivery instants kept in atomics.
fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

async fn measure(cluster: &Cluster, options: &Options, audience: Audience) -> Measured {
    cluster.psql("postgres", "TRUNCATE event_outbox");
    let relay = RelayBuilder::new(cluster.config("postgres", "postgres"))
        .application_name("bench_fanout")
        .subscriber_buffer(1 << 20)
        .build()
        .expect("build the relay");
    let delivered = Arc::new(AtomicU64::new(0));
    let lagged = Arc::new(AtomicU64::new(0));
    let first = Arc::new(AtomicU64::new(u64::MAX));
    let last = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for n in 0..SUBSCRIBERS {
        let mut subscription: Subscription = match audience {
            Audience::Everyone => relay.subscribe_to(Topic::channel("chat")),
            Audience::OnePerUser => {
                relay.subscribe_to(Topic::channel("chat").user(format!("user-{n}")))
            }
        };
        let (delivered, lagged) = (Arc::clone(&delivered), Arc::clone(&lagged));
        let (first, last) = (Arc::clone(&first), Arc::clone(&last));
        readers.push(tokio::spawn(async move {
            // Counts locally and publishes once per wake-up, so the benchmark's own shared
            // counters do not become the cost being measured.
            while let Some(item) = subscription.next().await {
                let (mut events, mut missed) = (0, 0);
                for item in
                    std::iter::once(item).chain(std::iter::from_fn(|| subscription.try_recv()))
                {
                    match item {
                        Delivery::Event(_) => events += 1,
                        Delivery::Lagged { missed: n } => missed += n,
                        _ => {}
                    }
                }
                if events > 0 {
                    let now = now_micros();
                    first.fetch_min(now, Ordering::Relaxed);
                    last.fetch_max(now, Ordering::Relaxed);
                    delivered.fetch_add(events, Ordering::Relaxed);
                }
                lagged.fetch_add(missed, Ordering::Relaxed);
            }
        }));
    }
    relay.start().await.expect("start the relay");

    let run = Run {
        script: "publish_batch_users.sql".into(),
        clients: 8,
        duration: options.run_time(),
        options: "-c pg_outbox.notify_mode=worker -c pg_outbox.notify_payload=inline".into(),
        variables: vec![
            ("batch".into(), EVENTS_PER_TX.to_string()),
            (
                "users".into(),
                match audience {
                    Audience::Everyone => 1,
                    Audience::OnePerUser => SUBSCRIBERS,
                }
                .to_string(),
            ),
        ],
    };
    let (bindir, root, port) = (
        cluster.bindir().to_owned(),
        cluster.root().to_owned(),
        cluster.port(),
    );
    tokio::task::spawn_blocking(move || tps_at(&bindir, &root, port, &run))
        .await
        .expect("the publishing run");
    let (published, published_over): (i64, f64) = {
        let line = cluster.psql(
            "postgres",
            "SELECT count(*) || ' ' || extract(epoch FROM max(created_at) - min(created_at)) \
             FROM event_outbox",
        );
        let mut parts = line.split_whitespace();
        (
            parts.next().and_then(|n| n.parse().ok()).unwrap_or(0),
            parts.next().and_then(|s| s.parse().ok()).unwrap_or(0.0),
        )
    };
    let expected = published.max(0) as u64 * audience.subscribers_per_event();
    let deadline = Instant::now() + Duration::from_secs(120);
    while delivered.load(Ordering::Relaxed) + lagged.load(Ordering::Relaxed) < expected
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.shutdown().await;
    for reader in readers {
        let _ = reader.await;
    }

    let delivered_over = last
        .load(Ordering::Relaxed)
        .saturating_sub(first.load(Ordering::Relaxed)) as f64
        / 1e6;
    let events_delivered =
        delivered.load(Ordering::Relaxed) as f64 / audience.subscribers_per_event() as f64;
    Measured {
        published_per_second: published as f64 / published_over.max(1e-3),
        delivered_per_second: events_delivered / delivered_over.max(1e-3),
        lagged: lagged.load(Ordering::Relaxed),
    }
}
