//! A relay started on a fresh cluster delivers what is published after `start()`, and stops.

use std::collections::HashSet;

use pg_outbox_client::{Health, Topic};
use pg_outbox_tests::relay::{publish, relay, wait_for_advances, Collector};
use pg_outbox_tests::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_what_is_published_after_start_then_stops() {
    let cluster = Cluster::builder()
        // References, and (below) publishers that seal theirs: both kinds of notification.
        .setting("pg_outbox.notify_payload", "'reference'")
        .start();
    let client = cluster.connect("postgres").await;
    let before = publish(&client, "chat", "u1", r#"{"n":0}"#, None).await;

    let relay = relay(&cluster, "relay_smoke").build().unwrap();
    assert_eq!(relay.health(), Health::NotStarted);
    let all = Collector::spawn(relay.subscribe_to(Topic::all()));
    relay.start().await.unwrap();
    assert_eq!(relay.health(), Health::Listening);

    let mut expected = HashSet::new();
    for n in 1..=5 {
        expected.insert(publish(&client, "chat", "u1", &format!(r#"{{"n":{n}}}"#), None).await);
    }
    client
        .batch_execute("SET pg_outbox.notify_payload = 'sealed'")
        .await
        .unwrap();
    for n in 6..=10 {
        expected.insert(publish(&client, "chat", "u1", &format!(r#"{{"n":{n}}}"#), None).await);
    }
    all.wait_for_all(&cluster, "events published after start", &expected)
        .await;
    wait_for_advances(&cluster, &relay, 2).await;
    all.assert_exactly("relay", &expected);
    assert!(
        !all.has(before),
        "an event committed before start() was replayed"
    );

    relay.shutdown().await;
    assert_eq!(relay.health(), Health::Stopped);
    all.finish().await;
    let metrics = relay.metrics();
    assert_eq!(metrics.delivered, 10);
    assert_eq!(metrics.latency.count(), 10);
    assert!(relay.start().await.is_err());
}
