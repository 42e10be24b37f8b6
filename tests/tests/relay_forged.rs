//! Forged notifications: any role that can connect can `NOTIFY pg_outbox`. A reference to a
//! transaction that never committed is settled as a missing event, counted, and forgotten; it
//! does not pin the relay to fetching forever.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pg_outbox_client::{Gap, Topic};
use pg_outbox_tests::relay::{publish, relay, wait_for_advances, Collector};
use pg_outbox_tests::{Cluster, WAIT};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;
use uuid::Uuid;

/// Counts the relay's advances that fetch references (span `pg_outbox_advance`, `kind =
/// "fetch"`), as against its sweeps.
#[derive(Clone, Default)]
struct Fetches(Arc<AtomicU64>);

impl Fetches {
    fn count(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

impl<S: Subscriber> Layer<S> for Fetches {
    fn on_new_span(&self, attrs: &Attributes<'_>, _id: &Id, _ctx: Context<'_, S>) {
        struct IsFetch(bool);
        impl Visit for IsFetch {
            fn record_str(&mut self, field: &Field, value: &str) {
                self.0 |= field.name() == "kind" && value == "fetch";
            }
            fn record_debug(&mut self, _field: &Field, _value: &dyn std::fmt::Debug) {}
        }
        if attrs.metadata().name() == "pg_outbox_advance" {
            let mut fetch = IsFetch(false);
            attrs.record(&mut fetch);
            if fetch.0 {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_references_are_settled_as_missing_and_the_relay_goes_on() {
    let fetches = Fetches::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(fetches.clone()))
        .unwrap();
    let cluster = Cluster::start();
    cluster.psql("postgres", "CREATE ROLE mallory LOGIN");
    let relay = relay(&cluster, "relay_forged").build().unwrap();
    let chat = Collector::spawn(relay.subscribe_to(Topic::channel("chat")));
    relay.start().await.unwrap();

    let mallory = cluster.connect_as("postgres", "mallory").await;
    let far: u64 = mallory
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .unwrap()
        .get::<_, String>(0)
        .parse::<u64>()
        .unwrap()
        + 1_000_000;
    let forged: Vec<Uuid> = (0..40u128)
        .map(|n| Uuid::from_u128(0xf0_0000 + n))
        .collect();
    for (n, id) in forged.iter().enumerate() {
        let document = format!(
            r#"{{"v":1,"id":"{id}","channel":"chat","user_id":"u1","origin":null,"xid":{},"created_at_us":1795827481361761}}"#,
            far + n as u64
        );
        mallory
            .execute("SELECT pg_notify('pg_outbox', $1)", &[&document])
            .await
            .unwrap();
    }

    cluster
        .wait_for("the forged references settled", WAIT, || async {
            (relay.metrics().forged == 40).then_some(())
        })
        .await;
    let missing: HashSet<Uuid> = chat
        .gaps()
        .iter()
        .filter_map(|gap| match gap {
            Gap::Missing { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(missing, forged.iter().copied().collect());

    // Nothing waits any more: the relay's next advances are its idle sweeps, not fetches...
    let fetched = fetches.count();
    assert!(fetched > 0, "the forged references were fetched");
    wait_for_advances(&cluster, &relay, 4).await;
    assert_eq!(fetches.count(), fetched, "the relay still fetches");
    // ...and a real event goes straight through.
    let client = cluster.connect("postgres").await;
    let real = publish(&client, "chat", "u1", "{}", None).await;
    chat.wait_for_all(&cluster, "a real event", &HashSet::from([real]))
        .await;
    wait_for_advances(&cluster, &relay, 2).await;
    chat.assert_exactly("real events", &HashSet::from([real]));
    assert_eq!(relay.metrics().forged, 40);
    relay.shutdown().await;
}
