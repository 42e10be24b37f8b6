//! Figures 2 and 3: commit-to-subscriber latency at a steady publish rate, and queries per
//! delivered event, for pg_outbox_client against a relay written the way the seed project did
//! (NOTIFY carries the id; the relay SELECTs each row by id, one at a time).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use pg_outbox_client::{Delivery, Relay};
use pg_outbox_tests::Cluster;
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::report::{quantile, Table};
use crate::Options;

/// How events are published and received.
#[derive(Clone, Copy)]
struct Setup {
    receiver: Receiver,
    notify_payload: &'static str,
    notify_mode: &'static str,
}

#[derive(Clone, Copy, PartialEq)]
enum Receiver {
    Client,
    Seed,
}

impl Setup {
    fn name(&self) -> String {
        match self.receiver {
            Receiver::Client => format!(
                "pg_outbox_client, {}, notify_mode = {}",
                self.notify_payload, self.notify_mode
            ),
            Receiver::Seed => "seed-style relay (SELECT by id, one at a time)".to_owned(),
        }
    }
}

const SETUPS: [Setup; 4] = [
    Setup {
        receiver: Receiver::Seed,
        notify_payload: "reference",
        notify_mode: "transaction",
    },
    Setup {
        receiver: Receiver::Client,
        notify_payload: "inline",
        notify_mode: "transaction",
    },
    Setup {
        receiver: Receiver::Client,
        notify_payload: "reference",
        notify_mode: "transaction",
    },
    Setup {
        receiver: Receiver::Client,
        notify_payload: "reference",
        notify_mode: "worker",
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
            "queries per event per relay",
        ],
    );
    table.note = format!(
        "8 publishers pace one-event transactions to the rate for {} s; latency is the time from \
         the row's created_at (clock_timestamp() in outbox_publish, just before commit) to the \
         subscriber holding the event, on the same machine's clock. Each relay subscribes to \
         everything.",
        options.latency_time().as_secs()
    );
    for rate in [1000, 5000] {
        for relays in [1, 4] {
            for setup in SETUPS {
                let result = measure(cluster, options, setup, rate, relays, 8).await;
                table.row(result.cells(rate, relays, &setup.name()));
            }
        }
    }
    let mut writers = Table::new(
        "Latency with 64 writers publishing as fast as they can",
        &[
            "notify_mode",
            "events/s published",
            "p50 ms",
            "p99 ms",
            "max ms",
            "queries per event",
        ],
    );
    writers.note =
        "64 publishers, one-event transactions, no pacing; one pg_outbox_client relay (reference)."
            .into();
    for mode in ["transaction", "worker"] {
        let setup = Setup {
            receiver: Receiver::Client,
            notify_payload: "reference",
            notify_mode: mode,
        };
        let result = measure(cluster, options, setup, 0, 1, 64).await;
        writers.row(vec![
            mode.to_owned(),
            format!("{:.0}", result.published_per_second),
            ms(result.p50),
            ms(result.p99),
            ms(result.max),
            format!("{:.3}", result.queries_per_event),
        ]);
    }
    vec![table, writers]
}

struct Measured {
    p50: f64,
    p99: f64,
    max: f64,
    queries_per_event: f64,
    published_per_second: f64,
}

impl Measured {
    fn cells(&self, rate: u32, relays: usize, receiver: &str) -> Vec<String> {
        vec![
            rate.to_string(),
            relays.to_string(),
            receiver.to_owned(),
            ms(self.p50),
            ms(self.p99),
            ms(self.max),
            format!("{:.3}", self.queries_per_event),
        ]
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
    let samples = Arc::new(Mutex::new(Vec::<f64>::new()));
    let mut receivers = Vec::new();
    for n in 0..relays {
        receivers.push(match setup.receiver {
            Receiver::Client => client_relay(cluster, n, Arc::clone(&samples)).await,
            Receiver::Seed => seed_relay(cluster, Arc::clone(&samples)).await,
        });
    }

    let duration = options.latency_time();
    let published = publish(cluster, setup, rate, publishers, duration).await;
    // Give the receivers time to drain what is in flight.
    let deadline = Instant::now() + Duration::from_secs(30);
    while samples.lock().map_or(0, |s| s.len()) < published as usize * relays
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut queries = 0;
    let mut delivered = 0;
    for receiver in receivers {
        let (q, d) = receiver.stop().await;
        queries += q;
        delivered += d;
    }
    let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
    Measured {
        p50: quantile(&samples, 0.50),
        p99: quantile(&samples, 0.99),
        max: quantile(&samples, 1.0),
        queries_per_event: queries as f64 / delivered.max(1) as f64,
        published_per_second: published as f64 / duration.as_secs_f64(),
    }
}

/// Paces one-event transactions over `publishers` connections; returns how many committed.
async fn publish(
    cluster: &Cluster,
    setup: Setup,
    rate: u32,
    publishers: u32,
    duration: Duration,
) -> u64 {
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
            .prepare("SELECT outbox_publish('chat', $1, '{\"text\": \"hello from the benchmark\", \"room\": 42}')")
            .await
            .expect("prepare outbox_publish");
        tasks.push(tokio::spawn(async move {
            let interval = (rate > 0)
                .then(|| Duration::from_secs_f64(f64::from(publishers) / f64::from(rate)));
            let user = format!("user-{p}");
            let mut sent = 0_u64;
            tokio::time::sleep_until(start.into()).await;
            while start.elapsed() < duration {
                if let Some(interval) = interval {
                    // Spread the publishers over the interval; catch up when behind.
                    let due = start
                        + interval.mul_f64(sent as f64)
                        + interval.mul_f64(f64::from(p) / f64::from(publishers));
                    tokio::time::sleep_until(due.into()).await;
                }
                if client.execute(&statement, &[&user]).await.is_ok() {
                    sent += 1;
                }
            }
            sent
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap_or(0);
    }
    total
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

fn latency_ms(created_at: SystemTime) -> f64 {
    SystemTime::now()
        .duration_since(created_at)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

async fn client_relay(cluster: &Cluster, n: usize, samples: Arc<Mutex<Vec<f64>>>) -> Running {
    let relay = Relay::builder(cluster.config("postgres", "postgres"))
        .application_name(format!("bench_relay_{n}"))
        .subscriber_buffer(1 << 20)
        .build()
        .expect("build the relay");
    let mut all = relay.subscribe_all();
    relay.start().await.expect("start the relay");
    let reader = tokio::spawn(async move {
        while let Some(delivery) = all.next().await {
            if let Delivery::Event(event) = delivery {
                let latency = latency_ms(event.created_at());
                if let Ok(mut samples) = samples.lock() {
                    samples.push(latency);
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
async fn seed_relay(cluster: &Cluster, samples: Arc<Mutex<Vec<f64>>>) -> Running {
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
        .prepare("SELECT payload, created_at FROM event_outbox WHERE id = $1::text::uuid")
        .await
        .expect("prepare the load by id");
    let worker = tokio::spawn(async move {
        let (mut queries, mut delivered) = (0_u64, 0_u64);
        while let Some(id) = incoming.recv().await {
            queries += 1;
            if let Ok(Some(row)) = loader.query_opt(&by_id, &[&id]).await {
                let created_at: SystemTime = row.get(1);
                delivered += 1;
                if let Ok(mut samples) = samples.lock() {
                    samples.push(latency_ms(created_at));
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
