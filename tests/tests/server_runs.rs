//! How the database records the runs of the server (`outbox_runs`), on both editions: a
//! session's first event records its run before it commits, a rollback takes the record with
//! it, a session recording the run never makes another wait, and a relay whose role may only
//! read still starts.

use pg_outbox_tests::relay::{create_relay_role, publish, relay_as};
use pg_outbox_tests::{Cluster, Edition};
use tokio_postgres::Client;

/// How many rows record the run the server is in.
async fn rows_of_this_run(client: &Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM outbox_runs \
             WHERE started_at = pg_postmaster_start_time() \
               AND system_identifier = (SELECT system_identifier::text FROM pg_control_system())",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

async fn a_rolled_back_record_is_made_again_on(edition: Edition) {
    let cluster = Cluster::builder().edition(edition).start();
    // A new run, which nothing has recorded yet.
    cluster.restart();
    let mut session = cluster.connect("postgres").await;
    let observer = cluster.connect("postgres").await;
    assert_eq!(rows_of_this_run(&observer).await, 0);

    let tx = session.transaction().await.unwrap();
    publish(&tx, "chat", "u1", "{}", None).await;
    publish(&tx, "chat", "u1", "{}", None).await;
    tx.rollback().await.unwrap();
    assert_eq!(rows_of_this_run(&observer).await, 0);

    // The session's next transaction records the run again, before it commits, and once
    // however many events it publishes.
    session
        .batch_execute(
            "SELECT outbox_publish('chat', 'u1', '{}') FROM generate_series(1, 50); \
             SELECT outbox_publish('chat', 'u1', '{}')",
        )
        .await
        .unwrap();
    assert_eq!(rows_of_this_run(&observer).await, 1);
    // And once it is recorded, the session records it no more.
    publish(&session, "chat", "u1", "{}", None).await;
    assert_eq!(rows_of_this_run(&observer).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_record_is_made_again() {
    a_rolled_back_record_is_made_again_on(Edition::Native).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_record_is_made_again_on_the_sql_edition() {
    a_rolled_back_record_is_made_again_on(Edition::Sql).await;
}

async fn a_session_recording_the_run_makes_no_one_wait_on(edition: Edition) {
    let cluster = Cluster::builder().edition(edition).start();
    create_relay_role(&cluster, "reader");
    cluster.psql(
        "postgres",
        "ALTER ROLE reader SET default_transaction_read_only = on",
    );
    cluster.restart();
    // A long transaction is the first to publish in the new run, and stays open.
    let mut long = cluster.connect("postgres").await;
    let long_tx = long.transaction().await.unwrap();
    publish(&long_tx, "chat", "u1", "{}", None).await;

    // Another session publishes, and a relay starts, without waiting for it.
    let other = cluster.connect("postgres").await;
    other
        .batch_execute("SET statement_timeout = '5s'")
        .await
        .unwrap();
    publish(&other, "chat", "u2", "{}", None).await;
    let relay = relay_as(&cluster, "relay_while_recording", "postgres")
        .build()
        .unwrap();
    relay.start().await.expect("a relay starts");
    // So does one whose role may only read: it records nothing, and reads the record.
    let reader = relay_as(&cluster, "relay_read_only", "reader")
        .build()
        .unwrap();
    reader.start().await.expect("a read-only relay starts");
    long_tx.commit().await.unwrap();
    reader.shutdown().await;
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_recording_the_run_makes_no_one_wait() {
    a_session_recording_the_run_makes_no_one_wait_on(Edition::Native).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_recording_the_run_makes_no_one_wait_on_the_sql_edition() {
    a_session_recording_the_run_makes_no_one_wait_on(Edition::Sql).await;
}
