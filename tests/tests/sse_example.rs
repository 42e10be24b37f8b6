//! The SSE example app (`examples/sse`) as a process: it serves its page, publishes through
//! `POST /publish`, refuses a stream without a user, and on SIGTERM (a deploy) ends its streams
//! and exits, so browsers reconnect to another replica.

use std::time::Duration;

use pg_outbox_tests::browser::Replica;
use pg_outbox_tests::{Cluster, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

/// Sends one HTTP/1.1 request and returns the connection, its response still to read.
async fn send(replica: &Replica, request: &str) -> TcpStream {
    let mut connection = TcpStream::connect(replica.address()).await.unwrap();
    connection.write_all(request.as_bytes()).await.unwrap();
    connection
}

/// The whole response of a `Connection: close` request.
async fn request(replica: &Replica, request: &str) -> String {
    let mut connection = send(replica, request).await;
    let mut response = String::new();
    tokio::time::timeout(WAIT, connection.read_to_string(&mut response))
        .await
        .expect("a response")
        .unwrap();
    response
}

fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_serves_publishes_and_ends_its_streams_on_sigterm() {
    let cluster = Cluster::start();
    let mut replica = Replica::start(&cluster.connection_string("postgres"), "example", &[]).await;

    let page = request(
        &replica,
        "GET /?user=u1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(body(&page).contains("new EventSource("), "{page}");

    let no_user = request(
        &replica,
        "GET /events HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(no_user.starts_with("HTTP/1.1 400"), "{no_user}");

    let event = r#"{"channel": "chat", "user_id": "u1", "payload": {"text": "hi"}}"#;
    let published = request(
        &replica,
        &format!(
            "POST /publish HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{event}",
            event.len()
        ),
    )
    .await;
    assert!(published.starts_with("HTTP/1.1 200"), "{published}");
    let answer: serde_json::Value = serde_json::from_str(body(&published)).unwrap();
    let id: Uuid = answer["id"].as_str().unwrap().parse().unwrap();
    let stored = cluster.psql(
        "postgres",
        &format!("SELECT channel || ' ' || user_id || ' ' || payload::text FROM event_outbox WHERE id = '{id}'"),
    );
    assert_eq!(stored, r#"chat u1 {"text": "hi"}"#);

    // The relay's metrics, for Prometheus: the event it delivered, once copied (every second).
    cluster
        .wait_for("the event in /metrics", WAIT, || async {
            let scraped = request(
                &replica,
                "GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            )
            .await;
            assert!(scraped.starts_with("HTTP/1.1 200"), "{scraped}");
            let lines = body(&scraped).lines().map(|line| Ok(line.to_owned()));
            let scrape =
                prometheus_parse::Scrape::parse(lines).expect("the Prometheus text format");
            let value = |name: &str, label: Option<(&str, &str)>| {
                scrape.samples.iter().find_map(|sample| {
                    let labelled = label.is_none_or(|(k, v)| sample.labels.get(k) == Some(v));
                    match sample.value {
                        prometheus_parse::Value::Counter(n) | prometheus_parse::Value::Gauge(n)
                            if sample.metric == name && labelled =>
                        {
                            Some(n)
                        }
                        _ => None,
                    }
                })
            };
            assert_eq!(
                value("pg_outbox_relay_health", Some(("state", "listening"))),
                Some(1.0)
            );
            (value("pg_outbox_relay_events_delivered_total", None) == Some(1.0)).then_some(())
        })
        .await;

    let bad_channel = r#"{"channel": "chat room", "user_id": "u1", "payload": {}}"#;
    let refused = request(
        &replica,
        &format!(
            "POST /publish HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{bad_channel}",
            bad_channel.len()
        ),
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 400"), "{refused}");

    // An open stream, then a deploy: the stream ends and the replica exits.
    let mut stream = send(&replica, "GET /events?user=u1 HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let mut head = vec![0; 1024];
    let read = tokio::time::timeout(WAIT, stream.read(&mut head))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&head[..read]).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/event-stream"), "{head}");
    let status = replica.terminate().await;
    assert!(status.success(), "{status}\n{}", replica.log());
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
        .await
        .expect("the stream ends with the replica")
        .unwrap();
}

/// A deploy sends every browser of a replica to the others at once. A replica that does not
/// accept for a moment (busy, or paused here with SIGSTOP) must still complete every
/// connection's handshake, so no browser waits a second for its SYN to be sent again: with
/// tokio's default backlog of 128, the 129th connection does not complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_fits_the_listen_backlog() {
    let cluster = Cluster::start();
    let mut replica = Replica::start(&cluster.connection_string("postgres"), "storm", &[]).await;
    let pid = replica.pid().expect("the replica runs");
    // What the process may open: its soft limit was raised to its hard one.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let open_files = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .expect("a limit on open files")
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect::<Vec<_>>();
    assert_eq!(
        open_files[0], open_files[1],
        "soft and hard limits:\n{limits}"
    );

    // The kernel caps every backlog at net.core.somaxconn.
    let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let storm = 1000.min(somaxconn);
    assert!(
        storm > 129,
        "net.core.somaxconn is {somaxconn}: too small to tell"
    );
    signal(pid, "-STOP");
    let connects: Vec<_> = (0..storm)
        .map(|_| {
            let address = replica.address();
            tokio::spawn(async move { TcpStream::connect(address).await })
        })
        .collect();
    let mut connections = Vec::with_capacity(storm);
    for connect in connects {
        let connection = tokio::time::timeout(WAIT, connect)
            .await
            .expect("the handshake completes while the replica does not accept")
            .unwrap()
            .expect("connect");
        connections.push(connection);
    }
    signal(pid, "-CONT");
    // The last to arrive is served once the replica accepts again.
    let mut last = connections.pop().unwrap();
    last.write_all(b"GET /?user=u1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut page = String::new();
    tokio::time::timeout(WAIT, last.read_to_string(&mut page))
        .await
        .expect("a response")
        .unwrap();
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    drop(connections);
    assert!(replica.terminate().await.success(), "{}", replica.log());
}

fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

/// `POST /publish` of one event for `user`: the response.
async fn publish(replica: &Replica, user: &str) -> String {
    let event = format!(r#"{{"channel": "chat", "user_id": "{user}", "payload": {{}}}}"#);
    request(
        replica,
        &format!(
            "POST /publish HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{event}",
            event.len()
        ),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_publishes_again_after_a_server_restart() {
    let cluster = Cluster::start();
    let replica = Replica::start(&cluster.connection_string("postgres"), "restart", &[]).await;
    let before = publish(&replica, "u1").await;
    assert!(before.starts_with("HTTP/1.1 200"), "{before}");
    cluster.restart();
    // The first attempts may meet the closed connections; the pool opens new ones.
    let after = cluster
        .wait_for("a publish after the restart", WAIT, || async {
            let response = publish(&replica, "u1").await;
            response.starts_with("HTTP/1.1 200").then_some(response)
        })
        .await;
    let answer: serde_json::Value = serde_json::from_str(body(&after)).unwrap();
    let id: Uuid = answer["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        cluster.psql(
            "postgres",
            &format!("SELECT count(*) FROM event_outbox WHERE id = '{id}'")
        ),
        "1"
    );
}
