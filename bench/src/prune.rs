//! Figure 5: the publish rate while the pruner deletes a large backlog of expired rows, against
//! the rate without pruning; how long the prune takes and what the table weighs afterwards.

use std::time::{Duration, Instant};

use pg_outbox_tests::Cluster;

use crate::pgbench::{tps, Run};
use crate::report::{median, ratio, Table};
use crate::Options;

pub async fn run(cluster: &Cluster, options: &Options) -> Vec<Table> {
    let backlog = if options.smoke { 20_000 } else { 1_000_000 };
    let drained = crate::drain::spawn(cluster).await;
    let publish = || Run {
        script: "publish.sql".into(),
        clients: 8,
        duration: options.run_time(),
        options: "-c pg_outbox.notify_mode=worker".into(),
        variables: Vec::new(),
    };
    let admin = cluster.connect("postgres").await;
    cluster.psql("postgres", "TRUNCATE event_outbox");
    let size = |label: &'static str| {
        let bytes = cluster.psql(
            "postgres",
            "SELECT pg_size_pretty(pg_total_relation_size('event_outbox'))",
        );
        (label, bytes)
    };
    let empty = size("empty");

    // Without pruning, twice around the run with pruning, so either side of it is measured.
    let mut without = vec![tps(cluster, &publish())];
    cluster.psql(
        "postgres",
        &format!(
            "INSERT INTO event_outbox (id, channel, user_id, payload, created_at) \
             SELECT gen_random_uuid(), 'chat', 'user-' || (n % 100), \
                    '{{\"text\": \"an expired event\", \"room\": 42}}', \
                    clock_timestamp() - interval '2 hours' \
             FROM generate_series(1, {backlog}) n"
        ),
    );
    cluster.psql("postgres", "VACUUM ANALYZE event_outbox");
    let loaded = size("with the expired backlog");

    cluster.psql(
        "postgres",
        "ALTER SYSTEM SET pg_outbox.prune_interval = '1s'",
    );
    cluster.psql("postgres", "SELECT pg_reload_conf()");
    let started = Instant::now();
    // pgbench blocks its thread; the prune is watched meanwhile from this task.
    let publishing = tokio::task::spawn_blocking({
        let (cluster_root, run) = (cluster.root().to_owned(), publish());
        let port = cluster.port();
        let bindir = cluster.bindir().to_owned();
        move || crate::pgbench::tps_at(&bindir, &cluster_root, port, &run)
    });
    let mut pruned_in = None;
    while started.elapsed() < Duration::from_secs(600) {
        let left: i64 = admin
            .query_one(
                "SELECT count(*) FROM event_outbox WHERE created_at < now() - interval '1 hour'",
                &[],
            )
            .await
            .map(|row| row.get(0))
            .unwrap_or(-1);
        if left == 0 {
            pruned_in = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let with = publishing.await.expect("the pgbench run while pruning");
    cluster.psql("postgres", "ALTER SYSTEM RESET pg_outbox.prune_interval");
    cluster.psql("postgres", "SELECT pg_reload_conf()");
    let pruned = size("after pruning (before vacuum)");
    without.push(tps(cluster, &publish()));
    drained.stop().await;

    let base = median(&without);
    let mut rates = Table::new(
        "Publishing while the pruner deletes an expired backlog",
        &["", "value"],
    );
    rates.note = format!(
        "pgbench, 8 clients, notify_mode = worker, {} s runs; {backlog} rows created two hours \
         ago, then prune_interval set to 1 s; the worker deletes in batches of 10,000, a \
         transaction each.",
        options.run_time().as_secs()
    );
    rates.row(vec![
        "publish tx/s without pruning (median of before and after)".into(),
        format!("{base:.0}"),
    ]);
    rates.row(vec![
        "publish tx/s while pruning".into(),
        format!("{with:.0} ({})", ratio(with, base)),
    ]);
    rates.row(vec![
        format!("time to prune {backlog} rows"),
        pruned_in.map_or("not done in 10 min".into(), |d| {
            format!("{:.1} s", d.as_secs_f64())
        }),
    ]);
    for (label, bytes) in [empty, loaded, pruned] {
        rates.row(vec![format!("event_outbox size, {label}"), bytes]);
    }
    vec![rates]
}
