//! Notification-queue pressure: a session that ran `LISTEN pg_outbox` and then sits inside an
//! open transaction reads nothing, so the cluster-wide NOTIFY queue cannot be trimmed past it
//! and grows with every published event. `outbox_stats().notification_queue_usage` shows it;
//! once that session ends its transaction the queue drains. A relay on another connection keeps
//! delivering throughout. (Filling the 8 GB queue to see publishers fail takes far too long for
//! a test on PostgreSQL 15, which has no `max_notify_queue_pages`: docs/operations-queue.md
//! says what happens then.)

use std::collections::HashSet;
use std::time::Duration;

use pg_outbox_client::Topic;
use pg_outbox_tests::relay::{relay, Collector};
use pg_outbox_tests::Cluster;
use tokio_postgres::Client;

async fn queue_usage(client: &Client) -> f64 {
    client
        .query_one("SELECT notification_queue_usage FROM outbox_stats()", &[])
        .await
        .unwrap()
        .get(0)
}

/// Publishes `n` events in one transaction; returns their ids.
async fn publish_batch(client: &Client, n: i32) -> Vec<uuid::Uuid> {
    client
        .query(
            "SELECT outbox_publish('chat', 'u' || i, jsonb_build_object('i', i))
             FROM generate_series(1, $1) i",
            &[&n],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test]
async fn a_listener_stuck_in_a_transaction_makes_the_queue_grow_until_it_ends() {
    let cluster = Cluster::start();
    let client = cluster.connect("postgres").await;
    let relay = relay(&cluster, "queue_pressure_relay")
        .subscriber_buffer(100_000) // batches of 2000 land at once: no lag for the collector
        .build()
        .unwrap();
    let delivered = Collector::spawn(relay.subscribe_to(Topic::all()));
    relay.start().await.unwrap();

    // Nothing is held yet: whatever the queue holds, everyone has read it.
    let mut expected = HashSet::new();
    expected.extend(publish_batch(&client, 200).await);
    delivered
        .wait_for_all(&cluster, "the first events", &expected)
        .await;
    let idle = queue_usage(&client).await;

    let stuck = cluster.listener("postgres").await;
    stuck.client.batch_execute("BEGIN; SELECT 1").await.unwrap();

    let mut usage = vec![idle];
    for _ in 0..3 {
        expected.extend(publish_batch(&client, 2000).await);
        usage.push(queue_usage(&client).await);
    }
    println!("notification_queue_usage while a listener is stuck: {usage:?}");
    assert!(usage[1] > 0.0, "{usage:?}");
    assert!(
        usage.windows(2).all(|w| w[1] > w[0]),
        "every batch adds to the queue: {usage:?}"
    );
    // The relay, reading on its own connection, is not held up.
    delivered
        .wait_for_all(&cluster, "events published meanwhile", &expected)
        .await;

    // The stuck session ends its transaction: it reads what it missed, and the queue is
    // trimmed as publishing goes on.
    stuck.client.batch_execute("COMMIT").await.unwrap();
    let peak = usage[3];
    let drained = cluster
        .wait_for("the queue to drain", Duration::from_secs(60), || async {
            publish_batch(&client, 50).await;
            let now = queue_usage(&client).await;
            (now < usage[1]).then_some(now)
        })
        .await;
    println!("after COMMIT: {drained} (peak {peak})");
    relay.shutdown().await;
}
