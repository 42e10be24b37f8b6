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

CREATE FUNCTION outbox_rotate_seal_key(grace interval DEFAULT '10 minutes')
    RETURNS timestamptz
    VOLATILE PARALLEL UNSAFE
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    retired_at timestamptz := now() + grace;
BEGIN
    IF grace IS NULL OR grace < interval '0' THEN
        RAISE EXCEPTION 'outbox_rotate_seal_key: grace must be zero or more, not %', grace
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Give relays time to read the new key: the default, 10 minutes, is plenty.';
    END IF;
    DELETE FROM @extschema@.outbox_seal_keys WHERE expires_at <= now();
    UPDATE @extschema@.outbox_seal_keys SET expires_at = retired_at WHERE expires_at IS NULL;
    -- 32 bytes from three random UUIDs (366 random bits, from the server's strong random source).
    INSERT INTO @extschema@.outbox_seal_keys (key)
    VALUES (sha256(uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid())
                   || uuid_send(gen_random_uuid())));
    RETURN retired_at;
END
$$;

COMMENT ON FUNCTION outbox_rotate_seal_key(interval) IS
    'Seal notifications with a new random key from now on; relays still open the previous one until the returned time';

-- Every change to the keys invalidates the table's relcache entry, which tells every backend
-- to read the current key again.
CREATE FUNCTION outbox_seal_keys_changed() RETURNS trigger
    LANGUAGE c
    AS 'MODULE_PATHNAME', 'outbox_seal_keys_changed';
CREATE TRIGGER outbox_seal_keys_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON outbox_seal_keys
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_seal_keys_changed();

-- Events deleted by hand (DELETE FROM event_outbox, which reaches the segments too, or TRUNCATE)
-- are recorded as pruned, as the pruner records its own: a relay that had not read them reports
-- them lost (Gap::Missing, Gap::Pruned) rather than counting their notifications as forged.
CREATE FUNCTION outbox_record_deleted() RETURNS trigger
    VOLATILE PARALLEL UNSAFE
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        -- Which rows went is not known: every transaction that has ended may have lost some.
        UPDATE @extschema@.outbox_prune_state SET pruned_through_xid = greatest(pruned_through_xid,
            (pg_snapshot_xmax(pg_current_snapshot())::text::bigint - 1)::text::xid8);
    ELSE
        UPDATE @extschema@.outbox_prune_state
           SET pruned_through_xid = greatest(pruned_through_xid,
                   (SELECT xid FROM gone ORDER BY xid DESC LIMIT 1))
         WHERE EXISTS (SELECT FROM gone);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER outbox_deleted
    AFTER DELETE ON event_outbox REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_record_deleted();
CREATE TRIGGER outbox_truncated
    AFTER TRUNCATE ON event_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_record_deleted();
REVOKE ALL ON FUNCTION outbox_record_deleted() FROM PUBLIC;

-- Records the run the server is in (see outbox_runs), unless a committed transaction that began
-- before this one did; tells whether one did. Each session's first event calls it first, so no
-- event of a run commits before the run is recorded, and the floor it records is exact:
-- * every event of the session is at or above it: this transaction's xid is. So is every event
--   of a session that found this row committed: its transaction either got its xid after this
--   snapshot was taken (so at or above its xmax), or was running then (so in it, at or above
--   the least xid running). It cannot have ended before: this row commits after the snapshot.
--   Prepared transactions are passed over: one prepared while this one runs published
--   nothing in the run, or it would have found or inserted a row of its own.
-- * every event of an earlier run below it: the server hands out xids, after a restart, a
--   crash or a promotion, from past every one its history holds, so every xid running or to
--   come in this run is past them, but those of transactions prepared before the run began.
-- A row this transaction inserted has its start time as recorded_at, so it does not count
-- until it is committed, and the next call records the run again if this one rolls back.
-- SECURITY DEFINER: publishers and relays record the run without a grant on outbox_runs, and
-- what it records is the truth, whoever asks.
CREATE FUNCTION outbox_record_run() RETURNS boolean
    VOLATILE SECURITY DEFINER PARALLEL UNSAFE
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    run_identifier  text := (SELECT system_identifier::text FROM pg_control_system());
    run_timeline    text := substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8);
    run_started     timestamptz := pg_postmaster_start_time();
    snapshot        pg_snapshot;
BEGIN
    IF EXISTS (SELECT FROM @extschema@.outbox_runs r
               WHERE (r.system_identifier, r.timeline, r.started_at)
                     = (run_identifier, run_timeline, run_started)
                 AND r.recorded_at < now()) THEN
        RETURN true;
    END IF;
    snapshot := pg_current_snapshot();
    INSERT INTO @extschema@.outbox_runs (system_identifier, timeline, started_at, floor_xid)
    VALUES (run_identifier, run_timeline, run_started,
            least(pg_current_xact_id(), pg_snapshot_xmax(snapshot),
                  (SELECT min(x) FROM pg_snapshot_xip(snapshot) x
                   WHERE NOT EXISTS (SELECT FROM pg_prepared_xacts p
                                     WHERE p.transaction::text = (x::text::numeric % 4294967296)::text))));
    RETURN false;
END
$$;

COMMENT ON FUNCTION outbox_record_run() IS
    'Record the server run this database is in, for relays to resume positions of earlier runs; true if it was recorded already';

-- What relays read when they reach a run of the server: the runs this database's history went
-- through, oldest first, each with the least floor recorded (none if one row has none), after
-- recording the current one unless the transaction is read-only. Nothing in it is secret (any
-- role may read the server's identifier, timeline, start time and transaction ids).
CREATE FUNCTION outbox_server_runs()
    RETURNS TABLE (system_identifier text, timeline text, started_at timestamptz, floor_xid xid8)
    VOLATILE SECURITY DEFINER PARALLEL UNSAFE
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF current_setting('transaction_read_only') = 'off' THEN
        PERFORM @extschema@.outbox_record_run();
    END IF;
    RETURN QUERY
        SELECT r.system_identifier, r.timeline, r.started_at,
               CASE WHEN bool_or(r.floor_xid IS NULL) THEN NULL ELSE min(r.floor_xid) END
        FROM @extschema@.outbox_runs r
        GROUP BY r.system_identifier, r.timeline, r.started_at
        ORDER BY 4 NULLS FIRST, min(r.recorded_at);
END
$$;

COMMENT ON FUNCTION outbox_server_runs() IS
    'The server runs this database went through, oldest first, with where each one''s transaction ids begin';

-- Nothing is granted to PUBLIC: publishing, relaying, pruning and monitoring are granted to
-- roles explicitly (see the README).
REVOKE ALL ON TABLE event_outbox, outbox_segments, outbox_prune_state, outbox_notifier_state,
    outbox_seal_keys, outbox_runs FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox_publish(text, text, jsonb, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox_prune(interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox_stats() FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox_rotate_seal_key(interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox_seal_keys_changed() FROM PUBLIC;
-- outbox_relay_keys() answers exactly the roles that may read event_outbox.payload and refuses
-- the others itself: a relay's role needs no grant beyond SELECT on event_outbox.
-- outbox_record_run() and outbox_server_runs() keep PUBLIC's EXECUTE (see above).

-- The first key.
SELECT outbox_rotate_seal_key();

-- The run the extension is created in: no event of it has committed yet.
SELECT outbox_record_run();

-- The first segments, so that the first events go into one rather than into event_outbox itself;
-- the pruner creates the next ones. The function serves this script alone: declared, called,
-- dropped.
CREATE FUNCTION outbox_create_first_segments() RETURNS void
    VOLATILE PARALLEL UNSAFE
    LANGUAGE c
    AS 'MODULE_PATHNAME', 'outbox_create_first_segments_wrapper';
SELECT outbox_create_first_segments();
DROP FUNCTION outbox_create_first_segments();
