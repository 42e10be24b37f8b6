//! `examples/sql/`: the psql session publishes in committed and rolled-back transactions, and
//! the trigger on an application table publishes each committed change, while a Rust relay
//! receives.

use std::collections::HashSet;

use pg_outbox_tests::callers::assert_committed_only;
use pg_outbox_tests::relay::{self, committed_ids};
use pg_outbox_tests::{repository, Cluster};
use uuid::Uuid;

fn example(name: &str) -> String {
    std::fs::read_to_string(repository().join("examples/sql").join(name))
        .unwrap_or_else(|e| panic!("read examples/sql/{name}: {e}"))
}

/// The id `\echo`ed after `label` by publish.sql.
fn echoed(output: &str, label: &str) -> Uuid {
    output
        .lines()
        .find_map(|line| line.strip_prefix(label)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {label} id in:\n{output}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_psql_session_and_the_trigger_publish_only_what_commits() {
    let cluster = Cluster::start();
    let client = cluster.connect("postgres").await;
    let (relay, all) = relay::started(&cluster, "callers_sql").await;

    let output = cluster.psql_script("postgres", &example("publish.sql"));
    let committed = echoed(&output, "committed ");
    let rolled_back = echoed(&output, "rolled_back ");
    assert_ne!(committed, rolled_back);

    let before = committed_ids(&client).await;
    cluster.psql_script("postgres", &example("trigger.sql"));
    cluster.psql_script(
        "postgres",
        "INSERT INTO orders VALUES (1, 'alice', 'placed');\n\
         BEGIN;\n\
         INSERT INTO orders VALUES (2, 'bob', 'placed');\n\
         ROLLBACK;\n\
         UPDATE orders SET status = 'placed' WHERE id = 1;\n\
         UPDATE orders SET status = 'shipped' WHERE id = 1;\n",
    );
    let from_trigger: HashSet<Uuid> = committed_ids(&client)
        .await
        .difference(&before)
        .copied()
        .collect();
    assert_eq!(
        from_trigger.len(),
        2,
        "the insert and the real status change publish; the rollback and the no-op update do not"
    );

    let expected: HashSet<Uuid> = committed_ids(&client).await;
    assert!(expected.contains(&committed));
    assert_committed_only(
        &cluster,
        &relay,
        &all,
        &expected,
        &HashSet::from([rolled_back]),
    )
    .await;
    let trigger_events: Vec<_> = all
        .items()
        .into_iter()
        .filter_map(|d| d.into_event())
        .filter(|e| e.channel() == "orders")
        .map(|e| (e.user_id().to_owned(), e.payload()["status"].clone()))
        .collect();
    assert_eq!(
        trigger_events,
        vec![
            ("alice".to_owned(), serde_json::json!("placed")),
            ("alice".to_owned(), serde_json::json!("shipped")),
        ]
    );
    relay.shutdown().await;
}
