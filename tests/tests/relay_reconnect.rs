//! Exactly once across disconnects: while thousands of events stream in, the relays' backends
//! are killed again and again and the server is restarted; every relay still delivers every
//! committed event exactly once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pg_outbox_client::Topic;
use pg_outbox_tests::relay::{
    committed_ids, relay, try_publish, wait_for_advances, wait_listening, Collector,
};
use pg_outbox_tests::{Cluster, Edition, WAIT};
use tokio_postgres::NoTls;

const PUBLISHERS: usize = 3;
const EVENTS_PER_PUBLISHER: usize = 1000;
const KILLS: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_and_restarts_lose_and_duplicate_nothing() {
    kills_and_restarts_lose_and_duplicate_nothing_on(Edition::Native).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_and_restarts_lose_and_duplicate_nothing_on_the_sql_edition() {
    kills_and_restarts_lose_and_duplicate_nothing_on(Edition::Sql).await;
}

async fn kills_and_restarts_lose_and_duplicate_nothing_on(edition: Edition) {
    let cluster = Cluster::builder()
        .edition(edition)
        // References, and (below) publishers that seal theirs: both kinds of notification.
        .setting("pg_outbox.notify_payload", "'reference'")
        .start();
    let names = ["relay_a", "relay_b"];
    let mut relays = Vec::new();
    for name in names {
        let relay = relay(&cluster, name).build().unwrap();
        let all = Collector::spawn(relay.subscribe_to(Topic::all()));
        relay.start().await.unwrap();
        relays.push((relay, all));
    }

    let published = Arc::new(AtomicUsize::new(0));
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let config = cluster.config("postgres", "postgres");
        let published = Arc::clone(&published);
        publishers.push(tokio::spawn(async move {
            let mut sent = 0;
            let mut t = 0usize;
            while sent < EVENTS_PER_PUBLISHER {
                // (Re)connect; the server may be restarting.
                let Ok((mut client, connection)) = config.connect(NoTls).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                tokio::spawn(connection);
                if p == 0
                    && client
                        .batch_execute("SET pg_outbox.notify_payload = 'sealed'")
                        .await
                        .is_err()
                {
                    continue;
                }
                while sent < EVENTS_PER_PUBLISHER {
                    t += 1;
                    let Ok(tx) = client.transaction().await else {
                        break;
                    };
                    let mut ok = true;
                    for e in 0..=(t % 3) {
                        let payload = format!(r#"{{"p":{p},"t":{t},"e":{e}}}"#);
                        if try_publish(&tx, "chat", "u1", &payload, None)
                            .await
                            .is_err()
                        {
                            ok = false;
                            break;
                        }
                        sent += 1;
                    }
                    published.fetch_add(t % 3 + 1, Ordering::Relaxed);
                    let done = if ok && !t.is_multiple_of(11) {
                        tx.commit().await
                    } else {
                        tx.rollback().await
                    };
                    if done.is_err() || !ok {
                        break; // the outcome is the table's to tell
                    }
                }
            }
        }));
    }

    // The chaos: kill each relay's backend in turn as the stream goes on, and restart the
    // server once in the middle.
    for k in 0..KILLS {
        let mark = (k + 1) * PUBLISHERS * EVENTS_PER_PUBLISHER / (KILLS + 2);
        cluster
            .wait_for("publishers to make progress", WAIT, || async {
                (published.load(Ordering::Relaxed) >= mark).then_some(())
            })
            .await;
        let before: Vec<u64> = relays.iter().map(|(r, _)| r.metrics().reconnects).collect();
        for (relay, _) in &relays {
            wait_listening(relay).await;
        }
        if k == KILLS / 2 {
            tokio::task::block_in_place(|| cluster.restart());
        } else {
            let name = names[k % names.len()];
            assert_eq!(
                cluster.terminate_backends(name),
                2,
                "{name}'s two connections"
            );
        }
        cluster
            .wait_for("the relays to reconnect", WAIT, || async {
                relays
                    .iter()
                    .zip(&before)
                    .any(|((r, _), b)| r.metrics().reconnects > *b)
                    .then_some(())
            })
            .await;
    }

    for publisher in publishers {
        publisher.await.unwrap();
    }
    let client = cluster.connect("postgres").await;
    let committed = committed_ids(&client).await;
    assert!(committed.len() > PUBLISHERS * EVENTS_PER_PUBLISHER / 2);

    for (relay, all) in &relays {
        wait_listening(relay).await;
        all.wait_for_all(&cluster, "every committed event", &committed)
            .await;
        wait_for_advances(&cluster, relay, 2).await;
        all.assert_exactly("relay", &committed);
        let metrics = relay.metrics();
        eprintln!("{metrics:?}");
        assert!(metrics.reconnects >= 1);
        assert_eq!(metrics.gaps, 0);
        assert_eq!(metrics.delivered, committed.len() as u64);
    }
    let total: u64 = relays.iter().map(|(r, _)| r.metrics().reconnects).sum();
    assert!(total >= KILLS as u64, "{total} reconnects");
    for (relay, _) in &relays {
        relay.shutdown().await;
    }
}
