//! Figures of resumes. A reconnect storm: one replica's browsers all arrive at another within a
//! second, each resuming from the position its last event carried (`Relay::subscribe_from`):
//! how many catch-up queries they cost, how soon the last of them holds what it missed and the
//! next live event, and what the server spends; side by side, the same resumes done the way an
//! app would by hand, one catch-up query per browser. And what one browser's resume costs after
//! it was away a second, a minute or an hour while other users' traffic went on: rows read and
//! time, beside the plan of 0.5.0's catch-up (the `xid` index from the position on, users as a
//! filter).

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
    vec![table, away(cluster, options).await]
}

/// Other users' events per second while the browser is away.
const OTHERS_PER_SECOND: u64 = 100;

/// One browser's resume after it was away while other users published: rows read and time.
async fn away(cluster: &Cluster, options: &Options) -> Table {
    let mut table = Table::new(
        "One resume against how long the browser was away",
        &[
            "away",
            "others' events since",
            "resume to its event ms",
            "catch-up rows read",
            "catch-up ms",
            "0.5.0's plan: rows read",
            "0.5.0's plan: ms",
        ],
    );
    table.note = format!(
        "A browser (user away-1) reads one event on relay A and keeps its position; then \
         {OTHERS_PER_SECOND} events per second of other users (10,000 of them) for the time away, \
         published at once, and one event for away-1; ANALYZE. The browser resumes on relay B, \
         started then: from subscribe_from to its event. The catch-up statement alone, with the \
         relay's settings (generic plan), under EXPLAIN ANALYZE: rows read from event_outbox \
         and its segments (returned and filtered out, every loop), and its execution time. \
         0.5.0's plan: the same rows read the way 0.5.0 read them, through the xid index from the \
         position on with the users as a filter (no (user_id, xid) index)."
    );
    let absences: &[(&str, u64)] = if options.smoke {
        &[("1 s", 1), ("1 min", 60)]
    } else {
        &[("1 s", 1), ("1 min", 60), ("1 h", 3_600)]
    };
    let publisher = cluster.connect("postgres").await;
    for &(label, seconds) in absences {
        cluster.psql("postgres", "TRUNCATE event_outbox");
        let issuer = relay(cluster, "bench_away_a").await;
        let mut browser = issuer.subscribe_to(Topic::all().user("away-1"));
        publisher
            .batch_execute("SELECT outbox_publish('chat', 'away-1', '{}')")
            .await
            .expect("publish the event the browser reads");
        next_event(&mut browser).await;
        let token = browser.position().expect("a position").to_string();
        let from: String = publisher
            .query_one("SELECT pg_snapshot_xmin(pg_current_snapshot())::text", &[])
            .await
            .expect("read where the browser stands")
            .get(0);
        issuer.shutdown().await;

        let others = OTHERS_PER_SECOND * seconds;
        let mut published = 0;
        while published < others {
            let chunk = (others - published).min(50_000);
            publisher
                .batch_execute(&format!(
                    "SELECT outbox_publish('chat', 'other-' || (n % 10000), '{{\"n\": 1}}') \
                     FROM generate_series(1, {chunk}) n"
                ))
                .await
                .expect("publish other users' events");
            published += chunk;
        }
        publisher
            .batch_execute("SELECT outbox_publish('chat', 'away-1', '{}'); ANALYZE")
            .await
            .expect("publish the event the browser missed");

        let resumer = relay(cluster, "bench_away_b").await;
        let started = Instant::now();
        let mut resumed = resumer.subscribe_from(Topic::all().user("away-1"), &token);
        next_event(&mut resumed).await;
        let resume = started.elapsed();
        resumer.shutdown().await;

        let relay_plan = explain(
            &publisher,
            &pg_outbox_client::__catch_up_sql("public"),
            "'{away-1}', ARRAY[$from], '{}', '{}', NULL",
            &from,
        )
        .await;
        let old_plan = explain(
            &publisher,
            "SELECT o.id FROM event_outbox o, (SELECT pg_current_snapshot() AS s) snap \
             WHERE o.xid >= $1::text::xid8 AND o.xid < pg_snapshot_xmax(snap.s) \
               AND pg_visible_in_snapshot(o.xid, snap.s) AND o.user_id || '' = ANY($2::text[]) \
             ORDER BY o.xid, o.id",
            "$from, '{away-1}'",
            &from,
        )
        .await;
        table.row(vec![
            label.to_owned(),
            others.to_string(),
            format!("{:.1}", resume.as_secs_f64() * 1e3),
            relay_plan.rows_read.to_string(),
            format!("{:.2}", relay_plan.ms),
            old_plan.rows_read.to_string(),
            format!("{:.2}", old_plan.ms),
        ]);
    }
    table
}

/// What EXPLAIN ANALYZE says of one statement.
struct Explained {
    /// Rows read from event_outbox and its segments: returned or filtered out, every loop.
    rows_read: u64,
    ms: f64,
}

/// EXPLAIN ANALYZE of `statement` prepared with the relay's session settings and executed with
/// `arguments`, where `$from` stands for `from` (as text).
async fn explain(client: &Client, statement: &str, arguments: &str, from: &str) -> Explained {
    let arguments = arguments.replace("$from", &format!("'{from}'"));
    client
        .batch_execute(&format!(
            "{}; DEALLOCATE ALL; PREPARE explained AS {statement}",
            pg_outbox_client::__QUERY_SESSION_SETTINGS
        ))
        .await
        .expect("prepare the statement to explain");
    let json: serde_json::Value = client
        .query_one(
            &format!("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE explained({arguments})"),
            &[],
        )
        .await
        .expect("explain the statement")
        .get(0);
    client
        .batch_execute("DEALLOCATE ALL; RESET ALL")
        .await
        .expect("reset the session");
    let root = &json[0];
    Explained {
        rows_read: rows_read(&root["Plan"]),
        ms: root["Execution Time"].as_f64().unwrap_or(0.0),
    }
}

/// Rows the scans of event_outbox and its segments under `node` read.
fn rows_read(node: &serde_json::Value) -> u64 {
    let number = |key: &str| node[key].as_f64().unwrap_or(0.0);
    let own = match (node["Node Type"].as_str(), node["Relation Name"].as_str()) {
        (Some(kind), Some(relation))
            if kind.ends_with("Scan") && relation.starts_with("event_outbox") =>
        {
            (number("Actual Rows")
                + number("Rows Removed by Filter")
                + number("Rows Removed by Index Recheck"))
                * number("Actual Loops")
        }
        _ => 0.0,
    };
    let children: u64 = node["Plans"]
        .as_array()
        .map_or(0, |plans| plans.iter().map(rows_read).sum());
    own.round() as u64 + children
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
