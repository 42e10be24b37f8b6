-- pg_outbox 0.5.0 -> 0.6.0
-- * The database records the runs of the server its history went through (outbox_runs), with
--   where each one's transaction ids begin, so that any relay resumes a position issued on an
--   earlier run exactly (a relay of 0.5.0 could only carry over positions of runs it had lived
--   through itself). Publishers record the run before its first event, through
--   outbox_record_run(); relays read the history through outbox_server_runs().
-- * The run in progress is recorded without a floor: it may have published already. Positions
--   of runs before it are carried over by the relays that lived through them, as in 0.5.0.
-- * Rows are indexed by (user_id, xid), so that a resume reads what its user missed; on
--   event_outbox and each segment (later segments copy it). Building it holds publishers for
--   as long as it takes on the rows the outbox keeps.
\echo Use "ALTER EXTENSION pg_outbox UPDATE TO '0.6.0'" to load this file. \quit

-- The runs of the server that this database's history went through, so that any relay can tell
-- what a position issued on one of them saw (client/src/history.rs). A run is the server from a
-- start, or a promotion, to its stop: after a crash, a failover or a restore, transaction ids of
-- the run before may be handed out again, to other transactions. Recorded by outbox_record_run()
-- before the first event of each session commits, and by relays when they connect: a run may
-- have a row per session that recorded it, and its floor is the least of theirs (rows are
-- inserted, never locked or updated, so that no session waits for another to commit).
CREATE TABLE outbox_runs (
    system_identifier   text        NOT NULL,
    timeline            text        NOT NULL,
    started_at          timestamptz NOT NULL,
    -- Where the run's transaction ids begin, as this row's recorder saw it: every event that
    -- it, or any session that found its row, committed in the run has an xid at or above it,
    -- and every event of an earlier run that this history holds, one below it (but one of a
    -- transaction prepared before the run and committed in it). NULL for the run recorded by
    -- the update to 0.6.0, which may have published before it was recorded.
    floor_xid           xid8,
    recorded_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_runs_run_idx ON outbox_runs (system_identifier, timeline, started_at);

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

REVOKE ALL ON TABLE outbox_runs FROM PUBLIC;

INSERT INTO outbox_runs (system_identifier, timeline, started_at, floor_xid)
VALUES ((SELECT system_identifier::text FROM pg_control_system()),
        substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8), pg_postmaster_start_time(), NULL);

CREATE INDEX event_outbox_user_id_xid_idx ON event_outbox (user_id, xid);
DO $$
DECLARE
    segment name;
BEGIN
    FOR segment IN SELECT s.name FROM @extschema@.outbox_segments s LOOP
        EXECUTE format('CREATE INDEX ON @extschema@.%I (user_id, xid)', segment);
    END LOOP;
END
$$;
