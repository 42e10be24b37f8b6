//! `ALTER EXTENSION pg_outbox UPDATE` from 0.1.0, on a database that holds events: the events
//! stay, publishing works before and after (the new library over the old objects), the notifier
//! waits for the update, and the result is the same as a fresh install.

use std::time::Duration;

use pg_outbox_tests::Cluster;
use tokio_postgres::Client;

/// Every object of the extension as the catalog describes it: columns, constraints, indexes,
/// functions (with their rights and settings) and privileges, sorted. Segments are left out:
/// they come and go with time (a fresh install creates its first ones).
const FINGERPRINT: &str = "
    SELECT kind || ' ' || description FROM (
        SELECT 'column' AS kind, format('%s.%s %s %s default %s', c.relname, a.attname,
               format_type(a.atttypid, a.atttypmod), CASE WHEN a.attnotnull THEN 'not null' ELSE 'null' END,
               pg_get_expr(d.adbin, d.adrelid)) AS description
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r' AND a.attnum > 0 AND NOT a.attisdropped
      UNION ALL
        SELECT 'constraint', conrelid::regclass || ' ' || pg_get_constraintdef(oid)
        FROM pg_constraint WHERE connamespace = 'public'::regnamespace
      UNION ALL
        SELECT 'index', indexdef FROM pg_indexes WHERE schemaname = 'public'
      UNION ALL
        SELECT 'function', format('%s(%s) returns %s secdef=%s config=%s acl=%s', proname,
               pg_get_function_arguments(oid), pg_get_function_result(oid), prosecdef, proconfig, proacl)
        FROM pg_proc WHERE pronamespace = 'public'::regnamespace
      UNION ALL
        SELECT 'table', format('%s acl=%s', relname, relacl)
        FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind = 'r'
      UNION ALL
        SELECT 'trigger', pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal
      UNION ALL
        SELECT 'dumped', unnest(extconfig)::regclass::text FROM pg_extension WHERE extname = 'pg_outbox'
    ) objects
    WHERE description !~ 'event_outbox_[0-9]{8}_[0-9]{6}'
    ORDER BY 1";

async fn fingerprint(client: &Client) -> Vec<String> {
    client
        .query(FINGERPRINT, &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

async fn count(client: &Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM event_outbox", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn updating_from_0_1_0_keeps_events_and_matches_a_fresh_install() {
    let cluster = Cluster::builder().create_extension(false).start();
    cluster.psql("postgres", "CREATE EXTENSION pg_outbox VERSION '0.1.0'");
    cluster.psql("postgres", "CREATE DATABASE fresh");
    cluster.psql("fresh", "CREATE EXTENSION pg_outbox");
    let old = cluster.connect("postgres").await;
    let fresh = cluster.connect("fresh").await;
    let version: String = fresh
        .query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'pg_outbox'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // The workspace's version, which the build writes into the control file.
    assert_eq!(version, env!("CARGO_PKG_VERSION"));

    // The new library publishes over the 0.1.0 objects in transaction mode.
    let mut listener = cluster.listener("postgres").await;
    for n in 0..50 {
        old.execute(
            "SELECT outbox_publish('chat', 'u1', jsonb_build_object('n', $1::int))",
            &[&n],
        )
        .await
        .unwrap();
    }
    assert_eq!(listener.next().await["channel"], "chat");
    // The notifier waits for the update instead of failing.
    cluster
        .wait_for(
            "the notifier to wait for the update",
            Duration::from_secs(30),
            || async {
                let state: Option<String> = old
                .query_opt(
                    "SELECT query FROM pg_stat_activity WHERE backend_type = 'pg_outbox notifier'",
                    &[],
                )
                .await
                .unwrap()
                .map(|row| row.get(0));
                (state.as_deref() == Some("waiting for ALTER EXTENSION pg_outbox UPDATE"))
                    .then_some(())
            },
        )
        .await;
    assert_ne!(fingerprint(&old).await, fingerprint(&fresh).await);

    // Worker mode asked for before the update: publishing goes on in transaction mode, since
    // the 0.1.0 table cannot mark an event as left to the notifier.
    old.batch_execute("SET pg_outbox.notify_mode = 'worker'")
        .await
        .unwrap();
    let id: String = old
        .query_one("SELECT outbox_publish('chat', 'u2', '{}')::text", &[])
        .await
        .expect("publishing in worker mode before the update")
        .get(0);
    next_with_id(&mut listener, &id).await;

    old.batch_execute("ALTER EXTENSION pg_outbox UPDATE")
        .await
        .unwrap();
    assert_eq!(fingerprint(&old).await, fingerprint(&fresh).await);
    assert_eq!(count(&old).await, 51);

    // Sealed, the default, once the update has made a key: the next notification is sealed.
    let id: String = old
        .query_one("SELECT outbox_publish('chat', 'u2', '{}')::text", &[])
        .await
        .unwrap()
        .get(0);
    loop {
        let raw = listener.next_raw().await;
        if pg_outbox_wire::seal::is_sealed(&raw) {
            let opened = pg_outbox_wire::decode(&open_with_database_key(&old, &raw).await).unwrap();
            assert_eq!(opened[0].id.to_string(), id);
            break;
        }
    }

    // Worker mode works once updated: the notifier picks the database up, and publishers leave
    // their notifications to it.
    cluster
        .wait_for(
            "the notifier to serve the updated database",
            Duration::from_secs(30),
            || async {
                let id: uuid::Uuid = old
                    .query_one("SELECT outbox_publish('chat', 'u3', '{}')", &[])
                    .await
                    .unwrap()
                    .get(0);
                let deferred: bool = old
                    .query_one(
                        "SELECT notify_deferred FROM event_outbox WHERE id = $1",
                        &[&id],
                    )
                    .await
                    .unwrap()
                    .get(0);
                deferred.then_some(())
            },
        )
        .await;
    let id: String = old
        .query_one("SELECT outbox_publish('chat', 'u4', '{}')::text", &[])
        .await
        .unwrap()
        .get(0);
    next_with_id(&mut listener, &id).await;
}

/// Reads notifications until the one of event `id`.
async fn next_with_id(listener: &mut pg_outbox_tests::Listener, id: &str) {
    loop {
        if listener.next().await["id"] == id {
            return;
        }
    }
}

/// `raw` opened with the current key of `outbox_seal_keys`.
async fn open_with_database_key(client: &Client, raw: &str) -> String {
    let key: Vec<u8> = client
        .query_one(
            "SELECT key FROM outbox_seal_keys WHERE expires_at IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let key = pg_outbox_wire::SealKey::from_bytes(key.try_into().unwrap());
    pg_outbox_wire::seal::open(&key, raw).unwrap()
}

#[tokio::test]
async fn updating_from_0_3_0_keeps_the_key_of_pg_outbox_seal_key() {
    const KEY: &str = "q2Ew0nGMd7Kf2yQn0c1Xb3Qm1T7mH8u0yJp4RzS9vWk=";
    let cluster = Cluster::builder()
        .create_extension(false)
        .setting("pg_outbox.seal_key", &format!("'{KEY}'"))
        .start();
    cluster.psql("postgres", "CREATE EXTENSION pg_outbox VERSION '0.3.0'");
    cluster.psql("postgres", "ALTER EXTENSION pg_outbox UPDATE");
    let keys = cluster.psql(
        "postgres",
        "SELECT string_agg(encode(key, 'base64'), ',') FROM outbox_seal_keys WHERE expires_at IS NULL",
    );
    assert_eq!(keys, KEY);
    // A relay of 0.4.0 held that key: what publishers seal now opens with it.
    let client = cluster.connect("postgres").await;
    let mut listener = cluster.listener("postgres").await;
    client
        .execute("SELECT outbox_publish('chat', 'u1', '{}')", &[])
        .await
        .unwrap();
    let raw = listener.next_raw().await;
    let key = pg_outbox_wire::SealKey::from_base64(KEY).unwrap();
    assert!(pg_outbox_wire::seal::open(&key, &raw).is_ok(), "{raw}");
}

#[tokio::test]
async fn updating_with_a_malformed_pg_outbox_seal_key_makes_a_new_key() {
    let cluster = Cluster::builder()
        .create_extension(false)
        .setting("pg_outbox.seal_key", "'not a key'")
        .start();
    cluster.psql("postgres", "CREATE EXTENSION pg_outbox VERSION '0.3.0'");
    cluster.psql("postgres", "ALTER EXTENSION pg_outbox UPDATE");
    let lengths = cluster.psql(
        "postgres",
        "SELECT string_agg(length(key)::text, ',') FROM outbox_seal_keys",
    );
    assert_eq!(lengths, "32");
}

/// The next event of `subscription`, which must be one.
async fn next_event_id(subscription: &mut pg_outbox_client::Subscription) -> uuid::Uuid {
    let item = tokio::time::timeout(pg_outbox_tests::WAIT, subscription.recv())
        .await
        .expect("an event in time");
    match item {
        Some(pg_outbox_client::Delivery::Event(event)) => event.id(),
        other => panic!("expected an event, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_issued_before_the_update_to_0_6_0_resume_across_the_next_restart() {
    use pg_outbox_client::Topic;
    use pg_outbox_tests::relay::{publish, relay};

    let cluster = Cluster::builder().create_extension(false).start();
    cluster.psql("postgres", "CREATE EXTENSION pg_outbox VERSION '0.5.0'");
    // A relay of this client over the 0.5.0 objects, which record no runs.
    let old_relay = relay(&cluster, "relay_before_update").build().unwrap();
    let mut browser = old_relay.subscribe_to(Topic::all().user("u1"));
    old_relay.start().await.unwrap();
    let publisher = cluster.connect("postgres").await;
    let seen = publish(&publisher, "chat", "u1", "{}", None).await;
    assert_eq!(next_event_id(&mut browser).await, seen);
    let position = browser.position().unwrap().to_string();
    old_relay.shutdown().await;

    cluster.psql("postgres", "ALTER EXTENSION pg_outbox UPDATE");
    let floors: Vec<Option<String>> = publisher
        .query("SELECT floor_xid::text FROM outbox_server_runs()", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        floors,
        [None],
        "the run of the update, which published before it"
    );

    cluster.restart();
    let publisher = cluster.connect("postgres").await;
    let missed = publish(&publisher, "chat", "u1", "{}", None).await;
    // A relay that never saw the run before the restart resumes the position exactly.
    let fresh = relay(&cluster, "relay_after_update").build().unwrap();
    fresh.start().await.unwrap();
    let mut resumed = fresh.subscribe_from(Topic::all().user("u1"), &position);
    assert_eq!(next_event_id(&mut resumed).await, missed);
    fresh.shutdown().await;
}

#[tokio::test]
async fn updating_the_sql_edition_from_0_5_0_matches_a_fresh_install() {
    let cluster = Cluster::builder()
        .create_extension(false)
        .preload(false)
        .start();
    cluster.psql("postgres", "CREATE EXTENSION pg_outbox_sql VERSION '0.5.0'");
    cluster.psql("postgres", "CREATE DATABASE fresh");
    cluster.psql("fresh", "CREATE EXTENSION pg_outbox_sql");
    let old = cluster.connect("postgres").await;
    let fresh = cluster.connect("fresh").await;
    old.execute("SELECT outbox_publish('chat', 'u1', '{}')", &[])
        .await
        .unwrap();
    assert_ne!(fingerprint(&old).await, fingerprint(&fresh).await);
    cluster.psql("postgres", "ALTER EXTENSION pg_outbox_sql UPDATE");
    assert_eq!(fingerprint(&old).await, fingerprint(&fresh).await);
    assert_eq!(count(&old).await, 1);
    // A new session's first event finds its run recorded by the update.
    let session = cluster.connect("postgres").await;
    session
        .execute("SELECT outbox_publish('chat', 'u1', '{}')", &[])
        .await
        .unwrap();
    let runs: i64 = session
        .query_one("SELECT count(*) FROM outbox_runs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(runs, 1);
}
