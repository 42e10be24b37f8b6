//! A browser that stops reading (headless Chromium's page blocks its event loop on a
//! synchronous request) while megabytes of events are published for its user: its replica's
//! queue for it fills, the replica reads what it missed from the outbox once the page reads
//! again, and the page gets every event once, in order, with no reset, while the queue stays
//! within its buffer.

use pg_outbox_tests::browser::{events, Chromium, Replica, Reports};
use pg_outbox_tests::relay::publish;
use pg_outbox_tests::{Cluster, WAIT};
use uuid::Uuid;

/// The replica's buffer per browser, in events.
const BUFFER: usize = 16;
/// Events published while the page is blocked, and the size of each payload: 16 MB in all,
/// more than the sockets and the browser hold on the way.
const BLOCKED_EVENTS: i32 = 1_000;
const PAYLOAD_BYTES: i32 = 16 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_that_stops_reading_gets_each_event_once_without_a_reset() {
    let cluster = Cluster::start();
    let replica = Replica::start(
        &cluster.connection_string("postgres"),
        "slow_page",
        &["--buffer", &BUFFER.to_string()],
    )
    .await;
    let reports = Reports::start().await;
    let _chromium = Chromium::open(&format!(
        "http://{}/?user=u1&report={}&block={}&block_after=3",
        replica.address(),
        reports.url(),
        reports.block_url()
    ));
    reports
        .wait("that its EventSource is open", WAIT, |items| {
            items.iter().any(|item| item["type"] == "open")
        })
        .await;
    let client = cluster.connect("postgres").await;
    let mut published: Vec<Uuid> = Vec::new();
    for n in 0..3 {
        published.push(publish(&client, "chat", "u1", &format!(r#"{{"n":{n}}}"#), None).await);
    }
    reports.wait_blocked().await;

    // Published in ten transactions while the page reads nothing.
    for batch in 0..10 {
        let rows = client
            .query(
                "SELECT outbox_publish('chat', 'u1', \
                     jsonb_build_object('n', $1::int * 1000 + n, 'pad', repeat('x', $2::int))) \
                 FROM generate_series(1, $3::int) n",
                &[&batch, &PAYLOAD_BYTES, &(BLOCKED_EVENTS / 10)],
            )
            .await
            .unwrap();
        published.extend(rows.iter().map(|row| row.get::<_, Uuid>(0)));
    }
    // The replica relays every event while the page reads nothing: past its buffer, it
    // stopped queueing for the page, which will read the rest from the outbox.
    cluster
        .wait_for("the replica to relay every event", WAIT, || async {
            let relayed = replica
                .metric("pg_outbox_relay_events_delivered_total")
                .await;
            (relayed >= published.len() as f64).then_some(())
        })
        .await;
    assert!(replica.metric("pg_outbox_relay_events_lagged_total").await > 0.0);
    let queued = replica.metric("pg_outbox_relay_queued_events").await;
    assert!(queued <= BUFFER as f64, "{queued} events queued");

    reports.unblock();
    let last = *published.last().unwrap();
    reports.wait_for_event("the last event", last).await;
    let items = reports.items();
    let received: Vec<String> = events(&items)
        .map(|event| event["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    let expected: Vec<String> = published.iter().map(Uuid::to_string).collect();
    let kinds = |kind: &str| items.iter().filter(|item| item["type"] == kind).count();
    assert!(
        received == expected,
        "received {} events, {} expected; first difference at {:?}; {} opens, {} errors, {} \
         resets; the replica's resumes {}, resets {}, lagged {}\n{}",
        received.len(),
        expected.len(),
        received.iter().zip(&expected).position(|(a, b)| a != b),
        kinds("open"),
        kinds("error"),
        kinds("reset"),
        replica.metric("pg_outbox_relay_resumes_total").await,
        replica.metric("pg_outbox_relay_resets_total").await,
        replica.metric("pg_outbox_relay_events_lagged_total").await,
        replica.log()
    );
    assert!(items.iter().all(|item| item["type"] != "reset"));
    assert!(
        replica.metric("pg_outbox_relay_resumes_total").await >= 1.0,
        "the page's stream caught up from the outbox"
    );
}
