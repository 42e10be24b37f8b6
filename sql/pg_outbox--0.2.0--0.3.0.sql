-- pg_outbox 0.2.0 -> 0.3.0
-- * Segments: events go into child tables of event_outbox, one per pg_outbox.segment_interval,
--   which the pruner drops whole once expired. The events already in event_outbox stay there
--   and are deleted as before when they expire: nothing is moved, nothing waits.
-- * outbox_stats().rows_estimate counts the segments' rows too.
\echo Use "ALTER EXTENSION pg_outbox UPDATE TO '0.3.0'" to load this file. \quit

CREATE TABLE outbox_segments (
    name        name        PRIMARY KEY,
    starts_at   timestamptz NOT NULL,
    ends_at     timestamptz NOT NULL,
    CHECK (starts_at < ends_at)
);
REVOKE ALL ON TABLE outbox_segments FROM PUBLIC;

CREATE OR REPLACE FUNCTION outbox_stats(
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
