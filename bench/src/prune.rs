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

use crate::backlog::{backlog, load_backlog, load_backlog_into_a_segment, publishers};
use crate::pgbench::{tps, tps_at};
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

/// The order of the runs with pruning: the segment's, the layout adopted, once per round and
/// between the others, so that its ratio is a median of runs spread over the figure like the
/// runs without pruning are, not one 6-second run.
fn schedule(options: &Options) -> Vec<usize> {
    let deletes: Vec<usize> = (1..PRUNINGS.len()).collect();
    let rounds = options.rounds().max(1);
    let mut order = Vec::new();
    for round in 0..rounds {
        order.push(0);
        // One DELETE arm after each segment run; the last round takes whatever is left.
        let from = round.min(deletes.len());
        let to = if round + 1 == rounds {
            deletes.len()
        } else {
            (round + 1).min(deletes.len())
        };
        order.extend(&deletes[from..to]);
    }
    order
}

/// One run with pruning.
struct Outcome {
    with: f64,
    pruned_in: Option<Duration>,
    loaded: String,
    after: String,
    catch_up: Option<retention::CatchUp>,
}

pub async fn run(cluster: &Cluster, options: &Options) -> Vec<Table> {
    let backlog = backlog(options);
    let drained = crate::drain::spawn(cluster).await;
    let publish = || publishers(options);
    let admin = cluster.connect("postgres").await;
    let size = || retention::size(cluster, "postgres");
    // Every run, with pruning or without, starts right after a checkpoint: a run with pruning
    // follows one (see [`settle`]), and the first writes after a checkpoint log full pages.
    let without_pruning = || {
        cluster.psql("postgres", "CHECKPOINT");
        tps(cluster, &publish())
    };

    // Without pruning before, between and after the runs with pruning.
    let mut without = vec![without_pruning()];
    let mut outcomes: Vec<Vec<Outcome>> = PRUNINGS.iter().map(|_| Vec::new()).collect();
    for arm in schedule(options) {
        let pruning = &PRUNINGS[arm];
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
                cluster.set_setting("pg_outbox.prune_pause", pause);
                if let Some(value) = wal_compression {
                    cluster.set_setting("wal_compression", value);
                }
                Some(pause)
            }
        };
        let loaded = size();
        let first_of_its_arm = outcomes[arm].is_empty();
        let catch_up =
            if first_of_its_arm && (*pruning == Pruning::Segment || *pruning == DEFAULT_DELETE) {
                Some(retention::catch_up(&admin).await)
            } else {
                None
            };
        let pruned_before = rows_pruned(&admin).await;
        cluster.set_setting("pg_outbox.prune_interval", "1s");
        let started = Instant::now();
        // pgbench blocks its thread; the prune is watched meanwhile from this task.
        let publishing = tokio::task::spawn_blocking({
            let (root, run) = (cluster.root().to_owned(), publish());
            let (port, bindir) = (cluster.port(), cluster.bindir().to_owned());
            move || tps_at(&bindir, &root, port, &run)
        });
        let pruned_in = wait_for_the_prune(&admin, started, pruned_before + backlog).await;
        let with = publishing.await.expect("the pgbench run while pruning");
        cluster.reset_setting("pg_outbox.prune_interval");
        cluster.reset_setting("wal_compression");
        if pause.is_some() {
            cluster.reset_setting("pg_outbox.prune_pause");
        }
        outcomes[arm].push(Outcome {
            with,
            pruned_in,
            loaded,
            after: size(),
            catch_up,
        });
        without.push(without_pruning());
    }
    drained.stop().await;
    drop(admin);

    let base = median(&without);
    let mut table = Table::new(
        "Publishing while the pruner removes an expired backlog",
        &[
            "the backlog lies in, and the pruner removes it by",
            "runs",
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
         rows, a transaction each. Publishers insert into the current segment all along. A run \
         without pruning (each after a CHECKPOINT too) comes before the first run with pruning \
         and after each; the segment's runs are spread over the figure, one per round. Medians \
         of an arm's runs (sizes from its first). Without pruning: {base:.0} tx/s (median of \
         {} runs).",
        options.run_time().as_secs(),
        without.len()
    );
    let (mut segment, mut plain) = (None, None);
    for (pruning, runs) in PRUNINGS.iter().zip(outcomes) {
        let with = median(&runs.iter().map(|r| r.with).collect::<Vec<_>>());
        let pruned_in = median_duration(runs.iter().map(|r| r.pruned_in));
        let runs_count = runs.len();
        let Some(first) = runs.into_iter().next() else {
            continue;
        };
        table.row(vec![
            pruning.name(),
            runs_count.to_string(),
            format!("{with:.0}"),
            ratio(with, base),
            pruned_in.map_or("not done in 10 min".into(), |d| {
                format!("{:.1} s", d.as_secs_f64())
            }),
            format!("{} → {}", first.loaded, first.after),
        ]);
        let arm = first.catch_up.map(|catch_up| Arm {
            without: without.clone(),
            with,
            pruned_in,
            loaded: first.loaded,
            after: first.after,
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

/// The median of the prune times, `None` if any prune did not finish.
fn median_duration(times: impl Iterator<Item = Option<Duration>>) -> Option<Duration> {
    let seconds: Option<Vec<f64>> = times.map(|t| t.map(|d| d.as_secs_f64())).collect();
    seconds.map(|s| Duration::from_secs_f64(median(&s)))
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
