//! The pruner worker: deletes what retention says, in batches, follows reloads, comes back
//! after being killed, and waits quietly for the extension.

use std::time::Duration;

use pg_outbox_tests::pruner::{insert_aged, pruner_pid, pruner_state, rows_pruned};
use pg_outbox_tests::Cluster;
use tokio_postgres::Client;

const WAIT: Duration = Duration::from_secs(30);

/// A cluster whose pruner runs every second in batches of 10, with the retention given.
fn cluster_with_retention(retention: &str) -> Cluster {
    Cluster::builder()
        .setting("pg_outbox.retention", &format!("'{retention}'"))
        .setting("pg_outbox.prune_interval", "'1s'")
        .setting("pg_outbox.prune_batch_size", "10")
        .start()
}

async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// Waits until the pruner has completed a pass that started after this call.
async fn wait_for_a_full_pass(cluster: &Cluster, client: &Client) {
    let since: String = client
        .query_one("SELECT clock_timestamp()::text", &[])
        .await
        .unwrap()
        .get(0);
    cluster
        .wait_for("a prune pass", WAIT, || async {
            let row = client
                .query_one(
                    "SELECT last_pruned_at > $1::text::timestamptz FROM outbox_prune_state",
                    &[&since],
                )
                .await
                .unwrap();
            row.get::<_, Option<bool>>(0).filter(|done| *done)
        })
        .await;
}

#[tokio::test]
async fn prunes_expired_rows_in_batches_and_keeps_younger_ones() {
    let cluster = cluster_with_retention("1h");
    let client = cluster.connect("postgres").await;
    insert_aged(&client, 35, "2 hours", "c").await;
    insert_aged(&client, 5, "50 minutes", "c").await;
    client
        .execute("SELECT outbox_publish('c', 'u', '{}')", &[])
        .await
        .unwrap();

    cluster
        .wait_for("the expired rows to go", WAIT, || async {
            (count(&client, "SELECT count(*) FROM event_outbox").await == 6).then_some(())
        })
        .await;
    let stats = client
        .query_one(
            "SELECT rows_pruned, worker_pid IS NOT NULL, worker_database::text FROM outbox_stats()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(stats.get::<_, i64>(0), 35);
    assert!(stats.get::<_, bool>(1));
    assert_eq!(stats.get::<_, String>(2), "postgres");
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM event_outbox WHERE created_at < now() - interval '1 hour'"
        )
        .await,
        0
    );
}

#[tokio::test]
async fn follows_a_reloaded_retention() {
    let cluster = cluster_with_retention("1h");
    let client = cluster.connect("postgres").await;
    insert_aged(&client, 12, "10 minutes", "c").await;
    wait_for_a_full_pass(&cluster, &client).await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM event_outbox").await,
        12
    );

    client
        .batch_execute("ALTER SYSTEM SET pg_outbox.retention = '5min'")
        .await
        .unwrap();
    client
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    cluster
        .wait_for("the reloaded retention to prune", WAIT, || async {
            (count(&client, "SELECT count(*) FROM event_outbox").await == 0).then_some(())
        })
        .await;
}

#[tokio::test]
async fn comes_back_after_pg_terminate_backend() {
    let cluster = cluster_with_retention("1h");
    let client = cluster.connect("postgres").await;
    let first = pruner_pid(&cluster, &client).await;
    client
        .execute("SELECT pg_terminate_backend($1)", &[&first])
        .await
        .unwrap();
    let second = cluster
        .wait_for("a new pruner", WAIT, || async {
            let pid = pruner_pid(&cluster, &client).await;
            (pid != first).then_some(pid)
        })
        .await;
    assert_ne!(first, second);
    // And it still prunes.
    insert_aged(&client, 3, "2 hours", "c").await;
    cluster
        .wait_for("the new pruner to prune", WAIT, || async {
            (count(&client, "SELECT count(*) FROM event_outbox").await == 0).then_some(())
        })
        .await;
}

#[tokio::test]
async fn waits_quietly_for_the_extension() {
    let cluster = Cluster::builder()
        .setting("pg_outbox.prune_interval", "'1s'")
        .create_extension(false)
        .start();
    let client = cluster.connect("postgres").await;
    let waiting = "waiting for CREATE EXTENSION pg_outbox";
    cluster
        .wait_for("the pruner to wait for the extension", WAIT, || async {
            let state = pruner_state(&client).await;
            (state.as_deref() == Some(waiting)).then_some(())
        })
        .await;
    // Several intervals later, still one line in the log and the same process.
    let pid = pruner_pid(&cluster, &client).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(pruner_pid(&cluster, &client).await, pid);
    let log = cluster.log();
    assert_eq!(
        log.matches("the pruner waits for CREATE EXTENSION").count(),
        1,
        "{log}"
    );

    client
        .batch_execute("CREATE EXTENSION pg_outbox")
        .await
        .unwrap();
    insert_aged(&client, 3, "2 hours", "c").await;
    cluster
        .wait_for("the pruner to prune once installed", WAIT, || async {
            (count(&client, "SELECT count(*) FROM event_outbox").await == 0).then_some(())
        })
        .await;
}

#[tokio::test]
async fn stops_promptly_when_the_server_shuts_down_mid_backlog() {
    let cluster = Cluster::builder()
        .setting("pg_outbox.prune_interval", "'1h'")
        .setting("pg_outbox.prune_batch_size", "100")
        .start();
    let client = cluster.connect("postgres").await;
    insert_aged(&client, 200_000, "2 hours", "c").await;
    // The worker's first pass ran at start, before the backlog existed; a reload does not
    // prune, so restart the pass by killing the worker: it starts pruning 5 s later.
    let pid = pruner_pid(&cluster, &client).await;
    client
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    cluster
        .wait_for("pruning to start", WAIT, || async {
            let pruned = rows_pruned(&client).await;
            (pruned > 0).then_some(())
        })
        .await;
    drop(client);
    // `pg_ctl stop -m fast` fails after its timeout if the worker ignores SIGTERM.
    cluster.stop_within(Duration::from_secs(10));
    let log = cluster.log();
    assert!(log.contains("pg_outbox pruner stopping"), "{log}");
}

/// The WAL the cluster writes while the pruner deletes `rows` rows that were written before the
/// last checkpoint, as expired rows are in production. The rows are inserted `age` old, younger
/// than the retention in force, and expire when the retention is lowered to `expire_with`
/// (which also reloads anything else set with ALTER SYSTEM), once the WAL position is read.
async fn wal_of_a_prune(
    cluster: &Cluster,
    client: &Client,
    rows: i32,
    age: &str,
    expire_with: &str,
) -> f64 {
    insert_aged(client, rows, age, "wal").await;
    client.batch_execute("CHECKPOINT").await.unwrap();
    let before: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    cluster.psql(
        "postgres",
        &format!("ALTER SYSTEM SET pg_outbox.retention = '{expire_with}'"),
    );
    cluster.psql("postgres", "SELECT pg_reload_conf()");
    cluster
        .wait_for("the expired rows to go", WAIT, || async {
            (count(client, "SELECT count(*) FROM event_outbox").await == 0).then_some(())
        })
        .await;
    client
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::float8",
            &[&before],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn compresses_its_full_page_images_unless_the_configuration_says_otherwise() {
    let cluster = Cluster::builder()
        .setting("pg_outbox.retention", "'1h'")
        .setting("pg_outbox.prune_interval", "'1s'")
        // Nothing else writes WAL meanwhile.
        .setting("autovacuum", "off")
        .start();
    let client = cluster.connect("postgres").await;
    // The pruner's first pass creates segments ahead: catalog writes, not the WAL measured.
    wait_for_a_full_pass(&cluster, &client).await;
    let compressed = wal_of_a_prune(&cluster, &client, 20_000, "50 minutes", "40min").await;

    // Read by the pruner with the reload that expires the next rows, before it deletes them.
    cluster.psql("postgres", "ALTER SYSTEM SET wal_compression = off");
    let uncompressed = wal_of_a_prune(&cluster, &client, 20_000, "30 minutes", "20min").await;

    assert!(
        compressed < 0.75 * uncompressed,
        "pruning wrote {compressed} bytes of WAL by default and {uncompressed} with \
         wal_compression = off: the full-page images were not compressed"
    );
}
