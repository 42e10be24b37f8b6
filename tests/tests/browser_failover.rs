//! Exactly once to the browser (issues 17 and 30): headless Chromium shows user u1's page of
//! the SSE example app through a proxy in front of two replicas; publishers commit
//! concurrently and out of order, roll some back, and publish for another user; the replica
//! the page is connected to is SIGKILLed mid-stream, and the page follows its `EventSource`'s
//! own reconnect (its `Last-Event-ID`) to the other one. Before that, the server may restart
//! (the other replica lagging, or started only after it), crash and hand out again xids the
//! page saw, or fail over to a standby that was behind. The page gets every committed event
//! of u1 once, none of u2's, none rolled back, in the order the client crate documents, and no
//! reset: the events the server itself lost are the only ones it may miss.

use std::time::Duration;

use pg_outbox_tests::browser::{failover, Failover, FailoverSize, Fault};
use pg_outbox_tests::{Cluster, Edition};

const SIZE: FailoverSize = FailoverSize {
    transactions: 40,
    kill_after: 8,
    pace: Duration::from_millis(10),
};

/// What every scenario must show.
fn assert_exactly_once(outcome: &Failover) {
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
    assert!(outcome.disorder.is_empty(), "{:#?}", outcome.disorder);
    // Three publishers' first halves, the late ones and the last: far more than the kill's.
    assert!(outcome.committed > 40, "{outcome}");
}

async fn a_browser_whose_replica_is_killed_gets_each_event_once_from_the_other_on(
    edition: Edition,
) {
    let cluster = Cluster::builder().edition(edition).start();
    let outcome = failover(
        &cluster.connection_string("postgres"),
        SIZE,
        Fault::ReplicaKilled,
    )
    .await;
    assert_exactly_once(&outcome);
    assert_eq!(outcome.received, outcome.committed, "{outcome}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_whose_replica_is_killed_gets_each_event_once_from_the_other() {
    a_browser_whose_replica_is_killed_gets_each_event_once_from_the_other_on(Edition::Native).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_whose_replica_is_killed_gets_each_event_once_from_the_other_on_the_sql_edition()
{
    a_browser_whose_replica_is_killed_gets_each_event_once_from_the_other_on(Edition::Sql).await;
}

async fn after_a_server_restart_the_page_moves_to_a_lagging_replica_on(edition: Edition) {
    let cluster = Cluster::builder().edition(edition).start();
    let outcome = failover(
        &cluster.connection_string("postgres"),
        SIZE,
        Fault::RestartThenReplicaKilled(&cluster),
    )
    .await;
    assert_exactly_once(&outcome);
    assert_eq!(outcome.received, outcome.committed, "{outcome}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_server_restart_the_page_moves_to_a_lagging_replica() {
    after_a_server_restart_the_page_moves_to_a_lagging_replica_on(Edition::Native).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_server_restart_the_page_moves_to_a_lagging_replica_on_the_sql_edition() {
    after_a_server_restart_the_page_moves_to_a_lagging_replica_on(Edition::Sql).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_server_restart_the_page_moves_to_a_replica_started_since() {
    let cluster = Cluster::start();
    let outcome = failover(
        &cluster.connection_string("postgres"),
        SIZE,
        Fault::RestartThenNewReplica(&cluster),
    )
    .await;
    assert_exactly_once(&outcome);
    assert_eq!(outcome.received, outcome.committed, "{outcome}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_that_hands_the_pages_xids_out_again_loses_nothing() {
    // Commits that wrote no WAL of their own, or asynchronous ones, are not flushed; the WAL
    // writer must not write them out before the crash either.
    let cluster = Cluster::builder()
        .setting("wal_writer_delay", "'10s'")
        .start();
    let outcome = failover(
        &cluster.connection_string("postgres"),
        SIZE,
        Fault::CrashReusingXids(&cluster),
    )
    .await;
    assert_exactly_once(&outcome);
    // The event committed without a flush is gone with the crash: the page had it.
    assert_eq!(outcome.server_lost, 1, "{outcome}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_to_a_standby_that_was_behind_loses_nothing_it_has() {
    let primary = Cluster::start();
    let standby = primary.standby();
    let db = format!(
        "host={},{} port={},{} user=postgres dbname=postgres target_session_attrs=read-write",
        primary.root().display(),
        standby.root().display(),
        primary.port(),
        standby.port()
    );
    let outcome = failover(
        &db,
        SIZE,
        Fault::StandbyPromoted {
            primary: &primary,
            standby: &standby,
        },
    )
    .await;
    assert_exactly_once(&outcome);
    assert!(outcome.server_lost >= 1, "{outcome}");
}
