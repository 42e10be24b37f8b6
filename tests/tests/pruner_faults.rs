//! The pruner worker under faults: killed mid-batch, its database dropped and created again, its
//! extension dropped and created again (also mid-prune), the server stopped mid-prune. Each
//! time it recovers or waits quietly, never crash-loops (counted by its "started" lines in the
//! server log), and never deletes a row younger than retention.

use std::time::Duration;

use pg_outbox_tests::pruner::{insert_aged, pruner_pid, pruner_state, rows_pruned};
use pg_outbox_tests::{Cluster, WAIT};
use tokio_postgres::Client;

/// Longer than the worker's 5 s restart delay plus a few 1 s intervals: a crash loop shows.
const QUIET: Duration = Duration::from_secs(7);
const STARTED: &str = "pg_outbox pruner started";
/// How long the database stays dropped: the FORCE exit, then failed starts at about 5 s and
/// 15 s, the next one due at about 30 s.
const WITHOUT_DATABASE: Duration = Duration::from_secs(25);

/// Retention 1 h, a pass every second, small batches back to back so a backlog takes many
/// transactions, quickly.
fn cluster(database: &str) -> Cluster {
    Cluster::builder()
        .setting("pg_outbox.retention", "'1h'")
        .setting("pg_outbox.prune_interval", "'1s'")
        .setting("pg_outbox.prune_batch_size", "50")
        .setting("pg_outbox.prune_pause", "0")
        .setting("pg_outbox.database", &format!("'{database}'"))
        .start()
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

/// How many times the postmaster saw the pruner exit (a FATAL at start logs no "started").
fn exits(log: &str) -> usize {
    log.matches("background worker \"pg_outbox pruner\" (PID")
        .count()
}

fn starts(cluster: &Cluster) -> usize {
    cluster.log().matches(STARTED).count()
}

/// Panics if the server logged a crash.
fn assert_no_crash(cluster: &Cluster) {
    let log = cluster.log();
    for bad in ["terminated by signal", "PANIC"] {
        assert!(!log.contains(bad), "the server log says {bad:?}:\n{log}");
    }
}

#[tokio::test]
async fn killed_mid_batch_it_comes_back_and_finishes() {
    let cluster = cluster("postgres");
    let client = cluster.connect("postgres").await;
    insert_young(&client).await;
    insert_aged(&client, 100_000, "2 hours", "old").await;
    wait_mid_prune(&cluster, &client).await;
    let first = pruner_pid(&cluster, &client).await;
    client
        .execute("SELECT pg_terminate_backend($1)", &[&first])
        .await
        .unwrap();
    wait_all_old_pruned(&cluster, &client).await;
    assert_ne!(pruner_pid(&cluster, &client).await, first);
    assert_young_intact(&client).await;
    // The recorded total is exact: the killed batch rolled back and was done again.
    let pruned = rows_pruned(&client).await;
    assert_eq!(pruned, 100_000);
    assert_eq!(starts(&cluster), 2, "{}", cluster.log());
    assert_no_crash(&cluster);
}

#[tokio::test]
async fn its_extension_dropped_mid_prune_and_created_again() {
    let cluster = cluster("postgres");
    let client = cluster.connect("postgres").await;
    insert_aged(&client, 100_000, "2 hours", "old").await;
    wait_mid_prune(&cluster, &client).await;
    let before = cluster.log().len();
    client
        .batch_execute("DROP EXTENSION pg_outbox")
        .await
        .unwrap();
    cluster
        .wait_for("the pruner to wait for the extension", WAIT, || async {
            let state = pruner_state(&client).await;
            (state.as_deref() == Some("waiting for CREATE EXTENSION pg_outbox")).then_some(())
        })
        .await;
    // Waiting is quiet: at most the one restart the drop caused, then one log line.
    tokio::time::sleep(QUIET).await;
    let log = cluster.log();
    let since = &log[before..];
    assert!(since.matches(STARTED).count() <= 1, "{log}");
    assert_eq!(
        since
            .matches("the pruner waits for CREATE EXTENSION")
            .count(),
        1,
        "{log}"
    );

    client
        .batch_execute("CREATE EXTENSION pg_outbox")
        .await
        .unwrap();
    insert_young(&client).await;
    insert_aged(&client, 1000, "2 hours", "old").await;
    wait_all_old_pruned(&cluster, &client).await;
    assert_young_intact(&client).await;
    assert_no_crash(&cluster);
}

#[tokio::test]
async fn its_database_dropped_and_created_again() {
    let cluster = Cluster::builder()
        .setting("pg_outbox.retention", "'1h'")
        .setting("pg_outbox.prune_interval", "'1s'")
        .setting("pg_outbox.database", "'app'")
        .create_extension(false)
        .start();
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
    // the worker once. Each later start fails to connect (FATAL, outside its control), but
    // it waits longer before each attempt (5 s, 10 s, ... up to 5 min): a few exits in this
    // window, where a restart every 5 s would make six.
    let before = cluster.log().len();
    admin
        .batch_execute("DROP DATABASE app WITH (FORCE)")
        .await
        .unwrap();
    tokio::time::sleep(WITHOUT_DATABASE).await;
    let log_without_database = cluster.log()[before..].to_owned();
    assert!(
        log_without_database.contains("could not connect to database \"app\"")
            && log_without_database.contains("next attempt in 5 s"),
        "{log_without_database}"
    );

    admin.batch_execute("CREATE DATABASE app").await.unwrap();
    let app = cluster.connect("app").await;
    app.batch_execute("CREATE EXTENSION pg_outbox")
        .await
        .unwrap();
    insert_young(&app).await;
    insert_aged(&app, 100, "2 hours", "old").await;
    wait_all_old_pruned(&cluster, &app).await;
    assert_young_intact(&app).await;
    assert_no_crash(&cluster);
    // It recovered; and it backed off meanwhile instead of restarting every 5 s.
    assert!(
        exits(&log_without_database) <= 3,
        "the worker exits again and again without its database:\n{log_without_database}"
    );
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
async fn the_server_stopped_mid_prune_finishes_after_start() {
    let cluster = cluster("postgres");
    let client = cluster.connect("postgres").await;
    insert_young(&client).await;
    insert_aged(&client, 100_000, "2 hours", "old").await;
    wait_mid_prune(&cluster, &client).await;
    drop(client);
    cluster.stop_within(Duration::from_secs(30));
    cluster.pg_ctl_start();

    let client = cluster.connect("postgres").await;
    wait_all_old_pruned(&cluster, &client).await;
    assert_young_intact(&client).await;
    let pruned = rows_pruned(&client).await;
    assert_eq!(pruned, 100_000);
    assert_eq!(starts(&cluster), 2, "{}", cluster.log());
    assert_no_crash(&cluster);
}
