//! A publishing transaction that is open while the relay's cursor is taken, or across a
//! reconnect, is delivered when it commits: the cursor is a snapshot, not "the greatest id seen".

use std::collections::HashSet;

use pg_outbox_client::Topic;
use pg_outbox_tests::relay::{
    create_relay_role, publish, relay, relay_as, set_login, wait_for_advances, wait_listening,
    wait_reconnecting, Collector,
};
use pg_outbox_tests::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_open_at_start_is_delivered_when_it_commits() {
    let cluster = Cluster::start();
    let mut publisher = cluster.connect("postgres").await;
    let tx = publisher.transaction().await.unwrap();
    let early = publish(&tx, "chat", "u1", r#"{"open":"before start"}"#, None).await;

    let relay = relay(&cluster, "relay_open").build().unwrap();
    let all = Collector::spawn(relay.subscribe_to(Topic::all()));
    relay.start().await.unwrap();
    let other = cluster.connect("postgres").await;
    let later = publish(&other, "chat", "u1", r#"{"n":1}"#, None).await;
    tx.commit().await.unwrap();

    let expected = HashSet::from([early, later]);
    all.wait_for_all(&cluster, "both events", &expected).await;
    wait_for_advances(&cluster, &relay, 2).await;
    all.assert_exactly("relay", &expected);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_committed_while_the_relay_is_away_is_caught_up() {
    let cluster = Cluster::start();
    create_relay_role(&cluster, "relay_user");
    let relay = relay_as(&cluster, "relay_away", "relay_user")
        .build()
        .unwrap();
    let all = Collector::spawn(relay.subscribe_to(Topic::all()));
    relay.start().await.unwrap();

    let mut publisher = cluster.connect("postgres").await;
    let tx = publisher.transaction().await.unwrap();
    let held = publish(
        &tx,
        "chat",
        "u1",
        r#"{"held":"across the reconnect"}"#,
        None,
    )
    .await;
    // Published and committed while the relay is connected, for comparison.
    let other = cluster.connect("postgres").await;
    let live = publish(&other, "chat", "u1", r#"{"n":1}"#, None).await;
    all.wait_for_all(&cluster, "the live event", &HashSet::from([live]))
        .await;

    // Lock the relay out, cut its connection, commit while it cannot come back.
    set_login(&cluster, "relay_user", false);
    assert_eq!(
        cluster.terminate_backends("relay_away"),
        2,
        "its two connections"
    );
    wait_reconnecting(&relay).await;
    tx.commit().await.unwrap();
    let missed = publish(&other, "chat", "u2", r#"{"n":2}"#, None).await;
    set_login(&cluster, "relay_user", true);
    wait_listening(&relay).await;

    let expected = HashSet::from([live, held, missed]);
    all.wait_for_all(&cluster, "the held and the missed event", &expected)
        .await;
    wait_for_advances(&cluster, &relay, 2).await;
    all.assert_exactly("relay", &expected);
    let metrics = relay.metrics();
    assert_eq!(metrics.reconnects, 1);
    assert!(metrics.caught_up >= 2, "{metrics:?}");
    relay.shutdown().await;
}
