//! The relay's advance query reads `event_outbox`'s segments through their xid index, not a
//! scan of the whole table, and parses and prints its snapshots once, so a catch-up costs what
//! it returns; a resume's catch-up reads a `(user_id, xid)` index where one was created.

use pg_outbox_tests::Cluster;
use tokio_postgres::Client;

/// 5,000 events of `users` users, one transaction each (one xid each, as in production), and
/// the segments' own statistics, as autovacuum gathers them.
fn publish_and_analyze(cluster: &Cluster, users: u32) {
    cluster.psql(
        "postgres",
        &format!(
            "DO $$ BEGIN FOR g IN 1..5000 LOOP \
               PERFORM outbox_publish('chat', 'u' || (g % {users}), jsonb_build_object('n', g)); \
               COMMIT; \
             END LOOP; END $$"
        ),
    );
    cluster.psql("postgres", "ANALYZE");
}

/// The plan of `execute`, after `prepare`.
async fn plan(client: &Client, prepare: &str, execute: &str) -> String {
    client.batch_execute(prepare).await.unwrap();
    let lines: Vec<String> = client
        .query(&format!("EXPLAIN (VERBOSE) {execute}"), &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    lines.join("\n")
}

/// The tables that hold events: the segments (`event_outbox` itself stays empty, and
/// scanning it costs nothing).
async fn segments_with_events(client: &Client) -> Vec<String> {
    let segments: Vec<String> = client
        .query(
            "SELECT DISTINCT tableoid::regclass::text FROM event_outbox",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(!segments.is_empty() && !segments.contains(&"event_outbox".to_owned()));
    segments
}

/// Panics unless `plan` reads every segment through its index `index` (by its name's suffix).
fn assert_reads_through(plan: &str, segments: &[String], index: &str, what: &str) {
    for segment in segments {
        assert!(
            plan.contains(&format!("{segment}_{index}"))
                && !plan.contains(&format!("Seq Scan on {segment}")),
            "{what} does not read {segment} through its {index}:\n{plan}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_advance_query_uses_the_xid_index() {
    let cluster = Cluster::start();
    publish_and_analyze(&cluster, 10);
    let client = cluster.connect("postgres").await;
    // The statement the relay prepares, with a generic plan (as a prepared statement may get).
    let plan = plan(
        &client,
        &format!(
            "SET plan_cache_mode = force_generic_plan; PREPARE advance(text) AS {}",
            pg_outbox_client::__advance_sql("public")
        ),
        "EXECUTE advance('1000:1000:')",
    )
    .await;
    let segments = segments_with_events(&client).await;
    assert_reads_through(&plan, &segments, "xid_id_idx", "the advance query");
    // The cursor's snapshot is parsed once per query, not once per row checked, and the new
    // one printed once, not again for every row returned.
    for (node, per_row) in [("Filter:", "::pg_snapshot"), ("Output:", "(snap.s)::text")] {
        let lines: Vec<&str> = plan
            .lines()
            .filter(|line| line.contains(node) && line.contains(per_row))
            .collect();
        assert!(
            lines.is_empty(),
            "{node} evaluates {per_row} for every row: {lines:?}\n{plan}"
        );
    }
}

/// What the README says to run for browsers that come back after long absences.
const USER_INDEX: &str = "DO $$ DECLARE t regclass; BEGIN \
       FOR t IN SELECT 'event_outbox'::regclass \
                UNION ALL SELECT format('%I', name)::regclass FROM outbox_segments LOOP \
         EXECUTE format('CREATE INDEX ON %s (user_id, xid)', t); \
       END LOOP; END $$";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_after_a_long_absence_reads_the_user_index_where_there_is_one() {
    let cluster = Cluster::start();
    cluster.psql("postgres", USER_INDEX);
    publish_and_analyze(&cluster, 500);
    let client = cluster.connect("postgres").await;
    // Planned with its parameters, as the relay's unnamed statement is; from the first
    // transaction on, so every event is in the range, and two users' are few.
    let plan = plan(
        &client,
        &format!(
            "SET plan_cache_mode = force_custom_plan; PREPARE catch_up(text, text[]) AS {}",
            pg_outbox_client::__catch_up_sql("public")
        ),
        "EXECUTE catch_up('1', '{u7,u8}')",
    )
    .await;
    let segments = segments_with_events(&client).await;
    assert_reads_through(&plan, &segments, "user_id_xid_idx", "the catch-up");
}
