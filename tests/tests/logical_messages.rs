//! `pg_outbox.logical_messages = on`: every publish is also a transactional logical-decoding
//! message (prefix `pg_outbox`), read here by real consumers of a replication slot:
//! `pg_recvlogical` with `test_decoding`, and a pgoutput client (`examples/python/
//! consume_messages.py`, psycopg2's replication protocol) with `messages 'true'`. Each gets
//! exactly the committed events, in commit order, none rolled back, payloads over the 8 KB
//! NOTIFY limit whole, in both notify modes, and goes on from its slot after a restart.

use std::collections::HashSet;
use std::process::Command;

use pg_outbox_tests::{repository, Cluster};
use serde_json::{json, Value};
use tokio_postgres::Client;

/// One event published with `payload`; returns its id.
async fn publish(client: &impl tokio_postgres::GenericClient, payload: &Value) -> String {
    client
        .query_one(
            "SELECT outbox_publish('chat', 'u1', $1::jsonb)::text",
            &[payload],
        )
        .await
        .unwrap()
        .get(0)
}

/// A consumer of the slot `outbox`.
#[derive(Clone, Copy, Debug)]
enum Consumer {
    /// `pg_recvlogical`, the slot made with `test_decoding`.
    TestDecoding,
    /// `examples/python/consume_messages.py`, the slot made with `pgoutput`.
    Pgoutput,
}

impl Consumer {
    async fn create_slot(self, client: &Client) {
        let plugin = match self {
            Consumer::TestDecoding => "test_decoding",
            Consumer::Pgoutput => {
                // A publication without tables: it streams no table's changes, only messages.
                client
                    .batch_execute("CREATE PUBLICATION pg_outbox")
                    .await
                    .unwrap();
                "pgoutput"
            }
        };
        client
            .execute(
                "SELECT pg_create_logical_replication_slot('outbox', $1)",
                &[&plugin],
            )
            .await
            .unwrap();
    }

    /// The messages the slot holds up to the server's current WAL position; the consumer then
    /// stops and confirms them: the next call reads from there.
    async fn receive(self, cluster: &Cluster, client: &Client) -> Vec<Value> {
        let end: String = client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        match self {
            Consumer::TestDecoding => recvlogical(cluster, &end),
            Consumer::Pgoutput => pgoutput(cluster, &end),
        }
    }
}

fn pgoutput(cluster: &Cluster, end: &str) -> Vec<Value> {
    let dsn = format!(
        "host={} port={} user=postgres dbname=postgres",
        cluster.root().display(),
        cluster.port()
    );
    let output = Command::new("/usr/bin/python3")
        .arg(repository().join("examples/python/consume_messages.py"))
        .args([&dsn, "outbox", "pg_outbox", end])
        .output()
        .expect("run consume_messages.py");
    assert!(
        output.status.success(),
        "consume_messages.py: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).expect("a message is JSON"))
        .collect()
}

fn recvlogical(cluster: &Cluster, end: &str) -> Vec<Value> {
    let output = Command::new(cluster.bindir().join("pg_recvlogical"))
        .arg("-h")
        .arg(cluster.root())
        .args(["-p", &cluster.port().to_string(), "-U", "postgres"])
        .args(["-d", "postgres", "--slot", "outbox", "--start", "--no-loop"])
        .args(["--endpos", end, "-f", "-"])
        .output()
        .expect("run pg_recvlogical");
    assert!(
        output.status.success(),
        "pg_recvlogical: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // test_decoding writes `message: transactional: 1 prefix: pg_outbox, sz: N content:{...}`.
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| line.strip_prefix("message: transactional: 1 prefix: pg_outbox, sz: "))
        .map(|rest| {
            let (_, content) = rest.split_once(" content:").expect("a message's content");
            serde_json::from_str(content).expect("the message is JSON")
        })
        .collect()
}

fn ids(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn test_decoding_reads_exactly_the_committed_events() {
    a_slot_consumer_reads_exactly_the_committed_events(Consumer::TestDecoding).await;
}

#[tokio::test]
async fn pgoutput_reads_exactly_the_committed_events() {
    a_slot_consumer_reads_exactly_the_committed_events(Consumer::Pgoutput).await;
}

async fn a_slot_consumer_reads_exactly_the_committed_events(consumer: Consumer) {
    let cluster = Cluster::builder()
        .setting("wal_level", "logical")
        .setting("max_replication_slots", "4")
        .setting("max_wal_senders", "4")
        .setting("pg_outbox.logical_messages", "on")
        .start();
    let mut client = cluster.connect("postgres").await;
    consumer.create_slot(&client).await;

    // Two events in one transaction; one rolled back; one over the NOTIFY limit.
    let tx = client.transaction().await.unwrap();
    let mut expected = vec![
        publish(&tx, &json!({ "n": 1 })).await,
        publish(&tx, &json!({ "n": 2 })).await,
    ];
    tx.commit().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let rolled_back = publish(&tx, &json!({ "n": 3 })).await;
    tx.rollback().await.unwrap();
    let big = "x".repeat(20_000);
    expected.push(publish(&client, &json!({ "big": big })).await);

    let messages = consumer.receive(&cluster, &client).await;
    assert_eq!(ids(&messages), expected);
    assert!(!ids(&messages).contains(&rolled_back));
    assert_eq!(messages[0]["channel"], "chat");
    assert_eq!(messages[0]["user_id"], "u1");
    assert_eq!(messages[0]["payload"], json!({ "n": 1 }));
    assert_eq!(
        messages[2]["payload"]["big"].as_str().map(str::len),
        Some(20_000)
    );
    let xid: String = client
        .query_one(
            "SELECT xid::text FROM event_outbox WHERE id = $1::text::uuid",
            &[&expected[0]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(messages[0]["xid"].to_string(), xid);

    // The consumer stops and starts again from its slot: only what came since, also in worker
    // mode, where the notifier, not the transaction, sends the notification.
    client
        .batch_execute("SET pg_outbox.notify_mode = 'worker'")
        .await
        .unwrap();
    let later = vec![
        publish(&client, &json!({ "n": 4 })).await,
        publish(&client, &json!({ "n": 5 })).await,
    ];
    let messages = consumer.receive(&cluster, &client).await;
    assert_eq!(ids(&messages), later);
    let all: HashSet<String> = expected.into_iter().chain(later).collect();
    assert_eq!(all.len(), 5);
}

#[tokio::test]
async fn off_by_default() {
    let cluster = Cluster::builder()
        .setting("wal_level", "logical")
        .setting("max_replication_slots", "4")
        .setting("max_wal_senders", "4")
        .start();
    let client = cluster.connect("postgres").await;
    Consumer::TestDecoding.create_slot(&client).await;
    publish(&client, &json!({ "n": 1 })).await;
    assert!(Consumer::TestDecoding
        .receive(&cluster, &client)
        .await
        .is_empty());
}
