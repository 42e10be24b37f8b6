//! Resuming a subscription from a position on another relay (`Relay::subscribe_from`): exactly
//! the events it had not seen, under out-of-order and rolled-back commits, across a server
//! restart, coalesced under a storm, and a typed reset for positions that cannot resume.

use std::collections::HashSet;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use pg_outbox_client::{Delivery, Gap, Relay, ResetReason, Subscription, Topic};
use pg_outbox_tests::relay::{publish, relay, wait_for_advances, wait_listening, Collector};
use pg_outbox_tests::{Cluster, Edition, WAIT};
use uuid::Uuid;

async fn started(cluster: &Cluster, name: &str) -> Relay {
    let relay = relay(cluster, name).build().unwrap();
    relay.start().await.unwrap();
    relay
}

/// The next event of `subscription`; panics on anything else.
async fn next_event(subscription: &mut Subscription) -> Uuid {
    match tokio::time::timeout(WAIT, subscription.recv()).await {
        Ok(Some(Delivery::Event(event))) => event.id(),
        other => panic!("expected an event, got {other:?}"),
    }
}

/// The first item of `subscription`, which must be a reset.
async fn reset_of(subscription: &mut Subscription) -> ResetReason {
    match tokio::time::timeout(WAIT, subscription.recv()).await {
        Ok(Some(Delivery::Reset { reason })) => reason,
        other => panic!("expected a reset, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_relay_resumes_exactly_what_the_position_had_not_seen() {
    another_relay_resumes_exactly_what_the_position_had_not_seen_on(Edition::Native).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_relay_resumes_exactly_what_the_position_had_not_seen_on_the_sql_edition() {
    another_relay_resumes_exactly_what_the_position_had_not_seen_on(Edition::Sql).await;
}

async fn another_relay_resumes_exactly_what_the_position_had_not_seen_on(edition: Edition) {
    let cluster = Cluster::builder().edition(edition).start();
    let a = started(&cluster, "relay_resume_a").await;
    let b = started(&cluster, "relay_resume_b").await;
    let mut on_a = a.subscribe_to(Topic::all().user("u1"));
    let publisher = cluster.connect("postgres").await;
    let mut late = cluster.connect("postgres").await;

    // A transaction that publishes first (its xid is the smallest) and commits last.
    let late_tx = late.transaction().await.unwrap();
    let late_id = publish(&late_tx, "chat", "u1", r#"{"n": "late"}"#, None).await;
    let mut before = Vec::new();
    for n in 0..3 {
        before.push(publish(&publisher, "chat", "u1", &format!(r#"{{"n": {n}}}"#), None).await);
        publish(&publisher, "chat", "u2", "{}", None).await;
    }
    // On another channel: a subscription for one user sees every channel.
    before.push(publish(&publisher, "news", "u1", "{}", None).await);
    {
        let mut client = cluster.connect("postgres").await;
        let rolled_back = client.transaction().await.unwrap();
        publish(&rolled_back, "chat", "u1", r#"{"n": "rolled back"}"#, None).await;
        rolled_back.rollback().await.unwrap();
    }
    // The browser saw two events on A, then A went away.
    let mut seen = vec![next_event(&mut on_a).await, next_event(&mut on_a).await];
    let position = on_a.position().expect("a started relay gives positions");
    drop(on_a);
    late_tx.commit().await.unwrap();
    let after = publish(&publisher, "chat", "u1", r#"{"n": "after"}"#, None).await;

    let resumed = Collector::spawn(b.subscribe_from(Topic::all().user("u1"), &position));
    let expected: HashSet<Uuid> = before
        .iter()
        .copied()
        .chain([late_id, after])
        .filter(|id| !seen.contains(id))
        .collect();
    assert_eq!(expected.len(), 4);
    resumed
        .wait_for_all(&cluster, "the events the position had not seen", &expected)
        .await;
    // Published once the resumed subscription is live.
    let live = publish(&publisher, "chat", "u1", "{}", None).await;
    let mut expected = expected;
    expected.insert(live);
    resumed
        .wait_for_all(&cluster, "a live event", &expected)
        .await;
    wait_for_advances(&cluster, &b, 2).await;
    resumed.assert_exactly("the resumed subscription", &expected);
    assert!(resumed.items().iter().all(|item| item.event().is_some()));
    seen.extend(resumed.ids());
    assert_eq!(seen.len(), 7, "every committed event of u1, once");
    let metrics = b.metrics();
    assert_eq!((metrics.resumes, metrics.resets), (1, 0));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_row_is_reported_once_per_browser_across_resumes() {
    let cluster = Cluster::start();
    let a = started(&cluster, "relay_resume_unreadable_a").await;
    let b = started(&cluster, "relay_resume_unreadable_b").await;
    let publisher = cluster.connect("postgres").await;
    let mut on_a = a.subscribe_to(Topic::all().user("u1"));
    let first = publish(&publisher, "chat", "u1", "{}", None).await;
    assert_eq!(next_event(&mut on_a).await, first);
    let before_it = on_a.position().unwrap().to_string();
    // Valid jsonb that serde_json refuses: a number beyond f64.
    let unreadable = publish(&publisher, "chat", "u1", r#"{"n": 1e400}"#, None).await;
    let after = publish(&publisher, "chat", "u1", "{}", None).await;
    match tokio::time::timeout(WAIT, on_a.recv()).await {
        Ok(Some(Delivery::Gap(Gap::Unreadable { id, .. }))) => assert_eq!(id, unreadable),
        other => panic!("expected the unreadable row's gap, got {other:?}"),
    }
    let past_it = on_a.position().unwrap().to_string();
    assert_eq!(next_event(&mut on_a).await, after);

    // A browser that had not seen the row is told once; one that had, not again.
    let from_before = Collector::spawn(b.subscribe_from(Topic::all().user("u1"), &before_it));
    let from_past = Collector::spawn(b.subscribe_from(Topic::all().user("u1"), &past_it));
    let live = publish(&publisher, "chat", "u1", "{}", None).await;
    let expected: HashSet<Uuid> = [after, live].into_iter().collect();
    for resumed in [&from_before, &from_past] {
        resumed
            .wait_for_all(&cluster, "the missed and the live event", &expected)
            .await;
    }
    wait_for_advances(&cluster, &b, 2).await;
    from_before.assert_exactly("resumed before the row", &expected);
    from_past.assert_exactly("resumed past the row", &expected);
    assert_eq!(from_before.unreadable_ids(), [unreadable]);
    assert_eq!(from_past.unreadable_ids(), Vec::<Uuid>::new());
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_that_cannot_resume_exactly_reset_and_go_on_live() {
    let cluster = Cluster::start();
    let relay = started(&cluster, "relay_resume_reset").await;
    let publisher = cluster.connect("postgres").await;
    let token = {
        let mut subscription = relay.subscribe_to(Topic::all().user("u1"));
        publish(&publisher, "chat", "u1", "{}", None).await;
        next_event(&mut subscription).await;
        subscription.position().unwrap().to_string()
    };
    let bytes = URL_SAFE_NO_PAD.decode(&token).unwrap();
    // The documented form: a version byte, the server run (4 bytes), then varints.
    let forged = |epoch: &[u8], xmin: u64| {
        let mut out = vec![1];
        out.extend_from_slice(epoch);
        let mut value = xmin;
        while value >= 0x80 {
            out.push((value as u8 & 0x7f) | 0x80);
            value >>= 7;
        }
        out.extend_from_slice(&[value as u8, 0, 0, 0]);
        URL_SAFE_NO_PAD.encode(out)
    };
    let ahead = forged(&bytes[1..5], 1 << 40);
    let other_run = forged(&[bytes[1] ^ 0xff, bytes[2], bytes[3], bytes[4]], 3);

    let mut malformed = relay.subscribe_from(Topic::all().user("u1"), "not a position");
    let mut ahead = relay.subscribe_from(Topic::all().user("u1"), &ahead);
    let mut other_run = relay.subscribe_from(Topic::all().user("u1"), &other_run);
    assert!(matches!(
        reset_of(&mut malformed).await,
        ResetReason::Malformed(_)
    ));
    assert!(matches!(
        reset_of(&mut ahead).await,
        ResetReason::Ahead { position_xmax, .. } if position_xmax == 1 << 40
    ));
    assert_eq!(reset_of(&mut other_run).await, ResetReason::OtherServerRun);
    // Each goes on with the live stream.
    let live = publish(&publisher, "chat", "u1", "{}", None).await;
    for subscription in [&mut malformed, &mut ahead, &mut other_run] {
        assert_eq!(next_event(subscription).await, live);
    }
    // Older than what was pruned: the prune state says rows up to a newer xid are gone.
    cluster.psql(
        "postgres",
        "UPDATE outbox_prune_state SET pruned_through_xid = pg_current_xact_id()",
    );
    let mut expired = relay.subscribe_from(Topic::all().user("u1"), &token);
    assert!(matches!(
        reset_of(&mut expired).await,
        ResetReason::Expired { .. }
    ));
    assert_eq!(
        relay.metrics().resets,
        4,
        "every reset counts, the malformed one (answered without the listener) too"
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_that_lived_through_a_restart_or_started_after_it_resume_older_positions() {
    relays_resume_positions_from_before_a_restart_on(Edition::Native).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_resume_positions_from_before_a_restart_on_the_sql_edition() {
    relays_resume_positions_from_before_a_restart_on(Edition::Sql).await;
}

async fn relays_resume_positions_from_before_a_restart_on(edition: Edition) {
    let cluster = Cluster::builder().edition(edition).start();
    let relay = started(&cluster, "relay_resume_restart").await;
    let publisher = cluster.connect("postgres").await;
    let mut subscription = relay.subscribe_to(Topic::all().user("u1"));
    let first = publish(&publisher, "chat", "u1", "{}", None).await;
    assert_eq!(next_event(&mut subscription).await, first);
    let token = subscription.position().unwrap().to_string();

    cluster.restart();
    drop(publisher);
    let publisher = cluster.connect("postgres").await;
    let missed = publish(&publisher, "chat", "u1", "{}", None).await;
    cluster
        .wait_for("the relay went through the restart", WAIT, || async {
            (relay.metrics().rewinds >= 1).then_some(())
        })
        .await;
    wait_listening(&relay).await;

    let resumed = Collector::spawn(relay.subscribe_from(Topic::all().user("u1"), &token));
    let expected = HashSet::from([missed]);
    resumed
        .wait_for_all(&cluster, "the event after the restart", &expected)
        .await;
    wait_for_advances(&cluster, &relay, 2).await;
    resumed.assert_exactly("resumed across the restart", &expected);
    // A subscription open across the restart carries its position over to the new run.
    assert_eq!(next_event(&mut subscription).await, missed);
    let carried = subscription.position().unwrap().to_string();
    drop(subscription);

    // A relay started after the restart resumes the old run's position exactly too: the
    // database recorded where the new run's xids begin.
    let fresh = started(&cluster, "relay_resume_fresh").await;
    let mut from_old_run = fresh.subscribe_from(Topic::all().user("u1"), &token);
    assert_eq!(next_event(&mut from_old_run).await, missed);
    // One issued after the restart resumes exactly there.
    let mut after_restart = fresh.subscribe_from(Topic::all().user("u1"), &carried);
    let next = publish(&publisher, "chat", "u1", "{}", None).await;
    assert_eq!(next_event(&mut after_restart).await, next);
    assert_eq!(next_event(&mut from_old_run).await, next);
    relay.shutdown().await;
    fresh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_resumes_shares_catch_up_queries() {
    const USERS: usize = 400;
    let cluster = Cluster::start();
    let a = started(&cluster, "relay_storm_a").await;
    let b = started(&cluster, "relay_storm_b").await;
    let publisher = cluster.connect("postgres").await;
    // Every browser's position, taken on A before anything below was published.
    let subscriptions: Vec<Subscription> = (0..USERS)
        .map(|n| a.subscribe_to(Topic::all().user(format!("u{n}"))))
        .collect();
    wait_for_advances(&cluster, &a, 1).await;
    let tokens: Vec<String> = subscriptions
        .iter()
        .map(|s| s.position().unwrap().to_string())
        .collect();
    drop(subscriptions);
    publisher
        .batch_execute(&format!(
            "SELECT outbox_publish('chat', 'u' || n, '{{}}') FROM generate_series(0, {}) n",
            USERS - 1
        ))
        .await
        .unwrap();
    let ids: Vec<(String, Uuid)> = publisher
        .query("SELECT user_id, id FROM event_outbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();

    let resumed: Vec<Collector> = tokens
        .iter()
        .enumerate()
        .map(|(n, token)| {
            Collector::spawn(b.subscribe_from(Topic::all().user(format!("u{n}")), token))
        })
        .collect();
    for (n, collector) in resumed.iter().enumerate() {
        let user = format!("u{n}");
        let expected: HashSet<Uuid> = ids
            .iter()
            .filter(|(u, _)| *u == user)
            .map(|(_, id)| *id)
            .collect();
        assert_eq!(expected.len(), 1);
        collector
            .wait_for_all(&cluster, "each user's event", &expected)
            .await;
        collector.assert_exactly(&user, &expected);
    }
    let metrics = b.metrics();
    assert_eq!(metrics.resumes, USERS as u64);
    assert!(
        metrics.resume_queries * 10 <= metrics.resumes,
        "{} queries for {} resumes",
        metrics.resume_queries,
        metrics.resumes
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_moving_between_relays_under_concurrent_publishers_gets_each_event_once() {
    const TRANSACTIONS: usize = 120;
    const HOPS: usize = 30;
    let cluster = Cluster::start();
    let relays = [
        started(&cluster, "relay_hops_a").await,
        started(&cluster, "relay_hops_b").await,
    ];
    let mut subscription = relays[0].subscribe_to(Topic::all().user("u1"));
    // Two publishers whose transactions overlap: each holds its transaction open over a
    // query, so commits land out of xid order; every fifth rolls back.
    let publishers: Vec<_> = (0..2)
        .map(|_| {
            let cluster_config = cluster.config("postgres", "postgres");
            tokio::spawn(async move {
                let (mut client, connection) =
                    cluster_config.connect(tokio_postgres::NoTls).await.unwrap();
                tokio::spawn(connection);
                for n in 0..TRANSACTIONS {
                    let tx = client.transaction().await.unwrap();
                    publish(&tx, "chat", "u1", "{}", None).await;
                    publish(&tx, "chat", "u2", "{}", None).await;
                    tx.query_one("SELECT count(*) FROM event_outbox", &[])
                        .await
                        .unwrap();
                    if n % 5 == 4 {
                        tx.rollback().await.unwrap();
                    } else {
                        tx.commit().await.unwrap();
                    }
                }
            })
        })
        .collect();
    let mut received = Vec::new();
    for hop in 0..HOPS {
        for _ in 0..3 {
            received.push(next_event(&mut subscription).await);
        }
        let position = subscription.position().unwrap().to_string();
        drop(subscription);
        subscription = relays[(hop + 1) % 2].subscribe_from(Topic::all().user("u1"), &position);
    }
    for publisher in publishers {
        publisher.await.unwrap();
    }
    let client = cluster.connect("postgres").await;
    let committed: HashSet<Uuid> = client
        .query("SELECT id FROM event_outbox WHERE user_id = 'u1'", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(committed.len(), 2 * TRANSACTIONS * 4 / 5);
    while !committed.iter().all(|id| received.contains(id)) {
        received.push(next_event(&mut subscription).await);
    }
    let last = &relays[HOPS % 2];
    wait_for_advances(&cluster, last, 2).await;
    if let Some(item) = subscription.try_recv() {
        panic!("nothing more is due, got {item:?}");
    }
    let distinct: HashSet<Uuid> = received.iter().copied().collect();
    assert_eq!(distinct.len(), received.len(), "an event came twice");
    assert_eq!(distinct, committed);
    for relay in &relays {
        assert_eq!(relay.metrics().resets, 0);
        relay.shutdown().await;
    }
}
