//! Origin dedup: a relay does not deliver the events its own replica published, unless asked to.

use std::collections::HashSet;

use pg_outbox_client::Topic;
use pg_outbox_tests::relay::{publish, relay, wait_for_advances, Collector};
use pg_outbox_tests::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_events_are_skipped_unless_asked_for() {
    let cluster = Cluster::builder()
        // References, and (below) publishers that seal theirs: both kinds of notification.
        .setting("pg_outbox.notify_payload", "'reference'")
        .start();
    let a = relay(&cluster, "relay_a")
        .instance_id("replica-a")
        .build()
        .unwrap();
    let b = relay(&cluster, "relay_b")
        .instance_id("replica-b")
        .build()
        .unwrap();
    let a_too = relay(&cluster, "relay_a_too")
        .instance_id("replica-a")
        .deliver_own_origin(true)
        .build()
        .unwrap();
    let relays = [&a, &b, &a_too];
    let collectors: Vec<Collector> = relays
        .iter()
        .map(|r| Collector::spawn(r.subscribe_to(Topic::all())))
        .collect();
    for relay in relays {
        relay.start().await.unwrap();
    }

    let client = cluster.connect("postgres").await;
    let mut from_a = HashSet::new();
    let mut from_b = HashSet::new();
    let mut from_none = HashSet::new();
    for n in 0..3 {
        let payload = format!(r#"{{"n":{n}}}"#);
        from_a.insert(publish(&client, "chat", "u1", &payload, Some("replica-a")).await);
        from_b.insert(publish(&client, "chat", "u1", &payload, Some("replica-b")).await);
        from_none.insert(publish(&client, "chat", "u1", &payload, None).await);
    }
    client
        .batch_execute("SET pg_outbox.notify_payload = 'sealed'")
        .await
        .unwrap();
    from_a.insert(publish(&client, "chat", "u1", "{}", Some("replica-a")).await);

    let union = |sets: &[&HashSet<uuid::Uuid>]| -> HashSet<uuid::Uuid> {
        sets.iter().flat_map(|s| s.iter().copied()).collect()
    };
    let expected = [
        union(&[&from_b, &from_none]),
        union(&[&from_a, &from_none]),
        union(&[&from_a, &from_b, &from_none]),
    ];
    for ((relay, collector), expected) in relays.iter().zip(&collectors).zip(&expected) {
        collector
            .wait_for_all(&cluster, "the events of other origins", expected)
            .await;
        wait_for_advances(&cluster, relay, 2).await;
        collector.assert_exactly(relay.instance_id().unwrap_or("?"), expected);
    }
    assert_eq!(a.metrics().skipped_own_origin, 4);
    assert_eq!(b.metrics().skipped_own_origin, 3);
    assert_eq!(a_too.metrics().skipped_own_origin, 0);
}
