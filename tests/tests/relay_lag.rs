//! A subscriber that does not keep up is told how many events it missed, and never slows the
//! relay or another subscriber down.

use std::collections::HashSet;

use pg_outbox_client::{Delivery, Topic};
use pg_outbox_tests::relay::{committed_ids, publish, relay, Collector};
use pg_outbox_tests::{Cluster, WAIT};

const BUFFER: usize = 16;
const EVENTS: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_lags_while_a_fast_one_gets_everything() {
    let cluster = Cluster::start();
    let relay = relay(&cluster, "relay_lag").build().unwrap();
    // Never read until the end.
    let mut slow = relay.subscribe_to(Topic::channel("chat").buffer(BUFFER));
    let fast = Collector::spawn(relay.subscribe_to(Topic::channel("chat")));
    relay.start().await.unwrap();

    cluster.psql(
        "postgres",
        &format!(
            "SELECT outbox_publish('chat', 'u1', jsonb_build_object('n', g)) \
             FROM generate_series(1, {EVENTS}) g"
        ),
    );
    let client = cluster.connect("postgres").await;
    let all: HashSet<_> = committed_ids(&client).await;
    assert_eq!(all.len(), EVENTS);
    fast.wait_for_all(&cluster, "every event, fast", &all).await;
    fast.assert_exactly("fast subscriber", &all);

    let mut events = 0;
    let mut missed = 0;
    while let Some(item) = slow.try_recv() {
        match item {
            Delivery::Event(_) => {
                assert_eq!(missed, 0, "events after the lag marker");
                events += 1;
            }
            Delivery::Lagged { missed: n } => missed += n,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(events, BUFFER);
    assert_eq!(missed as usize, EVENTS - BUFFER);
    assert_eq!(relay.metrics().lagged, (EVENTS - BUFFER) as u64);

    // Once it has read, it receives again.
    let next = publish(&client, "chat", "u1", "{}", None).await;
    let item = tokio::time::timeout(WAIT, slow.recv())
        .await
        .expect("the next event")
        .expect("an open stream");
    assert_eq!(item.event().map(|e| e.id()), Some(next));
    relay.shutdown().await;
}
