//! Segments: events go into the child table of their time, which the pruner drops whole once
//! its last event has expired, never while a transaction that wrote in it is open; publishing
//! into one needs only the grants on `event_outbox`, whose own security still applies, and
//! stores rows that are checked and indexed as an INSERT's.

use pg_outbox_tests::pruner::{rows_pruned, wait_for_passes};
use pg_outbox_tests::{Cluster, WAIT};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, GenericClient};

/// A cluster with segments of `interval`, a pruner pass every second and the retention given.
fn cluster(interval: &str, retention: &str) -> Cluster {
    Cluster::builder()
        .setting("pg_outbox.segment_interval", &format!("'{interval}'"))
        .setting("pg_outbox.retention", &format!("'{retention}'"))
        .setting("pg_outbox.prune_interval", "'1s'")
        .start()
}

/// Publishes one event (in a transaction of its own unless `client` is a transaction); returns
/// the table it landed in and its xid.
async fn publish(client: &impl GenericClient) -> (String, String) {
    let id: uuid::Uuid = client
        .query_one("SELECT outbox_publish('chat', 'u1', '{\"n\": 1}')", &[])
        .await
        .unwrap()
        .get(0);
    let row = client
        .query_one(
            "SELECT tableoid::regclass::text, xid::text FROM event_outbox WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// Publishes one event on `channel` as `client`'s role.
async fn publish_on(client: &Client, channel: &str) -> Result<u64, tokio_postgres::Error> {
    client
        .execute("SELECT outbox_publish($1, 'u1', '{}')", &[&channel])
        .await
}

/// Whether the table `name` exists, and whether `outbox_segments` lists it.
async fn segment_exists(client: &Client, name: &str) -> (bool, bool) {
    let row = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL, \
                    EXISTS (SELECT FROM outbox_segments WHERE name = $1)",
            &[&name],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// Whether `pruned_through_xid` covers `xid`.
async fn pruned_through(client: &Client, xid: &str) -> bool {
    client
        .query_one(
            "SELECT pruned_through_xid >= $1::text::xid8 FROM outbox_prune_state",
            &[&xid],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn events_go_into_the_segment_of_their_time_which_is_dropped_whole_once_expired() {
    // Segments are at least a 24th of the retention: 10 s.
    let cluster = cluster("10s", "4min");
    let client = cluster.connect("postgres").await;
    let mut published = Vec::new();
    for _ in 0..20 {
        published.push(publish(&client).await);
    }
    let in_range: i64 = client
        .query_one(
            "SELECT count(*) FROM event_outbox e JOIN outbox_segments s \
               ON s.name = e.tableoid::regclass::text \
              AND s.starts_at <= e.created_at AND e.created_at < s.ends_at",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(in_range, 20, "every event is in the segment of its time");
    let outside: i64 = client
        .query_one("SELECT count(*) FROM ONLY event_outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(outside, 0);

    cluster.set_setting("pg_outbox.retention", "1s");
    cluster
        .wait_for("the expired segments to be dropped", WAIT, || async {
            let remaining: i64 = client
                .query_one("SELECT count(*) FROM event_outbox", &[])
                .await
                .unwrap()
                .get(0);
            (remaining == 0).then_some(())
        })
        .await;
    for (segment, _) in &published {
        assert_eq!(segment_exists(&client, segment).await, (false, false));
    }
    assert!(rows_pruned(&client).await >= 20);
    let last_xid = &published.last().unwrap().1;
    assert!(pruned_through(&client, last_xid).await);
    let ahead: i64 = client
        .query_one(
            "SELECT count(*) FROM outbox_segments WHERE ends_at > clock_timestamp()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ahead >= 1, "the pruner keeps segments ahead of the clock");
}

#[tokio::test]
async fn a_segment_is_not_dropped_while_a_transaction_that_wrote_in_it_is_open() {
    let cluster = cluster("3s", "1s");
    let mut writer = cluster.connect("postgres").await;
    let others = cluster.connect("postgres").await;
    let open = writer.transaction().await.unwrap();
    let (segment, xid) = publish(&open).await;
    assert_ne!(segment, "event_outbox");

    // Several passes that began once the segment had expired (it ends within 3 s, and expires
    // a retention later) have tried to drop it.
    let pruned_before = rows_pruned(&others).await;
    let expired_at: String = others
        .query_one(
            "SELECT (ends_at + current_setting('pg_outbox.retention')::interval)::text \
             FROM outbox_segments WHERE name = $1",
            &[&segment],
        )
        .await
        .unwrap()
        .get(0);
    wait_for_passes(&cluster, &others, "idle", &expired_at, 3).await;
    assert_eq!(segment_exists(&others, &segment).await, (true, true));
    // Meanwhile others publish, into later segments, without waiting.
    others
        .batch_execute("SET statement_timeout = '5s'")
        .await
        .unwrap();
    let (later, _) = publish(&others).await;
    assert_ne!(later, segment);

    open.commit().await.unwrap();
    cluster
        .wait_for("the segment to be dropped", WAIT, || async {
            (segment_exists(&others, &segment).await == (false, false)).then_some(())
        })
        .await;
    assert!(rows_pruned(&others).await > pruned_before);
    assert!(
        pruned_through(&others, &xid).await,
        "a relay that never read the event learns that it was pruned"
    );
}

#[tokio::test]
async fn publishing_into_a_segment_needs_only_insert_on_event_outbox_whose_security_applies() {
    let cluster = cluster("10min", "1h");
    cluster.psql(
        "postgres",
        "CREATE ROLE publisher LOGIN; CREATE ROLE stranger LOGIN; \
         GRANT EXECUTE ON FUNCTION outbox_publish(text, text, jsonb, text) TO publisher, stranger; \
         GRANT INSERT ON event_outbox TO publisher",
    );
    let admin = cluster.connect("postgres").await;
    let publisher = cluster.connect_as("postgres", "publisher").await;
    let stranger = cluster.connect_as("postgres", "stranger").await;
    let table_of = |channel: &'static str| {
        let admin = &admin;
        async move {
            admin
                .query_one(
                    "SELECT tableoid::regclass::text FROM event_outbox WHERE channel = $1",
                    &[&channel],
                )
                .await
                .unwrap()
                .get::<_, String>(0)
        }
    };

    publish_on(&publisher, "granted").await.unwrap();
    assert_ne!(table_of("granted").await, "event_outbox");

    let refused = publish_on(&stranger, "refused").await.unwrap_err();
    assert_eq!(refused.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));
    assert!(
        refused
            .as_db_error()
            .unwrap()
            .message()
            .contains("event_outbox"),
        "{refused}"
    );

    // Row-level security on event_outbox: rows go through it, and its policy holds.
    cluster.psql(
        "postgres",
        "ALTER TABLE event_outbox ENABLE ROW LEVEL SECURITY; \
         CREATE POLICY only_allowed ON event_outbox FOR INSERT TO publisher \
           WITH CHECK (channel = 'allowed')",
    );
    publish_on(&publisher, "allowed").await.unwrap();
    assert_eq!(table_of("allowed").await, "event_outbox");
    let denied = publish_on(&publisher, "denied").await.unwrap_err();
    assert_eq!(
        denied.code(),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "{denied}"
    );
    cluster.psql(
        "postgres",
        "ALTER TABLE event_outbox DISABLE ROW LEVEL SECURITY",
    );

    // A trigger on event_outbox: rows go through it, and it fires.
    cluster.psql(
        "postgres",
        "CREATE FUNCTION mark() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN NEW.payload := NEW.payload || '{\"marked\": true}'; RETURN NEW; END $$; \
         CREATE TRIGGER mark BEFORE INSERT ON event_outbox FOR EACH ROW EXECUTE FUNCTION mark()",
    );
    publish_on(&publisher, "triggered").await.unwrap();
    assert_eq!(table_of("triggered").await, "event_outbox");
    let marked: bool = admin
        .query_one(
            "SELECT (payload->>'marked')::boolean FROM event_outbox WHERE channel = 'triggered'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(marked);
}

#[tokio::test]
async fn a_publisher_cannot_borrow_the_owners_rights_through_its_search_path() {
    let cluster = cluster("10min", "1h");
    cluster.psql(
        "postgres",
        "CREATE ROLE attacker LOGIN; CREATE SCHEMA evil AUTHORIZATION attacker; \
         GRANT EXECUTE ON FUNCTION outbox_publish(text, text, jsonb, text) TO attacker; \
         GRANT INSERT ON event_outbox TO attacker",
    );
    let attacker = cluster.connect_as("postgres", "attacker").await;
    // Operators and functions the segment lookup could resolve by name, each trying to make
    // its caller a superuser when it runs with the owner's rights.
    attacker
        .batch_execute(
            "CREATE FUNCTION evil.escalate() RETURNS void LANGUAGE plpgsql AS \
               $$ BEGIN EXECUTE 'ALTER ROLE attacker SUPERUSER'; EXCEPTION WHEN OTHERS THEN END $$; \
             CREATE FUNCTION evil.gt(timestamptz, timestamptz) RETURNS boolean LANGUAGE plpgsql AS \
               $$ BEGIN PERFORM evil.escalate(); RETURN $1 OPERATOR(pg_catalog.>) $2; END $$; \
             CREATE OPERATOR evil.> (LEFTARG = timestamptz, RIGHTARG = timestamptz, FUNCTION = evil.gt); \
             CREATE FUNCTION evil.gt_int(int8, int8) RETURNS boolean LANGUAGE plpgsql AS \
               $$ BEGIN PERFORM evil.escalate(); RETURN $1 OPERATOR(pg_catalog.>) $2; END $$; \
             CREATE OPERATOR evil.> (LEFTARG = int8, RIGHTARG = int8, FUNCTION = evil.gt_int); \
             SET search_path = evil, pg_catalog, public",
        )
        .await
        .unwrap();
    attacker
        .execute("SELECT public.outbox_publish('chat', 'u1', '{}')", &[])
        .await
        .unwrap();
    let superuser: bool = attacker
        .query_one(
            "SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = 'attacker'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!superuser, "the publisher became a superuser");
    let in_segment: i64 = cluster
        .connect("postgres")
        .await
        .query_one(
            "SELECT count(*) FROM event_outbox WHERE tableoid <> 'event_outbox'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(in_segment, 1, "the event still went into its segment");
}

#[tokio::test]
async fn a_row_stored_straight_into_a_segment_is_checked_and_indexed_like_an_insert() {
    let cluster = cluster("1h", "1d");
    let mut client = cluster.connect("postgres").await;
    // Constraints of event_outbox reach its segments, and hold for what publish stores there.
    client
        .batch_execute(
            "CREATE EXTENSION amcheck; \
             ALTER TABLE event_outbox ADD CONSTRAINT no_secrets CHECK (channel <> 'secrets')",
        )
        .await
        .unwrap();
    let refused = publish_on(&client, "secrets").await.unwrap_err();
    assert_eq!(
        refused.code(),
        Some(&SqlState::CHECK_VIOLATION),
        "{refused}"
    );
    let detail = refused.as_db_error().and_then(|e| e.detail()).unwrap_or("");
    assert!(
        detail.contains("secrets"),
        "the failing row is shown: {detail}"
    );

    // Several events in one statement, then read back in the same transaction through the
    // indexes alone; amcheck then finds every row of the segment in each of its indexes.
    let transaction = client.transaction().await.unwrap();
    transaction
        .batch_execute("SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off")
        .await
        .unwrap();
    let ids: Vec<uuid::Uuid> = transaction
        .query(
            "SELECT outbox_publish('chat', 'u' || n, jsonb_build_object('n', n)) \
             FROM generate_series(1, 50) n",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let (tables, by_id, by_xid): (Vec<String>, i64, i64) = {
        let row = transaction
            .query_one(
                "SELECT array_agg(DISTINCT tableoid::regclass::text), \
                        count(*) FILTER (WHERE id = ANY ($1)), \
                        (SELECT count(*) FROM event_outbox WHERE xid = pg_current_xact_id()) \
                 FROM event_outbox WHERE id = ANY ($1)",
                &[&ids],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    transaction.commit().await.unwrap();
    assert_eq!((by_id, by_xid), (50, 50));
    assert!(
        !tables.iter().any(|table| table == "event_outbox"),
        "the events went into their segment: {tables:?}"
    );
    let checked: i64 = client
        .query_one(
            "SELECT count(bt_index_check(indexrelid, true)) FROM pg_index \
             WHERE indrelid::regclass::text = ANY ($1)",
            &[&tables],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        checked,
        4 * tables.len() as i64,
        "the id, created_at, xid and (user_id, xid) indexes"
    );

    // A column added to event_outbox reaches the segments, but only an INSERT fills its
    // default: events go to event_outbox itself until it is dropped again.
    client
        .batch_execute("ALTER TABLE event_outbox ADD COLUMN tenant text NOT NULL DEFAULT 'acme'")
        .await
        .unwrap();
    let (table, _) = publish(&client).await;
    assert_eq!(table, "event_outbox");
    let tenants: Vec<String> = client
        .query("SELECT DISTINCT tenant FROM event_outbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(tenants, ["acme"]);
    client
        .batch_execute("ALTER TABLE event_outbox DROP COLUMN tenant")
        .await
        .unwrap();
    let (table, _) = publish(&client).await;
    assert_ne!(table, "event_outbox", "a dropped column is no obstacle");

    // A segment with a trigger of its own is not written to without an INSERT: its events go
    // into event_outbox itself, as for a column of its own.
    client
        .batch_execute(&format!(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS \
               $$ BEGIN RAISE EXCEPTION 'not here'; END $$; \
             CREATE TRIGGER refuse BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION refuse()"
        ))
        .await
        .unwrap();
    let (table, _) = publish(&client).await;
    assert_eq!(table, "event_outbox");
}
