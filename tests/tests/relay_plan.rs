//! The relay's advance query reads `event_outbox`'s segments through their xid index, not a
//! scan of the whole table, and parses and prints its snapshots once, so a catch-up costs what
//! it returns.

use pg_outbox_tests::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_advance_query_uses_the_xid_index() {
    let cluster = Cluster::start();
    // Many transactions (one xid each), as in production.
    cluster.psql(
        "postgres",
        "DO $$ BEGIN FOR g IN 1..5000 LOOP \
           PERFORM outbox_publish('chat', 'u' || (g % 10), jsonb_build_object('n', g)); \
           COMMIT; \
         END LOOP; END $$",
    );
    // The segments' own statistics, as autovacuum gathers them.
    cluster.psql("postgres", "ANALYZE");
    let client = cluster.connect("postgres").await;
    // The statement the relay prepares, with a generic plan (as a prepared statement may get).
    client
        .batch_execute(&format!(
            "SET plan_cache_mode = force_generic_plan; PREPARE advance(text) AS {}",
            pg_outbox_client::__advance_sql("public")
        ))
        .await
        .unwrap();
    let plan: Vec<String> = client
        .query("EXPLAIN (VERBOSE) EXECUTE advance('1000:1000:')", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let plan = plan.join("\n");
    // The events are in the current segment; event_outbox itself is empty, and scanning it
    // costs nothing.
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
    for segment in segments {
        assert!(
            plan.contains(&format!("{segment}_xid_id_idx"))
                && !plan.contains(&format!("Seq Scan on {segment}")),
            "the advance query does not read {segment} through its xid index:\n{plan}"
        );
    }
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
    cluster.psql(
        "postgres",
        "DO $$ BEGIN FOR g IN 1..5000 LOOP \
           PERFORM outbox_publish('chat', 'u' || (g % 500), jsonb_build_object('n', g)); \
           COMMIT; \
         END LOOP; END $$",
    );
    cluster.psql("postgres", "ANALYZE");
    let client = cluster.connect("postgres").await;
    // Planned with its parameters, as the relay's unnamed statement is.
    client
        .batch_execute(&format!(
            "SET plan_cache_mode = force_custom_plan; PREPARE catch_up(text, text[]) AS {}",
            pg_outbox_client::__catch_up_sql("public")
        ))
        .await
        .unwrap();
    // From the first transaction on: every event is in the range, one user's are few.
    let plan: Vec<String> = client
        .query("EXPLAIN EXECUTE catch_up('1', '{u7,u8}')", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let plan = plan.join("\n");
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
    assert!(!segments.is_empty());
    for segment in segments {
        assert!(
            plan.contains(&format!("{segment}_user_id_xid_idx"))
                && !plan.contains(&format!("Seq Scan on {segment}")),
            "the catch-up does not read {segment} through the user index:\n{plan}"
        );
    }
}
