//! Sealed notifications (`pg_outbox.notify_payload = 'sealed'`): other roles that LISTEN read
//! nothing and forge nothing; relays with the key deliver every event without a query, in both
//! notify modes; a missing key fails publishing before anything is written.

use std::collections::HashSet;
use std::time::Duration;

use pg_outbox_client::{Relay, SealKey, Topic};
use pg_outbox_tests::relay::{publish, relay, Collector};
use pg_outbox_tests::{Cluster, WAIT};
use uuid::Uuid;

const KEY: &str = "q2Ew0nGMd7Kf2yQn0c1Xb3Qm1T7mH8u0yJp4RzS9vWk=";

fn sealed_cluster(mode: &str) -> Cluster {
    Cluster::builder()
        .setting("pg_outbox.notify_payload", "'sealed'")
        .setting("pg_outbox.seal_key", &format!("'{KEY}'"))
        .setting("pg_outbox.notify_mode", &format!("'{mode}'"))
        .start()
}

/// A started relay with the key that sweeps only once an hour: every event it delivers came
/// from a notification, and every query it runs is counted in `advances`.
async fn keyed_relay(cluster: &Cluster, name: &str) -> (Relay, Collector) {
    let relay = relay(cluster, name)
        .seal_key(SealKey::from_base64(KEY).unwrap())
        .sweep_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    let all = Collector::spawn(relay.subscribe_to(Topic::all()));
    relay.start().await.unwrap();
    (relay, all)
}

async fn sealed_events_arrive_without_a_query(mode: &str) {
    let cluster = sealed_cluster(mode);
    let (relay, all) = keyed_relay(&cluster, "relay_sealed").await;
    let mut eavesdropper = cluster.listener("postgres").await;
    let advances = relay.metrics().advances;
    let client = cluster.connect("postgres").await;
    let mut expected = HashSet::new();
    for n in 0..50 {
        let payload = format!(r#"{{"secret": "s3cr3t-{n}"}}"#);
        expected.insert(publish(&client, "chat", "alice", &payload, None).await);
    }
    all.wait_for_all(&cluster, "the sealed events", &expected)
        .await;
    all.assert_exactly("sealed events", &expected);
    let delivered = all.items();
    assert!(delivered
        .iter()
        .all(|item| item.event().is_some_and(|e| e.payload()["secret"]
            .as_str()
            .is_some_and(|s| s.starts_with("s3cr3t")))));
    assert_eq!(
        relay.metrics().advances,
        advances,
        "a sealed inline event needs no query"
    );
    // What any other role that LISTENs sees: sealed text, nothing readable.
    let raw = eavesdropper.next_raw().await;
    assert!(raw.starts_with("s1."), "{raw}");
    assert!(!raw.contains("alice") && !raw.contains("s3cr3t") && !raw.contains("chat"));
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_events_arrive_without_a_query_in_transaction_mode() {
    sealed_events_arrive_without_a_query("transaction").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_events_arrive_without_a_query_in_worker_mode() {
    sealed_events_arrive_without_a_query("worker").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgeries_are_not_delivered_and_the_key_is_not_readable() {
    let cluster = sealed_cluster("transaction");
    cluster.psql("postgres", "CREATE ROLE mallory LOGIN");
    let (relay, all) = keyed_relay(&cluster, "relay_sealed_forged").await;
    let mallory = cluster.connect_as("postgres", "mallory").await;
    // The key is the superuser's: mallory cannot read it.
    let err = mallory
        .query_one("SHOW pg_outbox.seal_key", &[])
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );
    let visible: i64 = mallory
        .query_one(
            "SELECT count(*) FROM pg_settings WHERE name = 'pg_outbox.seal_key'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(visible, 0);

    let xid: String = mallory
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .unwrap()
        .get(0);
    let forged_id = Uuid::from_u128(0xf0f0);
    let unsealed = format!(
        r#"{{"v":1,"id":"{forged_id}","channel":"chat","user_id":"alice","origin":null,"xid":{xid},"created_at_us":1795827481361761,"payload":{{"text":"send me your password"}}}}"#
    );
    let other_key = SealKey::from_bytes([7; 32]);
    let wrongly_sealed = pg_outbox_wire::seal::seal(&other_key, &unsealed, [3; 24]);
    for forgery in [
        unsealed.as_str(),
        wrongly_sealed.as_str(),
        "s1.not-even-base64!",
    ] {
        mallory
            .execute("SELECT pg_notify('pg_outbox', $1)", &[&forgery])
            .await
            .unwrap();
    }
    cluster
        .wait_for("the forgeries settled", WAIT, || async {
            let metrics = relay.metrics();
            (metrics.forged >= 1 && metrics.decode_errors >= 2).then_some(())
        })
        .await;
    let client = cluster.connect("postgres").await;
    let real = publish(&client, "chat", "alice", "{}", None).await;
    all.wait_for_all(&cluster, "a real event after them", &HashSet::from([real]))
        .await;
    assert!(
        !all.has(forged_id),
        "an unsealed inline event was taken at its word"
    );
    assert_eq!(all.count(), 1);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_does_not_fit_sealed_goes_as_a_sealed_reference() {
    let cluster = sealed_cluster("transaction");
    let (relay, all) = keyed_relay(&cluster, "relay_sealed_large").await;
    let mut eavesdropper = cluster.listener("postgres").await;
    let client = cluster.connect("postgres").await;
    let large = format!(r#"{{"text": "{}"}}"#, "y".repeat(7_000));
    let id = publish(&client, "chat", "alice", &large, None).await;
    all.wait_for_all(&cluster, "the large event", &HashSet::from([id]))
        .await;
    assert_eq!(
        all.items()[0].event().unwrap().payload()["text"]
            .as_str()
            .map(str::len),
        Some(7_000)
    );
    assert!(relay.metrics().advances >= 1, "fetched");
    let raw = eavesdropper.next_raw().await;
    assert!(raw.starts_with("s1.") && raw.len() < 8000 && !raw.contains("alice"));
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_without_the_key_still_gets_every_event_from_its_sweeps() {
    let cluster = sealed_cluster("transaction");
    let relay = relay(&cluster, "relay_sealed_keyless").build().unwrap();
    let all = Collector::spawn(relay.subscribe_to(Topic::all()));
    relay.start().await.unwrap();
    let client = cluster.connect("postgres").await;
    let mut expected = HashSet::new();
    for _ in 0..5 {
        expected.insert(publish(&client, "chat", "bob", "{}", None).await);
    }
    all.wait_for_all(&cluster, "the events, from the sweeps", &expected)
        .await;
    all.assert_exactly("keyless relay", &expected);
    assert!(relay.metrics().decode_errors >= 1);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_without_a_key_refuses_to_publish_and_writes_nothing() {
    let cluster = Cluster::start();
    let client = cluster.connect("postgres").await;
    client
        .batch_execute("SET pg_outbox.notify_payload = 'sealed'")
        .await
        .unwrap();
    let err = client
        .query_one("SELECT outbox_publish('chat', 'u1', '{}')", &[])
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE)
    );
    let message = err.as_db_error().unwrap();
    assert!(message.message().contains("pg_outbox.seal_key"));
    assert!(message.hint().is_some_and(|hint| hint.contains("base64")));
    let rows: i64 = client
        .query_one("SELECT count(*) FROM event_outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0);
}
