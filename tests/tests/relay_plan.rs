//! The relay's advance query reads `event_outbox`'s segments through their xid index, not a
//! scan of the whole table, and parses and prints its snapshots once, so a catch-up costs what
//! it returns; a resume's catch-up reads a `(user_id, xid)` index where one was created.

use pg_outbox_client::Topic;
use pg_outbox_tests::relay::{committed_ids, relay, Collector};
use pg_outbox_tests::{Cluster, WAIT};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_after_a_long_absence_reads_its_users_index() {
    let cluster = Cluster::start();
    publish_and_analyze(&cluster, 500);
    let client = cluster.connect("postgres").await;
    // Planned with its parameters, as the relay's unnamed statement is; from the first
    // transaction on, so every event is in the range, and two users' are few.
    let plan = plan(
        &client,
        &format!(
            "SET plan_cache_mode = force_custom_plan; \
             PREPARE catch_up(text[], text[], text[], text[], text) AS {}",
            pg_outbox_client::__catch_up_sql("public")
        ),
        "EXECUTE catch_up('{u7,u8}', '{1,1}', '{}', '{}', NULL)",
    )
    .await;
    let segments = segments_with_events(&client).await;
    assert_reads_through(&plan, &segments, "user_id_xid_idx", "the catch-up");
    // Each user's rows from where its own position needs them: a range of the index.
    assert!(
        plan.lines().any(|line| line.contains("Index Cond:")
            && line.contains("user_id = w.topic")
            && line.contains("xid >= (w.from_xid)::xid8")),
        "the catch-up does not read each user's range:\n{plan}"
    );
}

/// The current segment of a new cluster, emptied and vacuumed: what a quiet night, a manual
/// `VACUUM` or `outbox_prune()` followed by autovacuum leave, with statistics that say 0 pages
/// and 0 rows. Returns its name.
fn vacuumed_empty_current_segment(cluster: &Cluster) -> String {
    let segment = cluster.psql(
        "postgres",
        "SELECT name FROM outbox_segments WHERE starts_at <= now() AND now() < ends_at",
    );
    assert!(!segment.is_empty(), "the cluster has a current segment");
    cluster.psql("postgres", &format!("VACUUM ANALYZE {segment}"));
    assert_eq!(
        cluster.psql(
            "postgres",
            &format!(
                "SELECT relpages || ':' || reltuples FROM pg_class WHERE relname = '{segment}'"
            )
        ),
        "0:0",
        "the statistics say the segment is empty"
    );
    segment
}

/// 2,000 events, one transaction each, with no ANALYZE after them: the statistics still say
/// the current segment is empty.
fn publish_without_analyze(cluster: &Cluster) {
    cluster.psql(
        "postgres",
        "DO $$ BEGIN FOR g IN 1..2000 LOOP \
           PERFORM outbox_publish('chat', 'u' || (g % 10), jsonb_build_object('n', g)); \
           COMMIT; \
         END LOOP; END $$",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_made_over_an_empty_vacuumed_segment_reads_the_index_as_the_segment_fills() {
    let cluster = Cluster::start();
    let segment = vacuumed_empty_current_segment(&cluster);
    let client = cluster.connect("postgres").await;
    // The relay's query session; each statement's generic plan is made, and cached, while the
    // segment is empty.
    client
        .batch_execute(pg_outbox_client::__QUERY_SESSION_SETTINGS)
        .await
        .unwrap();
    client
        .batch_execute(&format!(
            "PREPARE advance(text) AS {}; \
             PREPARE catch_up(text[], text[], text[], text[], text) AS {}; \
             EXECUTE advance('1:1:'); EXECUTE catch_up('{{u1}}', '{{1}}', '{{}}', '{{}}', NULL)",
            pg_outbox_client::__advance_sql("public"),
            pg_outbox_client::__catch_up_sql("public"),
        ))
        .await
        .unwrap();
    publish_without_analyze(&cluster);
    for (execute, what, index) in [
        ("EXECUTE advance('1:1:')", "the advance", "xid_id_idx"),
        (
            "EXECUTE catch_up('{u1}', '{1}', '{}', '{}', NULL)",
            "a resume's catch-up",
            "user_id_xid_idx",
        ),
        (
            "EXECUTE catch_up('{}', '{}', '{}', '{}', '1')",
            "a catch-up of every event",
            "xid_id_idx",
        ),
    ] {
        let plan = plan(&client, "SELECT 1", execute).await;
        assert!(
            plan.contains(&format!("Index Scan using {segment}_{index}"))
                || plan.contains(&format!("Bitmap Index Scan on {segment}_{index}")),
            "{what} does not read {segment} through its index {index}:\n{plan}"
        );
        assert!(
            !plan.contains(&format!("Seq Scan on {segment}")),
            "{what} scans {segment}:\n{plan}"
        );
        // Compiling the plan would cost far more than running it, at every execution.
        assert!(!plan.contains("JIT:"), "{what} is compiled:\n{plan}");
    }
}

/// The segment's scans so far, as `pg_stat_user_tables` counts them: (whole, through an index).
async fn scans(client: &Client, segment: &str) -> Option<(i64, i64)> {
    let row = client
        .query_one(
            "SELECT seq_scan, coalesce(idx_scan, 0) FROM pg_stat_user_tables WHERE relname = $1",
            &[&segment],
        )
        .await
        .ok()?;
    Some((row.get(0), row.get(1)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_started_over_an_empty_vacuumed_segment_never_scans_it() {
    let cluster = Cluster::start();
    let segment = vacuumed_empty_current_segment(&cluster);
    let client = cluster.connect("postgres").await;
    // Creating the cluster's segments reads them; only the relay's reads count from here.
    let (seq_before, index_before) = scans(&client, &segment).await.expect("segment statistics");
    let relay = relay(&cluster, "plan_relay").build().unwrap();
    let all = Collector::spawn(relay.subscribe_to(Topic::all().buffer(4096)));
    relay.start().await.unwrap();
    publish_without_analyze(&cluster);
    cluster
        .wait_for("every event relayed", WAIT, || async {
            (all.ids().len() >= 2000).then_some(())
        })
        .await;
    // Statistics reach pg_stat_user_tables when the relay's backend goes idle, within a
    // second: wait until they show its reads.
    let (seq_scans, index_scans) = cluster
        .wait_for("the relay's reads in the statistics", WAIT, || async {
            let (seq, index) = scans(&client, &segment).await?;
            let (seq, index) = (seq - seq_before, index - index_before);
            (seq + index >= 20).then_some((seq, index))
        })
        .await;
    assert_eq!(
        seq_scans, 0,
        "the relay's statements scanned {segment} whole {seq_scans} times \
         (and through an index {index_scans} times)"
    );
    all.assert_exactly("the relay", &committed_ids(&client).await);
    relay.shutdown().await;
}
