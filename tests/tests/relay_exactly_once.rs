//! Several relays, concurrent publishers in both payload modes (reference, sealed) and both
//! notify modes (by the transaction, by the notifier worker) at once, some transactions rolled
//! back: each relay delivers every committed event exactly once and no rolled-back one.

use std::collections::HashSet;

use pg_outbox_client::Topic;
use pg_outbox_tests::relay::{committed_ids, relay, wait_for_advances, Collector};
use pg_outbox_tests::Cluster;
use uuid::Uuid;

const PUBLISHERS: usize = 4;
const TRANSACTIONS: usize = 120;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_relay_gets_every_committed_event_once() {
    let cluster = Cluster::builder()
        // References, and (below) publishers that seal theirs: both kinds of notification.
        .setting("pg_outbox.notify_payload", "'reference'")
        .start();
    let mut relays = Vec::new();
    for name in ["relay_a", "relay_b", "relay_c"] {
        let relay = relay(&cluster, name).build().unwrap();
        let all = Collector::spawn(relay.subscribe_to(Topic::all()));
        relay.start().await.unwrap();
        relays.push((relay, all));
    }

    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let mut client = cluster.connect("postgres").await;
        publishers.push(tokio::spawn(async move {
            if p % 2 == 0 {
                client
                    .batch_execute("SET pg_outbox.notify_payload = 'sealed'")
                    .await
                    .unwrap();
            }
            if p >= PUBLISHERS / 2 {
                client
                    .batch_execute("SET pg_outbox.notify_mode = 'worker'")
                    .await
                    .unwrap();
            }
            let mut committed = HashSet::new();
            let mut rolled_back = HashSet::new();
            for t in 0..TRANSACTIONS {
                let tx = client.transaction().await.unwrap();
                let mut ids: Vec<Uuid> = Vec::new();
                for e in 0..=(t % 3) {
                    let payload = format!(r#"{{"p":{p},"t":{t},"e":{e}}}"#);
                    let row = tx
                        .query_one(
                            "SELECT outbox_publish('chat', $1, $2::text::jsonb)",
                            &[&format!("u{}", t % 7), &payload],
                        )
                        .await
                        .unwrap();
                    ids.push(row.get(0));
                }
                if t % 5 == 4 {
                    tx.rollback().await.unwrap();
                    rolled_back.extend(ids);
                } else {
                    tx.commit().await.unwrap();
                    committed.extend(ids);
                }
            }
            (committed, rolled_back)
        }));
    }
    let mut committed = HashSet::new();
    let mut rolled_back = HashSet::new();
    for publisher in publishers {
        let (c, r) = publisher.await.unwrap();
        committed.extend(c);
        rolled_back.extend(r);
    }
    let client = cluster.connect("postgres").await;
    assert_eq!(committed_ids(&client).await, committed);
    assert!(!rolled_back.is_empty());

    for (relay, all) in &relays {
        all.wait_for_all(&cluster, "every committed event", &committed)
            .await;
        // Two more advances: anything still to come would have come.
        wait_for_advances(&cluster, relay, 2).await;
        all.assert_exactly("relay", &committed);
        let metrics = relay.metrics();
        assert_eq!(metrics.delivered, committed.len() as u64);
        assert_eq!(metrics.gaps, 0);
        assert_eq!(metrics.decode_errors, 0);
        // References are fetched in batches: far fewer queries than events.
        assert!(
            metrics.advances < committed.len() as u64 / 2,
            "{} advances for {} events",
            metrics.advances,
            committed.len()
        );
    }
    for (relay, _) in &relays {
        relay.shutdown().await;
    }
}
