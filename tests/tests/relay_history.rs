//! A relay stays exact when the server's history changes under it: a crash that loses commits
//! which wrote no WAL of their own, a failover to a standby that was behind, and transactions
//! that commit late, after rows above them were pruned. Relays that started after the change
//! resume positions issued before it exactly too, from the runs the database recorded.
//!
//! In the first two, the server hands out again transaction ids the relay's cursor had seen as
//! committed; a relay that trusted its old snapshot would skip the new transactions that get
//! them.

use std::collections::HashSet;

use pg_outbox_client::{Gap, Topic};
use pg_outbox_tests::relay::{
    create_relay_role, publish, relay_as, relay_with, set_login, wait_for_advances, wait_listening,
    wait_reconnecting, Collector,
};
use pg_outbox_tests::{Cluster, WAIT};
use tokio_postgres::config::TargetSessionAttrs;
use uuid::Uuid;

/// The least xid among the rows of `ids`.
async fn least_xid(cluster: &Cluster, ids: &[Uuid]) -> u64 {
    let client = cluster.connect("postgres").await;
    let row = client
        .query_one(
            "SELECT min(xid)::text FROM event_outbox WHERE id = ANY($1)",
            &[&ids],
        )
        .await
        .unwrap();
    row.get::<_, String>(0).parse().unwrap()
}

/// Publishes `n` events on `chat` for `u1`, each in its own transaction.
async fn publish_n(cluster: &Cluster, n: usize) -> Vec<Uuid> {
    let client = cluster.connect("postgres").await;
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(publish(&client, "chat", "u1", &format!(r#"{{"n":{i}}}"#), None).await);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_that_hands_seen_xids_out_again_loses_nothing() {
    // Commits that wrote no WAL of their own are not flushed; the WAL writer must not write
    // them out before the crash either.
    let cluster = Cluster::builder()
        .setting("wal_writer_delay", "'10s'")
        .start();
    create_relay_role(&cluster, "relay_user");
    let relay = relay_as(&cluster, "relay_crash", "relay_user")
        .build()
        .unwrap();
    let chat = Collector::spawn(relay.subscribe_to(Topic::channel("chat")));
    let mut browser = relay.subscribe_to(Topic::all().user("u1"));
    relay.start().await.unwrap();
    let before = publish_n(&cluster, 1).await;
    chat.wait_for_all(
        &cluster,
        "the event before",
        &before.iter().copied().collect(),
    )
    .await;
    let item = tokio::time::timeout(WAIT, browser.recv()).await.unwrap();
    assert!(item.is_some_and(|item| item.event().is_some()));

    // The relay stays away after the crash until the new transactions have committed (its
    // connections are not affected), so the catch-up is what must find them. Set first: the
    // flush of its commit would write out the commits below.
    set_login(&cluster, "relay_user", false);
    cluster.psql("postgres", "CHECKPOINT");
    let burnt = cluster.burn_xids(30).await;
    // Two advances: the second began after those transactions ended, so the relay's cursor
    // has seen every one of them as committed, and so has the browser's position.
    wait_for_advances(&cluster, &relay, 2).await;
    let position = browser.position().unwrap();
    assert!(position.to_string().len() > 4);
    drop(browser);

    cluster.crash();
    cluster.pg_ctl_start();
    let after = publish_n(&cluster, 3).await;
    set_login(&cluster, "relay_user", true);
    let reused = least_xid(&cluster, &after).await;
    assert!(
        reused <= burnt,
        "the restarted server handed out xid {reused} again (the relay saw up to {burnt})"
    );

    let expected: HashSet<Uuid> = before.iter().chain(&after).copied().collect();
    chat.wait_for_all(&cluster, "the events after the crash", &expected)
        .await;
    wait_for_advances(&cluster, &relay, 2).await;
    chat.assert_exactly("after a crash", &expected);
    assert!(chat.gaps().is_empty(), "{:?}", chat.gaps());
    assert_eq!(relay.metrics().rewinds, 1);

    // A relay started after the crash resumes the browser exactly: the transactions that got
    // the xids its position saw are new.
    let fresh = relay_as(&cluster, "relay_after_crash", "relay_user")
        .build()
        .unwrap();
    fresh.start().await.unwrap();
    let resumed = Collector::spawn(fresh.subscribe_from(Topic::all().user("u1"), &position));
    let new: HashSet<Uuid> = after.iter().copied().collect();
    resumed
        .wait_for_all(&cluster, "the events after the crash, on a new relay", &new)
        .await;
    wait_for_advances(&cluster, &fresh, 2).await;
    resumed.assert_exactly("resumed on a relay started after the crash", &new);
    fresh.shutdown().await;
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_to_a_standby_that_was_behind_loses_nothing_it_has() {
    let primary = Cluster::start();
    create_relay_role(&primary, "relay_user");
    let standby = primary.standby();
    // The relay follows whichever server accepts writes, as an application's would.
    let mut config = primary.config("postgres", "relay_user");
    config
        .host_path(standby.root())
        .port(standby.port())
        .target_session_attrs(TargetSessionAttrs::ReadWrite);
    let relay = relay_with(config.clone(), "relay_failover")
        .build()
        .unwrap();
    let chat = Collector::spawn(relay.subscribe_to(Topic::channel("chat")));
    // A browser's stream, whose position must come through the failover too.
    let mut browser = relay.subscribe_to(Topic::all().user("u1"));
    relay.start().await.unwrap();
    // The relay stays away from the promoted standby until the new transactions have
    // committed (its connection to the primary is not affected), so the catch-up is what must
    // find them.
    set_login(&primary, "relay_user", false);

    let replicated = publish_n(&primary, 2).await;
    let standby_client = standby.connect("postgres").await;
    primary
        .wait_for("the standby to replay the first events", WAIT, || async {
            let row = standby_client
                .query_one(
                    "SELECT count(*) FROM event_outbox WHERE id = ANY($1)",
                    &[&replicated],
                )
                .await
                .ok()?;
            (row.get::<_, i64>(0) == 2).then_some(())
        })
        .await;

    // The standby stops receiving: what the primary commits from now on, it never has.
    standby.stop_replaying().await;
    let lost = publish_n(&primary, 5).await;
    let burnt = primary.burn_xids(50).await;
    let delivered: HashSet<Uuid> = replicated.iter().chain(&lost).copied().collect();
    chat.wait_for_all(&primary, "the events the standby lacks", &delivered)
        .await;
    wait_for_advances(&primary, &relay, 2).await;
    for _ in 0..delivered.len() {
        let item = tokio::time::timeout(WAIT, browser.recv()).await.unwrap();
        assert!(item.is_some_and(|item| item.event().is_some()));
    }
    // It saw the events the standby lacks, so its position covers xids the standby hands out
    // again.
    let position = browser.position().unwrap().to_string();
    drop(browser);

    primary.crash();
    standby.psql("postgres", "SELECT pg_promote()");
    let after = publish_n(&standby, 3).await;
    let reused = least_xid(&standby, &after).await;
    assert!(
        reused <= burnt,
        "the promoted standby handed out xid {reused} again (the relay saw up to {burnt})"
    );
    set_login(&standby, "relay_user", true);

    let expected: HashSet<Uuid> = delivered.iter().chain(&after).copied().collect();
    chat.wait_for_all(&standby, "the events after the failover", &expected)
        .await;
    wait_for_advances(&standby, &relay, 2).await;
    chat.assert_exactly("after a failover", &expected);
    assert!(chat.gaps().is_empty(), "{:?}", chat.gaps());
    assert_eq!(relay.metrics().rewinds, 1);

    // The browser resumes on the relay that went through the failover: the new transactions
    // that reuse the xids it saw are delivered, the lost events are not there to repeat.
    let resumed = Collector::spawn(relay.subscribe_from(Topic::all().user("u1"), &position));
    let new: HashSet<Uuid> = after.iter().copied().collect();
    resumed
        .wait_for_all(&standby, "the events after the failover, resumed", &new)
        .await;
    wait_for_advances(&standby, &relay, 2).await;
    resumed.assert_exactly("resumed after a failover", &new);
    // So does a relay that started on the promoted standby: the database recorded where the
    // promoted run's xids begin, and that record came through the failover with the events.
    let fresh = relay_with(config, "relay_after_failover").build().unwrap();
    fresh.start().await.unwrap();
    let resumed = Collector::spawn(fresh.subscribe_from(Topic::all().user("u1"), &position));
    resumed
        .wait_for_all(
            &standby,
            "the events after the failover, on a new relay",
            &new,
        )
        .await;
    wait_for_advances(&standby, &fresh, 2).await;
    resumed.assert_exactly("resumed on a relay started after the failover", &new);
    fresh.shutdown().await;
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_commit_pruned_below_a_seen_xid_is_reported_as_a_gap() {
    let cluster = Cluster::start();
    create_relay_role(&cluster, "relay_user");
    let relay = relay_as(&cluster, "relay_late", "relay_user")
        .build()
        .unwrap();
    let all = Collector::spawn(relay.subscribe_to(Topic::all()));
    relay.start().await.unwrap();

    // A transaction publishes and stays open while the relay's cursor moves past it.
    let mut late = cluster.connect("postgres").await;
    let late = late.transaction().await.unwrap();
    let lost = publish(&late, "chat", "u1", r#"{"late":true}"#, None).await;
    wait_for_advances(&cluster, &relay, 2).await;
    let seen = publish_n(&cluster, 1).await;
    all.wait_for_all(&cluster, "the later event", &seen.iter().copied().collect())
        .await;

    // The relay is away while the open transaction commits and everything is pruned, through
    // an xid its cursor had seen as committed.
    set_login(&cluster, "relay_user", false);
    assert_eq!(cluster.terminate_backends("relay_late"), 2);
    wait_reconnecting(&relay).await;
    late.commit().await.unwrap();
    assert_eq!(
        cluster.psql("postgres", "SELECT outbox_prune('0 seconds')"),
        "2"
    );
    set_login(&cluster, "relay_user", true);
    wait_listening(&relay).await;
    wait_for_advances(&cluster, &relay, 2).await;

    assert!(!all.has(lost));
    let gaps = all.gaps();
    assert!(matches!(gaps.as_slice(), [Gap::Pruned { .. }]), "{gaps:?}");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_with_none_of_the_relays_witnesses_is_reported_as_a_gap() {
    let cluster = Cluster::start();
    let relay = relay_as(&cluster, "relay_rewound", "postgres")
        .build()
        .unwrap();
    let all = Collector::spawn(relay.subscribe_to(Topic::all()));
    relay.start().await.unwrap();
    let before = publish_n(&cluster, 3).await;
    all.wait_for_all(
        &cluster,
        "the events before",
        &before.iter().copied().collect(),
    )
    .await;

    // As if the server came back from a backup older than everything the relay read: none of
    // the rows it could check exists, and nothing was pruned to explain it (the rows go with
    // triggers off, as in a restore, so that their deletion is not recorded), nor is the run
    // the relay read them on recorded.
    cluster.psql(
        "postgres",
        "SET session_replication_role = replica; DELETE FROM event_outbox; DELETE FROM outbox_runs",
    );
    cluster.restart();
    let after = publish_n(&cluster, 1).await;
    let expected: HashSet<Uuid> = before.iter().chain(&after).copied().collect();
    all.wait_for_all(&cluster, "the event after the restart", &expected)
        .await;
    all.assert_exactly("around a lost history", &expected);
    assert_eq!(relay.metrics().rewinds, 1);
    let gaps = all.gaps();
    assert!(matches!(gaps.as_slice(), [Gap::Rewound { .. }]), "{gaps:?}");
    relay.shutdown().await;
}
