//! Through a pooler in transaction mode LISTEN does not hold: `start()` says so and names the
//! fix, instead of relaying nothing; a session-mode pooler works.

use std::time::Duration;

use pg_outbox_client::{RelayBuilder, Topic};
use pg_outbox_tests::relay::{publish, Collector};
use pg_outbox_tests::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_mode_pooler_is_refused_naming_the_fix() {
    let cluster = Cluster::start();
    let bouncer = cluster.pgbouncer("transaction").await;
    let relay = RelayBuilder::new(bouncer.config())
        .connect_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let err = relay.start().await.unwrap_err();
    assert!(err.is_pooler(), "{err}");
    assert!(err.to_string().contains("session-mode pool"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_mode_pooler_works() {
    let cluster = Cluster::start();
    let bouncer = cluster.pgbouncer("session").await;
    let relay = RelayBuilder::new(bouncer.config()).build().unwrap();
    let all = Collector::spawn(relay.subscribe_to(Topic::all()));
    relay.start().await.unwrap();
    let client = cluster.connect("postgres").await;
    let id = publish(&client, "chat", "u1", "{}", None).await;
    all.wait_for_all(&cluster, "the event", &[id].into()).await;
    relay.shutdown().await;
}
