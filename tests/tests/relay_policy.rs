//! One relay policy for the live stream and for resumes: a relay that relays some channels and
//! skips its own origin hands a subscription resumed from before the events exactly what a
//! live one gets, whether the events came sealed (inline) or as references, for every kind of topic.

use std::collections::HashSet;

use pg_outbox_client::{Position, Topic};
use pg_outbox_tests::relay::{publish, relay, wait_for_advances, Collector};
use pg_outbox_tests::Cluster;
use tokio_postgres::Client;
use uuid::Uuid;

/// One published event: its id, channel and user.
type Published = (Uuid, &'static str, &'static str);

/// Publishes on every channel, from every origin, to two users; returns the events the relay's
/// policy passes on (channels `chat` and `news`, any origin but `replica-a`).
async fn publish_a_mix(client: &Client) -> Vec<Published> {
    let mut passed = Vec::new();
    for channel in ["chat", "news", "audit"] {
        for origin in [None, Some("replica-a"), Some("replica-b")] {
            for user in ["u1", "u2"] {
                let id = publish(client, channel, user, "{}", origin).await;
                if channel != "audit" && origin != Some("replica-a") {
                    passed.push((id, channel, user));
                }
            }
        }
    }
    passed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_stream_delivers_what_the_live_one_does() {
    let cluster = Cluster::builder()
        // References, and (below) publishers that seal theirs: both kinds of notification.
        .setting("pg_outbox.notify_payload", "'reference'")
        .start();
    let relay = relay(&cluster, "relay_policy")
        .channels(["chat", "news"])
        .instance_id("replica-a")
        .build()
        .unwrap();
    // Each topic, with which of the events the policy passes on it wants.
    type Wants = fn(&Published) -> bool;
    let topics: [(fn() -> Topic, Wants); 3] = [
        (Topic::all, |_| true),
        (|| Topic::all().user("u1"), |(_, _, user)| *user == "u1"),
        (
            || Topic::channel("news"),
            |(_, channel, _)| *channel == "news",
        ),
    ];
    let live: Vec<Collector> = topics
        .iter()
        .map(|(topic, _)| Collector::spawn(relay.subscribe_to(topic())))
        .collect();
    relay.start().await.unwrap();
    let positions: Vec<Position> = topics
        .iter()
        .map(|(topic, _)| relay.subscribe_to(topic()).position().unwrap())
        .collect();

    let client = cluster.connect("postgres").await;
    let mut passed = publish_a_mix(&client).await;
    client
        .batch_execute("SET pg_outbox.notify_payload = 'sealed'")
        .await
        .unwrap();
    passed.extend(publish_a_mix(&client).await);
    assert_eq!(passed.len(), 16);

    let resumed: Vec<Collector> = topics
        .iter()
        .zip(&positions)
        .map(|((topic, _), from)| Collector::spawn(relay.subscribe_from(topic(), from)))
        .collect();
    let expected: Vec<HashSet<Uuid>> = topics
        .iter()
        .map(|(_, wants)| passed.iter().filter(|e| wants(e)).map(|e| e.0).collect())
        .collect();
    for ((live, resumed), expected) in live.iter().zip(&resumed).zip(&expected) {
        live.wait_for_all(&cluster, "the live stream", expected)
            .await;
        resumed
            .wait_for_all(&cluster, "the resumed stream", expected)
            .await;
    }
    // Anything more would have come with the events, or with the advances after them.
    wait_for_advances(&cluster, &relay, 2).await;
    for (n, ((live, resumed), expected)) in live.iter().zip(&resumed).zip(&expected).enumerate() {
        live.assert_exactly(&format!("live stream {n}"), expected);
        resumed.assert_exactly(&format!("resumed stream {n}"), expected);
    }
    assert_eq!(relay.metrics().resets, 0);
    relay.shutdown().await;
}
