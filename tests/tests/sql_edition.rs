//! The SQL-only edition, `pg_outbox_sql`, as a managed service runs it: a database owner who is
//! not a superuser installs it on a server that never loaded the native library, and nothing
//! of it is a C function; it also installs with plain `psql -f` into a schema; and one list of
//! calls gives the same results on both editions: the same rows, the same notification
//! documents, the same SQLSTATEs, messages and hints, and a refused call writes and sends
//! nothing (the SQL edition's calls run under its defaults, where valid ones take its short
//! path, and under settings, where they take the long one). Pruning needs no worker:
//! `outbox_prune()` from a `pg_cron` job; it empties expired segments whole, never waiting for
//! a reader's lock.

use std::collections::HashSet;
use std::time::Duration;

use pg_outbox_client::{Delivery, RelayBuilder, Topic};
use pg_outbox_tests::relay::{publish, Collector};
use pg_outbox_tests::{repository, Cluster, Edition, WAIT};
use tokio_postgres::Client;

/// A cluster of the SQL edition without the extension, with a database `app` owned by `owner`,
/// a role that is not a superuser.
fn managed_service() -> Cluster {
    let cluster = Cluster::builder()
        .edition(Edition::Sql)
        .create_extension(false)
        .start();
    cluster.psql(
        "postgres",
        "CREATE ROLE owner LOGIN NOSUPERUSER NOCREATEROLE",
    );
    cluster.psql("postgres", "CREATE DATABASE app OWNER owner");
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_owner_installs_it_where_the_library_was_never_loaded_and_relays_use_it() {
    let cluster = managed_service();
    assert_eq!(
        cluster.psql("postgres", "SHOW shared_preload_libraries"),
        ""
    );
    let owner = cluster.connect_as("app", "owner").await;
    owner
        .batch_execute("CREATE EXTENSION pg_outbox_sql")
        .await
        .expect("a database owner who is not a superuser installs the trusted edition");
    let c_functions: i64 = owner
        .query_one(
            "SELECT count(*) FROM pg_depend d \
             JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_outbox_sql' \
             JOIN pg_proc p ON p.oid = d.objid AND d.classid = 'pg_proc'::regclass \
             WHERE d.deptype = 'e' AND p.prolang NOT IN \
                   (SELECT oid FROM pg_language WHERE lanname IN ('sql', 'plpgsql'))",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(c_functions, 0, "every member function is SQL or PL/pgSQL");
    let native: i64 = owner
        .query_one(
            "SELECT count(*) FROM pg_extension WHERE extname = 'pg_outbox'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(native, 0);

    // The client crate, unchanged: live events and a resume.
    let relay = RelayBuilder::new(cluster.config("app", "owner"))
        .application_name("relay_sql_edition")
        .build()
        .unwrap();
    let live = Collector::spawn(relay.subscribe_to(Topic::all().user("u1")));
    relay.start().await.unwrap();
    let position = relay
        .subscribe_to(Topic::all().user("u1"))
        .position()
        .unwrap();
    let mut expected = HashSet::new();
    for n in 0..5 {
        expected.insert(publish(&owner, "chat", "u1", &format!(r#"{{"n": {n}}}"#), None).await);
        publish(&owner, "chat", "u2", "{}", None).await;
    }
    live.wait_for_all(&cluster, "the live events", &expected)
        .await;
    live.assert_exactly("live", &expected);
    let resumed = Collector::spawn(relay.subscribe_from(Topic::all().user("u1"), &position));
    resumed
        .wait_for_all(&cluster, "the resumed events", &expected)
        .await;
    resumed.assert_exactly("resumed", &expected);
    assert!(!resumed
        .items()
        .iter()
        .any(|item| matches!(item, Delivery::Reset { .. })));
    let metrics = relay.metrics();
    assert_eq!((metrics.forged, metrics.gaps), (0, 0), "{metrics:?}");
    relay.shutdown().await;
}

#[tokio::test]
async fn it_installs_with_psql_into_a_schema() {
    let cluster = managed_service();
    let script = std::fs::read_to_string(repository().join("sql/edition/pg_outbox_sql--0.6.0.sql"))
        .expect("the SQL edition's script");
    cluster.psql("app", "CREATE SCHEMA outbox AUTHORIZATION owner");
    cluster.psql_script(
        "app",
        &format!("SET ROLE owner;\nSET search_path = outbox;\n{script}"),
    );
    let id = cluster.psql(
        "app",
        "SET ROLE owner; SET search_path = public; \
         SELECT outbox.outbox_publish('chat', 'u1', '{\"n\": 1}')",
    );
    let stored = cluster.psql(
        "app",
        &format!("SELECT channel || ' ' || user_id FROM outbox.event_outbox WHERE id = '{id}'"),
    );
    assert_eq!(stored, "chat u1");
}

/// What one call did: its result shape (the returned id's version and variant, the row stored,
/// the notification document with the id, xid and time masked), or its error.
#[derive(Debug, PartialEq)]
enum Outcome {
    Published {
        row: String,
        document: String,
    },
    Refused {
        code: String,
        message: String,
        hint: Option<String>,
        rows: i64,
    },
}

/// The settings a call runs under, then the call.
const CALLS: &[(&str, &str)] = &[
    ("", "SELECT outbox_publish('chat', 'u1', '{\"text\": \"hello\"}')"),
    ("", "SELECT outbox_publish('chat', 'u1', '{}', 'replica-a')"),
    ("", "SELECT outbox_publish('a.b:c-d_e', E'quote\" back\\\\ nl\\n tab\\t \\u0001 é 🎉', '[1, 2.5, null, true]')"),
    ("SET pg_outbox.notify_payload = 'inline'", "SELECT outbox_publish('chat', 'u1', '{\"inline\": [1, \"two\"]}')"),
    ("SET pg_outbox.notify_payload = 'inline'", "SELECT outbox_publish('chat', 'u1', jsonb_build_object('big', repeat('x', 9000)))"),
    ("SET pg_outbox.logical_messages = on", "SELECT outbox_publish('chat', 'u1', '{\"logged\": 1}')"),
    ("", "SELECT outbox_publish(NULL, 'u1', '{}')"),
    ("", "SELECT outbox_publish('chat', NULL, '{}')"),
    ("", "SELECT outbox_publish('chat', 'u1', NULL)"),
    ("", "SELECT outbox_publish('', 'u1', '{}')"),
    ("", "SELECT outbox_publish('chat', '', '{}')"),
    ("", "SELECT outbox_publish('chat', 'u1', '{}', '')"),
    ("", "SELECT outbox_publish('chat room', 'u1', '{}')"),
    ("", "SELECT outbox_publish(E'chat\\n', 'u1', '{}')"),
    ("", "SELECT outbox_publish('chät', 'u1', '{}')"),
    ("", "SELECT outbox_publish('chat', 'u1', '{}', 'a/b')"),
    ("", "SELECT outbox_publish(repeat('c', 64), 'u1', '{}')"),
    ("", "SELECT outbox_publish('chat', repeat('é', 513), '{}')"),
    ("", "SELECT outbox_publish('chat', 'u1', '{}', repeat('o', 256))"),
    ("SET pg_outbox.max_payload_bytes = '1kB'", "SELECT outbox_publish('chat', 'u1', jsonb_build_object('x', repeat('x', 2000)))"),
    ("SET pg_outbox.max_payload_bytes = '2MB'", "SELECT outbox_publish('chat', 'u1', '{\"limit\": \"raised\"}')"),
    // Payloads read from a table, stored compressed: their size is the decompressed one.
    (
        "CREATE TEMP TABLE stored AS SELECT jsonb_build_object('x', repeat('x', 100000)) AS payload",
        "SELECT outbox_publish('chat', 'u1', payload) FROM stored",
    ),
    (
        "CREATE TEMP TABLE stored AS SELECT jsonb_build_object('x', repeat('x', 1100000)) AS payload",
        "SELECT outbox_publish('chat', 'u1', payload) FROM stored",
    ),
    ("SET default_transaction_read_only = on", "SELECT outbox_publish('chat', 'u1', '{}')"),
    ("", "SELECT outbox_prune('-1 second')"),
    ("SET default_transaction_isolation = 'repeatable read'", "SELECT outbox_prune()"),
    ("", "SELECT outbox_prune('1 hour')"),
];

/// Runs every call of [`CALLS`] on one edition, each in a session of its own: the SQL edition
/// under its defaults, the native one sending references as the SQL edition does (its default
/// seals them).
async fn outcomes(cluster: &Cluster, edition: Edition) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    let sentinel = cluster.connect("postgres").await;
    for (setting, call) in CALLS {
        let client = cluster.connect("postgres").await;
        if edition == Edition::Native {
            client
                .batch_execute("SET pg_outbox.notify_payload = 'reference'")
                .await
                .unwrap();
        }
        if !setting.is_empty() {
            client.batch_execute(setting).await.unwrap();
        }
        let mut listener = cluster.listener("postgres").await;
        let before = rows(&client).await;
        let outcome = match client.query_one(*call, &[]).await {
            Ok(row) if call.contains("outbox_prune") => Outcome::Published {
                row: format!("pruned {}", row.get::<_, i64>(0)),
                document: String::new(),
            },
            Ok(row) => {
                let id: uuid::Uuid = row.get(0);
                assert_eq!(id.get_version_num(), 7, "{call}");
                let stored: String = client
                    .query_one(
                        "SELECT format('%s|%s|%s|%s|%s', channel, user_id, payload::text, \
                                origin, notify_deferred) FROM event_outbox WHERE id = $1",
                        &[&id],
                    )
                    .await
                    .unwrap()
                    .get(0);
                let document = listener.next_raw().await.replace(&id.to_string(), "ID");
                Outcome::Published {
                    row: stored,
                    document: mask_numbers(&document),
                }
            }
            Err(err) => {
                let db = err.as_db_error().unwrap_or_else(|| panic!("{call}: {err}"));
                // Notifications arrive in commit order: had the refused call sent one, it
                // would come before this one, sent after it.
                sentinel
                    .batch_execute("NOTIFY pg_outbox, 'sentinel'")
                    .await
                    .unwrap();
                assert_eq!(
                    listener.next_raw().await,
                    "sentinel",
                    "a refused call sent nothing: {call}"
                );
                Outcome::Refused {
                    code: db.code().code().to_owned(),
                    message: db.message().to_owned(),
                    hint: db.hint().map(str::to_owned),
                    rows: rows(&client).await - before,
                }
            }
        };
        outcomes.push(outcome);
    }
    outcomes
}

async fn rows(client: &Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM event_outbox", &[])
        .await
        .unwrap()
        .get(0)
}

/// The document with its `xid` and `created_at_us` values replaced, which differ per call.
fn mask_numbers(document: &str) -> String {
    let mut masked = document.to_owned();
    for key in ["\"xid\":", "\"created_at_us\":"] {
        if let Some(at) = masked.find(key) {
            let start = at + key.len();
            let end = masked[start..]
                .find(|c: char| !c.is_ascii_digit())
                .map_or(masked.len(), |n| start + n);
            masked.replace_range(start..end, "N");
        }
    }
    masked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_editions_answer_every_call_alike() {
    let native = Cluster::start();
    let sql = Cluster::builder().edition(Edition::Sql).start();
    let (native_outcomes, sql_outcomes) = (
        outcomes(&native, Edition::Native).await,
        outcomes(&sql, Edition::Sql).await,
    );
    for ((call, native), sql) in CALLS.iter().zip(&native_outcomes).zip(&sql_outcomes) {
        assert_eq!(native, sql, "{call:?}");
        if let Outcome::Refused { rows, .. } = sql {
            assert_eq!(*rows, 0, "a refused call wrote nothing: {call:?}");
        }
    }
    // The list covers both kinds of outcome.
    assert!(sql_outcomes.iter().any(
        |o| matches!(o, Outcome::Published { document, .. } if document.contains("\"payload\""))
    ));
    assert!(
        sql_outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Refused { .. }))
            .count()
            >= 15
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pg_cron_job_prunes_it() {
    let cluster = Cluster::builder()
        .edition(Edition::Sql)
        .setting("shared_preload_libraries", "'pg_cron'")
        .setting("cron.database_name", "'postgres'")
        .start();
    cluster.psql(
        "postgres",
        "CREATE EXTENSION pg_cron; \
         ALTER DATABASE postgres SET pg_outbox.retention = '1s'; \
         ALTER DATABASE postgres SET pg_outbox.segment_interval = 0",
    );
    // No segments: each call deletes whatever expired (segments_are_emptied_whole...
    // covers them), so that the first run prunes.
    let client = cluster.connect("postgres").await;
    for _ in 0..10 {
        publish(&client, "chat", "u1", "{}", None).await;
    }
    // Every minute, pg_cron 1.4's finest schedule.
    cluster.psql(
        "postgres",
        "SELECT cron.schedule('pg_outbox prune', '* * * * *', 'SELECT outbox_prune()')",
    );
    let pruned_by: String = cluster
        .wait_for(
            "the cron job to prune",
            Duration::from_secs(150),
            || async {
                let row = client
                    .query_one(
                        "SELECT rows_pruned, coalesce(last_pruned_by, '') FROM outbox_prune_state",
                        &[],
                    )
                    .await
                    .unwrap();
                (row.get::<_, i64>(0) == 10).then(|| row.get(1))
            },
        )
        .await;
    assert!(!pruned_by.is_empty());
    assert_eq!(rows(&client).await, 0);
    let succeeded: i64 = client
        .query_one(
            "SELECT count(*) FROM cron.job_run_details WHERE status = 'succeeded'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(succeeded >= 1);
}

/// Rows of one segment table.
async fn segment_rows(client: &Client, segment: i32) -> i64 {
    client
        .query_one(
            &format!("SELECT count(*) FROM event_outbox_segment_{segment}"),
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// The segment publishers write into, as `outbox_prune()` last set it.
async fn current_segment(client: &Client) -> i32 {
    client
        .query_one(
            "SELECT pg_sequence_last_value('outbox_current_segment')::int",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_are_emptied_whole_once_expired_and_never_wait_for_a_reader() {
    let cluster = Cluster::builder().edition(Edition::Sql).start();
    cluster.psql(
        "postgres",
        "ALTER DATABASE postgres SET pg_outbox.retention = '1s'; \
         ALTER DATABASE postgres SET pg_outbox.segment_interval = '1s'",
    );
    let client = cluster.connect("postgres").await;
    let first = current_segment(&client).await;
    for _ in 0..5 {
        publish(&client, "chat", "u1", "{}", None).await;
    }
    assert_eq!(segment_rows(&client, first).await, 5);
    // Publishers move on once the segment is older than the interval.
    cluster
        .wait_for("publishers to move on", WAIT, || async {
            client.execute("SELECT outbox_prune()", &[]).await.unwrap();
            (current_segment(&client).await != first).then_some(())
        })
        .await;
    for _ in 0..5 {
        publish(&client, "chat", "u1", "{}", None).await;
    }
    let first_xid: String = client
        .query_one(
            &format!("SELECT max(xid)::text FROM event_outbox_segment_{first}"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let second = current_segment(&client).await;
    assert_eq!(segment_rows(&client, second).await, 5);

    // A transaction that read the outbox holds every segment's lock: pruning neither waits
    // for it nor queues readers behind itself, and leaves the segment for the next call.
    let mut reader_client = cluster.connect("postgres").await;
    let reader = reader_client.transaction().await.unwrap();
    reader
        .query_one("SELECT count(*) FROM event_outbox", &[])
        .await
        .unwrap();
    cluster
        .wait_for("the first segment to expire", WAIT, || async {
            let expired: bool = client
                .query_one(
                    &format!(
                        "SELECT max(created_at) < clock_timestamp() - interval '1s' \
                         FROM event_outbox_segment_{first}"
                    ),
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            expired.then_some(())
        })
        .await;
    let removed: i64 = client
        .query_one("SELECT outbox_prune()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        removed, 0,
        "nothing removed while the reader holds the segment"
    );
    assert_eq!(segment_rows(&client, first).await, 5);
    // Readers meanwhile are not held up: this one is new, and reads at once.
    let other_reader = cluster.connect("postgres").await;
    assert_eq!(
        other_reader
            .query_one("SELECT count(*) FROM event_outbox", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        10
    );
    reader.commit().await.unwrap();

    let removed: i64 = client
        .query_one("SELECT outbox_prune()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(removed >= 5, "{removed}");
    assert_eq!(segment_rows(&client, first).await, 0);
    let (size, pruned, covers): (i64, i64, bool) = {
        let row = client
            .query_one(
                &format!(
                    "SELECT pg_relation_size('event_outbox_segment_{first}'), rows_pruned, \
                            pruned_through_xid >= $1::text::xid8 \
                     FROM outbox_prune_state"
                ),
                &[&first_xid],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    assert_eq!(size, 0, "emptied whole (TRUNCATE), not row by row");
    assert!(pruned >= 5);
    assert!(
        covers,
        "the relays learn that the segment's events were pruned"
    );
}
