//! Figure 5: the publish rate while the pruner removes a large backlog of expired rows, against
//! the rate without pruning. The backlog lies either in an expired segment, which the pruner
//! drops whole (the default layout), or in `event_outbox` itself, whose rows it deletes in
//! batches: back to back (`prune_pause = 0`), with the default pause, and with the default pause
//! but `wal_compression = off` set in the configuration (so the pruner leaves its full-page
//! images uncompressed). Also how long each prune takes and what the table weighs. The segment
//! run and the DELETE run with the default pause are then compared with a time-partitioned
//! outbox ([`crate::retention`]).

use std::time::{Duration, Instant};

use pg_outbox_tests::Cluster;
use tokio_postgres::Client;

use crate::pgbench::{tps, tps_at, Run};
use crate::report::{median, ratio, Table};
use crate::retention::{self, Arm};
use crate::Options;

/// Where the expired backlog lies, and so how the pruner removes it.
#[derive(PartialEq)]
enum Pruning {
    /// In an expired segment, dropped whole.
    Segment,
    /// In `event_outbox` itself, deleted in batches with `pause` between them.
    Delete {
        pause: &'static str,
        /// `wal_compression` set in the configuration, or `None` to leave it at its default
        /// (and the pruner compressing its own full-page images).
        wal_compression: Option<&'static str>,
    },
}

impl Pruning {
    fn name(&self) -> String {
        match self {
            Pruning::Segment => "an expired segment: DROP TABLE".into(),
            Pruning::Delete {
                pause,
                wal_compression: None,
            } => format!("event_outbox itself: DELETE batches, prune_pause {pause}"),
            Pruning::Delete {
                pause,
                wal_compression: Some(value),
            } => format!(
                "event_outbox itself: DELETE batches, prune_pause {pause}, wal_compression = \
                 {value} in the configuration"
            ),
        }
    }
}

/// The ways compared; the first and the third are the two sides of [`crate::retention`]'s
/// comparison.
const PRUNINGS: [Pruning; 4] = [
    Pruning::Segment,
    Pruning::Delete {
        pause: "0",
        wal_compression: None,
    },
    DEFAULT_DELETE,
    Pruning::Delete {
        pause: "100ms",
        wal_compression: Some("off"),
    },
];

const DEFAULT_DELETE: Pruning = Pruning::Delete {
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

/// The statement that inserts `backlog` rows created two hours ago into `table`.
fn insert_backlog(table: &str, backlog: i64) -> String {
    format!(
        "INSERT INTO {table} (id, channel, user_id, payload, created_at) \
         SELECT gen_random_uuid(), 'chat', 'user-' || mod(n, 100), \
                '{{\"text\": \"an expired event\", \"room\": 42}}', \
                clock_timestamp() - interval '2 hours' \
         FROM generate_series(1, {backlog}) n"
    )
}

/// Inserts `backlog` rows created two hours ago into `database`'s `event_outbox` itself (not a
/// segment), in one statement, then [`settle`]s them.
pub fn load_backlog(cluster: &Cluster, database: &str, backlog: i64) {
    cluster.psql(database, &insert_backlog("event_outbox", backlog));
    settle(cluster, database, "event_outbox");
}

/// The name the backlog's segment takes.
pub const EXPIRED_SEGMENT: &str = "event_outbox_expired_backlog";

/// Loads `backlog` rows created two hours ago into a segment the extension created: the newest,
/// which no publisher writes into yet. The segment is then renamed and moved back in
/// `outbox_segments` to the hour its rows were created in, which is how the pruner finds a
/// segment once its events have expired. Then [`settle`]s it.
pub fn load_backlog_into_a_segment(cluster: &Cluster, backlog: i64) {
    let insert = insert_backlog("%I", backlog).replace('\'', "''");
    cluster.psql(
        "postgres",
        &format!(
            "DO $$ \
             DECLARE newest name; \
             BEGIN \
                 SELECT name INTO newest FROM outbox_segments ORDER BY starts_at DESC LIMIT 1; \
                 EXECUTE format('{insert}', newest); \
                 EXECUTE format('ALTER TABLE %I RENAME TO {EXPIRED_SEGMENT}', newest); \
                 UPDATE outbox_segments SET name = '{EXPIRED_SEGMENT}', \
                     starts_at = now() - interval '3 hours', ends_at = now() - interval '2 hours' \
                 WHERE name = newest; \
             END $$"
        ),
    );
    settle(cluster, "postgres", EXPIRED_SEGMENT);
}

/// Vacuums and analyzes `table` (and `event_outbox` for its statistics over the segments), and
/// checkpoints.
///
/// The checkpoint makes the rows what expired rows are in production: written before the last
/// checkpoint, so the first change to each of their pages writes a full-page image to the WAL.
/// Without it, a prune in the same checkpoint cycle as the load wrote a quarter of the WAL (56 MB
/// for 1M rows, against 221 MB with the images), and the figure depended on where the server's
/// checkpoint timer happened to be.
fn settle(cluster: &Cluster, database: &str, table: &str) {
    cluster.psql(database, &format!("VACUUM ANALYZE {table}"));
    cluster.psql(database, "ANALYZE event_outbox");
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
    for pruning in &PRUNINGS {
        // Each prune starts from the same table: a million live rows, no dead ones left over
        // from the previous prune.
        cluster.psql("postgres", "TRUNCATE event_outbox");
        let pause = match pruning {
            Pruning::Segment => {
                load_backlog_into_a_segment(cluster, backlog);
                None
            }
            Pruning::Delete {
                pause,
                wal_compression,
            } => {
                load_backlog(cluster, "postgres", backlog);
                cluster.psql(
                    "postgres",
                    &format!("ALTER SYSTEM SET pg_outbox.prune_pause = '{pause}'"),
                );
                if let Some(value) = wal_compression {
                    cluster.psql(
                        "postgres",
                        &format!("ALTER SYSTEM SET wal_compression = '{value}'"),
                    );
                }
                Some(pause)
            }
        };
        let loaded = size();
        let catch_up = if *pruning == Pruning::Segment || *pruning == DEFAULT_DELETE {
            Some(retention::catch_up(&admin).await)
        } else {
            None
        };
        let pruned_before = rows_pruned(&admin).await;
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
        if pause.is_some() {
            cluster.psql("postgres", "ALTER SYSTEM RESET pg_outbox.prune_pause");
        }
        cluster.psql("postgres", "SELECT pg_reload_conf()");
        rows.push((pruning, with, pruned_in, loaded, size(), catch_up));
        without.push(tps(cluster, &publish()));
    }
    drained.stop().await;
    drop(admin);

    let base = median(&without);
    let mut table = Table::new(
        "Publishing while the pruner removes an expired backlog",
        &[
            "the backlog lies in, and the pruner removes it by",
            "publish tx/s while pruning",
            "vs without pruning",
            "time to prune",
            "table size loaded → after (before vacuum)",
        ],
    );
    table.note = format!(
        "pgbench, 8 clients, notify_mode = worker, {} s runs starting with the prune; {backlog} \
         rows created two hours ago, into a truncated outbox: either into a segment the \
         extension created, then renamed and moved back to the hour its rows were created in \
         (as the pruner finds a segment once it expires), or into event_outbox itself; then \
         VACUUM ANALYZE and CHECKPOINT, so that deleting them writes full-page images, as for \
         rows written hours before; then prune_interval set to 1 s. DELETE batches of 10,000 \
         rows, a transaction each. Publishers insert into the current segment all along. \
         Without pruning: {base:.0} tx/s (median of the runs before, between and after).",
        options.run_time().as_secs()
    );
    let (mut segment, mut plain) = (None, None);
    for (pruning, with, pruned_in, loaded, after, catch_up) in rows {
        table.row(vec![
            pruning.name(),
            format!("{with:.0}"),
            ratio(with, base),
            pruned_in.map_or("not done in 10 min".into(), |d| {
                format!("{:.1} s", d.as_secs_f64())
            }),
            format!("{loaded} → {after}"),
        ]);
        let arm = catch_up.map(|catch_up| Arm {
            without: without.clone(),
            with,
            pruned_in,
            loaded,
            after,
            catch_up,
        });
        if *pruning == Pruning::Segment {
            segment = arm;
        } else if *pruning == DEFAULT_DELETE {
            plain = arm;
        }
    }
    let mut tables = vec![table];
    tables.extend(
        retention::run(
            cluster,
            options,
            plain.expect("the DELETE run with the default pause"),
            segment.expect("the segment run"),
        )
        .await,
    );
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
