//! The pruner worker: deletes what retention says, in batches, follows reloads, and
//! compresses the WAL of its deletes. How it comes back after being killed, waits for its
//! extension and stops with the server: `pruner_faults.rs`.

use std::time::Duration;

use pg_outbox_tests::pruner::{insert_aged, server_clock, wait_for_passes};
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
    let since = server_clock(client).await;
    wait_for_passes(cluster, client, "idle", &since, 1).await;
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

    cluster.set_setting("pg_outbox.retention", "5min");
    cluster
        .wait_for("the reloaded retention to prune", WAIT, || async {
            (count(&client, "SELECT count(*) FROM event_outbox").await == 0).then_some(())
        })
        .await;
}

/// The WAL the cluster writes while the pruner deletes `rows` rows that were written before the
/// last checkpoint, as expired rows are in production. The rows are inserted `age` old, younger
/// than the retention in force, and expire when the retention is lowered to `expire_with`,
/// once the WAL position is read.
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
    cluster.set_setting("pg_outbox.retention", expire_with);
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

    // The pruner reads it at this reload, before the next rows expire.
    cluster.set_setting("wal_compression", "off");
    let uncompressed = wal_of_a_prune(&cluster, &client, 20_000, "30 minutes", "20min").await;

    assert!(
        compressed < 0.75 * uncompressed,
        "pruning wrote {compressed} bytes of WAL by default and {uncompressed} with \
         wal_compression = off: the full-page images were not compressed"
    );
}
