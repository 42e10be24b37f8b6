//! Figure 5: the publish rate while the pruner deletes a large backlog of expired rows, against
//! the rate without pruning, with batches back to back (`prune_pause = 0`) and with the default
//! pause, and with the default pause but `wal_compression = off` set in the configuration (so
//! the pruner leaves its full-page images uncompressed); how long each prune takes and what the
//! table weighs. The run with the default pause is
//! then compared with a time-partitioned outbox whose expired partitions are dropped
//! ([`crate::retention`]).

use std::time::{Duration, Instant};

use pg_outbox_tests::Cluster;
use tokio_postgres::Client;

use crate::pgbench::{tps, tps_at, Run};
use crate::report::{median, ratio, Table};
use crate::retention::{self, Arm};
use crate::Options;

/// One way of running the pruner.
#[derive(PartialEq)]
struct Pruning {
    pause: &'static str,
    /// `wal_compression` set in the configuration, or `None` to leave it at its default (and
    /// the pruner compressing its own full-page images).
    wal_compression: Option<&'static str>,
}

impl Pruning {
    fn name(&self) -> String {
        match self.wal_compression {
            None => format!("prune_pause {}", self.pause),
            Some(value) => format!(
                "prune_pause {}, wal_compression = {value} in the configuration",
                self.pause
            ),
        }
    }
}

/// The ways compared; the second is the default, and its run is the plain table's side of
/// [`crate::retention`]'s comparison.
const PRUNINGS: [Pruning; 3] = [
    Pruning {
        pause: "0",
        wal_compression: None,
    },
    DEFAULT_PRUNING,
    Pruning {
        pause: "100ms",
        wal_compression: Some("off"),
    },
];

const DEFAULT_PRUNING: Pruning = Pruning {
    pause: "100ms",
    wal_compression: None,
};

/// The backlog's size: a million rows, or a few for `--smoke`.
pub fn backlog(options: &Options) -> i64 {
    if options.smoke {
        20_000
    } else {
        1_000_000
    }
}

/// The publishers of this figure: `outbox_publish` from 8 pgbench clients, in worker mode.
pub fn publishers(options: &Options) -> Run {
    Run {
        script: "publish.sql".into(),
        clients: 8,
        duration: options.run_time(),
        options: "-c pg_outbox.notify_mode=worker".into(),
        variables: Vec::new(),
    }
}

/// Inserts `backlog` rows created two hours ago into `database`'s `event_outbox`, in one
/// statement, vacuums and analyzes the table, and checkpoints.
///
/// The checkpoint makes the rows what expired rows are in production: written before the last
/// checkpoint, so the first change to each of their pages writes a full-page image to the WAL.
/// Without it, a prune in the same checkpoint cycle as the load wrote a quarter of the WAL (56 MB
/// for 1M rows, against 221 MB with the images), and the figure depended on where the server's
/// checkpoint timer happened to be.
pub fn load_backlog(cluster: &Cluster, database: &str, backlog: i64) {
    cluster.psql(
        database,
        &format!(
            "INSERT INTO event_outbox (id, channel, user_id, payload, created_at) \
             SELECT gen_random_uuid(), 'chat', 'user-' || (n % 100), \
                    '{{\"text\": \"an expired event\", \"room\": 42}}', \
                    clock_timestamp() - interval '2 hours' \
             FROM generate_series(1, {backlog}) n"
        ),
    );
    cluster.psql(database, "VACUUM ANALYZE event_outbox");
    cluster.psql(database, "CHECKPOINT");
}

pub async fn run(cluster: &Cluster, options: &Options) -> Vec<Table> {
    let backlog = backlog(options);
    let drained = crate::drain::spawn(cluster).await;
    let publish = || publishers(options);
    let admin = cluster.connect("postgres").await;
    let size = || retention::size(cluster, "postgres");

    // Without pruning before, between and after the runs with pruning.
    let mut without = vec![tps(cluster, &publish())];
    let mut rows = Vec::new();
    let mut catch_up = None;
    for pruning in &PRUNINGS {
        let is_default = *pruning == DEFAULT_PRUNING;
        // Each prune starts from the same table: a million live rows, no dead ones left over
        // from the previous prune.
        cluster.psql("postgres", "TRUNCATE event_outbox");
        load_backlog(cluster, "postgres", backlog);
        let loaded = size();
        if is_default {
            catch_up = Some(retention::catch_up(&admin).await);
        }
        let pruned_before = rows_pruned(&admin).await;
        cluster.psql(
            "postgres",
            &format!(
                "ALTER SYSTEM SET pg_outbox.prune_pause = '{}'",
                pruning.pause
            ),
        );
        if let Some(value) = pruning.wal_compression {
            cluster.psql(
                "postgres",
                &format!("ALTER SYSTEM SET wal_compression = '{value}'"),
            );
        }
        cluster.psql(
            "postgres",
            "ALTER SYSTEM SET pg_outbox.prune_interval = '1s'",
        );
        cluster.psql("postgres", "SELECT pg_reload_conf()");
        let started = Instant::now();
        // pgbench blocks its thread; the prune is watched meanwhile from this task.
        let publishing = tokio::task::spawn_blocking({
            let (root, run) = (cluster.root().to_owned(), publish());
            let (port, bindir) = (cluster.port(), cluster.bindir().to_owned());
            move || tps_at(&bindir, &root, port, &run)
        });
        let pruned_in = wait_for_the_prune(&admin, started, pruned_before + backlog).await;
        let with = publishing.await.expect("the pgbench run while pruning");
        cluster.psql("postgres", "ALTER SYSTEM RESET pg_outbox.prune_interval");
        cluster.psql("postgres", "ALTER SYSTEM RESET wal_compression");
        cluster.psql("postgres", "SELECT pg_reload_conf()");
        rows.push((pruning, is_default, with, pruned_in, loaded, size()));
        without.push(tps(cluster, &publish()));
    }
    cluster.psql("postgres", "ALTER SYSTEM RESET pg_outbox.prune_pause");
    cluster.psql("postgres", "SELECT pg_reload_conf()");
    drained.stop().await;
    drop(admin);

    let base = median(&without);
    let mut table = Table::new(
        "Publishing while the pruner deletes an expired backlog",
        &[
            "pruner",
            "publish tx/s while pruning",
            "vs without pruning",
            "time to prune",
            "table size loaded → after (before vacuum)",
        ],
    );
    table.note = format!(
        "pgbench, 8 clients, notify_mode = worker, {} s runs starting with the prune; {backlog} \
         rows created two hours ago (into a truncated table, then VACUUM ANALYZE and CHECKPOINT, \
         so that deleting them writes full-page images, as for rows written hours before), \
         then prune_interval set to 1 s; batches of 10,000 rows, a transaction each. Without \
         pruning: {base:.0} tx/s (median of the runs before, between and after).",
        options.run_time().as_secs()
    );
    let mut plain = None;
    for (pruning, is_default, with, pruned_in, loaded, after) in rows {
        table.row(vec![
            pruning.name(),
            format!("{with:.0}"),
            ratio(with, base),
            pruned_in.map_or("not done in 10 min".into(), |d| {
                format!("{:.1} s", d.as_secs_f64())
            }),
            format!("{loaded} → {after}"),
        ]);
        if is_default {
            plain = Some((with, pruned_in, loaded, after));
        }
    }
    let (with, pruned_in, loaded, after) = plain.expect("the run with the default pause");
    let plain = Arm {
        without,
        with,
        pruned_in,
        loaded,
        after,
        catch_up: catch_up.expect("the catch-up timed on the plain table"),
    };
    let mut tables = vec![table];
    tables.extend(retention::run(cluster, options, plain).await);
    tables
}

/// `outbox_prune_state.rows_pruned`: a one-row read, so watching the prune costs the
/// publishers nothing (counting the expired rows would scan an index of a million entries).
async fn rows_pruned(admin: &Client) -> i64 {
    admin
        .query_one("SELECT rows_pruned FROM outbox_prune_state", &[])
        .await
        .map(|row| row.get(0))
        .unwrap_or(-1)
}

/// Waits until `rows_pruned` reaches `target`; returns how long it took from `started`.
async fn wait_for_the_prune(admin: &Client, started: Instant, target: i64) -> Option<Duration> {
    while started.elapsed() < Duration::from_secs(600) {
        if rows_pruned(admin).await >= target {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}
