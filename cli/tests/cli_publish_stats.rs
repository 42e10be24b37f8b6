//! `pg-outbox publish` (arguments, standard input, one transaction, errors in one line) and
//! `pg-outbox stats` (table and JSON).

mod support;

use pg_outbox_tests::Cluster;
use support::{run, stderr, stdout};

fn ids(output: &std::process::Output) -> Vec<String> {
    stdout(output).lines().map(str::to_owned).collect()
}

#[test]
fn publish_from_arguments_and_stdin_prints_the_ids() {
    let cluster = Cluster::start();
    let db = cluster.connection_string("postgres");

    let output = run(
        &[
            "publish",
            "--db",
            &db,
            "--channel",
            "chat",
            "--user",
            "u1",
            "--origin",
            "cli",
            r#"{"n":1}"#,
            r#"{"n":2}"#,
        ],
        "",
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let from_args = ids(&output);
    assert_eq!(from_args.len(), 2);
    let row = cluster.psql(
        "postgres",
        &format!(
            "SELECT channel || ' ' || user_id || ' ' || origin || ' ' || payload::text \
             FROM event_outbox WHERE id = '{}'",
            from_args[1]
        ),
    );
    assert_eq!(row, r#"chat u1 cli {"n": 2}"#);

    let output = run(
        &[
            "publish",
            "--db",
            &db,
            "--channel",
            "chat",
            "--user",
            "u2",
            "-",
        ],
        "{\"line\":1}\n\n[\"line\",3]\n",
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let from_stdin = ids(&output);
    assert_eq!(from_stdin.len(), 2);
    assert_eq!(
        cluster.psql(
            "postgres",
            "SELECT count(*) FROM event_outbox WHERE user_id = 'u2' AND origin IS NULL"
        ),
        "2"
    );
}

#[test]
fn publish_errors_are_one_line_with_the_fix() {
    let cluster = Cluster::start();
    let db = cluster.connection_string("postgres");

    // Not JSON, on line 2: the first line committed on its own; in one transaction nothing.
    let output = run(
        &["publish", "--db", &db, "--channel", "c", "--user", "u"],
        "{\"ok\":true}\nnot json\n",
    );
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("line 2 is not JSON"),
        "{}",
        stderr(&output)
    );
    assert_eq!(
        stderr(&output).trim().lines().count(),
        1,
        "{}",
        stderr(&output)
    );
    assert_eq!(ids(&output).len(), 1);
    let output = run(
        &[
            "publish",
            "--db",
            &db,
            "--channel",
            "one",
            "--user",
            "u",
            "--single-transaction",
        ],
        "{\"ok\":true}\nnot json\n",
    );
    assert!(!output.status.success());
    assert!(
        ids(&output).is_empty(),
        "ids of a rolled-back transaction were printed"
    );
    assert_eq!(
        cluster.psql(
            "postgres",
            "SELECT count(*) FROM event_outbox WHERE channel = 'one'"
        ),
        "0"
    );

    // The server's refusal, with its SQLSTATE.
    let output = run(
        &[
            "publish",
            "--db",
            &db,
            "--channel",
            "chat room",
            "--user",
            "u",
            "{}",
        ],
        "",
    );
    assert!(!output.status.success());
    let said = stderr(&output);
    assert!(
        said.contains("22023") && said.contains("argument 1"),
        "{said}"
    );

    // The wrong schema names the fix.
    let output = run(
        &[
            "publish",
            "--db",
            &db,
            "--schema",
            "nowhere",
            "--channel",
            "c",
            "--user",
            "u",
            "{}",
        ],
        "",
    );
    assert!(!output.status.success());
    assert!(stderr(&output).contains("--schema"), "{}", stderr(&output));
}

#[test]
fn stats_prints_a_table_or_json() {
    let cluster = Cluster::start();
    let db = cluster.connection_string("postgres");
    cluster.psql("postgres", "SELECT outbox_publish('c', 'u', '{}')");

    let output = run(&["stats", "--db", &db, "--json"], "");
    assert!(output.status.success(), "{}", stderr(&output));
    let stats: serde_json::Value = serde_json::from_str(stdout(&output).trim()).expect("JSON");
    for key in [
        "rows_estimate",
        "oldest_created_at",
        "worker_pid",
        "worker_state",
        "last_pruned_at",
        "notification_queue_usage",
    ] {
        assert!(stats.get(key).is_some(), "{key} missing from {stats}");
    }
    assert!(stats["worker_pid"].is_number(), "the pruner runs: {stats}");

    let output = run(&["stats", "--db", &db], "");
    assert!(output.status.success(), "{}", stderr(&output));
    let table = stdout(&output);
    assert_eq!(table.lines().count(), 10, "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("worker_database") && l.contains("postgres")),
        "{table}"
    );
}
