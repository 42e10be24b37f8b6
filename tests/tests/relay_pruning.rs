//! Pruning by the relays themselves (`RelayBuilder::prune_every`), on the SQL edition, where no
//! worker prunes: of two relays one at a time prunes; the one pruning, killed mid-prune, hands
//! over to the other; and nothing younger than the retention is removed.

use std::time::Duration;

use pg_outbox_client::{Relay, Topic};
use pg_outbox_tests::relay::{publish, relay_as, Collector};
use pg_outbox_tests::{Cluster, Edition, WAIT};
use tokio_postgres::Client;

async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// The relays' sessions that run `outbox_prune()`: (application_name, pid, waiting on a lock).
async fn pruning_sessions(client: &Client) -> Vec<(String, i32, bool)> {
    client
        .query(
            "SELECT application_name, pid, wait_event_type IS NOT DISTINCT FROM 'Lock' \
             FROM pg_stat_activity \
             WHERE application_name LIKE 'relay_prune_%' AND query LIKE '%outbox_prune()%' \
               AND state = 'active'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_relay_at_a_time_prunes_and_another_takes_over_when_it_dies() {
    let cluster = Cluster::builder().edition(Edition::Sql).start();
    cluster.psql(
        "postgres",
        "CREATE ROLE relay_role LOGIN; \
         GRANT SELECT ON event_outbox, outbox_prune_state TO relay_role; \
         GRANT EXECUTE ON FUNCTION outbox_prune(interval) TO relay_role",
    );
    let admin = cluster.connect("postgres").await;
    // 100 events two hours old (past the default retention of one hour), 10 fresh ones.
    admin
        .batch_execute(
            "INSERT INTO event_outbox (id, channel, user_id, payload, created_at) \
             SELECT gen_random_uuid(), 'chat', 'u1', '{}', now() - interval '2 hours' \
             FROM generate_series(1, 100)",
        )
        .await
        .unwrap();
    for _ in 0..10 {
        publish(&admin, "chat", "u1", "{}", None).await;
    }
    // Whoever is elected first stops at recording its batch, mid-prune, until this ends.
    let mut blocker_client = cluster.connect("postgres").await;
    let blocker = blocker_client.transaction().await.unwrap();
    blocker
        .batch_execute("SELECT * FROM outbox_prune_state FOR UPDATE")
        .await
        .unwrap();

    let mut relays: Vec<(String, Relay)> = Vec::new();
    for name in ["relay_prune_a", "relay_prune_b"] {
        let relay = relay_as(&cluster, name, "relay_role")
            .prune_every(Duration::from_millis(200))
            .build()
            .unwrap();
        let _all = Collector::spawn(relay.subscribe_to(Topic::all()));
        relay.start().await.unwrap();
        relays.push((name.to_owned(), relay));
    }

    let (pruner, pid) = cluster
        .wait_for("one relay to prune, held up", WAIT, || async {
            match pruning_sessions(&admin).await.as_slice() {
                [(name, pid, true)] => Some((name.clone(), *pid)),
                _ => None,
            }
        })
        .await;
    let other = relays
        .iter()
        .find(|(name, _)| *name != pruner)
        .map(|(_, relay)| relay.clone())
        .unwrap();
    // The other takes its turns meanwhile, and is not elected.
    let turns = other.metrics().prune_turns;
    cluster
        .wait_for("the other relay's turns", WAIT, || async {
            (other.metrics().prune_turns >= turns + 3).then_some(())
        })
        .await;
    assert_eq!(other.metrics().prunes, 0);
    assert_eq!(
        pruning_sessions(&admin).await.len(),
        1,
        "one pruner at a time"
    );

    // Killed mid-prune, session and relay: its batch rolls back, its lock goes with its
    // session, and the other relay takes over.
    cluster.psql("postgres", &format!("SELECT pg_terminate_backend({pid})"));
    let at = relays.iter().position(|(name, _)| *name == pruner).unwrap();
    let (_, killed) = relays.remove(at);
    killed.shutdown().await;
    blocker.commit().await.unwrap();
    cluster
        .wait_for("the expired events pruned", WAIT, || async {
            (count(&admin, "SELECT count(*) FROM event_outbox").await == 10).then_some(())
        })
        .await;
    let fresh = count(
        &admin,
        "SELECT count(*) FROM event_outbox WHERE created_at > now() - interval '1 hour'",
    )
    .await;
    assert_eq!(fresh, 10, "nothing younger than the retention was removed");
    let state = admin
        .query_one(
            "SELECT rows_pruned, last_pruned_by FROM outbox_prune_state",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(state.get::<_, i64>(0), 100);
    let pruned_by: String = state.get(1);
    assert!(pruned_by.contains("relay_prune_"), "{pruned_by}");
    assert!(pruned_by.contains(relays[0].0.as_str()), "{pruned_by}");
    assert_eq!(other.metrics().rows_pruned, 100);
    other.shutdown().await;
}
