//! The pruner warns in the server log while the notification queue is fuller than
//! `pg_outbox.queue_warning`, naming the cause and the remedy.

use std::time::Duration;

use pg_outbox_tests::Cluster;

#[tokio::test]
async fn the_pruner_warns_while_a_stuck_listener_holds_the_queue() {
    // A tiny threshold: filling a real tenth of the 8 GB queue would take minutes.
    let cluster = Cluster::builder()
        .setting("pg_outbox.prune_interval", "'1s'")
        .setting("pg_outbox.queue_warning", "0.0000001")
        .start();
    let warning = "the notification queue is";
    let publisher = cluster.connect("postgres").await;
    // Nothing listens yet: the queue is empty and nothing is said.
    publisher
        .batch_execute("SELECT outbox_publish('chat', 'u', '{}') FROM generate_series(1, 100)")
        .await
        .unwrap();

    let mut stuck = cluster.listener("postgres").await;
    stuck.client.batch_execute("BEGIN; SELECT 1").await.unwrap();
    publisher
        .batch_execute("SELECT outbox_publish('chat', 'u', '{}') FROM generate_series(1, 2000)")
        .await
        .unwrap();
    cluster
        .wait_for("the pruner's warning", Duration::from_secs(30), || async {
            cluster.log().contains(warning).then_some(())
        })
        .await;
    let log = cluster.log();
    let line = log
        .lines()
        .find(|l| l.contains(warning))
        .unwrap_or_default();
    assert!(line.contains("WARNING"), "{line}");
    assert!(line.contains("idle in transaction"), "{line}");
    stuck.client.batch_execute("COMMIT").await.unwrap();
    let _ = stuck.next().await;
}
