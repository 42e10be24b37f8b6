//! Subscriptions by channel and user see only their own events.

use std::collections::HashSet;

use pg_outbox_client::Topic;
use pg_outbox_tests::relay::{publish, relay, wait_for_advances, Collector};
use pg_outbox_tests::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_subscriptions_see_only_their_user() {
    let cluster = Cluster::start();
    let relay = relay(&cluster, "relay_users").build().unwrap();
    let u1 = Collector::spawn(relay.subscribe_to(Topic::channel("chat").user("u1")));
    let u2 = Collector::spawn(relay.subscribe_to(Topic::channel("chat").user("u2")));
    let chat = Collector::spawn(relay.subscribe_to(Topic::channel("chat")));
    let other = Collector::spawn(relay.subscribe_to(Topic::channel("other")));
    relay.start().await.unwrap();

    let client = cluster.connect("postgres").await;
    let mut sent: Vec<(&str, &str, uuid::Uuid)> = Vec::new();
    for (channel, user) in [
        ("chat", "u1"),
        ("chat", "u2"),
        ("other", "u1"),
        ("chat", "u1"),
        ("chat", "u3"),
        ("chat", "u2"),
        ("chat", "u1"),
    ] {
        sent.push((
            channel,
            user,
            publish(&client, channel, user, "{}", None).await,
        ));
    }
    let select = |f: &dyn Fn(&str, &str) -> bool| -> HashSet<uuid::Uuid> {
        sent.iter()
            .filter(|(c, u, _)| f(c, u))
            .map(|(_, _, id)| *id)
            .collect()
    };
    let cases = [
        (&u1, select(&|c, u| c == "chat" && u == "u1")),
        (&u2, select(&|c, u| c == "chat" && u == "u2")),
        (&chat, select(&|c, _| c == "chat")),
        (&other, select(&|c, _| c == "other")),
    ];
    for (collector, expected) in &cases {
        collector
            .wait_for_all(&cluster, "the subscription's events", expected)
            .await;
    }
    wait_for_advances(&cluster, &relay, 2).await;
    for (collector, expected) in &cases {
        collector.assert_exactly("subscription", expected);
    }
    assert_eq!(cases[0].1.len(), 3);
    relay.shutdown().await;
}
