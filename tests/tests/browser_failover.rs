//! Exactly once to the browser (issue 17): headless Chromium shows user u1's page of the SSE
//! example app through a proxy in front of two replicas; publishers commit concurrently and
//! out of order, roll some back, and publish for another user; the replica the page is
//! connected to is SIGKILLed mid-stream, and the page follows its `EventSource`'s own
//! reconnect (its `Last-Event-ID`) to the other one. The page gets every committed event of
//! u1 once, none of u2's, none rolled back, in the order the client crate documents, and no
//! reset.

use std::time::Duration;

use pg_outbox_tests::browser::{failover, FailoverSize};
use pg_outbox_tests::{Cluster, Edition};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_whose_replica_is_killed_gets_each_event_once_from_the_other() {
    a_browser_whose_replica_is_killed_gets_each_event_once_from_the_other_on(Edition::Native).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_whose_replica_is_killed_gets_each_event_once_from_the_other_on_the_sql_edition()
{
    a_browser_whose_replica_is_killed_gets_each_event_once_from_the_other_on(Edition::Sql).await;
}

async fn a_browser_whose_replica_is_killed_gets_each_event_once_from_the_other_on(
    edition: Edition,
) {
    let cluster = Cluster::builder().edition(edition).start();
    let outcome = failover(
        &cluster.connection_string("postgres"),
        FailoverSize {
            transactions: 40,
            kill_after: 8,
            pace: Duration::from_millis(10),
        },
    )
    .await;
    println!("{outcome}");
    assert!(outcome.connections >= 2, "the page reconnected: {outcome}");
    assert_eq!(
        (
            outcome.lost,
            outcome.duplicated,
            outcome.foreign,
            outcome.resets
        ),
        (0, 0, 0, 0),
        "{outcome}"
    );
    assert_eq!(outcome.received, outcome.committed, "{outcome}");
    assert!(outcome.disorder.is_empty(), "{:#?}", outcome.disorder);
    // Three publishers' first halves, the late one and the last: far more than the kill's.
    assert!(outcome.committed > 40, "{outcome}");
}
