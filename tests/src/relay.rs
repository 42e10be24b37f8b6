//! What the relay tests share: relays tuned for tests, publishing, and collectors that read a
//! subscription in the background.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use pg_outbox_client::{Delivery, Gap, Relay, RelayBuilder, Subscription, Topic};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, GenericClient};
use uuid::Uuid;

use crate::{Cluster, WAIT};

/// A relay builder for `cluster` with test-sized timings: quick backoff and sweep.
pub fn relay(cluster: &Cluster, application_name: &str) -> RelayBuilder {
    relay_as(cluster, application_name, "postgres")
}

/// [`relay`], connecting as `user`.
pub fn relay_as(cluster: &Cluster, application_name: &str, user: &str) -> RelayBuilder {
    relay_with(cluster.config("postgres", user), application_name)
}

/// [`relay`], connecting with `config`.
pub fn relay_with(config: tokio_postgres::Config, application_name: &str) -> RelayBuilder {
    RelayBuilder::new(config)
        .application_name(application_name)
        .backoff(Duration::from_millis(20), Duration::from_millis(300))
        .sweep_interval(Duration::from_millis(250))
}

/// A started relay (built by [`relay`]) and a collector of everything it delivers.
pub async fn started(cluster: &Cluster, application_name: &str) -> (Relay, Collector) {
    let relay = relay(cluster, application_name)
        .build()
        .expect("build the relay");
    let all = Collector::spawn(relay.subscribe_to(Topic::all()));
    relay.start().await.expect("start the relay");
    (relay, all)
}

/// Publishes one event with `client`; returns its id.
pub async fn publish(
    client: &impl GenericClient,
    channel: &str,
    user_id: &str,
    payload: &str,
    origin: Option<&str>,
) -> Uuid {
    try_publish(client, channel, user_id, payload, origin)
        .await
        .unwrap_or_else(|e| panic!("outbox_publish: {e}"))
}

/// Publishes one event with `client`.
pub async fn try_publish(
    client: &impl GenericClient,
    channel: &str,
    user_id: &str,
    payload: &str,
    origin: Option<&str>,
) -> Result<Uuid, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT outbox_publish($1, $2, $3::text::jsonb, $4)",
            &[&channel, &user_id, &payload, &origin],
        )
        .await?;
    row.try_get(0)
}

/// Every id in `event_outbox` (the committed events: the tests do not prune unless they say so).
pub async fn committed_ids(client: &Client) -> HashSet<Uuid> {
    client
        .query("SELECT id FROM event_outbox", &[])
        .await
        .expect("read event_outbox")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Reads a subscription to its end in a background task, keeping everything it yields.
pub struct Collector {
    items: Arc<Mutex<Vec<Delivery>>>,
    task: JoinHandle<()>,
}

impl Collector {
    /// Starts reading `subscription` in a background task.
    pub fn spawn(mut subscription: Subscription) -> Collector {
        let items = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&items);
        let task = tokio::spawn(async move {
            while let Some(item) = subscription.next().await {
                sink.lock().unwrap().push(item);
            }
        });
        Collector { items, task }
    }

    /// Ids of the events received so far, in order, duplicates included.
    pub fn ids(&self) -> Vec<Uuid> {
        self.items
            .lock()
            .unwrap()
            .iter()
            .filter_map(|d| d.event().map(|e| e.id()))
            .collect()
    }

    /// How many events were received so far, duplicates included.
    pub fn count(&self) -> usize {
        self.ids().len()
    }

    /// Whether the event `id` was received.
    pub fn has(&self, id: Uuid) -> bool {
        self.ids().contains(&id)
    }

    /// The gaps received so far, in order.
    pub fn gaps(&self) -> Vec<Gap> {
        self.items
            .lock()
            .unwrap()
            .iter()
            .filter_map(|d| match d {
                Delivery::Gap(gap) => Some(gap.clone()),
                _ => None,
            })
            .collect()
    }

    /// The ids of the unreadable rows reported so far ([`Gap::Unreadable`]), in order.
    pub fn unreadable_ids(&self) -> Vec<Uuid> {
        self.gaps()
            .into_iter()
            .filter_map(|gap| match gap {
                Gap::Unreadable { id, .. } => Some(id),
                _ => None,
            })
            .collect()
    }

    /// Everything received so far, in order.
    pub fn items(&self) -> Vec<Delivery> {
        self.items.lock().unwrap().clone()
    }

    /// Waits until every id of `expected` was received.
    pub async fn wait_for_all(&self, cluster: &Cluster, what: &str, expected: &HashSet<Uuid>) {
        cluster
            .wait_for(what, WAIT, || async {
                let got: HashSet<Uuid> = self.ids().into_iter().collect();
                expected.is_subset(&got).then_some(())
            })
            .await;
    }

    /// Panics unless exactly `expected` was received, each once.
    pub fn assert_exactly(&self, what: &str, expected: &HashSet<Uuid>) {
        let ids = self.ids();
        let mut counts: HashMap<Uuid, usize> = HashMap::new();
        for id in &ids {
            *counts.entry(*id).or_default() += 1;
        }
        let duplicated = counts.values().filter(|&&n| n > 1).count();
        let unexpected = counts.keys().filter(|id| !expected.contains(id)).count();
        let missing = expected
            .iter()
            .filter(|id| !counts.contains_key(id))
            .count();
        assert!(
            duplicated == 0 && unexpected == 0 && missing == 0,
            "{what}: {} received, {} expected: {duplicated} duplicated, {unexpected} unexpected, {missing} missing",
            ids.len(),
            expected.len()
        );
    }

    /// Waits for the stream to end (the relay stopped).
    pub async fn finish(self) -> Vec<Delivery> {
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the subscription ended")
            .expect("the collector task");
        Arc::try_unwrap(self.items)
            .map(|m| m.into_inner().unwrap())
            .unwrap_or_else(|arc| arc.lock().unwrap().clone())
    }
}

/// Waits until `relay` has run `n` more advances than `before` (so anything committed before
/// this call was settled by its cursor).
pub async fn wait_for_advances(cluster: &Cluster, relay: &Relay, n: u64) {
    let before = relay.metrics().advances;
    cluster
        .wait_for("relay advances", WAIT, || async {
            (relay.metrics().advances >= before + n).then_some(())
        })
        .await;
}

/// Creates the login role `name` with what a relay needs (read the outbox tables), so a test can
/// lock the relay out (`set_login(false)`) and let it back in.
pub fn create_relay_role(cluster: &Cluster, name: &str) {
    cluster.psql(
        "postgres",
        &format!(
            "CREATE ROLE {name} LOGIN; \
             GRANT SELECT ON event_outbox, outbox_prune_state TO {name}"
        ),
    );
}

/// Allows or forbids `role` to log in; existing sessions are not affected.
pub fn set_login(cluster: &Cluster, role: &str, login: bool) {
    let what = if login { "LOGIN" } else { "NOLOGIN" };
    cluster.psql("postgres", &format!("ALTER ROLE {role} {what}"));
}

/// Waits until the relay reports it is listening.
pub async fn wait_listening(relay: &Relay) {
    tokio::time::timeout(WAIT, relay.watch_health().wait_for(|h| h.is_listening()))
        .await
        .expect("the relay listens")
        .expect("the relay is running");
}

/// Waits until the relay reports it is reconnecting.
pub async fn wait_reconnecting(relay: &Relay) {
    tokio::time::timeout(
        WAIT,
        relay
            .watch_health()
            .wait_for(|h| matches!(h, pg_outbox_client::Health::Reconnecting { .. })),
    )
    .await
    .expect("the relay reconnects")
    .expect("the relay is running");
}
