//! Running the examples in `examples/` against a cluster while a Rust relay receives.

use std::collections::HashSet;
use std::process::Command;

use pg_outbox_client::{Event, Relay};
use uuid::Uuid;

use crate::relay::{self, Collector};
use crate::Cluster;

/// Runs `cmd`, which must succeed, and returns its standard output.
fn stdout_of(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&crate::run(cmd).stdout).into_owned()
}

/// Parses an example's `{"committed": id, "rolled_back": id}` line.
fn published(stdout: &str) -> (Uuid, Uuid) {
    let value: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("the example printed no JSON ({e}): {stdout}"));
    let id = |key: &str| -> Uuid {
        value[key]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no {key} id in {value}"))
    };
    (id("committed"), id("rolled_back"))
}

/// The committed event arrives; the rolled-back one never does (checked after the relay's
/// cursor has moved past both transactions); nothing else arrives.
pub async fn assert_committed_only(
    cluster: &Cluster,
    relay: &Relay,
    all: &Collector,
    committed: &HashSet<Uuid>,
    rolled_back: &HashSet<Uuid>,
) {
    all.wait_for_all(cluster, "the committed events", committed)
        .await;
    relay::wait_for_advances(cluster, relay, 2).await;
    for id in rolled_back {
        assert!(!all.has(*id), "a rolled-back event {id} was delivered");
    }
    all.assert_exactly("relay", committed);
}

/// Starts a cluster and a relay, runs the example that `example` builds (given the cluster's
/// URL), which publishes one committed and one rolled-back event and prints their ids; checks
/// that only the committed one arrives, and returns it.
pub async fn committed_event_of(name: &str, example: impl FnOnce(String) -> Command) -> Event {
    let cluster = Cluster::start();
    let (relay, all) = relay::started(&cluster, name).await;
    let (committed, rolled_back) = published(&stdout_of(&mut example(cluster.url("postgres"))));
    assert_committed_only(
        &cluster,
        &relay,
        &all,
        &HashSet::from([committed]),
        &HashSet::from([rolled_back]),
    )
    .await;
    relay.shutdown().await;
    all.items()
        .into_iter()
        .find_map(|d| d.into_event())
        .expect("the committed event")
}
