//! pg_dump, then a restore into another database: the extension comes back working, with an
//! empty outbox and fresh worker positions, since every row of its tables holds transaction ids
//! of the cluster it was written in.

use pg_outbox_tests::Cluster;

#[test]
fn a_dump_restores_without_errors_into_an_empty_working_outbox() {
    let cluster = Cluster::builder()
        .setting("pg_outbox.notify_mode", "'worker'")
        .start();
    cluster.psql(
        "postgres",
        "SELECT outbox_publish('chat', 'u1', jsonb_build_object('n', n)) FROM generate_series(1, 5) n",
    );
    cluster.psql("postgres", "SELECT outbox_prune('0 seconds')");

    let dump = cluster.pg_dump("postgres");
    for table in [
        "event_outbox",
        "outbox_prune_state",
        "outbox_notifier_state",
    ] {
        assert!(
            !dump.contains(&format!("COPY public.{table} ")),
            "the dump carries the rows of {table}"
        );
    }
    cluster.psql("postgres", "CREATE DATABASE restored");
    // Stops at the first error: the state tables' single rows used to collide with the ones
    // CREATE EXTENSION inserts.
    cluster.psql_script("restored", &dump);

    let counts = cluster.psql(
        "restored",
        "SELECT (SELECT count(*) FROM event_outbox) || ' ' || \
                (SELECT count(*) FROM outbox_prune_state) || ' ' || \
                (SELECT rows_pruned FROM outbox_prune_state) || ' ' || \
                (SELECT count(*) FROM outbox_notifier_state)",
    );
    assert_eq!(counts, "0 1 0 1");
    cluster.psql("restored", "SELECT outbox_publish('chat', 'u1', '{}')");
    assert_eq!(
        cluster.psql("restored", "SELECT count(*) FROM event_outbox"),
        "1"
    );
}
