//! The SQL API inside one backend: results, every bad input's SQLSTATE, and that a refused call
//! writes nothing.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// Runs `statements` in a subtransaction and returns `SQLSTATE: message` of the error they
    /// raise, or `None` when they succeed; the subtransaction is rolled back either way.
    fn error_of(statements: &[&str]) -> Option<String> {
        Spi::run(
            "CREATE OR REPLACE FUNCTION pg_temp.error_of(statements text[]) RETURNS text
             LANGUAGE plpgsql AS $$
             DECLARE s text;
             BEGIN
                 FOREACH s IN ARRAY statements LOOP EXECUTE s; END LOOP;
                 RAISE EXCEPTION USING ERRCODE = 'ZX001', MESSAGE = 'no error, rolled back';
             EXCEPTION WHEN OTHERS THEN
                 RETURN CASE WHEN SQLSTATE = 'ZX001' THEN NULL ELSE SQLSTATE || ': ' || SQLERRM END;
             END $$",
        )
        .unwrap();
        let statements: Vec<String> = statements.iter().map(|s| (*s).to_owned()).collect();
        Spi::get_one_with_args("SELECT pg_temp.error_of($1)", &[statements.into()]).unwrap()
    }

    fn outbox_rows() -> i64 {
        Spi::get_one("SELECT count(*) FROM event_outbox")
            .unwrap()
            .unwrap()
    }

    /// Asserts that `call` fails with `sqlstate` and a message containing `words`, writing nothing.
    fn assert_refused(call: &str, sqlstate: &str, words: &str) {
        let before = outbox_rows();
        let error = error_of(&[call]).unwrap_or_else(|| panic!("{call} succeeded"));
        assert!(
            error.starts_with(&format!("{sqlstate}: ")) && error.contains(words),
            "{call}: expected {sqlstate} mentioning {words:?}, got {error}"
        );
        assert_eq!(outbox_rows(), before, "{call} wrote a row");
    }

    #[pg_test]
    fn publish_inserts_the_row_and_returns_its_id() {
        let id = Spi::get_one::<pgrx::Uuid>(
            "SELECT outbox_publish('chat.room:1-a', 'user 1', '{\"text\": \"hi\"}', 'replica-a')",
        )
        .unwrap()
        .unwrap();
        let (channel, user_id) = Spi::get_two_with_args::<String, String>(
            "SELECT channel, user_id FROM event_outbox WHERE id = $1",
            &[id.into()],
        )
        .unwrap();
        assert_eq!(channel.as_deref(), Some("chat.room:1-a"));
        assert_eq!(user_id.as_deref(), Some("user 1"));
        let same_transaction = Spi::get_one_with_args::<bool>(
            "SELECT xid = pg_current_xact_id() AND origin = 'replica-a' AND payload = '{\"text\": \"hi\"}'
               AND created_at BETWEEN now() AND clock_timestamp()
             FROM event_outbox WHERE id = $1",
            &[id.into()],
        )
        .unwrap();
        assert_eq!(same_transaction, Some(true));
    }

    #[pg_test]
    fn ids_increase_within_a_transaction() {
        let ordered = Spi::get_one::<bool>(
            "WITH published AS (
                 SELECT n, outbox_publish('c', 'u', jsonb_build_object('n', n)) AS id
                 FROM generate_series(1, 50) n)
             SELECT bool_and(ordered) FROM (
                 SELECT id > lag(id) OVER (ORDER BY n) AS ordered FROM published) o",
        )
        .unwrap();
        assert_eq!(ordered, Some(true));
    }

    #[pg_test]
    fn null_arguments_are_refused_with_22004() {
        assert_refused(
            "SELECT outbox_publish(NULL, 'u', '{}')",
            "22004",
            "channel must not be NULL",
        );
        assert_refused(
            "SELECT outbox_publish('c', NULL, '{}')",
            "22004",
            "user_id must not be NULL",
        );
        assert_refused(
            "SELECT outbox_publish('c', 'u', NULL)",
            "22004",
            "payload must not be NULL",
        );
        // A NULL origin is the default: no origin.
        assert_eq!(
            error_of(&["SELECT outbox_publish('c', 'u', '{}', NULL)"]),
            None
        );
    }

    #[pg_test]
    fn bad_channels_and_user_ids_are_refused_with_22023() {
        assert_refused(
            "SELECT outbox_publish('', 'u', '{}')",
            "22023",
            "channel must not be empty",
        );
        assert_refused(
            "SELECT outbox_publish('c', '', '{}')",
            "22023",
            "user_id must not be empty",
        );
        let long_channel = format!("SELECT outbox_publish('{}', 'u', '{{}}')", "c".repeat(64));
        assert_refused(
            &long_channel,
            "22023",
            "64 bytes long, longer than the 63 bytes allowed",
        );
        // 63 bytes is fine.
        let longest = format!("SELECT outbox_publish('{}', 'u', '{{}}')", "c".repeat(63));
        assert_eq!(error_of(&[&longest]), None);
        for bad in [
            "chat room",
            "chat/room",
            "é",
            "chat'room",
            "chat\nroom",
            "a,b",
        ] {
            let call = format!(
                "SELECT outbox_publish({}, 'u', '{{}}')",
                pgrx::spi::quote_literal(bad)
            );
            assert_refused(
                &call,
                "22023",
                "use only letters, digits, '_', '.', ':' and '-'",
            );
        }
        assert_refused(
            "SELECT outbox_publish('c', 'u', '{}', 'replica a')",
            "22023",
            "origin \"replica a\" contains ' '",
        );
        let long_user = format!("SELECT outbox_publish('c', '{}', '{{}}')", "u".repeat(1025));
        assert_refused(&long_user, "22023", "user_id is 1025 bytes long");
        // User ids are opaque text: anything non-empty up to 1024 bytes.
        assert_eq!(
            error_of(&["SELECT outbox_publish('c', 'ü \"quoted\" \t id', '{}')"]),
            None
        );
    }

    #[pg_test]
    fn oversized_payloads_are_refused_with_54000() {
        assert_refused(
            "SET LOCAL pg_outbox.max_payload_bytes = '1kB';
             SELECT outbox_publish('c', 'u', jsonb_build_object('blob', repeat('x', 2000)))",
            "54000",
            "over pg_outbox.max_payload_bytes (1024 bytes)",
        );
        // The default, 1MB, takes a 900 kB payload.
        assert_eq!(
            error_of(&[
                "SELECT outbox_publish('c', 'u', jsonb_build_object('blob', repeat('x', 900000)))"
            ]),
            None
        );
    }

    #[pg_test]
    fn read_only_transactions_are_refused_with_25006() {
        let before = outbox_rows();
        let error = error_of(&[
            "SET LOCAL transaction_read_only = on",
            "SELECT outbox_publish('c', 'u', '{}')",
        ])
        .expect("refused");
        assert!(
            error.starts_with("25006: ")
                && error.contains("cannot publish in a read-only transaction"),
            "{error}"
        );
        assert_eq!(outbox_rows(), before);
    }

    #[pg_test]
    fn prune_deletes_only_older_rows_and_records_them() {
        Spi::run(
            "INSERT INTO event_outbox (id, channel, user_id, payload, created_at)
             SELECT gen_random_uuid(), 'c', 'u', '{}', clock_timestamp() - interval '2 hours'
             FROM generate_series(1, 25)",
        )
        .unwrap();
        Spi::run("SELECT outbox_publish('c', 'u', '{}')").unwrap();
        assert_eq!(
            Spi::get_one::<i64>("SELECT outbox_prune()").unwrap(),
            Some(25)
        );
        assert_eq!(outbox_rows(), 1);
        assert_eq!(
            Spi::get_one::<i64>("SELECT outbox_prune(interval '1 hour')").unwrap(),
            Some(0)
        );
        assert_eq!(
            Spi::get_one::<i64>("SELECT outbox_prune(interval '0')").unwrap(),
            Some(1)
        );
        let recorded = Spi::get_one::<bool>(
            "SELECT rows_pruned = 26 AND pruned_through_xid = pg_current_xact_id()
               AND last_pruned_at IS NOT NULL
             FROM outbox_prune_state",
        )
        .unwrap();
        assert_eq!(recorded, Some(true));
        assert_refused(
            "SELECT outbox_prune(interval '-1 second')",
            "22023",
            "older_than must not be negative",
        );
    }

    #[pg_test]
    fn stats_report_the_outbox() {
        Spi::run("SELECT outbox_publish('c', 'u', '{}') FROM generate_series(1, 3)").unwrap();
        let consistent = Spi::get_one::<bool>(
            "SELECT oldest_created_at <= newest_created_at
                AND notification_queue_usage >= 0 AND rows_pruned = 0
             FROM outbox_stats()",
        )
        .unwrap();
        assert_eq!(consistent, Some(true));
    }

    #[pg_test]
    fn stats_estimate_the_rows_of_event_outbox_and_its_segments() {
        // The current segment, so that published events go into it.
        Spi::run("SELECT outbox_prune()").unwrap();
        // A transaction's row counts reach pg_stat_all_tables when it ends, and a pg_test's
        // never does. ANALYZE reports its count at once, but leaves out the rows the running
        // transaction counted itself (they are reported at its end): so the rows are written
        // uncounted, with track_counts off, and ANALYZE alone counts them.
        Spi::run("SET LOCAL track_counts = off").unwrap();
        Spi::run("SELECT outbox_publish('c', 'u', '{}') FROM generate_series(1, 3)").unwrap();
        Spi::run(
            "INSERT INTO event_outbox (id, channel, user_id, payload)
             SELECT gen_random_uuid(), 'c', 'u', '{}' FROM generate_series(1, 2)",
        )
        .unwrap();
        Spi::run("SET LOCAL track_counts = on").unwrap();
        let tables = Spi::get_one::<Vec<String>>(
            "SELECT array_agg(relid::regclass::text) FROM (
                 SELECT 'event_outbox'::regclass::oid AS relid
                 UNION ALL
                 SELECT inhrelid FROM pg_inherits WHERE inhparent = 'event_outbox'::regclass) tree",
        )
        .unwrap()
        .unwrap_or_default();
        // ANALYZE of event_outbox reports its own rows only: each segment is analyzed too.
        for table in &tables {
            Spi::run(&format!("ANALYZE {table}")).unwrap();
        }
        // Read the statistics afresh, not as this transaction may have cached them.
        Spi::run("SELECT pg_stat_clear_snapshot()").unwrap();
        let in_segments = Spi::get_one::<i64>(
            "SELECT count(*) FROM event_outbox WHERE tableoid <> 'event_outbox'::regclass",
        )
        .unwrap();
        assert_eq!(
            in_segments,
            Some(3),
            "the published events are in a segment"
        );
        let estimate = Spi::get_one::<i64>("SELECT rows_estimate FROM outbox_stats()").unwrap();
        assert_eq!(
            estimate,
            Some(5),
            "event_outbox's own 2 rows and its segments' 3 (tables {tables:?})"
        );
    }

    #[pg_test]
    fn public_has_no_privileges() {
        let granted = Spi::get_one::<bool>(
            "SELECT has_table_privilege('public', 'event_outbox', 'SELECT')
                 OR has_table_privilege('public', 'event_outbox', 'INSERT')
                 OR has_function_privilege('public', 'outbox_publish(text, text, jsonb, text)', 'EXECUTE')
                 OR has_function_privilege('public', 'outbox_prune(interval)', 'EXECUTE')
                 OR has_function_privilege('public', 'outbox_stats()', 'EXECUTE')",
        )
        .unwrap();
        assert_eq!(granted, Some(false));
    }
}
