-- pg_outbox API: the functions that are not generated from Rust, and the privileges.

CREATE FUNCTION outbox_publish(channel text, user_id text, payload jsonb, origin text DEFAULT NULL)
    RETURNS uuid
    VOLATILE PARALLEL UNSAFE
    LANGUAGE c
    AS 'MODULE_PATHNAME', 'outbox_publish';

COMMENT ON FUNCTION outbox_publish(text, text, jsonb, text) IS
    'Insert an event into event_outbox and notify listeners on channel pg_outbox, in the caller''s transaction';

CREATE FUNCTION outbox_stats(
    OUT rows_estimate             bigint,
    OUT oldest_created_at         timestamptz,
    OUT newest_created_at         timestamptz,
    OUT worker_pid                integer,
    OUT worker_database           name,
    OUT worker_state              text,
    OUT last_pruned_at            timestamptz,
    OUT rows_pruned               bigint,
    OUT pruned_through_xid        xid8,
    OUT notification_queue_usage  double precision)
    RETURNS record
    STABLE
    LANGUAGE sql
    -- With its owner's rights: a monitoring role needs only EXECUTE, and sees the workers'
    -- states in pg_stat_activity, which other roles' sessions cannot read; it returns no payload.
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT
        (SELECT sum(n_live_tup)::bigint FROM pg_stat_all_tables
          WHERE relid = '@extschema@.event_outbox'::regclass
             OR relid IN (SELECT inhrelid FROM pg_inherits
                           WHERE inhparent = '@extschema@.event_outbox'::regclass)),
        (SELECT min(created_at) FROM @extschema@.event_outbox),
        (SELECT max(created_at) FROM @extschema@.event_outbox),
        w.pid, w.datname, w.query,
        s.last_pruned_at, s.rows_pruned, s.pruned_through_xid,
        pg_notification_queue_usage()
    FROM @extschema@.outbox_prune_state s
    LEFT JOIN (SELECT pid, datname, query FROM pg_stat_activity
                WHERE backend_type = 'pg_outbox pruner' LIMIT 1) w ON true
$$;

COMMENT ON FUNCTION outbox_stats() IS
    'Outbox size, the pruner''s state and history, and how full the notification queue is';

-- Nothing is granted to PUBLIC: publishing, relaying, pruning and monitoring are granted to
-- roles explicitly (see the README).
REVOKE ALL ON TABLE event_outbox, outbox_segments, outbox_prune_state, outbox_notifier_state FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox_publish(text, text, jsonb, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox_prune(interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox_stats() FROM PUBLIC;

-- The first segments, so that the first events go into one rather than into event_outbox itself;
-- the pruner creates the next ones. The function serves this script alone: declared, called,
-- dropped.
CREATE FUNCTION outbox_create_first_segments() RETURNS void
    VOLATILE PARALLEL UNSAFE
    LANGUAGE c
    AS 'MODULE_PATHNAME', 'outbox_create_first_segments_wrapper';
SELECT outbox_create_first_segments();
DROP FUNCTION outbox_create_first_segments();
