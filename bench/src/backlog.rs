//! The expired backlog that figure 5 ([`crate::prune`]) and its continuation
//! ([`crate::retention`]) load before each prune, and the publishers that run meanwhile.

use pg_outbox_tests::Cluster;

use crate::pgbench::Run;
use crate::Options;

/// The backlog's size: a million rows, or a few for `--smoke`.
pub fn backlog(options: &Options) -> i64 {
    if options.smoke {
        20_000
    } else {
        1_000_000
    }
}

/// The publishers of both figures: `outbox_publish` from 8 pgbench clients, in worker mode.
pub fn publishers(options: &Options) -> Run {
    Run {
        script: "publish.sql".into(),
        clients: 8,
        duration: options.run_time(),
        options: "-c pg_outbox.notify_mode=worker".into(),
        variables: Vec::new(),
    }
}

/// The statement that inserts `backlog` rows created two hours ago into `table`.
fn insert_backlog(table: &str, backlog: i64) -> String {
    format!(
        "INSERT INTO {table} (id, channel, user_id, payload, created_at) \
         SELECT gen_random_uuid(), 'chat', 'user-' || mod(n, 100), \
                '{{\"text\": \"an expired event\", \"room\": 42}}', \
                clock_timestamp() - interval '2 hours' \
         FROM generate_series(1, {backlog}) n"
    )
}

/// Inserts `backlog` rows created two hours ago into `database`'s `event_outbox` itself (not a
/// segment), in one statement, then [`settle`]s them.
pub fn load_backlog(cluster: &Cluster, database: &str, backlog: i64) {
    cluster.psql(database, &insert_backlog("event_outbox", backlog));
    settle(cluster, database, "event_outbox");
}

/// The name the backlog's segment takes.
pub const EXPIRED_SEGMENT: &str = "event_outbox_expired_backlog";

/// Loads `backlog` rows created two hours ago into a segment the extension created: the newest,
/// which no publisher writes into yet. The segment is then renamed and moved back in
/// `outbox_segments` to the hour its rows were created in, which is how the pruner finds a
/// segment once its events have expired. Then [`settle`]s it.
pub fn load_backlog_into_a_segment(cluster: &Cluster, backlog: i64) {
    let insert = insert_backlog("%I", backlog).replace('\'', "''");
    cluster.psql(
        "postgres",
        &format!(
            "DO $$ \
             DECLARE newest name; \
             BEGIN \
                 SELECT name INTO newest FROM outbox_segments ORDER BY starts_at DESC LIMIT 1; \
                 EXECUTE format('{insert}', newest); \
                 EXECUTE format('ALTER TABLE %I RENAME TO {EXPIRED_SEGMENT}', newest); \
                 UPDATE outbox_segments SET name = '{EXPIRED_SEGMENT}', \
                     starts_at = now() - interval '3 hours', ends_at = now() - interval '2 hours' \
                 WHERE name = newest; \
             END $$"
        ),
    );
    settle(cluster, "postgres", EXPIRED_SEGMENT);
}

/// Vacuums and analyzes `table` (and `event_outbox` for its statistics over the segments), and
/// checkpoints.
///
/// The checkpoint makes the rows what expired rows are in production: written before the last
/// checkpoint, so the first change to each of their pages writes a full-page image to the WAL.
/// Without it, a prune in the same checkpoint cycle as the load wrote a quarter of the WAL (56 MB
/// for 1M rows, against 221 MB with the images), and the figure depended on where the server's
/// checkpoint timer happened to be.
fn settle(cluster: &Cluster, database: &str, table: &str) {
    cluster.psql(database, &format!("VACUUM ANALYZE {table}"));
    cluster.psql(database, "ANALYZE event_outbox");
    cluster.psql(database, "CHECKPOINT");
}
