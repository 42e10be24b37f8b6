//! `examples/node/publish.js` (node-postgres) publishes in a committed and a rolled-back
//! transaction while a Rust relay receives: only the committed event arrives.

mod callers_support;
mod relay_support;

use std::collections::HashSet;
use std::process::Command;

use callers_support::{assert_committed_only, published, relay, repo, run};
use pg_outbox_tests::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_publishes_in_its_transaction() {
    let example = repo().join("examples/node");
    assert!(
        example.join("node_modules/pg").is_dir(),
        "examples/node has no node_modules: run scripts/setup.sh (npm ci --prefix examples/node)"
    );
    let cluster = Cluster::start();
    let (relay, all) = relay(&cluster, "callers_node").await;

    let stdout = run(Command::new("node")
        .arg(example.join("publish.js"))
        .arg(cluster.url("postgres")));
    let (committed, rolled_back) = published(&stdout);

    assert_committed_only(
        &cluster,
        &relay,
        &all,
        &HashSet::from([committed]),
        &HashSet::from([rolled_back]),
    )
    .await;
    let event = all
        .items()
        .into_iter()
        .find_map(|d| d.into_event())
        .unwrap();
    assert_eq!(event.origin(), Some("node"));
    assert_eq!(event.payload()["status"], "shipped");
    relay.shutdown().await;
}
