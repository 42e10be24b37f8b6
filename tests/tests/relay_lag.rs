//! A subscriber that reads slowly falls behind its buffer, and reads what it missed from the
//! outbox instead of losing it: every event once, no `Lagged`, no reset, while what it holds
//! stays within its buffer and a catch-up's page. It never slows the relay or another
//! subscriber down.

use std::collections::HashSet;

use pg_outbox_client::{Delivery, Subscription, Topic};
use pg_outbox_tests::relay::{publish, relay};
use pg_outbox_tests::{Cluster, WAIT};
use uuid::Uuid;

/// The buffer of the slow subscription, in events.
const BUFFER: usize = 4;

/// Publishes `n` events on `chat`, `per_transaction` in each transaction.
async fn publish_batches(cluster: &Cluster, n: usize, per_transaction: usize) -> Vec<Uuid> {
    let mut client = cluster.connect("postgres").await;
    let mut ids = Vec::new();
    while ids.len() < n {
        let tx = client.transaction().await.unwrap();
        for _ in 0..per_transaction.min(n - ids.len()) {
            let payload = format!(r#"{{"n":{}}}"#, ids.len());
            ids.push(publish(&tx, "chat", "u1", &payload, None).await);
        }
        tx.commit().await.unwrap();
    }
    ids
}

/// Reads `n` items, checking each is an event and that what the subscription holds stays
/// within its buffer and the page a catch-up reads.
async fn read_events(subscription: &mut Subscription, n: usize) -> Vec<Uuid> {
    let mut ids = Vec::new();
    while ids.len() < n {
        // Its buffer, the batch being read, a marker, and a page: 1,000 rows and the rest of
        // the transaction at its end (2,500 events here at most).
        assert!(
            subscription.len() <= 2 * subscription.capacity() + 1 + 1_000 + 2_500,
            "{} items held",
            subscription.len()
        );
        let item = tokio::time::timeout(WAIT, subscription.recv())
            .await
            .expect("the next item in time");
        match item {
            Some(Delivery::Event(event)) => ids.push(event.id()),
            other => panic!("expected an event, got {other:?}"),
        }
    }
    ids
}

/// Asserts `read` is `expected`, in order, and says where it is not.
fn assert_in_order(what: &str, read: &[Uuid], expected: &[Uuid]) {
    let distinct: HashSet<&Uuid> = read.iter().collect();
    let first_difference = read.iter().zip(expected).position(|(a, b)| a != b);
    assert!(
        read == expected,
        "{what}: read {} ({} distinct), expected {}, first difference at {first_difference:?}",
        read.len(),
        distinct.len(),
        expected.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_reads_what_it_missed_from_the_outbox_each_event_once() {
    let cluster = Cluster::start();
    let relay = relay(&cluster, "relay_slow_reader").build().unwrap();
    let mut slow = relay.subscribe_to(Topic::channel("chat").buffer(BUFFER));
    let mut fast = relay.subscribe_to(Topic::channel("chat"));
    relay.start().await.unwrap();

    // Published and relayed before the slow reader reads anything: it falls 296 behind.
    let first = publish_batches(&cluster, 300, 3).await;
    assert_in_order(
        "the fast reader",
        &read_events(&mut fast, first.len()).await,
        &first,
    );
    let mut read = read_events(&mut slow, first.len()).await;
    assert_in_order("the slow reader", &read, &first);

    // Then it falls behind again while publishers go on: a catch-up, then the live stream.
    let second = publish_batches(&cluster, 100, 1).await;
    assert_eq!(read_events(&mut fast, second.len()).await, second);
    let third = tokio::spawn({
        let cluster_url = cluster.connection_string("postgres");
        async move {
            let (client, connection) = tokio_postgres::connect(&cluster_url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            let mut ids = Vec::new();
            for n in 0..50 {
                ids.push(publish(&client, "chat", "u1", &format!(r#"{{"m":{n}}}"#), None).await);
            }
            ids
        }
    });
    read.extend(read_events(&mut slow, second.len()).await);
    let third = third.await.unwrap();
    read.extend(read_events(&mut slow, third.len()).await);
    assert_in_order(
        "the fast reader",
        &read_events(&mut fast, third.len()).await,
        &third,
    );
    let expected: HashSet<Uuid> = first.iter().chain(&second).chain(&third).copied().collect();
    assert_eq!(read.len(), expected.len(), "no event twice");
    assert_eq!(read.iter().copied().collect::<HashSet<Uuid>>(), expected);
    assert!(slow.try_recv().is_none(), "nothing more: no marker");

    // A backlog larger than a catch-up's page: read a page at a time, whole transactions each.
    let publisher = cluster.connect("postgres").await;
    let queries_before = relay.metrics().resume_queries;
    let mut backlog = Vec::new();
    for _ in 0..3 {
        let rows = publisher
            .query(
                "SELECT outbox_publish('chat', 'u1', jsonb_build_object('n', n)) \
                 FROM generate_series(1, 2500) n",
                &[],
            )
            .await
            .unwrap();
        backlog.extend(rows.iter().map(|row| row.get::<_, Uuid>(0)));
    }
    // Delivered in (xid, id) order, which within a statement need not be the order of its
    // result: the fast reader's order is the reference.
    let fast_read = read_events(&mut fast, backlog.len()).await;
    let fast_set: HashSet<&Uuid> = fast_read.iter().collect();
    let backlog_set: HashSet<&Uuid> = backlog.iter().collect();
    assert!(
        fast_set == backlog_set,
        "fast read {} ({} distinct), {} of the backlog",
        fast_read.len(),
        fast_set.len(),
        fast_set.intersection(&backlog_set).count()
    );
    let slow_read = read_events(&mut slow, backlog.len()).await;
    assert_in_order("the slow reader", &slow_read, &fast_read);
    assert!(slow.try_recv().is_none());
    let pages = relay.metrics().resume_queries - queries_before;
    assert!(pages >= 3, "{pages} catch-up queries for 7,500 rows");
    relay.shutdown().await;
}
