//! `pg_outbox.notify_mode = 'worker'`: publishers only INSERT, and the notifier worker sends
//! each committed event's notification right after the commit, never a rolled-back one, and
//! resumes where it was after a restart.

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use pg_outbox_tests::Cluster;
use serde_json::json;
use tokio_postgres::GenericClient;

const PUBLISH: &str = "SELECT outbox_publish($1, $2, $3::jsonb)::text";
const WAIT: Duration = Duration::from_secs(30);

/// Worker mode with reference notifications, whose documents these tests read as they come
/// (`sealed.rs` covers the notifier's sealed ones).
fn worker_mode_cluster() -> Cluster {
    Cluster::builder()
        .setting("pg_outbox.notify_mode", "'worker'")
        .setting("pg_outbox.notify_payload", "'reference'")
        .start()
}

/// A cluster in worker mode without a handoff buffer: the notifier reads every batch from
/// `event_outbox`. References, as in [`worker_mode_cluster`].
fn table_only_cluster() -> Cluster {
    Cluster::builder()
        .setting("pg_outbox.notify_mode", "'worker'")
        .setting("pg_outbox.notify_payload", "'reference'")
        .setting("pg_outbox.handoff_buffer", "0")
        .start()
}

async fn publish(client: &impl GenericClient, n: i64) -> String {
    client
        .query_one(PUBLISH, &[&"chat", &"u1", &json!({ "n": n })])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn the_worker_notifies_after_commit_and_never_for_rollback() {
    let cluster = worker_mode_cluster();
    let mut listener = cluster.listener("postgres").await;
    let mut publisher = cluster.connect("postgres").await;

    // The publishing transaction itself sends nothing: no pending notification at commit.
    let tx = publisher.transaction().await.unwrap();
    let committed = [publish(&tx, 1).await, publish(&tx, 2).await];
    let deferred: bool = tx
        .query_one(
            "SELECT bool_and(notify_deferred) FROM event_outbox WHERE xid = pg_current_xact_id()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(deferred);
    tx.commit().await.unwrap();

    let tx = publisher.transaction().await.unwrap();
    publish(&tx, 3).await;
    tx.rollback().await.unwrap();
    let last = publish(&publisher, 4).await;

    for id in committed.iter().chain([&last]) {
        let notification = listener.next().await;
        assert_eq!(notification["id"], id.as_str(), "{notification}");
        assert_eq!(notification["channel"], "chat");
        assert!(notification.get("payload").is_none());
    }
}

#[tokio::test]
async fn inline_payloads_come_from_the_worker_too() {
    let cluster = Cluster::builder()
        .setting("pg_outbox.notify_mode", "'worker'")
        .setting("pg_outbox.notify_payload", "'inline'")
        .start();
    let mut listener = cluster.listener("postgres").await;
    let publisher = cluster.connect("postgres").await;
    let id = publish(&publisher, 7).await;
    let notification = listener.next().await;
    assert_eq!(notification["id"], id.as_str());
    assert_eq!(notification["payload"], json!({ "n": 7 }));

    // And through the handoff, which carries the payload itself.
    until_the_handoff_is_used(&cluster, &publisher, &mut listener).await;
    let id = publish(&publisher, 8).await;
    let notification = listener.next().await;
    assert_eq!(notification["id"], id.as_str());
    assert_eq!(notification["payload"], json!({ "n": 8 }));
}

#[tokio::test]
async fn with_a_trigger_on_the_outbox_the_notifier_sends_what_was_stored() {
    let (cluster, mut listener, publisher) =
        with_the_handoff_in_use(&[("pg_outbox.notify_payload", "'inline'")]).await;
    let before = notifier_state(&cluster, &publisher).await;
    publisher
        .batch_execute(
            r#"CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN
                   IF NEW.payload ? 'skip' THEN RETURN NULL; END IF;
                   NEW.payload := NEW.payload || '{"stamped": true}';
                   RETURN NEW;
               END $$;
               CREATE TRIGGER stamp BEFORE INSERT ON event_outbox
                   FOR EACH ROW EXECUTE FUNCTION stamp()"#,
        )
        .await
        .unwrap();
    let stamped = publish(&publisher, 1).await;
    publisher
        .query_one(PUBLISH, &[&"chat", &"u1", &json!({ "skip": true })])
        .await
        .unwrap();
    let last = publish(&publisher, 2).await;

    for (id, n) in [(&stamped, 1), (&last, 2)] {
        let notification = listener.next().await;
        assert_eq!(notification["id"], id.as_str());
        assert_eq!(notification["payload"], json!({ "n": n, "stamped": true }));
    }
    assert!(notifier_state(&cluster, &publisher).await.table_batches > before.table_batches);
}

#[tokio::test]
async fn a_batch_goes_out_in_as_few_notifications_as_fit() {
    let cluster = worker_mode_cluster();
    let mut listener = cluster.listener("postgres").await;
    let mut publisher = cluster.connect("postgres").await;
    let tx = publisher.transaction().await.unwrap();
    let mut expected = Vec::new();
    for n in 0..100 {
        expected.push(publish(&tx, n).await);
    }
    tx.commit().await.unwrap();

    // 100 references of some 120 bytes each: two documents under the 8000-byte limit.
    let mut ids = Vec::new();
    let mut documents = 0;
    while ids.len() < expected.len() {
        let raw = listener.next_raw().await;
        assert!(raw.len() < 8000, "{} bytes", raw.len());
        let doc: serde_json::Value = serde_json::from_str(&raw).unwrap();
        assert_eq!(doc["v"], 2, "{raw:.200}");
        for event in doc["events"].as_array().unwrap() {
            ids.push(event["id"].as_str().unwrap().to_owned());
        }
        documents += 1;
    }
    assert_eq!(ids, expected);
    assert_eq!(documents, 2, "notifications for 100 events");
}

#[tokio::test]
async fn concurrent_publishers_are_each_notified_exactly_once() {
    let cluster = worker_mode_cluster();
    let mut listener = cluster.listener("postgres").await;
    let mut tasks = Vec::new();
    for publisher in 0..4_i64 {
        let client = cluster.connect("postgres").await;
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in 0..200 {
                ids.push(publish(&client, publisher * 1000 + n).await);
            }
            ids
        }));
    }
    let mut expected = HashSet::new();
    for task in tasks {
        expected.extend(task.await.unwrap());
    }
    let mut seen = HashSet::new();
    while seen.len() < expected.len() {
        let notification = listener.next().await;
        let id = notification["id"].as_str().unwrap().to_owned();
        assert!(seen.insert(id.clone()), "notified twice: {id}");
    }
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn a_restarted_worker_notifies_what_committed_while_it_was_down() {
    let cluster = worker_mode_cluster();
    let mut listener = cluster.listener("postgres").await;
    let admin = cluster.connect("postgres").await;
    let publisher = cluster.connect("postgres").await;
    let ids = while_the_notifier_is_down(&cluster, &admin, || async {
        let mut ids = Vec::new();
        for n in 0..20 {
            ids.push(publish(&publisher, n).await);
        }
        ids
    })
    .await;
    for id in &ids {
        assert_eq!(listener.next().await["id"], id.as_str());
    }
}

#[tokio::test]
async fn a_backlog_goes_out_in_bounded_batches_each_row_once_in_commit_order() {
    let cluster = worker_mode_cluster();
    let mut listener = cluster.listener("postgres").await;
    let admin = cluster.connect("postgres").await;
    let expected = while_the_notifier_is_down(&cluster, &admin, || async {
        // 25,000 rows in transactions of 1,000, then one transaction of 12,000: more than the
        // worker's 10,000 rows per batch, both ways.
        for size in std::iter::repeat_n(1_000, 25).chain([12_000]) {
            admin
                .execute(
                    "SELECT outbox_publish('chat', 'u1', jsonb_build_object('n', n)) \
                     FROM generate_series(1, $1::int) n",
                    &[&size],
                )
                .await
                .unwrap();
        }
        admin
            .query("SELECT id::text FROM event_outbox ORDER BY xid, id", &[])
            .await
            .unwrap()
            .iter()
            .map(|row| row.get::<_, String>(0))
            .collect::<Vec<_>>()
    })
    .await;

    for (n, id) in expected.iter().enumerate() {
        let notification = listener.next().await;
        assert_eq!(notification["id"], id.as_str(), "notification {n}");
    }
    // 37,000 rows at most 10,000 to a batch: the new worker read them in four batches or more.
    assert!(notifier_state(&cluster, &admin).await.table_batches >= 4);
}

#[tokio::test]
async fn a_stopped_worker_records_its_position_so_its_successor_sends_nothing_twice() {
    let cluster = worker_mode_cluster();
    let mut listener = cluster.listener("postgres").await;
    let admin = cluster.connect("postgres").await;
    let publisher = cluster.connect("postgres").await;
    // Ten events sent within one of the worker's record intervals, so that only the record
    // made as it stops tells its successor that they are sent: checked on the recorded
    // position, and tried again on a machine too slow for that.
    loop {
        for n in 0..10 {
            let id = publish(&publisher, n).await;
            assert_eq!(listener.next().await["id"], id.as_str());
        }
        let recorded: bool = admin
            .query_one(
                "SELECT pg_visible_in_snapshot((SELECT max(xid) FROM event_outbox), snapshot) \
                 FROM outbox_notifier_state",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if !recorded {
            break;
        }
    }
    let pid = stop_notifier(&admin).await;
    wait_for_a_notifier_other_than(&cluster, &admin, pid).await;
    let after = publish(&publisher, 10).await;
    assert_eq!(listener.next().await["id"], after.as_str());
}

#[tokio::test]
async fn events_of_a_rolled_back_savepoint_are_never_notified() {
    let (_cluster, mut listener, mut publisher) = with_the_handoff_in_use(&[]).await;
    let tx = publisher.transaction().await.unwrap();
    let kept_before = publish(&tx, 1).await;
    tx.batch_execute("SAVEPOINT a").await.unwrap();
    publish(&tx, 2).await;
    tx.batch_execute("SAVEPOINT b").await.unwrap();
    publish(&tx, 3).await;
    tx.batch_execute("ROLLBACK TO SAVEPOINT a").await.unwrap();
    let kept_after = publish(&tx, 4).await;
    tx.batch_execute("SAVEPOINT c").await.unwrap();
    let released = publish(&tx, 5).await;
    tx.batch_execute("RELEASE SAVEPOINT c").await.unwrap();
    tx.commit().await.unwrap();
    let next = publish(&publisher, 6).await;

    for id in [&kept_before, &kept_after, &released, &next] {
        assert_eq!(listener.next().await["id"], id.as_str());
    }
}

#[tokio::test]
async fn a_prepared_transaction_is_notified_once_committed_never_once_rolled_back() {
    let (cluster, mut listener, publisher) =
        with_the_handoff_in_use(&[("max_prepared_transactions", "2")]).await;
    let before = notifier_state(&cluster, &publisher).await;
    let prepare = |n: i64, name: &str| {
        format!("BEGIN; SELECT outbox_publish('chat', 'u1', '{{\"n\": {n}}}'); PREPARE TRANSACTION '{name}'")
    };
    publisher.batch_execute(&prepare(1, "kept")).await.unwrap();
    publisher
        .batch_execute(&prepare(2, "dropped"))
        .await
        .unwrap();
    for finish in ["ROLLBACK PREPARED 'dropped'", "COMMIT PREPARED 'kept'"] {
        publisher.batch_execute(finish).await.unwrap();
    }
    let after = publish(&publisher, 3).await;

    let kept: String = publisher
        .query_one(
            "SELECT id::text FROM event_outbox WHERE payload = '{\"n\": 1}'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(listener.next().await["id"], kept.as_str());
    assert_eq!(listener.next().await["id"], after.as_str());
    assert!(notifier_state(&cluster, &publisher).await.table_batches > before.table_batches);
}

#[tokio::test]
async fn a_transaction_too_large_to_hand_over_is_read_from_the_table() {
    // Payloads are handed over only when they may go inline.
    let (cluster, mut listener, publisher) =
        with_the_handoff_in_use(&[("pg_outbox.notify_payload", "'inline'")]).await;
    let before = notifier_state(&cluster, &publisher).await;
    // 500 payloads of 10 kB each, all small enough to go inline: 5 MB, more than the 4 MB the
    // handoff buffer holds.
    let ids: Vec<String> = publisher
        .query(
            "SELECT outbox_publish('chat', 'u1', jsonb_build_object('n', n, 'pad', repeat('x', 10000)))::text \
             FROM generate_series(1, 500) n",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let after = publish(&publisher, 501).await;
    for (n, id) in ids.iter().chain([&after]).enumerate() {
        assert_eq!(listener.next().await["id"], id.as_str(), "notification {n}");
    }
    assert!(notifier_state(&cluster, &publisher).await.table_batches > before.table_batches);
}

#[tokio::test]
async fn without_a_handoff_buffer_the_notifier_reads_every_batch_from_the_table() {
    let cluster = table_only_cluster();
    let mut listener = cluster.listener("postgres").await;
    let mut publisher = cluster.connect("postgres").await;
    let before = notifier_state(&cluster, &publisher).await;
    let tx = publisher.transaction().await.unwrap();
    let first = publish(&tx, 1).await;
    tx.batch_execute("SAVEPOINT a").await.unwrap();
    publish(&tx, 2).await;
    tx.batch_execute("ROLLBACK TO SAVEPOINT a").await.unwrap();
    tx.commit().await.unwrap();
    let mut expected = vec![first];
    for n in 3..20 {
        expected.push(publish(&publisher, n).await);
    }
    for id in &expected {
        assert_eq!(listener.next().await["id"], id.as_str());
    }
    // Every batch since read the table, but for an idle tick (every 5 s with nothing woken)
    // that found nothing to read.
    let after = notifier_state(&cluster, &publisher).await;
    let table_batches = after.table_batches - before.table_batches;
    assert!(table_batches > 0, "{before:?} {after:?}");
    assert!(
        after.batches - before.batches <= table_batches + 1,
        "{before:?} {after:?}"
    );
}

#[tokio::test]
async fn a_batch_cut_below_transactions_the_position_saw_sends_nothing_twice() {
    // Every batch from the table, where batches are cut at 10,000 rows.
    let cluster = table_only_cluster();
    let mut listener = cluster.listener("postgres").await;
    let mut big = cluster.connect("postgres").await;
    let small = cluster.connect("postgres").await;

    // A transaction with more rows than a batch stays open while later ones are notified: the
    // notifier's position sees them ended, and it still running.
    let tx = big.transaction().await.unwrap();
    let big_ids: HashSet<String> = tx
        .query(
            "SELECT outbox_publish('chat', 'u1', jsonb_build_object('n', n))::text \
             FROM generate_series(1, 10001) n",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    for n in 0..50 {
        let id = publish(&small, n).await;
        assert_eq!(listener.next().await["id"], id.as_str());
    }
    // Its commit makes a batch that is cut right after it: the batch after must not send the
    // 50 again.
    tx.commit().await.unwrap();
    let mut seen = HashSet::new();
    while seen.len() < big_ids.len() {
        let notification = listener.next().await;
        let id = notification["id"].as_str().unwrap().to_owned();
        assert!(
            big_ids.contains(&id),
            "not of the large transaction: {notification}"
        );
        assert!(seen.insert(id), "twice: {notification}");
    }
    let after = publish(&small, 50).await;
    assert_eq!(listener.next().await["id"], after.as_str());
}

#[tokio::test]
async fn a_first_publish_from_another_extensions_pre_commit_callback_is_handed_over() {
    let (cluster, mut listener, publisher) = with_the_handoff_in_use(&[]).await;
    // tests/fixtures/pre_commit_publisher, installed by `make test-e2e`.
    cluster.psql("postgres", "CREATE EXTENSION pre_commit_publisher");
    // A new session whose first publish happens inside that extension's PRE_COMMIT callback.
    let mut session = cluster.connect("postgres").await;
    let tx = session.transaction().await.unwrap();
    tx.execute("SELECT publish_at_commit('at_commit')", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let after = publish(&publisher, 1).await;
    let first = listener.next().await;
    assert_eq!(first["channel"], "at_commit", "{first}");
    assert_eq!(listener.next().await["id"], after.as_str());
}

#[tokio::test]
async fn order_is_commit_order_between_batches_and_xid_order_within_one() {
    let cluster = worker_mode_cluster();
    let mut listener = cluster.listener("postgres").await;
    let admin = cluster.connect("postgres").await;
    let (mut first, mut second) = (
        cluster.connect("postgres").await,
        cluster.connect("postgres").await,
    );
    let direct = cluster.connect("postgres").await;
    direct
        .batch_execute("SET pg_outbox.notify_mode = 'transaction'")
        .await
        .unwrap();
    let order = while_the_notifier_is_down(&cluster, &admin, || async move {
        // Two worker-mode transactions commit in the reverse of their xid order...
        let earlier = first.transaction().await.unwrap();
        let a = publish(&earlier, 1).await;
        let later = second.transaction().await.unwrap();
        let b = publish(&later, 2).await;
        later.commit().await.unwrap();
        earlier.commit().await.unwrap();
        // ...then a transaction-mode one, which notifies at its own commit.
        let t = publish(&direct, 3).await;
        [t, a, b]
    })
    .await;
    // The transaction-mode event first, then the notifier's batch, in xid order: `a`, committed
    // last, before `b`.
    for id in &order {
        assert_eq!(listener.next().await["id"], id.as_str());
    }
}

/// A cluster in worker mode, with `settings` too, a listener and a publisher, once the notifier
/// takes events from the handoff.
async fn with_the_handoff_in_use(
    settings: &[(&str, &str)],
) -> (Cluster, pg_outbox_tests::Listener, tokio_postgres::Client) {
    let mut builder = Cluster::builder().setting("pg_outbox.notify_mode", "'worker'");
    for (name, value) in settings {
        builder = builder.setting(name, value);
    }
    let cluster = builder.start();
    let mut listener = cluster.listener("postgres").await;
    let publisher = cluster.connect("postgres").await;
    until_the_handoff_is_used(&cluster, &publisher, &mut listener).await;
    (cluster, listener, publisher)
}

/// Publishes until the notifier takes events from the handoff: a notifier that starts reads the
/// table until the transactions that existed then have ended.
async fn until_the_handoff_is_used(
    cluster: &Cluster,
    publisher: &tokio_postgres::Client,
    listener: &mut pg_outbox_tests::Listener,
) {
    // Each publish makes a batch, and each batch moves the notifier's position past what was
    // running when it started.
    for _ in 0..100 {
        let id = publish(publisher, 0).await;
        assert_eq!(listener.next().await["id"], id.as_str());
        if !notifier_state(cluster, publisher).await.from_table {
            return;
        }
    }
    panic!("the notifier never used the handoff\n{}", cluster.log());
}

/// What the notifier reports in `pg_stat_activity` between batches.
#[derive(Debug)]
struct NotifierState {
    /// Whether its last batch read `event_outbox` rather than the handoff.
    from_table: bool,
    /// How many batches read `event_outbox` since the worker started.
    table_batches: u64,
    /// How many batches ran since the worker started.
    batches: u64,
}

/// The notifier's state once it is between batches, read from
/// `idle (last batch from handoff; 3 of 40 batches read event_outbox)` or
/// `idle (last batch from event_outbox through xid 812; 4 of 40 batches read event_outbox)`.
async fn notifier_state(cluster: &Cluster, client: &tokio_postgres::Client) -> NotifierState {
    cluster
        .wait_for("the notifier between two batches", WAIT, || async {
            let query: String = client
                .query_opt(
                    "SELECT query FROM pg_stat_activity WHERE backend_type = 'pg_outbox notifier'",
                    &[],
                )
                .await
                .ok()??
                .get(0);
            let rest = query.strip_prefix("idle (last batch from ")?;
            let (source, counts) = rest.split_once("; ")?;
            let (table_batches, rest) = counts.split_once(" of ")?;
            let (batches, _) = rest.split_once(' ')?;
            Some(NotifierState {
                from_table: source != "handoff",
                table_batches: table_batches.parse().ok()?,
                batches: batches.parse().ok()?,
            })
        })
        .await
}

/// Runs `work` while the notifier is down: it is stopped, and its successor kept from starting
/// by a lock on its state row (a worker starting, or one recording its position as it stops,
/// waits on it); returns once a new notifier runs.
async fn while_the_notifier_is_down<T, F: Future<Output = T>>(
    cluster: &Cluster,
    admin: &tokio_postgres::Client,
    work: impl FnOnce() -> F,
) -> T {
    let mut holder = cluster.connect("postgres").await;
    let hold = holder.transaction().await.unwrap();
    hold.batch_execute("SELECT * FROM outbox_notifier_state FOR UPDATE")
        .await
        .unwrap();
    let pid = stop_notifier(admin).await;
    let done = work().await;
    hold.rollback().await.unwrap();
    wait_for_a_notifier_other_than(cluster, admin, pid).await;
    done
}

/// Terminates the notifier (the postmaster starts another a second later); returns its pid.
async fn stop_notifier(admin: &tokio_postgres::Client) -> i32 {
    let pid: i32 = admin
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_outbox notifier'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    pid
}

async fn wait_for_a_notifier_other_than(
    cluster: &Cluster,
    admin: &tokio_postgres::Client,
    pid: i32,
) {
    cluster
        .wait_for("a new notifier", WAIT, || async {
            admin
                .query_opt(
                    "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_outbox notifier' AND pid <> $1",
                    &[&pid],
                )
                .await
                .unwrap()
                .map(|_| ())
        })
        .await;
}

#[tokio::test]
async fn outside_the_workers_database_publishers_notify_themselves() {
    let cluster = worker_mode_cluster();
    cluster.psql("postgres", "CREATE DATABASE other");
    cluster.psql("other", "CREATE EXTENSION pg_outbox");
    let mut listener = cluster.listener("other").await;
    let publisher = cluster.connect("other").await;
    let id = publish(&publisher, 1).await;
    assert_eq!(listener.next().await["id"], id.as_str());
    let deferred: bool = publisher
        .query_one("SELECT notify_deferred FROM event_outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!deferred);
}
