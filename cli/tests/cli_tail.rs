//! `pg-outbox tail` is a relay: JSON lines for committed events only, filters, status lines on
//! standard error, a reconnect that catches up, and exit status 0 on SIGTERM and SIGINT.

mod support;

use pg_outbox_tests::Cluster;
use support::Running;

fn publish(cluster: &Cluster, sql: &str) -> String {
    cluster.psql("postgres", sql)
}

#[test]
fn tail_prints_committed_events_as_json_lines_and_survives_a_disconnect() {
    let cluster = Cluster::start();
    let db = format!(
        "{} application_name=cli_tail",
        cluster.connection_string("postgres")
    );
    let tail = Running::spawn(&["tail", "--db", &db, "--channel", "chat"]);
    tail.stderr_until("the listening status", |v| v["status"] == "listening");

    publish(
        &cluster,
        "BEGIN; SELECT outbox_publish('chat', 'u1', '{\"n\": 0}'); ROLLBACK",
    );
    publish(
        &cluster,
        "SELECT outbox_publish('other', 'u1', '{\"n\": 1}')",
    );
    let id = publish(
        &cluster,
        "SELECT outbox_publish('chat', 'u2', '{\"n\": 2, \"text\": \"hi\"}', 'replica-a')",
    );
    let line = tail.next_stdout();
    assert_eq!(line["id"], id.as_str());
    assert_eq!(line["channel"], "chat");
    assert_eq!(line["user_id"], "u2");
    assert_eq!(line["payload"], serde_json::json!({"n": 2, "text": "hi"}));
    assert_eq!(line["origin"], "replica-a");
    let created_at = line["created_at"].as_str().expect("created_at is a string");
    assert!(
        created_at.len() > 20 && created_at.ends_with('Z') && created_at.as_bytes()[10] == b'T',
        "RFC 3339: {created_at}"
    );
    let keys: Vec<&String> = line.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 6, "{keys:?}");

    // Its connection is killed: it says so, reconnects, and catches up what committed meanwhile.
    assert!(cluster.terminate_backends("cli_tail") >= 1);
    tail.stderr_until("the reconnecting status", |v| v["status"] == "reconnecting");
    let during = publish(
        &cluster,
        "SELECT outbox_publish('chat', 'u3', '{\"n\": 3}')",
    );
    tail.stderr_until("listening again", |v| v["status"] == "listening");
    assert_eq!(tail.next_stdout()["id"], during.as_str());

    let (status, rest) = tail.signal_and_wait("TERM");
    assert!(status.success(), "exit status on SIGTERM: {status}");
    assert!(rest.is_empty(), "nothing else was published: {rest:?}");
}

#[test]
fn tail_filters_by_user_skips_its_own_origin_and_exits_0_on_sigint() {
    let cluster = Cluster::start();
    let db = cluster.connection_string("postgres");
    let tail = Running::spawn(&["tail", "--db", &db, "--user", "alice", "--instance", "me"]);
    tail.stderr_until("the listening status", |v| v["status"] == "listening");

    publish(&cluster, "SELECT outbox_publish('a', 'bob', '{}')");
    publish(&cluster, "SELECT outbox_publish('a', 'alice', '{}', 'me')");
    let id = publish(&cluster, "SELECT outbox_publish('b', 'alice', '[1, 2]')");
    let line = tail.next_stdout();
    assert_eq!(line["id"], id.as_str());
    assert_eq!(line["origin"], serde_json::Value::Null);

    let (status, rest) = tail.signal_and_wait("INT");
    assert!(status.success(), "exit status on SIGINT: {status}");
    assert!(rest.is_empty(), "{rest:?}");
}

#[test]
fn tail_refuses_a_database_without_the_extension_in_one_line() {
    let cluster = Cluster::builder().create_extension(false).start();
    let output = support::run(
        &["tail", "--db", &cluster.connection_string("postgres")],
        "",
    );
    assert!(!output.status.success());
    let stderr = support::stderr(&output);
    assert!(stderr.contains("CREATE EXTENSION pg_outbox"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn tail_opens_sealed_notifications_with_the_database_key() {
    // The defaults: sealed notifications, and the key the extension made.
    let cluster = Cluster::builder().start();
    let db = cluster.connection_string("postgres");
    let tail = Running::spawn(&["tail", "--db", &db]);
    tail.stderr_until("the listening status", |v| v["status"] == "listening");
    let id = publish(
        &cluster,
        "SELECT outbox_publish('chat', 'u1', '{\"sealed\": true}')",
    );
    let line = tail.next_stdout();
    assert_eq!(line["id"], id.as_str());
    assert_eq!(line["payload"], serde_json::json!({"sealed": true}));
    let (status, _) = tail.signal_and_wait("TERM");
    assert!(status.success(), "exit status on SIGTERM: {status}");
}
