//! What a role that can only connect can do to subscribers: nothing. It may LISTEN and NOTIFY
//! `pg_outbox` (neither has a privilege); whatever it sends, sealed with a made-up key,
//! unsealed where everything is sealed, or references to rows that never were (with
//! transaction ids that never committed, and with ones that did), reaches no subscriber as an
//! event, a gap or a reset, in a subscription or in a browser over SSE, and is counted in
//! `forged`.

use std::collections::HashSet;
use std::future::Future;

use pg_outbox_client::{Relay, Topic};
use pg_outbox_tests::browser::{events, Chromium, Replica, Reports};
use pg_outbox_tests::relay::{publish, relay, Collector};
use pg_outbox_tests::{Cluster, WAIT};
use tokio_postgres::{Client, GenericClient};
use uuid::Uuid;

/// Sends `pg_outbox` notifications for alice as `mallory` (a role with LOGIN and nothing else):
/// `per_kind` references whose transaction never commits, as many naming a transaction that
/// commits without writing a row (held open until `heard` resolves, so that the relay hears
/// them first), and as many sealed with a key of its own. Returns how many it sent.
async fn forge(cluster: &Cluster, per_kind: u64, heard: impl Future<Output = ()>) -> u64 {
    let mallory = cluster.connect_as("postgres", "mallory").await;
    let mut holder = cluster.connect_as("postgres", "mallory").await;
    let open = holder.transaction().await.unwrap();
    let committing = xid(&open).await;
    let never = committing + 1_000_000;
    let made_up_key = pg_outbox_wire::SealKey::from_bytes([7; 32]);
    let mut sent = 0;
    for n in 0..per_kind {
        for (kind, xid) in [(1, never + n), (2, committing)] {
            let id = Uuid::from_u128(0xf0_0000 + u128::from(kind * 1000 + n));
            let reference = format!(
                r#"{{"v":1,"id":"{id}","channel":"chat","user_id":"alice","origin":null,"xid":{xid},"created_at_us":1795827481361761}}"#
            );
            notify(&mallory, &reference).await;
            sent += 1;
        }
        let inline = format!(
            r#"{{"v":1,"id":"{}","channel":"chat","user_id":"alice","origin":null,"xid":{committing},"created_at_us":1795827481361761,"payload":{{"text":"send me your password"}}}}"#,
            Uuid::from_u128(0xf1_0000 + u128::from(n))
        );
        let sealed = pg_outbox_wire::seal::seal(&made_up_key, &inline, [n as u8; 24]);
        notify(&mallory, &sealed).await;
        sent += 1;
    }
    heard.await;
    open.commit().await.unwrap();
    sent
}

/// The transaction id of `client`'s transaction.
async fn xid(client: &impl GenericClient) -> u64 {
    client
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .unwrap()
        .get::<_, String>(0)
        .parse()
        .unwrap()
}

async fn notify(client: &Client, text: &str) {
    client
        .execute("SELECT pg_notify('pg_outbox', $1)", &[&text])
        .await
        .unwrap();
}

fn cluster(notify_payload: Option<&str>) -> Cluster {
    let mut builder = Cluster::builder();
    if let Some(mode) = notify_payload {
        builder = builder.setting("pg_outbox.notify_payload", &format!("'{mode}'"));
    }
    let cluster = builder.start();
    cluster.psql("postgres", "CREATE ROLE mallory LOGIN");
    cluster
}

async fn forgeries_reach_no_subscriber(cluster: Cluster, name: &str) {
    let relay: Relay = relay(&cluster, name).build().unwrap();
    let alice = Collector::spawn(relay.subscribe_to(Topic::all().user("alice")));
    relay.start().await.unwrap();
    let heard = cluster.wait_for("every forgery heard", WAIT, || async {
        (relay.metrics().received >= 60).then_some(())
    });
    let sent = forge(&cluster, 20, heard).await;
    cluster
        .wait_for("every forgery counted", WAIT, || async {
            (relay.metrics().forged == sent).then_some(())
        })
        .await;
    let client = cluster.connect("postgres").await;
    let real = HashSet::from([publish(&client, "chat", "alice", "{}", None).await]);
    alice.wait_for_all(&cluster, "a real event", &real).await;
    alice.assert_exactly("alice's events", &real);
    assert!(alice.gaps().is_empty(), "{:?}", alice.gaps());
    let metrics = relay.metrics();
    assert_eq!(metrics.forged, sent, "{metrics:?}");
    assert_eq!(metrics.gaps, 0, "{metrics:?}");
    assert_eq!(metrics.resets, 0, "{metrics:?}");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgeries_reach_no_subscriber_with_the_defaults() {
    forgeries_reach_no_subscriber(cluster(None), "forgery_sealed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgeries_reach_no_subscriber_in_reference_mode() {
    forgeries_reach_no_subscriber(cluster(Some("reference")), "forgery_reference").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_hears_nothing_of_forgeries() {
    let cluster = cluster(None);
    let replica = Replica::start(&cluster.connection_string("postgres"), "forgery", &[]).await;
    let reports = Reports::start().await;
    let _chromium = Chromium::open(&format!(
        "http://{}/?user=alice&report={}",
        replica.address(),
        reports.url()
    ));
    reports
        .wait("that its EventSource is open", WAIT, |items| {
            items.iter().any(|item| item["type"] == "open")
        })
        .await;
    let sent = forge(&cluster, 20, async {}).await;
    cluster
        .wait_for("every forgery counted in /metrics", WAIT, || async {
            let forged = replica
                .metric("pg_outbox_relay_forged_notifications_total")
                .await;
            (forged == sent as f64).then_some(())
        })
        .await;
    let client = cluster.connect("postgres").await;
    let real = publish(&client, "chat", "alice", r#"{"real": true}"#, None).await;
    reports.wait_for_event("the real event", real).await;
    let items = reports.items();
    let received: Vec<_> = events(&items).collect();
    assert_eq!(received.len(), 1, "{items:#?}");
    assert!(
        items.iter().all(|item| item["type"] != "reset"),
        "{items:#?}"
    );
}
