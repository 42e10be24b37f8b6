//! Rows pruned before a disconnected relay could read them are reported as a gap (a marker to
//! every subscriber and a counter), never silently skipped; so are rows deleted by hand
//! between their notification and its fetch, which no forgery can imitate.

use std::collections::HashSet;
use std::time::Duration;

use pg_outbox_client::{Gap, Topic};
use pg_outbox_tests::relay::{
    create_relay_role, publish, relay_as, set_login, wait_for_advances, wait_listening,
    wait_reconnecting, Collector,
};
use pg_outbox_tests::{Cluster, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_pruned_while_disconnected_are_reported_as_a_gap() {
    let cluster = Cluster::start();
    create_relay_role(&cluster, "relay_user");
    let relay = relay_as(&cluster, "relay_gap", "relay_user")
        .build()
        .unwrap();
    let all = Collector::spawn(relay.subscribe_to(Topic::all()));
    let chat = Collector::spawn(relay.subscribe_to(Topic::channel("chat")));
    relay.start().await.unwrap();

    let client = cluster.connect("postgres").await;
    let seen = publish(&client, "chat", "u1", r#"{"n":1}"#, None).await;
    all.wait_for_all(&cluster, "the first event", &HashSet::from([seen]))
        .await;
    // Pruning what the relay already has, and has advanced past, is no gap.
    wait_for_advances(&cluster, &relay, 2).await;
    cluster.psql("postgres", "SELECT outbox_prune('0 seconds')");
    wait_for_advances(&cluster, &relay, 2).await;
    assert_eq!(relay.metrics().gaps, 0);

    // The relay is away while events are published and pruned.
    set_login(&cluster, "relay_user", false);
    assert_eq!(
        cluster.terminate_backends("relay_gap"),
        2,
        "its two connections"
    );
    wait_reconnecting(&relay).await;
    let lost = publish(&client, "chat", "u1", r#"{"n":2}"#, None).await;
    let pruned = cluster.psql("postgres", "SELECT outbox_prune('0 seconds')");
    assert_eq!(pruned, "1");
    let kept = publish(&client, "chat", "u1", r#"{"n":3}"#, None).await;
    set_login(&cluster, "relay_user", true);
    wait_listening(&relay).await;

    all.wait_for_all(
        &cluster,
        "the event after the gap",
        &HashSet::from([seen, kept]),
    )
    .await;
    wait_for_advances(&cluster, &relay, 2).await;
    assert!(!all.has(lost));
    assert_eq!(relay.metrics().gaps, 1);
    for collector in [&all, &chat] {
        let gaps = collector.gaps();
        assert!(matches!(gaps.as_slice(), [Gap::Pruned { .. }]), "{gaps:?}");
    }
    // The gap marker comes before the events caught up after it.
    let items = all.items();
    let gap_at = items
        .iter()
        .position(|d| matches!(d, pg_outbox_client::Delivery::Gap(_)));
    let kept_at = items
        .iter()
        .position(|d| d.event().map(|e| e.id()) == Some(kept));
    assert!(gap_at < kept_at, "{items:?}");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_deleted_by_hand_before_its_fetch_is_reported_missing_not_forged() {
    let cluster = Cluster::builder()
        .setting("pg_outbox.notify_payload", "'reference'")
        .start();
    create_relay_role(&cluster, "relay_user");
    // References wait until 32 of them do: the row is deleted meanwhile.
    let relay = relay_as(&cluster, "relay_deleted", "relay_user")
        .fetch_interval(Duration::from_secs(3600))
        .sweep_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    let u1 = Collector::spawn(relay.subscribe_to(Topic::all().user("u1")));
    relay.start().await.unwrap();

    let client = cluster.connect("postgres").await;
    let deleted = publish(&client, "chat", "u1", "{}", None).await;
    cluster
        .wait_for("its notification", WAIT, || async {
            (relay.metrics().received >= 1).then_some(())
        })
        .await;
    cluster.psql(
        "postgres",
        &format!("DELETE FROM event_outbox WHERE id = '{deleted}'"),
    );
    let mut kept = HashSet::new();
    for _ in 0..31 {
        kept.insert(publish(&client, "chat", "u1", "{}", None).await);
    }
    u1.wait_for_all(&cluster, "the events after it", &kept)
        .await;
    u1.assert_exactly("u1's events", &kept);
    assert!(
        u1.gaps()
            .iter()
            .any(|gap| matches!(gap, Gap::Missing { id, .. } if *id == deleted)),
        "{:?}",
        u1.gaps()
    );
    assert_eq!(relay.metrics().forged, 0);
    relay.shutdown().await;
}
