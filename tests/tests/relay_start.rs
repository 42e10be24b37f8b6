//! `start()` fails fast with an error that names the cause; a relay whose handles are all
//! dropped stops.

use pg_outbox_client::{Health, RelayBuilder, Topic};
use pg_outbox_tests::{relay, Cluster, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_without_the_extension_is_named() {
    let cluster = Cluster::start();
    cluster.psql("postgres", "CREATE DATABASE plain");
    let relay = RelayBuilder::new(cluster.config("plain", "postgres"))
        .build()
        .unwrap();
    let err = relay.start().await.unwrap_err();
    assert!(err.is_extension_missing(), "{err}");
    assert_eq!(err.code(), Some("42P01"));
    assert!(err.to_string().contains("CREATE EXTENSION pg_outbox"));
    assert_eq!(relay.health(), Health::NotStarted);

    let relay = relay::relay(&cluster, "relay_schema")
        .schema("elsewhere")
        .build()
        .unwrap();
    let err = relay.start().await.unwrap_err();
    assert!(err.is_extension_missing(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_a_connect_error() {
    let cluster = Cluster::start();
    let mut config = cluster.config("postgres", "postgres");
    config.port(1); // nothing listens there
    let relay = RelayBuilder::new(config).build().unwrap();
    let err = relay.start().await.unwrap_err();
    assert!(err.is_connect(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_every_handle_stops_the_relay() {
    let cluster = Cluster::start();
    let relay = relay::relay(&cluster, "relay_dropped").build().unwrap();
    let mut subscription = relay.subscribe_to(Topic::all());
    relay.start().await.unwrap();
    let mut health = relay.watch_health();
    let clone = relay.clone();
    drop(relay);
    assert!(clone.health().is_listening());
    drop(clone);
    tokio::time::timeout(WAIT, health.wait_for(|h| *h == Health::Stopped))
        .await
        .expect("the relay stops")
        .ok();
    assert!(subscription.recv().await.is_none());
    cluster
        .wait_for("the relay's backends to go", WAIT, || async {
            let n = cluster.psql(
                "postgres",
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'relay_dropped'",
            );
            (n == "0").then_some(())
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_is_refused_naming_the_fix() {
    let primary = Cluster::start();
    let standby = primary.standby();
    let relay = RelayBuilder::new(standby.config("postgres", "postgres"))
        .build()
        .unwrap();
    let err = relay.start().await.unwrap_err();
    assert!(err.is_standby(), "{err}");
    assert_eq!(err.code(), Some("25006"));
    assert!(err.to_string().contains("target_session_attrs=read-write"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_cannot_read_the_outbox_is_refused_at_start() {
    let cluster = Cluster::start();
    cluster.psql(
        "postgres",
        "CREATE ROLE blind LOGIN; GRANT SELECT ON outbox_prune_state TO blind",
    );
    let relay = relay::relay_as(&cluster, "relay_blind", "blind")
        .build()
        .unwrap();
    let err = relay.start().await.unwrap_err();
    assert_eq!(err.code(), Some("42501"), "{err}");
}
