//! Figures 2 and 3: commit-to-subscriber latency at a steady publish rate, and queries per
//! delivered event, for pg_outbox_client against a relay written the way the seed project did
//! (NOTIFY carries the id; the relay SELECTs each row by id, one at a time).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use pg_outbox_client::{Delivery, RelayBuilder, Topic};
use pg_outbox_tests::Cluster;
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, NoTls};
use uuid::Uuid;

use crate::report::{median, quantile, Table};
use crate::Options;

/// How events are published and received.
#[derive(Clone, Copy)]
struct Setup {
    receiver: Receiver,
    notify_payload: &'static str,
    notify_mode: &'static str,
    /// The client's `fetch_interval`, when not its default.
    fetch_interval_ms: Option<u64>,
}

#[derive(Clone, Copy, PartialEq)]
enum Receiver {
    Client,
    Seed,
}

impl Setup {
    fn name(&self) -> String {
        match self.receiver {
            Receiver::Client => {
                let mut name = format!(
                    "pg_outbox_client, {}, notify_mode = {}",
                    self.notify_payload, self.notify_mode
                );
                if let Some(ms) = self.fetch_interval_ms {
                    name += &format!(", fetch_interval = {ms} ms");
                }
                if self.notify_payload == "sealed"
                    && self.notify_mode == "transaction"
                    && self.fetch_interval_ms.is_none()
                {
                    name += " (the defaults)";
                }
                name
            }
            Receiver::Seed => "seed-style relay (SELECT by id, one at a time)".to_owned(),
        }
    }
}

const SETUPS: [Setup; 7] = [
    Setup {
        receiver: Receiver::Seed,
        notify_payload: "reference",
        notify_mode: "transaction",
        fetch_interval_ms: None,
    },
    Setup {
        receiver: Receiver::Client,
        notify_payload: "inline",
        notify_mode: "transaction",
        fetch_interval_ms: None,
    },
    Setup {
        receiver: Receiver::Client,
        notify_payload: "reference",
        notify_mode: "transaction",
        fetch_interval_ms: None,
    },
    Setup {
        receiver: Receiver::Client,
        notify_payload: "reference",
        notify_mode: "worker",
        fetch_interval_ms: None,
    },
    // The default: inline, sealed with the database's key: no query per event, nothing for
    // other roles to read.
    Setup {
        receiver: Receiver::Client,
        notify_payload: "sealed",
        notify_mode: "transaction",
        fetch_interval_ms: None,
    },
    Setup {
        receiver: Receiver::Client,
        notify_payload: "sealed",
        notify_mode: "worker",
        fetch_interval_ms: None,
    },
    // More, smaller fetches: the latency side of the trade (the default before 25 ms).
    Setup {
        receiver: Receiver::Client,
        notify_payload: "reference",
        notify_mode: "worker",
        fetch_interval_ms: Some(5),
    },
];

pub async fn run(cluster: &Cluster, options: &Options) -> Vec<Table> {
    let mut table = Table::new(
        "Commit-to-subscriber latency at a steady publish rate",
        &[
            "events/s",
            "relays",
            "receiver",
            "p50 ms",
            "p99 ms",
            "max ms",
            "after ack p50 ms",
            "after ack p99 ms",
            "queries per event per relay",
            "publish call p99 ms",
        ],
    );
    table.note = format!(
        "8 publishers pace one-event transactions to the rate for {} s, in {} interleaved \
         rounds (every receiver once per round; medians of the rounds' figures). Latency is the \
         time from the row's created_at (clock_timestamp() in outbox_publish, before the \
         commit) to the subscriber holding the event, on the same machine's clock, so it \
         includes the commit's WAL flush, which every receiver pays alike (the last column: the \
         publishers' own call time, statement and commit). \"After ack\" starts instead when the \
         publisher has read the commit's acknowledgement: what the receiver adds (it can be \
         negative: a notification may arrive first). Each relay subscribes to everything.",
        options.latency_time().as_secs(),
        options.rounds()
    );
    // 100 events/s too: reference mode's queries per event where fetches are not yet full.
    for rate in [100, 1000, 5000] {
        for relays in [1, 4] {
            let mut rounds: Vec<Vec<Measured>> = SETUPS.iter().map(|_| Vec::new()).collect();
            for _ in 0..options.rounds() {
                for (setup, results) in SETUPS.iter().zip(&mut rounds) {
                    results.push(measure(cluster, options, *setup, rate, relays, 8).await);
                }
            }
            for (setup, results) in SETUPS.iter().zip(&rounds) {
                let m = Measured::median(results);
                table.row(vec![
                    rate.to_string(),
                    relays.to_string(),
                    setup.name(),
                    ms(m.p50),
                    ms(m.p99),
                    ms(m.max),
                    ms(m.after_commit_p50),
                    ms(m.after_commit_p99),
                    format!("{:.3}", m.queries_per_event),
                    ms(m.publish_p99),
                ]);
            }
        }
    }
    let mut writers = Table::new(
        "Latency with 64 writers publishing as fast as they can",
        &[
            "notify_mode, notify_payload",
            "events/s published",
            "p50 ms",
            "p99 ms",
            "max ms",
            "after ack p99 ms",
            "queries per event",
            "publish call p99 ms",
        ],
    );
    writers.note = format!(
        "64 publishers, one-event transactions, no pacing, {} interleaved rounds (medians); one \
         pg_outbox_client relay.",
        options.rounds()
    );
    let modes = [
        ("transaction", "reference"),
        ("worker", "reference"),
        ("worker", "inline"),
    ];
    let mut rounds: Vec<Vec<Measured>> = modes.iter().map(|_| Vec::new()).collect();
    for _ in 0..options.rounds() {
        for (&(mode, payload), results) in modes.iter().zip(&mut rounds) {
            let setup = Setup {
                receiver: Receiver::Client,
                notify_payload: payload,
                notify_mode: mode,
                fetch_interval_ms: None,
            };
            results.push(measure(cluster, options, setup, 0, 1, 64).await);
        }
    }
    for ((mode, payload), results) in modes.iter().zip(&rounds) {
        let m = Measured::median(results);
        writers.row(vec![
            format!("{mode}, {payload}"),
            format!("{:.0}", m.published_per_second),
            ms(m.p50),
            ms(m.p99),
            ms(m.max),
            ms(m.after_commit_p99),
            format!("{:.3}", m.queries_per_event),
            ms(m.publish_p99),
        ]);
    }
    cluster.reset_setting("pg_outbox.notify_payload");
    vec![table, writers]
}

struct Measured {
    p50: f64,
    p99: f64,
    max: f64,
    /// From the publisher's reading of the commit's acknowledgement to the subscriber.
    after_commit_p50: f64,
    after_commit_p99: f64,
    queries_per_event: f64,
    published_per_second: f64,
    /// The publishers' `outbox_publish` calls (statement and commit), 99th percentile.
    publish_p99: f64,
}

impl Measured {
    /// Each figure's median over rounds.
    fn median(rounds: &[Measured]) -> Measured {
        let of =
            |figure: fn(&Measured) -> f64| median(&rounds.iter().map(figure).collect::<Vec<_>>());
        Measured {
            p50: of(|m| m.p50),
            p99: of(|m| m.p99),
            max: of(|m| m.max),
            after_commit_p50: of(|m| m.after_commit_p50),
            after_commit_p99: of(|m| m.after_commit_p99),
            queries_per_event: of(|m| m.queries_per_event),
            published_per_second: of(|m| m.published_per_second),
            publish_p99: of(|m| m.publish_p99),
        }
    }
}

fn ms(value: f64) -> String {
    format!("{value:.1}")
}

/// Publishes at `rate` events/s (0: as fast as possible) from `publishers` connections for the
/// latency run time and measures what `relays` receivers see.
async fn measure(
    cluster: &Cluster,
    options: &Options,
    setup: Setup,
    rate: u32,
    relays: usize,
    publishers: u32,
) -> Measured {
    cluster.psql("postgres", "TRUNCATE event_outbox");
    // The notifier sends what its own setting says; publishers set theirs per session.
    cluster.set_setting("pg_outbox.notify_payload", setup.notify_payload);
    let samples: Samples = Arc::new(Mutex::new(Vec::new()));
    let mut receivers = Vec::new();
    for n in 0..relays {
        receivers.push(match setup.receiver {
            Receiver::Client => client_relay(cluster, n, setup, Arc::clone(&samples)).await,
            Receiver::Seed => seed_relay(cluster, Arc::clone(&samples)).await,
        });
    }

    let duration = options.latency_time();
    let calls = publish(cluster, setup, rate, publishers, duration).await;
    let published = calls.len();
    // Give the receivers time to drain what is in flight.
    let deadline = Instant::now() + Duration::from_secs(30);
    while samples.lock().map_or(0, |s| s.len()) < published * relays && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut queries = 0;
    let mut delivered = 0;
    for receiver in receivers {
        let (q, d) = receiver.stop().await;
        queries += q;
        delivered += d;
    }
    let received = samples.lock().map(|s| s.clone()).unwrap_or_default();
    let since_created: Vec<f64> = received
        .iter()
        .map(|r| millis_between(r.created_at, r.at))
        .collect();
    let acked: HashMap<Uuid, SystemTime> = calls.iter().map(|c| (c.id, c.acked)).collect();
    let since_acked: Vec<f64> = received
        .iter()
        .filter_map(|r| acked.get(&r.id).map(|&acked| millis_between(acked, r.at)))
        .collect();
    let call_ms: Vec<f64> = calls.iter().map(|c| c.took_ms).collect();
    Measured {
        p50: quantile(&since_created, 0.50),
        p99: quantile(&since_created, 0.99),
        max: quantile(&since_created, 1.0),
        after_commit_p50: quantile(&since_acked, 0.50),
        after_commit_p99: quantile(&since_acked, 0.99),
        queries_per_event: queries as f64 / delivered.max(1) as f64,
        published_per_second: published as f64 / duration.as_secs_f64(),
        publish_p99: quantile(&call_ms, 0.99),
    }
}

/// One committed `outbox_publish` call.
struct Call {
    id: Uuid,
    /// When the publisher had the commit's acknowledgement.
    acked: SystemTime,
    took_ms: f64,
}

/// One event in a subscriber's hands.
#[derive(Clone)]
struct Received {
    id: Uuid,
    created_at: SystemTime,
    at: SystemTime,
}

type Samples = Arc<Mutex<Vec<Received>>>;

/// Paces one-event transactions over `publishers` connections; returns the committed calls.
async fn publish(
    cluster: &Cluster,
    setup: Setup,
    rate: u32,
    publishers: u32,
    duration: Duration,
) -> Vec<Call> {
    let start = Instant::now() + Duration::from_millis(200);
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let client = cluster.connect("postgres").await;
        client
            .batch_execute(&format!(
                "SET pg_outbox.notify_payload = '{}'; SET pg_outbox.notify_mode = '{}'",
                setup.notify_payload, setup.notify_mode
            ))
            .await
            .expect("set the publisher's modes");
        let statement = client
            .prepare("SELECT outbox_publish('chat', $1, '{\"text\": \"hello from the benchmark\", \"room\": 42}')::uuid")
            .await
            .expect("prepare outbox_publish");
        tasks.push(tokio::spawn(async move {
            let interval = (rate > 0)
                .then(|| Duration::from_secs_f64(f64::from(publishers) / f64::from(rate)));
            let user = format!("user-{p}");
            let mut calls = Vec::new();
            tokio::time::sleep_until(start.into()).await;
            while start.elapsed() < duration {
                if let Some(interval) = interval {
                    // Spread the publishers over the interval; catch up when behind.
                    let due = start
                        + interval.mul_f64(calls.len() as f64)
                        + interval.mul_f64(f64::from(p) / f64::from(publishers));
                    tokio::time::sleep_until(due.into()).await;
                }
                let called = Instant::now();
                if let Ok(row) = client.query_one(&statement, &[&user]).await {
                    calls.push(Call {
                        id: row.get(0),
                        acked: SystemTime::now(),
                        took_ms: called.elapsed().as_secs_f64() * 1000.0,
                    });
                }
            }
            calls
        }));
    }
    let mut calls = Vec::new();
    for task in tasks {
        calls.extend(task.await.unwrap_or_default());
    }
    calls
}

/// A receiver running in the background; `stop` returns (queries run, events delivered).
struct Running {
    stop: Box<dyn FnOnce() -> JoinHandle<(u64, u64)> + Send>,
}

impl Running {
    async fn stop(self) -> (u64, u64) {
        (self.stop)().await.unwrap_or((0, 0))
    }
}

/// Milliseconds from `from` to `to`; negative when `to` came first (an event can reach a
/// subscriber before its publisher has read the commit's acknowledgement).
fn millis_between(from: SystemTime, to: SystemTime) -> f64 {
    match to.duration_since(from) {
        Ok(d) => d.as_secs_f64() * 1000.0,
        Err(e) => -e.duration().as_secs_f64() * 1000.0,
    }
}

async fn client_relay(cluster: &Cluster, n: usize, setup: Setup, samples: Samples) -> Running {
    let mut builder = RelayBuilder::new(cluster.config("postgres", "postgres"))
        .application_name(format!("bench_relay_{n}"))
        .subscriber_buffer(1 << 20);
    if let Some(ms) = setup.fetch_interval_ms {
        builder = builder.fetch_interval(Duration::from_millis(ms));
    }
    let relay = builder.build().expect("build the relay");
    let mut all = relay.subscribe_to(Topic::all());
    relay.start().await.expect("start the relay");
    let reader = tokio::spawn(async move {
        while let Some(delivery) = all.next().await {
            if let Delivery::Event(event) = delivery {
                let received = Received {
                    id: event.id(),
                    created_at: event.created_at(),
                    at: SystemTime::now(),
                };
                if let Ok(mut samples) = samples.lock() {
                    samples.push(received);
                }
            }
        }
    });
    Running {
        stop: Box::new(move || {
            tokio::spawn(async move {
                let metrics = relay.metrics();
                relay.shutdown().await;
                let _ = reader.await;
                (metrics.advances, metrics.delivered)
            })
        }),
    }
}

/// The seed project's relay: LISTEN; for each notification, parse the id and load the row by
/// id on a second connection, one at a time, in arrival order.
async fn seed_relay(cluster: &Cluster, samples: Samples) -> Running {
    let (listener, mut connection) = cluster
        .config("postgres", "postgres")
        .connect(NoTls)
        .await
        .expect("connect the seed relay's listener");
    let (ids, mut incoming) = tokio::sync::mpsc::unbounded_channel::<String>();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message {
                let id = serde_json::from_str::<serde_json::Value>(n.payload())
                    .ok()
                    .and_then(|doc| doc["id"].as_str().map(str::to_owned));
                if let Some(id) = id {
                    if ids.send(id).is_err() {
                        break;
                    }
                }
            }
        }
    });
    listener
        .batch_execute("LISTEN pg_outbox")
        .await
        .expect("LISTEN");
    let loader = cluster.connect("postgres").await;
    let by_id = loader
        .prepare("SELECT payload, created_at, id FROM event_outbox WHERE id = $1::text::uuid")
        .await
        .expect("prepare the load by id");
    let worker = tokio::spawn(async move {
        let (mut queries, mut delivered) = (0_u64, 0_u64);
        while let Some(id) = incoming.recv().await {
            queries += 1;
            if let Ok(Some(row)) = loader.query_opt(&by_id, &[&id]).await {
                let created_at: SystemTime = row.get(1);
                delivered += 1;
                let received = Received {
                    id: row.get(2),
                    created_at,
                    at: SystemTime::now(),
                };
                if let Ok(mut samples) = samples.lock() {
                    samples.push(received);
                }
            }
        }
        (queries, delivered)
    });
    Running {
        stop: Box::new(move || {
            tokio::spawn(async move {
                drop(listener);
                let _ = driver.await;
                worker.await.unwrap_or((0, 0))
            })
        }),
    }
}
