//! Nothing read from the network stops the relay: malformed notifications, unknown versions,
//! events nobody subscribes to, payloads that do not fit the subscriber's type, and
//! notifications for rows that do not exist.

use std::collections::HashSet;
use std::time::Duration;

use pg_outbox_client::{Health, Topic};
use pg_outbox_tests::relay::{publish, relay, Collector};
use pg_outbox_tests::Cluster;

#[derive(serde::Deserialize, Debug)]
#[allow(dead_code)]
struct Chat {
    text: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_counted_and_skipped() {
    // Reference mode: unsealed input is read, not dropped unread as it is where everything is
    // sealed (forgery.rs).
    let cluster = Cluster::builder()
        .setting("pg_outbox.notify_payload", "'reference'")
        .start();
    // No idle sweep during the test: a sweep that passed the fake reference's transaction
    // before its notification was read would rightly treat it as already settled.
    let relay = relay(&cluster, "relay_robust")
        .sweep_interval(Duration::from_secs(600))
        .build()
        .unwrap();
    let chat = Collector::spawn(relay.subscribe_to(Topic::channel("chat")));
    relay.start().await.unwrap();

    let client = cluster.connect("postgres").await;
    // A well-formed reference to a row that does not exist: counted as forged, not invented.
    client
        .batch_execute(
            "SELECT pg_notify('pg_outbox', json_build_object('v', 1, 'id', gen_random_uuid(), \
               'channel', 'chat', 'user_id', 'u1', 'origin', null, \
               'xid', pg_current_xact_id()::text::bigint, 'created_at_us', 0)::text)",
        )
        .await
        .unwrap();
    for payload in ["garbage", r#"{"v":99,"id":"x"}"#, "{}"] {
        client
            .execute("SELECT pg_notify('pg_outbox', $1)", &[&payload])
            .await
            .unwrap();
    }
    publish(&client, "nobody_listens", "u1", r#"{"n":1}"#, None).await;
    let odd = publish(&client, "chat", "u1", r#"{"not":"a chat message"}"#, None).await;
    let good = publish(&client, "chat", "u1", r#"{"text":"hi"}"#, None).await;

    let expected = HashSet::from([odd, good]);
    chat.wait_for_all(&cluster, "the events after the bad input", &expected)
        .await;
    // A last reference makes the relay run one more advance: nothing else comes.
    let last = publish(&client, "chat", "u2", "{}", None).await;
    let expected = HashSet::from([odd, good, last]);
    chat.wait_for_all(&cluster, "the last event", &expected)
        .await;
    chat.assert_exactly("chat", &expected);
    assert_eq!(relay.health(), Health::Listening);

    let items = chat.items();
    let events: Vec<_> = items.iter().filter_map(|d| d.event()).collect();
    assert!(events[0].decode::<Chat>().is_err());
    assert_eq!(events[1].decode::<Chat>().unwrap().text, "hi");
    assert!(chat.gaps().is_empty(), "{:?}", chat.gaps());

    let metrics = relay.metrics();
    assert_eq!(metrics.decode_errors, 3, "{metrics:?}");
    assert_eq!(metrics.forged, 1, "{metrics:?}");
    assert_eq!(metrics.gaps, 0);
    assert_eq!(metrics.delivered, 4); // including the one nobody subscribed to
    relay.shutdown().await;
}
