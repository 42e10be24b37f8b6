//! `pg-outbox doctor` passes a healthy set-up and explains, with a non-zero exit, a missing
//! extension, a library not preloaded, a role without privileges, a database without a seal
//! key, a standby, and a pooler in transaction mode.

mod support;

use pg_outbox_tests::{Cluster, Edition, WAIT};
use support::{run, stderr, stdout};

fn doctor(db: &str) -> (bool, String) {
    let output = run(&["doctor", "--db", db, "--listen-timeout", "3s"], "");
    assert!(stderr(&output).is_empty(), "{}", stderr(&output));
    (output.status.success(), stdout(&output))
}

fn line<'a>(report: &'a str, level: &str, words: &str) -> Option<&'a str> {
    report
        .lines()
        .find(|l| l.starts_with(level) && l.contains(words))
}

#[test]
fn a_healthy_set_up_passes() {
    let cluster = Cluster::start();
    let (ok, report) = doctor(&cluster.connection_string("postgres"));
    assert!(ok, "{report}");
    for words in [
        "a primary",
        "LISTEN holds",
        "is created in schema public",
        "preloaded",
        "the pruner runs in this database",
        "may publish, relay, monitor, prune by hand",
        "sealed with the database's key",
        "notification queue",
    ] {
        assert!(
            line(&report, "ok", words).is_some(),
            "no ok line for {words:?}:\n{report}"
        );
    }
    assert!(report.contains("0 problem(s), 0 warning(s)"), "{report}");
}

#[test]
fn problems_are_explained_and_fail() {
    let cluster = Cluster::builder()
        .preload(false)
        .create_extension(false)
        .start();
    let (ok, report) = doctor(&cluster.connection_string("postgres"));
    assert!(!ok, "{report}");
    assert!(
        line(&report, "FAIL", "not created in database").is_some(),
        "{report}"
    );
    assert!(report.contains("CREATE EXTENSION pg_outbox"), "{report}");
    assert!(
        line(&report, "warn", "shared_preload_libraries").is_some(),
        "{report}"
    );

    // Created, but nobody prunes, and a role that may do nothing.
    cluster.psql(
        "postgres",
        "CREATE EXTENSION pg_outbox; CREATE ROLE nobody LOGIN",
    );
    let (ok, report) = doctor(&cluster.connection_string("postgres"));
    assert!(!ok, "{report}");
    assert!(
        line(&report, "FAIL", "no pruner worker serves this database").is_some(),
        "{report}"
    );
    let as_nobody = format!(
        "host={} port={} user=nobody dbname=postgres",
        cluster.root().display(),
        cluster.port()
    );
    let (ok, report) = doctor(&as_nobody);
    assert!(!ok, "{report}");
    assert!(
        line(&report, "FAIL", "may neither publish, relay").is_some(),
        "{report}"
    );
    assert!(
        report.contains("GRANT SELECT ON public.event_outbox"),
        "{report}"
    );

    // Pruned by hand: a warning only.
    cluster.psql("postgres", "SELECT outbox_prune()");
    let (ok, report) = doctor(&cluster.connection_string("postgres"));
    assert!(ok, "{report}");
    assert!(
        line(&report, "warn", "pruned by hand").is_some(),
        "{report}"
    );

    // No seal key: every publish would fail.
    cluster.psql("postgres", "DELETE FROM outbox_seal_keys");
    let (ok, report) = doctor(&cluster.connection_string("postgres"));
    assert!(!ok, "{report}");
    assert!(line(&report, "FAIL", "holds no key").is_some(), "{report}");
    assert!(report.contains("outbox_rotate_seal_key()"), "{report}");
}

#[test]
fn the_sql_edition_is_recognised_with_what_prunes_it() {
    let cluster = Cluster::builder().edition(Edition::Sql).start();
    let db = cluster.connection_string("postgres");
    let (ok, report) = doctor(&db);
    assert!(ok, "{report}");
    assert!(
        line(&report, "ok", "pg_outbox_sql 0.6.0, the SQL edition").is_some(),
        "{report}"
    );
    assert!(
        line(&report, "warn", "nothing pruned this database").is_some(),
        "{report}"
    );
    assert!(report.contains("cron.schedule"), "{report}");
    assert!(
        !report.contains("shared_preload_libraries"),
        "no worker is expected: {report}"
    );
    cluster.psql("postgres", "SELECT outbox_prune()");
    let (ok, report) = doctor(&db);
    assert!(ok, "{report}");
    assert!(
        line(&report, "ok", "pruned in the last day").is_some(),
        "{report}"
    );
    assert!(report.contains("0 problem(s), 0 warning(s)"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_and_a_transaction_pooler_fail() {
    let cluster = Cluster::start();
    let standby = cluster.standby();
    let (ok, report) = doctor(&standby.connection_string("postgres"));
    assert!(!ok, "{report}");
    assert!(line(&report, "FAIL", "hot standby").is_some(), "{report}");
    assert!(
        report.contains("target_session_attrs=read-write"),
        "{report}"
    );

    let bouncer = cluster.pgbouncer("transaction").await;
    let port = bouncer.config().get_ports()[0];
    let (ok, report) = doctor(&format!("postgresql://postgres@127.0.0.1:{port}/postgres"));
    assert!(!ok, "{report}");
    assert!(
        line(&report, "FAIL", "transaction mode").is_some(),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_mode_is_checked_against_the_notifier() {
    let cluster = Cluster::builder()
        .setting("pg_outbox.notify_mode", "'worker'")
        .start();
    // The notifier started before CREATE EXTENSION: a publish wakes it to find the extension.
    cluster.psql("postgres", "SELECT outbox_publish('c', 'u', '{}')");
    let activity = "SELECT query FROM pg_stat_activity WHERE backend_type = 'pg_outbox notifier'";
    cluster
        .wait_for("the notifier to become idle", WAIT, || async {
            cluster
                .psql("postgres", activity)
                .starts_with("idle")
                .then_some(())
        })
        .await;
    let (ok, report) = doctor(&cluster.connection_string("postgres"));
    assert!(ok, "{report}");
    assert!(
        line(&report, "ok", "the notifier serves this database").is_some(),
        "{report}"
    );

    // Elsewhere the notifier does not serve: publishers fall back to their own NOTIFY.
    cluster.psql("postgres", "CREATE DATABASE other");
    cluster.psql("other", "CREATE EXTENSION pg_outbox");
    let (_, report) = doctor(&cluster.connection_string("other"));
    assert!(
        line(&report, "warn", "the notifier serves database \"postgres\"").is_some(),
        "{report}"
    );
}
