//! `examples/node/publish.js` (node-postgres) publishes in a committed and a rolled-back
//! transaction while a Rust relay receives: only the committed event arrives.

use std::process::Command;

use pg_outbox_tests::callers::committed_event_of;
use pg_outbox_tests::repository;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_publishes_in_its_transaction() {
    let example = repository().join("examples/node");
    assert!(
        example.join("node_modules/pg").is_dir(),
        "examples/node has no node_modules: run scripts/setup.sh (npm ci --prefix examples/node)"
    );
    let event = committed_event_of("callers_node", |url| {
        let mut node = Command::new("node");
        node.arg(example.join("publish.js")).arg(url);
        node
    })
    .await;
    assert_eq!(event.origin(), Some("node"));
    assert_eq!(event.payload()["status"], "shipped");
}
