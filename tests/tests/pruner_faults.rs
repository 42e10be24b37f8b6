//! The pruner worker under faults: killed mid-batch, its database dropped and created again, its
//! extension missing at start and dropped mid-prune, the server stopped mid-prune. Each time it
//! recovers or waits quietly, never crash-loops, and never deletes a row younger than retention.
//!
//! The tests wait for what the server reports, not for time to pass: the pruner's passes, pid
//! and start in `pg_stat_activity`, and what it pruned in `outbox_prune_state` (see
//! `pg_outbox_tests::pruner`). How many times it restarted is bounded by when the running one
//! started (the postmaster waits 5 s after each exit); a crash shows as a new checkpointer. The
//! server log is read only where it is itself the subject (a wait is said once; the pruner
//! says it stops, when the server is down). A pruner whose database is gone never connects, so
//! no view shows its attempts: their processes, in `/proc`, do.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use pg_outbox_tests::pruner::{
    insert_aged, pruner_pid, pruner_state, restarts_since, rows_pruned, server_clock, server_start,
    wait_for_passes, WAITING_FOR_EXTENSION,
};
use pg_outbox_tests::{Cluster, ClusterBuilder, WAIT};
use tokio_postgres::Client;

/// Passes a waiting pruner must run as one process: a crash loop would show as a new pid, or as
/// passes that stop coming.
const QUIET_PASSES: usize = 5;
/// What the pruner's processes show as their title, from their start.
const PRUNER_TITLE: &str = "postgres: pg_outbox pruner";

/// Retention 1 h, a pass every second, small batches back to back so a backlog takes many
/// transactions, quickly.
fn cluster(database: &str) -> ClusterBuilder {
    Cluster::builder()
        .setting("pg_outbox.retention", "'1h'")
        .setting("pg_outbox.prune_interval", "'1s'")
        .setting("pg_outbox.prune_batch_size", "50")
        .setting("pg_outbox.prune_pause", "0")
        .setting("pg_outbox.database", &format!("'{database}'"))
}

async fn count(client: &Client, channel: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM event_outbox WHERE channel = $1",
            &[&channel],
        )
        .await
        .unwrap()
        .get(0)
}

/// Rows 50 minutes old (younger than retention) and fresh ones, which must all survive.
const YOUNG: i32 = 500;
async fn insert_young(client: &Client) {
    insert_aged(client, YOUNG, "50 minutes", "young").await;
    insert_aged(client, YOUNG, "0 seconds", "young").await;
}

async fn assert_young_intact(client: &Client) {
    assert_eq!(
        count(client, "young").await,
        2 * i64::from(YOUNG),
        "a row younger than retention was pruned"
    );
}

/// Waits until the worker has deleted some of the backlog (it is mid-pass: batches remain).
async fn wait_mid_prune(cluster: &Cluster, client: &Client) {
    cluster
        .wait_for("pruning to be under way", WAIT, || async {
            let pruned = rows_pruned(client).await;
            let left = count(client, "old").await;
            (pruned > 0 && left > 0).then_some(())
        })
        .await;
}

async fn wait_all_old_pruned(cluster: &Cluster, client: &Client) {
    cluster
        .wait_for("the backlog to be pruned", WAIT, || async {
            (count(client, "old").await == 0).then_some(())
        })
        .await;
}

/// Panics if the server crashed since its checkpointer was `checkpointer` (see
/// [`Cluster::checkpointer_pid`]).
fn assert_no_crash(cluster: &Cluster, checkpointer: i32) {
    assert_eq!(
        cluster.checkpointer_pid(),
        checkpointer,
        "the server crashed (its processes were started again):\n{}",
        cluster.log()
    );
}

/// Waits until the pruner waits for its extension, then for [`QUIET_PASSES`] more passes, and
/// checks that it waits quietly: one process throughout, and one line in the server log since
/// `log_from` (a length of [`Cluster::log`]) saying why.
async fn assert_waits_quietly(cluster: &Cluster, client: &Client, log_from: usize) {
    cluster
        .wait_for("the pruner to wait for the extension", WAIT, || async {
            let state = pruner_state(client).await;
            (state.as_deref() == Some(WAITING_FOR_EXTENSION)).then_some(())
        })
        .await;
    let pid = pruner_pid(cluster, client).await;
    let since = server_clock(client).await;
    let pids = wait_for_passes(cluster, client, WAITING_FOR_EXTENSION, &since, QUIET_PASSES).await;
    assert!(
        pids.iter().all(|&p| p == pid),
        "the waiting pruner {pid} was replaced: passes ran by {pids:?}"
    );
    // Saying it once, rather than every pass, is what is checked here: only the log shows it.
    let log = cluster.log();
    assert_eq!(
        log[log_from..]
            .matches("the pruner waits for CREATE EXTENSION")
            .count(),
        1,
        "{log}"
    );
}

#[tokio::test]
async fn killed_mid_batch_it_comes_back_once_and_finishes() {
    let cluster = cluster("postgres").start();
    let checkpointer = cluster.checkpointer_pid();
    let client = cluster.connect("postgres").await;
    insert_young(&client).await;
    insert_aged(&client, 100_000, "2 hours", "old").await;
    wait_mid_prune(&cluster, &client).await;
    let first = pruner_pid(&cluster, &client).await;
    // The pruner killed is the one the server started with.
    let started = server_start(&client).await;
    assert_eq!(restarts_since(&cluster, &client, &started).await, 0);
    let killed_at = server_clock(&client).await;
    client
        .execute("SELECT pg_terminate_backend($1)", &[&first])
        .await
        .unwrap();
    wait_all_old_pruned(&cluster, &client).await;
    assert_ne!(pruner_pid(&cluster, &client).await, first);
    // Started again once, for the kill, and not again since: no crash loop.
    assert_eq!(
        restarts_since(&cluster, &client, &killed_at).await,
        1,
        "{}",
        cluster.log()
    );
    assert_young_intact(&client).await;
    // The recorded total is exact: the killed batch rolled back and was done again.
    let pruned = rows_pruned(&client).await;
    assert_eq!(pruned, 100_000);
    assert_no_crash(&cluster, checkpointer);
}

#[tokio::test]
async fn waits_quietly_for_its_extension_before_it_is_created_and_after_a_drop_mid_prune() {
    let cluster = cluster("postgres").create_extension(false).start();
    let checkpointer = cluster.checkpointer_pid();
    let client = cluster.connect("postgres").await;
    assert_waits_quietly(&cluster, &client, 0).await;

    client
        .batch_execute("CREATE EXTENSION pg_outbox")
        .await
        .unwrap();
    insert_aged(&client, 100_000, "2 hours", "old").await;
    wait_mid_prune(&cluster, &client).await;
    let log_from = cluster.log().len();
    let dropped_at = server_clock(&client).await;
    client
        .batch_execute("DROP EXTENSION pg_outbox")
        .await
        .unwrap();
    assert_waits_quietly(&cluster, &client, log_from).await;
    // At most the one restart the drop caused (the batch under way fails on a dropped table).
    assert!(
        restarts_since(&cluster, &client, &dropped_at).await <= 1,
        "{}",
        cluster.log()
    );

    client
        .batch_execute("CREATE EXTENSION pg_outbox")
        .await
        .unwrap();
    insert_young(&client).await;
    insert_aged(&client, 1000, "2 hours", "old").await;
    wait_all_old_pruned(&cluster, &client).await;
    assert_young_intact(&client).await;
    assert_no_crash(&cluster, checkpointer);
}

#[tokio::test]
async fn its_database_dropped_and_created_again() {
    let cluster = Cluster::builder()
        .setting("pg_outbox.retention", "'1h'")
        .setting("pg_outbox.prune_interval", "'1s'")
        .setting("pg_outbox.database", "'app'")
        .create_extension(false)
        .start();
    let checkpointer = cluster.checkpointer_pid();
    let admin = cluster.connect("postgres").await;
    admin.batch_execute("CREATE DATABASE app").await.unwrap();
    let app = cluster.connect("app").await;
    app.batch_execute("CREATE EXTENSION pg_outbox")
        .await
        .unwrap();
    insert_aged(&app, 100, "2 hours", "old").await;
    wait_all_old_pruned(&cluster, &app).await;
    drop(app);

    // The worker holds a connection: only FORCE can drop the database under it. That ends
    // the worker once. Each later start fails to connect (FATAL, outside its control), but it
    // waits longer before each attempt (5 s, 10 s, ... up to 5 min). A pruner that cannot
    // connect never appears in pg_stat_activity, but its process does, from its start, and
    // lives as long as its wait: without one it would fail within milliseconds, every 5 s. One
    // seen alive for 8 s or more is at least its second wait, which doubled.
    let before: HashSet<i32> = cluster.processes(PRUNER_TITLE).into_iter().collect();
    admin
        .batch_execute("DROP DATABASE app WITH (FORCE)")
        .await
        .unwrap();
    let mut seen: HashMap<i32, (Instant, Instant)> = HashMap::new();
    cluster
        .wait_for("a failed start that waited 8 s", WAIT, || {
            let now = Instant::now();
            for pid in cluster.processes(PRUNER_TITLE) {
                if !before.contains(&pid) {
                    seen.entry(pid).or_insert((now, now)).1 = now;
                }
            }
            let waited = seen
                .values()
                .any(|(first, last)| *last - *first >= Duration::from_secs(8));
            async move { waited.then_some(()) }
        })
        .await;

    admin.batch_execute("CREATE DATABASE app").await.unwrap();
    let app = cluster.connect("app").await;
    app.batch_execute("CREATE EXTENSION pg_outbox")
        .await
        .unwrap();
    insert_young(&app).await;
    insert_aged(&app, 100, "2 hours", "old").await;
    wait_all_old_pruned(&cluster, &app).await;
    assert_young_intact(&app).await;
    assert_no_crash(&cluster, checkpointer);
}

#[tokio::test]
async fn its_database_dropped_is_refused_while_it_is_connected() {
    let cluster = Cluster::builder()
        .setting("pg_outbox.database", "'app'")
        .create_extension(false)
        .start();
    let admin = cluster.connect("postgres").await;
    admin.batch_execute("CREATE DATABASE app").await.unwrap();
    // The worker connects at its next start: make it restart now.
    let pid = pruner_pid(&cluster, &admin).await;
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    cluster
        .wait_for("the pruner to connect to app", WAIT, || async {
            admin
                .query_opt(
                    "SELECT 1 FROM pg_stat_activity \
                     WHERE backend_type = 'pg_outbox pruner' AND datname = 'app'",
                    &[],
                )
                .await
                .unwrap()
                .map(|_| ())
        })
        .await;
    let error = admin.batch_execute("DROP DATABASE app").await.unwrap_err();
    assert_eq!(
        error.code(),
        Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE),
        "{error:?}"
    );
}

#[tokio::test]
async fn the_server_stopped_mid_prune_stops_it_promptly_and_it_finishes_after_start() {
    let cluster = cluster("postgres").start();
    let checkpointer = cluster.checkpointer_pid();
    let client = cluster.connect("postgres").await;
    insert_young(&client).await;
    insert_aged(&client, 100_000, "2 hours", "old").await;
    wait_mid_prune(&cluster, &client).await;
    // The pruner stopped is the one the server started with.
    let started = server_start(&client).await;
    assert_eq!(restarts_since(&cluster, &client, &started).await, 0);
    assert_no_crash(&cluster, checkpointer);
    drop(client);
    // `pg_ctl stop -m fast` fails after its timeout if the worker ignores SIGTERM.
    cluster.stop_within(Duration::from_secs(10));
    // The server is down: only its log can say the pruner left through its own loop.
    let log = cluster.log();
    assert!(log.contains("pg_outbox pruner stopping"), "{log}");
    cluster.pg_ctl_start();

    let checkpointer = cluster.checkpointer_pid();
    let client = cluster.connect("postgres").await;
    wait_all_old_pruned(&cluster, &client).await;
    assert_young_intact(&client).await;
    let pruned = rows_pruned(&client).await;
    assert_eq!(pruned, 100_000);
    // The pruner that finished is the one this start began with.
    let started = server_start(&client).await;
    assert_eq!(restarts_since(&cluster, &client, &started).await, 0);
    assert_no_crash(&cluster, checkpointer);
}
