//! Figure: a relay started just after the current segment was emptied and vacuumed, beside one
//! started over a segment whose statistics are current. The relay's statements keep one plan
//! each for the life of their connection; made over statistics that say "0 pages, 0 rows", a
//! plan free to scan the segment would scan it whole at every fetch as it filled.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use pg_outbox_client::{Delivery, RelayBuilder, Topic};
use pg_outbox_tests::Cluster;

use crate::pace;
use crate::report::{quantile, Table};
use crate::server_cpu;
use crate::Options;

const PUBLISHERS: u32 = 4;

#[derive(Clone, Copy)]
enum Outbox {
    /// 5,000 events, then ANALYZE: what autovacuum leaves on a busy outbox.
    Analyzed,
    /// Emptied, then VACUUM ANALYZE: a quiet night, a manual VACUUM.
    EmptiedAndVacuumed,
}

impl Outbox {
    fn name(self) -> &'static str {
        match self {
            Outbox::Analyzed => "statistics current (5,000 rows analyzed)",
            Outbox::EmptiedAndVacuumed => "emptied and vacuumed (0 pages, 0 rows)",
        }
    }

    fn prepare(self, cluster: &Cluster) {
        cluster.psql("postgres", "TRUNCATE event_outbox");
        match self {
            Outbox::Analyzed => {
                cluster.psql(
                    "postgres",
                    "SELECT count(outbox_publish('chat', 'u' || n, '{}')) \
                     FROM generate_series(1, 5000) n",
                );
                cluster.psql("postgres", "ANALYZE");
            }
            Outbox::EmptiedAndVacuumed => {
                cluster.psql("postgres", "VACUUM ANALYZE");
            }
        }
    }
}

pub async fn run(cluster: &Cluster, options: &Options) -> Vec<Table> {
    let rate = if options.smoke { 200 } else { 5_000 };
    let duration = options.latency_time() * if options.smoke { 1 } else { 6 };
    let mut table = Table::new(
        "The relay after the current segment was emptied and vacuumed",
        &[
            "outbox when the relay started",
            "events",
            "p50 ms",
            "p99 ms",
            "p50 ms, last sixth",
            "server CPU ms per 1,000 events",
        ],
    );
    table.note = format!(
        "A relay with the defaults starts over the outbox as described, then {PUBLISHERS} \
         publishers pace one-event transactions at {rate} events/s for {} s, with no ANALYZE \
         meanwhile. Latency from each row's created_at to its delivery; the last sixth's median \
         shows a plan that degrades as the segment fills. Server CPU: every PostgreSQL process, \
         from /proc, per 1,000 events. Goal: the two rows within noise of each other.",
        duration.as_secs()
    );
    for outbox in [Outbox::Analyzed, Outbox::EmptiedAndVacuumed] {
        outbox.prepare(cluster);
        let relay = RelayBuilder::new(cluster.config("postgres", "postgres"))
            .application_name("bench_plan")
            .subscriber_buffer(1 << 20)
            .build()
            .expect("build the relay");
        let mut subscription = relay.subscribe_to(Topic::all());
        relay.start().await.expect("start the relay");
        let latencies = Arc::new(Mutex::new(Vec::new()));
        let collected = Arc::clone(&latencies);
        let collector = tokio::spawn(async move {
            while let Some(delivery) = subscription.recv().await {
                if let Delivery::Event(event) = delivery {
                    let ms = SystemTime::now()
                        .duration_since(event.created_at())
                        .map_or(0.0, |d| d.as_secs_f64() * 1e3);
                    collected.lock().expect("latencies").push(ms);
                }
            }
        });
        let data_dir = server_cpu::data_dir(cluster);
        let server_before = server_cpu::used(&data_dir).unwrap_or_default();
        let users = Arc::new((0..1000).map(|n| format!("u{n}")).collect::<Vec<_>>());
        let events = pace::publish(
            cluster,
            "SELECT outbox_publish('chat', $1, '{}')",
            users,
            PUBLISHERS,
            rate,
            duration,
        )
        .await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while (latencies.lock().expect("latencies").len() as u64) < events
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let server_cpu = server_cpu::used(&data_dir).unwrap_or_default() - server_before;
        relay.shutdown().await;
        let _ = collector.await;
        let latencies = latencies.lock().expect("latencies").clone();
        let last_sixth = &latencies[latencies.len() - latencies.len() / 6..];
        table.row(vec![
            outbox.name().to_owned(),
            format!("{} of {events}", latencies.len()),
            format!("{:.2}", quantile(&latencies, 0.50)),
            format!("{:.2}", quantile(&latencies, 0.99)),
            format!("{:.2}", quantile(last_sixth, 0.50)),
            format!(
                "{:.0}",
                server_cpu.as_secs_f64() * 1e6 / events.max(1) as f64
            ),
        ]);
    }
    vec![table]
}
