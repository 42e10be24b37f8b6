//! Sealed notifications, the default: with nothing configured, other roles that LISTEN read
//! nothing and forge nothing, and relays (which read the key from the database) deliver every
//! event without a query, in both notify modes. Keys rotate under running relays and
//! publishers; a database without a current key fails publishing before anything is written.

use std::collections::HashSet;
use std::time::Duration;

use pg_outbox_client::{Relay, Topic};
use pg_outbox_tests::relay::{publish, relay, Collector};
use pg_outbox_tests::{Cluster, WAIT};
use tokio_postgres::error::SqlState;

fn sealed_cluster(mode: &str) -> Cluster {
    Cluster::builder()
        .setting("pg_outbox.notify_mode", &format!("'{mode}'"))
        .start()
}

/// A started relay, with the defaults, that sweeps only once an hour: every event it delivers
/// came from a notification, and every query it runs is counted in `advances`.
async fn quiet_relay(cluster: &Cluster, name: &str) -> (Relay, Collector) {
    let relay = relay(cluster, name)
        .sweep_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    let all = Collector::spawn(relay.subscribe_to(Topic::all()));
    relay.start().await.unwrap();
    (relay, all)
}

async fn sealed_events_arrive_without_a_query(mode: &str) {
    let cluster = sealed_cluster(mode);
    let (relay, all) = quiet_relay(&cluster, "relay_sealed").await;
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
async fn the_key_goes_to_exactly_the_roles_that_may_read_payloads() {
    let cluster = Cluster::start();
    cluster.psql(
        "postgres",
        "CREATE ROLE mallory LOGIN; CREATE ROLE publisher LOGIN; CREATE ROLE reader LOGIN; \
         CREATE ROLE columns LOGIN; \
         GRANT EXECUTE ON FUNCTION outbox_publish(text, text, jsonb, text) TO publisher; \
         GRANT INSERT ON event_outbox TO publisher; \
         GRANT SELECT ON event_outbox TO reader; \
         GRANT SELECT (id, xid, payload) ON event_outbox TO columns",
    );
    let keys = |user: &'static str| {
        let cluster = &cluster;
        async move {
            let client = cluster.connect_as("postgres", user).await;
            let table = client.query("SELECT key FROM outbox_seal_keys", &[]).await;
            assert_eq!(
                table.unwrap_err().code(),
                Some(&SqlState::INSUFFICIENT_PRIVILEGE),
                "{user} read the table"
            );
            client
                .query_one("SELECT keys FROM outbox_relay_keys()", &[])
                .await
                .map(|row| row.get::<_, Vec<Vec<u8>>>(0))
        }
    };
    for refused in ["mallory", "publisher"] {
        let err = keys(refused).await.unwrap_err();
        assert_eq!(
            err.code(),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{refused}"
        );
        let db = err.as_db_error().unwrap();
        assert!(db.message().contains("event_outbox.payload"), "{db:?}");
        assert!(
            db.hint().is_some_and(|h| h.contains("GRANT SELECT")),
            "{db:?}"
        );
    }
    let read = keys("reader").await.unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].len(), 32);
    assert_eq!(keys("columns").await.unwrap(), read);
    // The publisher seals with the key it cannot read.
    let publisher = cluster.connect_as("postgres", "publisher").await;
    let mut eavesdropper = cluster.listener("postgres").await;
    publish(&publisher, "chat", "alice", r#"{"n": 1}"#, None).await;
    assert!(eavesdropper.next_raw().await.starts_with("s1."));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_reaches_running_publishers_and_relays() {
    let cluster = Cluster::start();
    let (relay, all) = quiet_relay(&cluster, "relay_rotation").await;
    // A publisher that has sealed with the first key, and keeps its session.
    let publisher = cluster.connect("postgres").await;
    let mut expected = HashSet::from([publish(&publisher, "chat", "u1", "{}", None).await]);
    all.wait_for_all(&cluster, "an event under the first key", &expected)
        .await;
    let first: Vec<u8> = current_key(&cluster).await;

    // No grace: the first key is gone at once, so anything still sealed with it is forged.
    cluster.psql("postgres", "SELECT outbox_rotate_seal_key('0')");
    assert_ne!(current_key(&cluster).await, first);
    for _ in 0..5 {
        expected.insert(publish(&publisher, "chat", "u1", "{}", None).await);
    }
    all.wait_for_all(&cluster, "the events under the new key", &expected)
        .await;
    all.assert_exactly("events across the rotation", &expected);
    let metrics = relay.metrics();
    assert_eq!(metrics.forged, 0, "{metrics:?}");
    assert_eq!(metrics.decode_errors, 0, "{metrics:?}");
    relay.shutdown().await;

    // A relay started now holds only the new key, and opens what the old session seals.
    let (relay, all) = quiet_relay(&cluster, "relay_after_rotation").await;
    let advances = relay.metrics().advances;
    let id = publish(&publisher, "chat", "u1", "{}", None).await;
    all.wait_for_all(&cluster, "an event", &HashSet::from([id]))
        .await;
    assert_eq!(relay.metrics().advances, advances, "opened, not fetched");
    assert_eq!(relay.metrics().forged, 0);
    relay.shutdown().await;

    let kept: i64 = cluster
        .connect("postgres")
        .await
        .query_one(
            "SELECT count(*) FROM outbox_seal_keys WHERE expires_at IS NULL OR expires_at > now()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 1);
    let negative = cluster
        .connect("postgres")
        .await
        .query_one("SELECT outbox_rotate_seal_key('-1 second')", &[])
        .await
        .unwrap_err();
    assert_eq!(negative.code(), Some(&SqlState::INVALID_PARAMETER_VALUE));
}

async fn current_key(cluster: &Cluster) -> Vec<u8> {
    cluster
        .connect("postgres")
        .await
        .query_one(
            "SELECT key FROM outbox_seal_keys WHERE expires_at IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_notification_sent_again_delivers_nothing() {
    let cluster = Cluster::start();
    cluster.psql("postgres", "CREATE ROLE mallory LOGIN");
    let (relay, all) = quiet_relay(&cluster, "relay_replay").await;
    let mut eavesdropper = cluster.listener_as("postgres", "mallory").await;
    let client = cluster.connect("postgres").await;
    let id = publish(&client, "chat", "alice", "{}", None).await;
    let captured = eavesdropper.next_raw().await;
    all.wait_for_all(&cluster, "the event", &HashSet::from([id]))
        .await;
    let mallory = cluster.connect_as("postgres", "mallory").await;
    for _ in 0..3 {
        mallory
            .execute("SELECT pg_notify('pg_outbox', $1)", &[&captured])
            .await
            .unwrap();
    }
    cluster
        .wait_for("the replays heard", WAIT, || async {
            (relay.metrics().duplicates >= 3).then_some(())
        })
        .await;
    let last = publish(&client, "chat", "alice", "{}", None).await;
    all.wait_for_all(&cluster, "a later event", &HashSet::from([id, last]))
        .await;
    all.assert_exactly("no replay", &HashSet::from([id, last]));
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_does_not_fit_sealed_goes_as_a_sealed_reference() {
    let cluster = sealed_cluster("transaction");
    let (relay, all) = quiet_relay(&cluster, "relay_sealed_large").await;
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
async fn without_a_current_key_publishing_is_refused_and_writes_nothing() {
    let cluster = Cluster::start();
    let client = cluster.connect("postgres").await;
    // A publisher that has a key cached hears of its deletion too.
    publish(&client, "chat", "u1", "{}", None).await;
    cluster.psql("postgres", "DELETE FROM outbox_seal_keys");
    let err = client
        .query_one("SELECT outbox_publish('chat', 'u1', '{}')", &[])
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE)
    );
    let message = err.as_db_error().unwrap();
    assert!(message.message().contains("no current key"), "{message:?}");
    assert!(message
        .hint()
        .is_some_and(|hint| hint.contains("outbox_rotate_seal_key")));
    let rows: i64 = client
        .query_one("SELECT count(*) FROM event_outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);
    cluster.psql("postgres", "SELECT outbox_rotate_seal_key()");
    publish(&client, "chat", "u1", "{}", None).await;
}
