//! `outbox_publish` seen from a second session: notifications arrive only after commit, never
//! after rollback, one per publish, as a reference or inline.

use pg_outbox_tests::Cluster;
use serde_json::json;

const PUBLISH: &str = "SELECT outbox_publish($1, $2, $3::jsonb)::text";

#[tokio::test]
async fn notification_arrives_only_after_commit() {
    let cluster = Cluster::start();
    let mut listener = cluster.listener("postgres").await;
    let mut publisher = cluster.connect("postgres").await;
    let other = cluster.connect("postgres").await;

    let tx = publisher.transaction().await.unwrap();
    let held: String = tx
        .query_one(PUBLISH, &[&"chat", &"u1", &json!({"n": "held"})])
        .await
        .unwrap()
        .get(0);
    // A commit elsewhere is delivered while the first transaction is still open.
    let first: String = other
        .query_one(PUBLISH, &[&"chat", &"u2", &json!({"n": "first"})])
        .await
        .unwrap()
        .get(0);
    assert_eq!(listener.next().await["id"], first.as_str());

    tx.commit().await.unwrap();
    let notification = listener.next().await;
    assert_eq!(notification["id"], held.as_str());
    assert_eq!(notification["channel"], "chat");
    assert_eq!(notification["user_id"], "u1");
    assert_eq!(notification["v"], 1);
}

#[tokio::test]
async fn rollback_publishes_nothing() {
    let cluster = Cluster::start();
    let mut listener = cluster.listener("postgres").await;
    let mut publisher = cluster.connect("postgres").await;

    let tx = publisher.transaction().await.unwrap();
    tx.query_one(PUBLISH, &[&"chat", &"u1", &json!({"n": "lost"})])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    // The next notification is the one committed after the rollback.
    let kept: String = publisher
        .query_one(PUBLISH, &[&"chat", &"u1", &json!({"n": "kept"})])
        .await
        .unwrap()
        .get(0);
    assert_eq!(listener.next().await["id"], kept.as_str());

    let rows: i64 = publisher
        .query_one("SELECT count(*) FROM event_outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1, "the rolled-back event left no row");
}

#[tokio::test]
async fn each_publish_in_a_transaction_is_delivered_in_order() {
    let cluster = Cluster::start();
    let mut listener = cluster.listener("postgres").await;
    let mut publisher = cluster.connect("postgres").await;

    let tx = publisher.transaction().await.unwrap();
    let mut ids = Vec::new();
    for n in 0..5 {
        // Identical channel, user and payload: distinct events all the same.
        let id: String = tx
            .query_one(PUBLISH, &[&"chat", &"u1", &json!({"same": true})])
            .await
            .unwrap()
            .get(0);
        ids.push((n, id));
    }
    tx.commit().await.unwrap();

    let mut xid = None;
    for (_, id) in &ids {
        let notification = listener.next().await;
        assert_eq!(notification["id"], id.as_str());
        // One transaction, one xid, and it is the row's.
        let x = notification["xid"].as_u64().expect("xid is a number");
        assert_eq!(*xid.get_or_insert(x), x);
    }
    let stored: String = publisher
        .query_one("SELECT xid::text FROM event_outbox LIMIT 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, xid.unwrap().to_string());
}

#[tokio::test]
async fn sealed_by_default_reference_and_inline_when_asked() {
    let cluster = Cluster::start();
    let mut listener = cluster.listener("postgres").await;
    let publisher = cluster.connect("postgres").await;
    let big = json!({ "blob": "x".repeat(100 * 1024) });
    let small = json!({ "text": "hello", "n": [1, 2, 3] });

    // Sealed (the default): the payload when it fits, a reference otherwise, both sealed.
    for (payload, inside) in [(&small, true), (&big, false)] {
        let id: String = publisher
            .query_one(PUBLISH, &[&"chat", &"u1", payload])
            .await
            .unwrap()
            .get(0);
        let raw = listener.next_raw().await;
        assert!(raw.starts_with("s1.") && !raw.contains(&id), "{raw:.100}");
        let keys: Vec<Vec<u8>> = publisher
            .query_one("SELECT keys FROM outbox_relay_keys()", &[])
            .await
            .unwrap()
            .get(0);
        let key = pg_outbox_wire::SealKey::from_bytes(keys[0].clone().try_into().unwrap());
        let opened: serde_json::Value =
            serde_json::from_str(&pg_outbox_wire::seal::open(&key, &raw).unwrap()).unwrap();
        assert_eq!(opened["id"], id.as_str());
        assert_eq!(opened.get("payload") == Some(payload), inside, "{opened}");
    }

    // Reference mode: never the payload, whatever its size.
    publisher
        .batch_execute("SET pg_outbox.notify_payload = 'reference'")
        .await
        .unwrap();
    for payload in [&small, &big] {
        let id: String = publisher
            .query_one(PUBLISH, &[&"chat", &"u1", payload])
            .await
            .unwrap()
            .get(0);
        let notification = listener.next().await;
        assert_eq!(notification["id"], id.as_str());
        assert!(notification.get("payload").is_none(), "{notification}");
    }

    publisher
        .batch_execute("SET pg_outbox.notify_payload = 'inline'")
        .await
        .unwrap();
    publisher
        .query_one(
            "SELECT outbox_publish('chat', 'u1', $1::jsonb, 'replica-a')",
            &[&small],
        )
        .await
        .unwrap();
    let notification = listener.next().await;
    assert_eq!(notification["payload"], small);
    assert_eq!(notification["origin"], "replica-a");

    // Too big for a notification: a reference, and the row holds the whole payload.
    let id: String = publisher
        .query_one(PUBLISH, &[&"chat", &"u1", &big])
        .await
        .unwrap()
        .get(0);
    let notification = listener.next().await;
    assert_eq!(notification["id"], id.as_str());
    assert!(notification.get("payload").is_none());
    let stored: serde_json::Value = publisher
        .query_one(
            "SELECT payload FROM event_outbox WHERE id::text = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, big);
}
