//! An advance that cannot finish holds up no notification: the relay LISTENs on a connection of
//! its own, and keeps delivering inline events while its query connection waits.

use std::collections::HashSet;
use std::time::Duration;

use pg_outbox_client::Topic;
use pg_outbox_tests::relay::{publish, relay, wait_for_advances, Collector};
use pg_outbox_tests::{Cluster, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_events_arrive_while_an_advance_waits_on_a_lock() {
    let cluster = Cluster::start();
    let relay = relay(&cluster, "relay_blocked")
        .sweep_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    let all = Collector::spawn(relay.subscribe_to(Topic::all()));
    relay.start().await.unwrap();

    // Every advance reads outbox_prune_state: with it locked, the next sweep waits.
    let mut admin = cluster.connect("postgres").await;
    let lock = admin.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE outbox_prune_state IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    cluster
        .wait_for("the relay's advance to wait on the lock", WAIT, || async {
            let waiting = cluster.psql(
                "postgres",
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = 'relay_blocked' AND wait_event_type = 'Lock'",
            );
            (waiting == "1").then_some(())
        })
        .await;
    let advances = relay.metrics().advances;

    // Sealed, the default: the events travel inside their notifications.
    let publisher = cluster.connect("postgres").await;
    let mut expected = HashSet::new();
    for n in 0..5 {
        expected.insert(publish(&publisher, "chat", "u1", &format!(r#"{{"n":{n}}}"#), None).await);
    }
    all.wait_for_all(&cluster, "inline events during the advance", &expected)
        .await;
    assert_eq!(
        relay.metrics().advances,
        advances,
        "the advance was still waiting"
    );

    // Once it finishes, it reads the same rows again: none is delivered twice.
    lock.rollback().await.unwrap();
    wait_for_advances(&cluster, &relay, 2).await;
    all.assert_exactly("relay", &expected);
    relay.shutdown().await;
}
