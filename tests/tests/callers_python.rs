//! `examples/python/publish.py` (psycopg 3) publishes in a committed and a rolled-back
//! transaction while a Rust relay receives: only the committed event arrives.

mod callers_support;
mod relay_support;

use std::collections::HashSet;
use std::process::Command;

use callers_support::{assert_committed_only, published, relay, repo, run};
use pg_outbox_tests::Cluster;

/// Debian's interpreter, which `apt-get install python3-psycopg` (scripts/setup.sh) serves,
/// rather than whatever `python3` comes first on PATH.
fn python() -> Command {
    let system = std::path::Path::new("/usr/bin/python3");
    Command::new(if system.exists() {
        system.as_os_str()
    } else {
        "python3".as_ref()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_publishes_in_its_transaction() {
    let cluster = Cluster::start();
    let (relay, all) = relay(&cluster, "callers_python").await;

    let stdout = run(python()
        .arg(repo().join("examples/python/publish.py"))
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
    assert_eq!(event.channel(), "orders");
    assert_eq!(event.origin(), Some("python"));
    assert_eq!(event.payload()["order"], 42);
    relay.shutdown().await;
}
