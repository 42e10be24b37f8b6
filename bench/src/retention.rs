//! Figure 5, continued: retention without bloat. Three layouts of the outbox, each with the
//! same expired backlog: rows in `event_outbox` itself, deleted by the pruner worker's batches,
//! and the extension's segments, one of which the pruner drops whole (both measured in
//! [`crate::prune`]); and a time-partitioned outbox whose expired partitions are dropped, as
//! PgQ rotates its tables. Then what dropping a partition does to publishers while a long
//! transaction reads the outbox: why the extension's segments are inheritance children rather
//! than partitions.
//!
//! The partitioned outbox lives in a database of its own, [`DATABASE`]: `pg_outbox` is created
//! there (with `segment_interval = 0`, so without segments), its `event_outbox` taken out of
//! the extension and replaced by a table with the same columns, defaults and indexes,
//! partitioned by hour on `created_at`. `outbox_publish` is the extension's, unchanged: its
//! prepared INSERT names `event_outbox` and is routed to the partitions (the figure counts the
//! rows of each partition to show it). The workers serve one database (`pg_outbox.database`,
//! read at server start), so the server is restarted to serve this one while it is measured,
//! and restarted back after: the notifier does the same work for both layouts. Its pruner must
//! never run a pass over the partitioned table with expired rows in it (its `DELETE ... WHERE
//! ctid = ANY(...)` would match rows of other partitions with the same ctid), so the backlog
//! is loaded only after the pruner's first pass, and the bench's `prune_interval` of an hour
//! keeps it from another.
//!
//! Why `created_at` and not the UUIDv7 `id` as the partition key: retention is defined on
//! `created_at`, by the database clock, so a partition's upper bound says exactly when all of its
//! rows have expired; and rows whose id is not a UUIDv7 of their time (inserted by hand or with
//! `gen_random_uuid()`, as this backlog and the PL/pgSQL baseline are) still land where they
//! expire instead of in a wrong partition or none. The price is a primary key of
//! `(id, created_at)`: ids alone are no longer checked unique by the database, and a lookup by
//! id alone probes every partition (timed here, though the client never does it: its reference
//! fetch is the same xid-range read as its catch-up).

use std::time::{Duration, Instant};

use pg_outbox_tests::Cluster;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};
use uuid::Uuid;

use crate::backlog::{
    backlog, load_backlog, load_backlog_into_a_segment, publishers, EXPIRED_SEGMENT,
};
use crate::pgbench::{tps, tps_in};
use crate::report::{median, ratio, Table};
use crate::Options;

/// The database of the partitioned outbox.
pub const DATABASE: &str = "retention_partitioned";

/// Partitions created for the partitioned outbox: hours from `FIRST_HOUR` to `LAST_HOUR` around
/// the current one (the backlog, created two hours ago, lands in the hour −2 or −3).
const FIRST_HOUR: i32 = -3;
const LAST_HOUR: i32 = 2;

/// How often the catch-up and the lookup by id are timed, and how many recent events they read.
const TIMED_RUNS: usize = 50;
const RECENT_TRANSACTIONS: usize = 10;
const EVENTS_PER_TRANSACTION: usize = 10;

/// How long a DROP waits for the lock on the parent before giving up, and how long the worker
/// waits before it tries again.
const LOCK_TIMEOUT: &str = "100ms";
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The sessions that publish during the lock experiment.
const HAZARD_PUBLISHERS: usize = 4;

/// One layout's side of the comparison.
pub struct Arm {
    /// Publish rates without pruning.
    pub without: Vec<f64>,
    /// The publish rate of the run during which the backlog was pruned.
    pub with: f64,
    pub pruned_in: Option<Duration>,
    /// `size` with the backlog loaded, and right after the prune.
    pub loaded: String,
    pub after: String,
    pub catch_up: CatchUp,
}

/// The client's read timings on one layout, with the backlog present.
pub struct CatchUp {
    /// The advance query over the recent events (median).
    pub advance: Duration,
    /// The same events fetched by id, `id = ANY($1)` (median).
    pub by_id: Duration,
    /// The advance's plan, in short: its scans of the outbox's tables.
    pub plan: String,
    /// The outbox's tables: 1, or its partitions.
    pub leaves: usize,
}

/// The outbox's size with its indexes and TOAST, summed over its segments or partitions.
pub fn size(cluster: &Cluster, database: &str) -> String {
    cluster.psql(
        database,
        "SELECT pg_size_pretty(sum(pg_total_relation_size(relid))) \
         FROM (SELECT 'event_outbox'::regclass AS relid \
               UNION ALL SELECT inhrelid FROM pg_inherits \
                          WHERE inhparent = 'event_outbox'::regclass) AS tables",
    )
}

/// Runs `statement` once, checks that it read `expected` rows, and returns how long it took, in
/// milliseconds.
async fn timed(
    client: &Client,
    statement: &Statement,
    params: &[&(dyn ToSql + Sync)],
    expected: usize,
    what: &str,
) -> f64 {
    let started = Instant::now();
    let rows = client
        .query(statement, params)
        .await
        .unwrap_or_else(|e| panic!("run {what}: {e}"));
    let took = started.elapsed();
    assert_eq!(rows.len(), expected, "{what} reads the recent events");
    took.as_secs_f64() * 1000.0
}

/// Times the client's reads with the backlog in the table: publishes
/// `RECENT_TRANSACTIONS × EVENTS_PER_TRANSACTION` events after a snapshot, then runs the relay's
/// advance statement (`pg_outbox_client::__advance_sql`, as prepared by the client) from that
/// snapshot, and a fetch of the same events by id, `TIMED_RUNS` times each.
pub async fn catch_up(client: &Client) -> CatchUp {
    let from: String = client
        .query_one("SELECT pg_current_snapshot()::text", &[])
        .await
        .expect("read the snapshot")
        .get(0);
    let mut ids: Vec<Uuid> = Vec::new();
    for _ in 0..RECENT_TRANSACTIONS {
        let rows = client
            .query(
                &format!(
                    "SELECT outbox_publish('chat', 'user-1', '{{\"text\": \"a recent event\"}}') \
                     FROM generate_series(1, {EVENTS_PER_TRANSACTION})"
                ),
                &[],
            )
            .await
            .expect("publish the recent events");
        ids.extend(rows.iter().map(|row| row.get::<_, Uuid>(0)));
    }
    let advance_sql = pg_outbox_client::__advance_sql("public");
    let advance = client
        .prepare(&advance_sql)
        .await
        .expect("prepare the advance");
    let by_id = client
        .prepare(
            "SELECT id, channel, user_id, payload::text, origin, created_at, xid::text \
             FROM event_outbox WHERE id = ANY($1)",
        )
        .await
        .expect("prepare the lookup by id");

    let mut advance_ms = Vec::new();
    let mut by_id_ms = Vec::new();
    for run in 0..TIMED_RUNS + 3 {
        let advanced = timed(client, &advance, &[&from], ids.len(), "the advance").await;
        let looked_up = timed(client, &by_id, &[&ids], ids.len(), "the lookup by id").await;
        // The first runs warm the plans and the caches.
        if run >= 3 {
            advance_ms.push(advanced);
            by_id_ms.push(looked_up);
        }
    }

    let plan = client
        .query(&format!("EXPLAIN (COSTS OFF) {advance_sql}"), &[&from])
        .await
        .expect("explain the advance");
    let plan: Vec<String> = plan.iter().map(|row| row.get(0)).collect();
    let count = |pattern: &dyn Fn(&str) -> bool| plan.iter().filter(|l| pattern(l)).count();
    let index_scans = count(&|l| l.contains("Index Scan") && l.contains("xid"));
    let seq_scans = count(&|l| l.contains("Seq Scan on") && l.contains("event_outbox"));
    let leaves: i64 = client
        .query_one(
            "SELECT count(*) FROM (SELECT 'event_outbox'::regclass AS relid \
                   UNION ALL SELECT inhrelid FROM pg_inherits \
                              WHERE inhparent = 'event_outbox'::regclass) AS tables \
             JOIN pg_class ON pg_class.oid = tables.relid WHERE relkind <> 'p'",
            &[],
        )
        .await
        .expect("count the tables that hold rows")
        .get(0);
    CatchUp {
        advance: Duration::from_secs_f64(median(&advance_ms) / 1000.0),
        by_id: Duration::from_secs_f64(median(&by_id_ms) / 1000.0),
        plan: format!("{index_scans} xid index scan(s), {seq_scans} seq scan(s)"),
        leaves: leaves as usize,
    }
}

/// Measures the partitioned outbox and the lock experiment; returns the comparison with
/// `plain` (the prune figure's DELETE run with the default pause) and `segments` (its segment
/// run), and the experiment's table.
pub async fn run(
    cluster: &Cluster,
    options: &Options,
    mut plain: Arm,
    mut segments: Arm,
) -> Vec<Table> {
    let backlog = backlog(options);
    // Segments would be children of the table the setup replaces.
    cluster.set_setting("pg_outbox.segment_interval", "0");
    cluster.psql("postgres", &format!("CREATE DATABASE {DATABASE}"));
    cluster.psql_script(DATABASE, &setup_sql());
    serve(cluster, Some(DATABASE)).await;
    let drained = crate::drain::spawn_in(cluster, DATABASE).await;
    let admin = cluster.connect(DATABASE).await;
    let publish_here = || {
        let (bindir, root, port) = (
            cluster.bindir().to_owned(),
            cluster.root().to_owned(),
            cluster.port(),
        );
        let run = publishers(options);
        move || tps_in(&bindir, &root, port, DATABASE, &run)
    };

    load_backlog(cluster, DATABASE, backlog);
    let loaded = size(cluster, DATABASE);
    let catch_up = catch_up(&admin).await;
    let mut without = vec![publish_here()()];
    let routed = rows_per_partition(cluster);

    // The run with the prune: the expired partitions are dropped half a second in, as a worker
    // would drop them on its tick.
    let publishing = tokio::task::spawn_blocking(publish_here());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let worker = cluster.connect(DATABASE).await;
    let dropped = drop_expired(&worker).await;
    let with = publishing.await.expect("the pgbench run while dropping");
    let after = size(cluster, DATABASE);
    without.push(publish_here()());

    let mut hazard_table = hazard_table(options);
    let partition_ddls = [
        Ddl::Nothing,
        Ddl::Drop,
        Ddl::DropWithTimeout,
        Ddl::DetachConcurrently,
    ];
    hazard(cluster, options, &mut hazard_table, &partition_ddls).await;
    drop(worker);
    drop(admin);
    drained.stop().await;

    // Back to the plain table: one more run without pruning, so that its runs bracket the
    // partitioned ones.
    cluster.reset_setting("pg_outbox.segment_interval");
    serve(cluster, None).await;
    let drained = crate::drain::spawn(cluster).await;
    let last = tps(cluster, &publishers(options));
    plain.without.push(last);
    segments.without.push(last);
    hazard(
        cluster,
        options,
        &mut hazard_table,
        &[Ddl::NothingInSegments, Ddl::SegmentPrune],
    )
    .await;
    drained.stop().await;
    cluster.psql("postgres", &format!("DROP DATABASE {DATABASE}"));

    let partitioned = Arm {
        without,
        with,
        pruned_in: Some(dropped.took),
        loaded,
        after,
        catch_up,
    };
    vec![
        comparison(options, &plain, &segments, &partitioned, &dropped, &routed),
        hazard_table,
    ]
}

/// The comparison's table.
fn comparison(
    options: &Options,
    plain: &Arm,
    segments: &Arm,
    partitioned: &Arm,
    dropped: &Dropped,
    routed: &str,
) -> Table {
    let mut table = Table::new(
        "Retention without bloat: DELETE batches, dropping segments, dropping partitions",
        &[
            "outbox layout, pruned by",
            "publish tx/s without pruning",
            "while pruning",
            "vs without",
            "time to prune",
            "table size loaded → after (before vacuum)",
            "catch-up of 100 new events (median)",
            "the 100 events by id (median)",
        ],
    );
    let plain_base = median(&plain.without);
    for (name, arm) in [
        (
            "rows in event_outbox itself; the pruner worker's DELETE batches (prune_pause 100ms)",
            plain,
        ),
        (
            "the extension's segments (inheritance children); the pruner worker drops the expired one",
            segments,
        ),
        (
            "hourly partitions on created_at; DROP TABLE of the expired partitions",
            partitioned,
        ),
    ] {
        let base = median(&arm.without);
        let without = if std::ptr::eq(arm, partitioned) {
            format!("{base:.0} ({} the extension's layout)", ratio(base, plain_base))
        } else {
            format!("{base:.0}")
        };
        table.row(vec![
            name.to_owned(),
            without,
            format!("{:.0}", arm.with),
            ratio(arm.with, base),
            arm.pruned_in.map_or("not done in 10 min".into(), |d| {
                format!("{:.2} s", d.as_secs_f64())
            }),
            format!("{} → {}", arm.loaded, arm.after),
            format!("{:.2} ms", arm.catch_up.advance.as_secs_f64() * 1000.0),
            format!("{:.2} ms", arm.catch_up.by_id.as_secs_f64() * 1000.0),
        ]);
    }
    table.note = format!(
        "Measured in the same run as the table above: its DELETE run with prune_pause 100ms \
         and its segment run, which share their runs without pruning (publishers insert into \
         the current segment in both). The partitioned outbox is in a database of its own \
         ({DATABASE}): CREATE EXTENSION pg_outbox, then its event_outbox taken out of the \
         extension (ALTER EXTENSION pg_outbox DROP TABLE), dropped, and replaced by a table \
         with the same columns, defaults and indexes, PARTITION BY RANGE (created_at), primary \
         key (id, created_at), with {} hourly partitions from hour {FIRST_HOUR} to hour \
         +{LAST_HOUR} around the current one; the server restarted with pg_outbox.database \
         naming it, so its notifier does the work it does for the plain table. Publishers call \
         the extension's outbox_publish unchanged (pgbench, 8 clients, notify_mode = worker, \
         {} s runs); rows per partition after the first run without pruning: {routed}. The \
         same {} rows created two hours ago, then VACUUM ANALYZE and CHECKPOINT. The \
         partitions' prune, half a second into its run, is what a worker would do: per expired partition (upper bound at \
         least pg_outbox.retention ago), one transaction with lock_timeout {LOCK_TIMEOUT} that \
         counts its rows and their greatest xid into outbox_prune_state and drops it \
         ({} partitions, {} rows, {} retries after a lock timeout). Without pruning: medians \
         of the runs before, between and after the prunes above and after the \
         partitioned runs ({} tx/s), and of the partitioned runs before and after its prune \
         ({} tx/s). Sizes: pg_total_relation_size, summed over the segments or partitions. Catch-up: the \
         relay's advance statement (pg_outbox_client's, prepared) from a snapshot taken before \
         {} transactions of {} outbox_publish calls, with the backlog present, median of \
         {TIMED_RUNS} runs after 3 warm-ups, measured at the client; its plan (EXPLAIN) with \
         the backlog in event_outbox itself, over {} tables: {}; in a segment, over {} tables: \
         {}; on the {} partitions: {}. By id: SELECT ... WHERE id = ANY($1) with \
         the same 100 ids, which the client never runs.",
        LAST_HOUR - FIRST_HOUR + 1,
        options.run_time().as_secs(),
        backlog(options),
        dropped.partitions,
        dropped.rows,
        dropped.attempts - dropped.partitions as u32,
        rates(&plain.without),
        rates(&partitioned.without),
        RECENT_TRANSACTIONS,
        EVENTS_PER_TRANSACTION,
        plain.catch_up.leaves,
        plain.catch_up.plan,
        segments.catch_up.leaves,
        segments.catch_up.plan,
        partitioned.catch_up.leaves,
        partitioned.catch_up.plan,
    );
    table
}

/// `a, b, c` for the runs' rates.
fn rates(runs: &[f64]) -> String {
    runs.iter()
        .map(|r| format!("{r:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Creates the extension in [`DATABASE`] and replaces its `event_outbox` by a partitioned one.
fn setup_sql() -> String {
    format!(
        r#"
CREATE EXTENSION pg_outbox;
BEGIN;
CREATE TABLE event_outbox_partitioned
    (LIKE event_outbox INCLUDING DEFAULTS INCLUDING COMMENTS)
    PARTITION BY RANGE (created_at);
ALTER EXTENSION pg_outbox DROP TABLE event_outbox;
DROP TABLE event_outbox;
ALTER TABLE event_outbox_partitioned RENAME TO event_outbox;
-- A partitioned table's unique keys must hold its partition key.
ALTER TABLE event_outbox ADD PRIMARY KEY (id, created_at);
CREATE INDEX event_outbox_created_at_idx ON event_outbox (created_at);
CREATE INDEX event_outbox_xid_idx ON event_outbox (xid, id);
REVOKE ALL ON TABLE event_outbox FROM PUBLIC;
DO $$
DECLARE
    h timestamptz;
BEGIN
    FOR i IN {FIRST_HOUR}..{LAST_HOUR} LOOP
        h := date_trunc('hour', now()) + make_interval(hours => i);
        EXECUTE format('CREATE TABLE %I PARTITION OF event_outbox FOR VALUES FROM (%L) TO (%L)',
                       'event_outbox_p' || to_char(h AT TIME ZONE 'UTC', 'YYYYMMDD_HH24'),
                       h, h + interval '1 hour');
    END LOOP;
END $$;
COMMIT;
"#
    )
}

/// Points the workers at `database` (or back at `postgres`), restarts the server, and waits
/// until both serve it: the notifier connected past the extension check, and the pruner's
/// first pass over (and the tables it finds then).
async fn serve(cluster: &Cluster, database: Option<&str>) {
    match database {
        Some(database) => cluster.set_setting("pg_outbox.database", database),
        None => cluster.reset_setting("pg_outbox.database"),
    }
    cluster.restart();
    let database = database.unwrap_or("postgres");
    let ready = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{database}' \
         AND ((backend_type = 'pg_outbox pruner' AND query = 'idle') \
              OR (backend_type = 'pg_outbox notifier' \
                  AND query NOT IN ('', 'waiting for CREATE EXTENSION pg_outbox')))"
    );
    let started = Instant::now();
    while cluster.psql("postgres", &ready) != "2" {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the workers did not start serving {database} within a minute"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `partition: rows, ...` of the partitioned outbox.
fn rows_per_partition(cluster: &Cluster) -> String {
    cluster.psql(
        DATABASE,
        "SELECT string_agg(format('%s: %s', p, n), ', ' ORDER BY p) \
         FROM (SELECT tableoid::regclass::text AS p, count(*) AS n \
               FROM event_outbox GROUP BY 1) AS s",
    )
}

/// What dropping the expired partitions took.
struct Dropped {
    took: Duration,
    partitions: usize,
    rows: i64,
    attempts: u32,
}

/// Drops every expired partition the way a worker would, each in a transaction of its own that
/// first records the rows and their greatest xid in `outbox_prune_state` (so relays detect the
/// gap as they do after a DELETE), with `lock_timeout` and a retry after [`RETRY_AFTER`].
async fn drop_expired(worker: &Client) -> Dropped {
    let started = Instant::now();
    worker
        .batch_execute(&format!("SET lock_timeout = '{LOCK_TIMEOUT}'"))
        .await
        .expect("set lock_timeout");
    let expired: Vec<String> = worker
        .query(
            "SELECT c.oid::regclass::text \
             FROM pg_catalog.pg_inherits i JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = 'event_outbox'::regclass \
               AND (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \\(''([^'']*)''\\)'))[1] \
                   ::timestamptz <= now() - current_setting('pg_outbox.retention')::interval \
             ORDER BY 1",
            &[],
        )
        .await
        .expect("list the expired partitions")
        .iter()
        .map(|row| row.get(0))
        .collect();
    let (mut rows, mut attempts) = (0, 0);
    for partition in &expired {
        loop {
            attempts += 1;
            match drop_partition(worker, partition).await {
                Ok(n) => {
                    rows += n;
                    break;
                }
                Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                    worker.batch_execute("ROLLBACK").await.expect("roll back");
                    tokio::time::sleep(RETRY_AFTER).await;
                }
                Err(e) => panic!("drop {partition}: {e}"),
            }
        }
    }
    Dropped {
        took: started.elapsed(),
        partitions: expired.len(),
        rows,
        attempts,
    }
}

async fn drop_partition(worker: &Client, partition: &str) -> Result<i64, tokio_postgres::Error> {
    worker.batch_execute("BEGIN").await?;
    let rows: i64 = worker
        .query_one(
            &format!(
                "WITH gone AS (SELECT count(*) AS n, max(xid) AS max_xid FROM {partition}) \
                 UPDATE outbox_prune_state SET \
                     rows_pruned = rows_pruned + gone.n, \
                     pruned_through_xid = greatest(pruned_through_xid, gone.max_xid), \
                     last_pruned_at = clock_timestamp() \
                 FROM gone RETURNING gone.n"
            ),
            &[],
        )
        .await?
        .get(0);
    worker
        .batch_execute(&format!("DROP TABLE {partition}; COMMIT"))
        .await?;
    Ok(rows)
}

/// How the lock experiment drops its partition, or its segment.
#[derive(Clone, Copy, PartialEq)]
enum Ddl {
    Nothing,
    Drop,
    DropWithTimeout,
    DetachConcurrently,
    /// The extension's segments, nothing dropped.
    NothingInSegments,
    /// The extension's segments, dropped by `outbox_prune()` as the pruner drops them.
    SegmentPrune,
}

impl Ddl {
    fn describe(self) -> String {
        match self {
            Ddl::Nothing => "partitions: nothing dropped (reference)".into(),
            Ddl::Drop => "partitions: DROP TABLE".into(),
            Ddl::DropWithTimeout => format!(
                "partitions: DROP TABLE with lock_timeout = '{LOCK_TIMEOUT}', retried every {} s",
                RETRY_AFTER.as_secs()
            ),
            Ddl::DetachConcurrently => {
                "partitions: ALTER TABLE ... DETACH PARTITION ... CONCURRENTLY, then DROP TABLE"
                    .into()
            }
            Ddl::NothingInSegments => "segments: nothing dropped (reference)".into(),
            Ddl::SegmentPrune => format!(
                "segments: outbox_prune(), the pruner's drop (locks taken only without waiting), \
                 called every {} s",
                RETRY_AFTER.as_secs()
            ),
        }
    }

    /// The database the round runs in: segments are in `postgres`.
    fn database(self) -> &'static str {
        match self {
            Ddl::NothingInSegments | Ddl::SegmentPrune => "postgres",
            _ => DATABASE,
        }
    }

    /// Creates the expired table to drop in round `round` (a partition days ago, or a segment
    /// moved back to two hours ago), filled with 1,000 rows; returns its name.
    fn prepare(self, cluster: &Cluster, round: usize) -> String {
        match self {
            Ddl::NothingInSegments => String::new(),
            Ddl::SegmentPrune => {
                load_backlog_into_a_segment(cluster, 1000);
                EXPIRED_SEGMENT.to_owned()
            }
            _ => {
                // Days ago, clear of the partitions the comparison made.
                let partition = format!("event_outbox_expired_{round}");
                cluster.psql(
                    DATABASE,
                    &format!(
                        "CREATE TABLE {partition} PARTITION OF event_outbox FOR VALUES \
                             FROM (date_trunc('hour', now()) - interval '{} hours') \
                             TO (date_trunc('hour', now()) - interval '{} hours'); \
                         INSERT INTO {partition} (id, channel, user_id, payload, created_at) \
                         SELECT gen_random_uuid(), 'chat', 'user-1', '{{}}', \
                                date_trunc('hour', now()) - interval '{} hours' \
                         FROM generate_series(1, 1000)",
                        48 - round,
                        47 - round,
                        48 - round,
                    ),
                );
                partition
            }
        }
    }

    /// Runs the DDL; returns the attempts it took.
    async fn run(self, client: &Client, partition: &str) -> u32 {
        match self {
            Ddl::Nothing | Ddl::NothingInSegments => 0,
            Ddl::SegmentPrune => {
                let mut attempts = 0;
                loop {
                    attempts += 1;
                    let gone: bool = client
                        .query_one(
                            "SELECT outbox_prune() IS NOT NULL AND to_regclass($1) IS NULL",
                            &[&partition],
                        )
                        .await
                        .expect("prune")
                        .get(0);
                    if gone {
                        return attempts;
                    }
                    tokio::time::sleep(RETRY_AFTER).await;
                }
            }
            Ddl::Drop => {
                client
                    .batch_execute(&format!("DROP TABLE {partition}"))
                    .await
                    .expect("drop the partition");
                1
            }
            Ddl::DropWithTimeout => {
                client
                    .batch_execute(&format!("SET lock_timeout = '{LOCK_TIMEOUT}'"))
                    .await
                    .expect("set lock_timeout");
                let mut attempts = 0;
                loop {
                    attempts += 1;
                    match client
                        .batch_execute(&format!("DROP TABLE {partition}"))
                        .await
                    {
                        Ok(()) => return attempts,
                        Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                            tokio::time::sleep(RETRY_AFTER).await;
                        }
                        Err(e) => panic!("drop {partition}: {e}"),
                    }
                }
            }
            Ddl::DetachConcurrently => {
                client
                    .batch_execute(&format!(
                        "ALTER TABLE event_outbox DETACH PARTITION {partition} CONCURRENTLY"
                    ))
                    .await
                    .expect("detach the partition");
                client
                    .batch_execute(&format!("DROP TABLE {partition}"))
                    .await
                    .expect("drop the detached partition");
                1
            }
        }
    }
}

/// When, in each round of the lock experiment, the reader takes its lock, the worker starts,
/// how long the reader holds the lock, and how long the publishers go on after.
struct Timings {
    lock_at: Duration,
    ddl_at: Duration,
    hold: Duration,
    tail: Duration,
}

impl Timings {
    fn new(options: &Options) -> Self {
        let [lock_at, ddl_at, hold, tail] = if options.smoke {
            [200, 400, 600, 500]
        } else {
            [500, 1000, 3000, 1500]
        }
        .map(Duration::from_millis);
        Timings {
            lock_at,
            ddl_at,
            hold,
            tail,
        }
    }

    /// How long the publishers publish.
    fn window(&self) -> Duration {
        self.lock_at + self.hold + self.tail
    }
}

/// The lock experiment's table, with no rows yet.
fn hazard_table(options: &Options) -> Table {
    let timings = Timings::new(options);
    let mut table = Table::new(
        "Dropping an expired partition or segment while a transaction that read the outbox stays open",
        &[
            "outbox layout: how the worker drops it",
            "publishes/s",
            "slowest publish",
            "publishes over 50 ms",
            "gone after",
            "attempts",
        ],
    );
    table.note = format!(
        "{HAZARD_PUBLISHERS} sessions call outbox_publish (notify_mode = worker) back to back \
         for {:.1} s; {:.1} s in, another session runs BEGIN; SELECT 1 FROM event_outbox \
         LIMIT 1 (an AccessShareLock on the outbox and every partition or segment, as any open \
         transaction that read the outbox holds, pg_dump included) and commits {:.1} s later; \
         {:.1} s in, the worker starts dropping an expired partition or segment of 1,000 rows. \
         DROP TABLE of a partition takes an AccessExclusiveLock on the partitioned table: while \
         it waits, every publisher queues behind it. A segment's drop takes no lock on \
         event_outbox, and takes the segment's own lock only if it can without waiting. The \
         partitioned rows are in the partitioned outbox's database, the segments' in the \
         extension's own, each served by the workers. Measured at the publishing sessions.",
        timings.window().as_secs_f64(),
        timings.lock_at.as_secs_f64(),
        timings.hold.as_secs_f64(),
        timings.ddl_at.as_secs_f64(),
    );
    table
}

/// The lock experiment: for each way of dropping in `ddls`, an expired table of 1,000 rows is
/// dropped while a session holds a read lock on the outbox (a transaction that read it, as a
/// long report or pg_dump does) and [`HAZARD_PUBLISHERS`] sessions publish back to back. Adds
/// a row to `table` for each.
async fn hazard(cluster: &Cluster, options: &Options, table: &mut Table, ddls: &[Ddl]) {
    let Timings {
        lock_at,
        ddl_at,
        hold,
        ..
    } = Timings::new(options);
    let window = Timings::new(options).window();
    for (i, &ddl) in ddls.iter().enumerate() {
        let database = ddl.database();
        let partition = ddl.prepare(cluster, i);

        let started = Instant::now();
        let until = started + window;
        let mut publishing = Vec::new();
        for _ in 0..HAZARD_PUBLISHERS {
            let client = cluster.connect(database).await;
            publishing.push(tokio::spawn(async move {
                client
                    .batch_execute("SET pg_outbox.notify_mode = worker")
                    .await
                    .expect("set notify_mode");
                let publish = client
                    .prepare("SELECT outbox_publish('chat', 'user-1', '{\"text\": \"hello\"}')")
                    .await
                    .expect("prepare the publish");
                let mut latencies = Vec::new();
                while Instant::now() < until {
                    let sent = Instant::now();
                    client.query_one(&publish, &[]).await.expect("publish");
                    latencies.push(sent.elapsed());
                }
                latencies
            }));
        }
        let reader = cluster.connect(database).await;
        let reading = tokio::spawn(async move {
            tokio::time::sleep_until((started + lock_at).into()).await;
            reader
                .batch_execute("BEGIN; SELECT 1 FROM event_outbox LIMIT 1")
                .await
                .expect("read the outbox");
            tokio::time::sleep(hold).await;
            reader.batch_execute("COMMIT").await.expect("commit");
        });
        let worker = cluster.connect(database).await;
        tokio::time::sleep_until((started + ddl_at).into()).await;
        let ddl_started = Instant::now();
        let attempts = ddl.run(&worker, &partition).await;
        let gone_after = ddl_started.elapsed();
        let mut latencies = Vec::new();
        for publisher in publishing {
            latencies.extend(publisher.await.expect("a publisher"));
        }
        reading.await.expect("the reader");
        if ddl == Ddl::Nothing {
            cluster.psql(DATABASE, &format!("DROP TABLE {partition}"));
        }

        let slowest = latencies.iter().max().copied().unwrap_or_default();
        let slow = latencies
            .iter()
            .filter(|l| **l > Duration::from_millis(50))
            .count();
        table.row(vec![
            ddl.describe(),
            format!("{:.0}", latencies.len() as f64 / window.as_secs_f64()),
            format!("{:.0} ms", slowest.as_secs_f64() * 1000.0),
            slow.to_string(),
            if matches!(ddl, Ddl::Nothing | Ddl::NothingInSegments) {
                "–".into()
            } else {
                format!("{:.1} s", gone_after.as_secs_f64())
            },
            attempts.to_string(),
        ]);
    }
}
