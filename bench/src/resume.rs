//! Figure: a reconnect storm. One replica's browsers all arrive at another within a second, each
//! resuming from the position its last event carried (`Relay::subscribe_from`): how many
//! catch-up queries they cost, how soon the last of them holds what it missed and the next live
//! event, and what the server spends. Side by side, the same resumes done the way an app would
//! by hand: one catch-up query per browser.

use std::time::{Duration, Instant};

use pg_outbox_client::{Delivery, Relay, RelayBuilder, Subscription, Topic};
use pg_outbox_tests::Cluster;
use tokio_postgres::Client;

use crate::report::Table;
use crate::server_cpu;
use crate::Options;

pub async fn run(cluster: &Cluster, options: &Options) -> Vec<Table> {
    let browsers = if options.smoke { 50 } else { 5_000 };
    let mut table = Table::new(
        "A reconnect storm: resumes arriving within one second",
        &[
            "resumes by",
            "browsers",
            "catch-up queries",
            "queries per resume",
            "last missed event ms",
            "last live event ms",
            "server CPU ms",
            "server CPU per resume µs",
        ],
    );
    table.note = format!(
        "Each of {browsers} users has one subscription (`Topic::all().user(…)`) on relay A and reads \
         one event; the positions are kept and A's subscriptions dropped. One more event per \
         user is published (what the browsers miss while they move), then all {browsers} \
         resume on relay B within one second, and once the last resume is issued one live \
         event per user is published. Times run from the first resume to the last browser \
         holding its missed event, and its live one. Server CPU: every PostgreSQL process, \
         from /proc, over that window. By hand: the same catch-ups as one query per browser \
         (`WHERE user_id = $1 AND xid >= $2`, on the xid index), from 8 connections."
    );
    let storm = relay_storm(cluster, browsers).await;
    table.row(storm.row("Relay::subscribe_from", browsers));
    let by_hand = by_hand(cluster, browsers).await;
    table.row(by_hand.row("one query each", browsers));
    vec![table]
}

struct Storm {
    queries: u64,
    missed_after: Duration,
    live_after: Option<Duration>,
    server_cpu: Duration,
}

impl Storm {
    fn row(&self, how: &str, browsers: usize) -> Vec<String> {
        vec![
            how.to_owned(),
            browsers.to_string(),
            self.queries.to_string(),
            format!("{:.4}", self.queries as f64 / browsers as f64),
            format!("{:.0}", self.missed_after.as_secs_f64() * 1e3),
            self.live_after.map_or("-".into(), |live| {
                format!("{:.0}", live.as_secs_f64() * 1e3)
            }),
            format!("{:.0}", self.server_cpu.as_secs_f64() * 1e3),
            format!(
                "{:.0}",
                self.server_cpu.as_secs_f64() * 1e6 / browsers as f64
            ),
        ]
    }
}

async fn relay(cluster: &Cluster, name: &str) -> Relay {
    let relay = RelayBuilder::new(cluster.config("postgres", "postgres"))
        .application_name(name)
        .build()
        .expect("build a relay");
    relay.start().await.expect("start a relay");
    relay
}

fn user(n: usize) -> String {
    format!("storm-{n}")
}

async fn publish_one_each(client: &Client, browsers: usize) {
    client
        .batch_execute(&format!(
            "SELECT outbox_publish('chat', 'storm-' || n, '{{}}') FROM generate_series(0, {}) n",
            browsers - 1
        ))
        .await
        .expect("publish one event per user");
}

/// The next event of `subscription`, within a minute.
async fn next_event(subscription: &mut Subscription) {
    match tokio::time::timeout(Duration::from_secs(60), subscription.recv()).await {
        Ok(Some(Delivery::Event(_))) => {}
        other => panic!("the storm expected an event, got {other:?}"),
    }
}

/// Positions of `browsers` users that each read one event on a relay that is then stopped.
async fn positions(cluster: &Cluster, publisher: &Client, browsers: usize) -> Vec<String> {
    cluster.psql("postgres", "TRUNCATE event_outbox");
    let issuer = relay(cluster, "bench_storm_a").await;
    let mut subscriptions: Vec<Subscription> = (0..browsers)
        .map(|n| issuer.subscribe_to(Topic::all().user(user(n))))
        .collect();
    publish_one_each(publisher, browsers).await;
    let mut tokens = Vec::with_capacity(browsers);
    for subscription in &mut subscriptions {
        next_event(subscription).await;
        tokens.push(subscription.position().expect("a position").to_string());
    }
    issuer.shutdown().await;
    tokens
}

async fn relay_storm(cluster: &Cluster, browsers: usize) -> Storm {
    let publisher = cluster.connect("postgres").await;
    let tokens = positions(cluster, &publisher, browsers).await;
    publish_one_each(&publisher, browsers).await;
    let resumer = relay(cluster, "bench_storm_b").await;
    let cpu_before = server_cpu::used(&server_cpu::data_dir(cluster));
    let started = Instant::now();
    let mut readers = Vec::with_capacity(browsers);
    // Spread over one second, as browsers arrive.
    let per_tick = browsers.div_ceil(100);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for (n, token) in tokens.iter().enumerate() {
        if n % per_tick == 0 {
            tick.tick().await;
        }
        let mut subscription = resumer.subscribe_from(Topic::all().user(user(n)), token);
        readers.push(tokio::spawn(async move {
            next_event(&mut subscription).await;
            let missed = Instant::now();
            next_event(&mut subscription).await;
            (missed, Instant::now())
        }));
    }
    publish_one_each(&publisher, browsers).await;
    let (mut missed_at, mut live_at) = (started, started);
    for reader in readers {
        let (missed, live) = reader.await.expect("a storm reader");
        missed_at = missed_at.max(missed);
        live_at = live_at.max(live);
    }
    let cpu_after = server_cpu::used(&server_cpu::data_dir(cluster));
    let metrics = resumer.metrics();
    assert_eq!(metrics.resumes, browsers as u64);
    assert_eq!(metrics.resets, 0, "every position resumes exactly");
    resumer.shutdown().await;
    Storm {
        queries: metrics.resume_queries,
        missed_after: missed_at - started,
        live_after: Some(live_at - started),
        server_cpu: cpu_after
            .zip(cpu_before)
            .map_or(Duration::ZERO, |(after, before)| {
                after.saturating_sub(before)
            }),
    }
}

/// The hand-written resume: per browser, the rows of its user from the transaction it last
/// saw on (an `xid >= …` scan is the best a hand-written query has; an id is no position).
async fn by_hand(cluster: &Cluster, browsers: usize) -> Storm {
    cluster.psql("postgres", "TRUNCATE event_outbox");
    let publisher = cluster.connect("postgres").await;
    publish_one_each(&publisher, browsers).await;
    let from: String = publisher
        .query_one("SELECT pg_snapshot_xmin(pg_current_snapshot())::text", &[])
        .await
        .expect("read the resume point")
        .get(0);
    publish_one_each(&publisher, browsers).await;
    let cpu_before = server_cpu::used(&server_cpu::data_dir(cluster));
    let started = Instant::now();
    let connections = 8;
    let mut workers = Vec::new();
    for worker in 0..connections {
        let client = cluster.connect("postgres").await;
        let from = from.clone();
        workers.push(tokio::spawn(async move {
            let statement = client
                .prepare(
                    "SELECT id, payload FROM event_outbox \
                     WHERE user_id = $1 AND xid >= $2::text::xid8 ORDER BY xid, id",
                )
                .await
                .expect("prepare the hand-written resume");
            for n in (worker..browsers).step_by(connections) {
                let rows = client
                    .query(&statement, &[&user(n), &from])
                    .await
                    .expect("a hand-written resume");
                assert_eq!(rows.len(), 1, "one missed event each");
            }
        }));
    }
    for worker in workers {
        worker.await.expect("a hand-written resume worker");
    }
    let missed_after = started.elapsed();
    let cpu_after = server_cpu::used(&server_cpu::data_dir(cluster));
    Storm {
        queries: browsers as u64,
        missed_after,
        live_after: None,
        server_cpu: cpu_after
            .zip(cpu_before)
            .map_or(Duration::ZERO, |(after, before)| {
                after.saturating_sub(before)
            }),
    }
}
