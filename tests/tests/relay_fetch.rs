//! References share their fetches: within `fetch_interval` of the last fetch a reference waits,
//! and once 32 notified rows wait, the fetch starts without waiting for the interval.

use std::collections::HashSet;
use std::time::Duration;

use pg_outbox_client::Topic;
use pg_outbox_tests::relay::{publish, relay, Collector};
use pg_outbox_tests::{Cluster, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_waiting_references_are_fetched_at_once_in_one_query() {
    // References, the relays' included: every event is fetched.
    let cluster = Cluster::builder()
        .setting("pg_outbox.notify_payload", "'reference'")
        .start();
    // Neither the interval nor a sweep moves the relay in this test: only the waiting rows can.
    let relay = relay(&cluster, "relay_fetch")
        .fetch_interval(Duration::from_secs(3600))
        .sweep_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    let chat = Collector::spawn(relay.subscribe_to(Topic::channel("chat")));
    relay.start().await.unwrap();
    let mut client = cluster.connect("postgres").await;
    client
        .batch_execute("SET pg_outbox.notify_payload = reference")
        .await
        .unwrap();

    // The start ran an advance: one reference now waits for the interval, however long the
    // relay has had it.
    let advances = relay.metrics().advances;
    let first = publish(&client, "chat", "u1", r#"{"n":0}"#, None).await;
    cluster
        .wait_for("the first notification", WAIT, || async {
            (relay.metrics().received >= 1).then_some(())
        })
        .await;
    // Not fetched at once: nothing but 32 waiting rows may start the next advance, which the
    // count of advances below proves (one for all 32, none before).
    assert!(
        !chat.has(first),
        "a lone reference was fetched before the interval"
    );
    assert_eq!(relay.metrics().received, 1);
    assert_eq!(relay.metrics().advances, advances);

    // 31 more in one transaction: 32 wait, and one query fetches them all.
    let mut expected = HashSet::from([first]);
    let tx = client.transaction().await.unwrap();
    for n in 1..32 {
        expected.insert(publish(&tx, "chat", "u1", &format!(r#"{{"n":{n}}}"#), None).await);
    }
    tx.commit().await.unwrap();
    chat.wait_for_all(&cluster, "the 32 referenced events", &expected)
        .await;
    chat.assert_exactly("chat", &expected);
    let metrics = relay.metrics();
    assert_eq!(metrics.advances, advances + 1, "{metrics:?}");
    assert_eq!(metrics.delivered, 32);
    relay.shutdown().await;
}
