-- pg_outbox schema: the outbox table and the pruner's record.
-- Created in the schema given to CREATE EXTENSION (default: the first schema in search_path).

-- One row per published event. Rows are only ever inserted (by outbox_publish) and deleted (by the
-- pruner); never updated. Most rows live in the table's segments, its inheritance children
-- (see outbox_segments), which a query of event_outbox reads too.
CREATE TABLE event_outbox (
    -- UUIDv7: time-ordered, and increasing within one publishing backend, so (xid, id) orders
    -- the events of one transaction as they were published.
    id          uuid        PRIMARY KEY,
    channel     text        NOT NULL,
    user_id     text        NOT NULL,
    payload     jsonb       NOT NULL,
    -- The publishing replica's instance id, so a relay can skip its own events.
    origin      text,
    -- The database clock when the event was published; pruning compares it with retention.
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- The publishing top-level transaction. A catch-up reads the rows whose xid is visible in
    -- a new snapshot and was not in the previous one: exact even when transactions commit out
    -- of id order, unlike "id greater than the last one seen".
    xid         xid8        NOT NULL DEFAULT pg_current_xact_id(),
    -- True when the publishing transaction did not NOTIFY (pg_outbox.notify_mode = 'worker') and
    -- left the notification to the notifier worker.
    notify_deferred boolean NOT NULL DEFAULT false
);

COMMENT ON TABLE event_outbox IS
    'pg_outbox events: written by outbox_publish(), deleted by the pruner after pg_outbox.retention';

-- The pruner deletes the oldest rows first.
CREATE INDEX event_outbox_created_at_idx ON event_outbox (created_at);
-- Catch-up scans the xid range between two snapshots.
CREATE INDEX event_outbox_xid_idx ON event_outbox (xid, id);
-- A resume reads its user's rows from its position on: what that user missed, not what
-- everyone published since.
CREATE INDEX event_outbox_user_id_xid_idx ON event_outbox (user_id, xid);

-- The outbox's segments: child tables of event_outbox, each holding the events published from
-- starts_at to ends_at. The pruner creates them ahead of time (pg_outbox.segment_interval) and
-- drops each whole once its last event has expired: no row is deleted, no WAL is written per row,
-- no dead row is left for vacuum. outbox_publish inserts into the segment of its clock, or into
-- event_outbox itself when there is none, whose rows the pruner deletes one by one. A segment
-- takes no lock on event_outbox, so creating or dropping one never waits for publishers nor
-- blocks them. Segments belong to the extension: pg_dump skips them, as it skips the events.
CREATE TABLE outbox_segments (
    name        name        PRIMARY KEY,
    starts_at   timestamptz NOT NULL,
    ends_at     timestamptz NOT NULL,
    CHECK (starts_at < ends_at)
);

-- What pruning has done: one row, updated by every prune batch.
CREATE TABLE outbox_prune_state (
    only_row            boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    -- The greatest xid of any row ever pruned. A relay whose cursor does not cover it may have
    -- missed pruned rows, and reports a gap.
    pruned_through_xid  xid8        NOT NULL DEFAULT '0',
    rows_pruned         bigint      NOT NULL DEFAULT 0,
    last_pruned_at      timestamptz
);
INSERT INTO outbox_prune_state DEFAULT VALUES;

-- Where the notifier worker is: every row whose xid is visible in this snapshot has been seen by
-- it. Each of its batches notifies the deferred rows visible in a new snapshot and not in this
-- one, then stores the new one in the same transaction, so a restarted worker resumes exactly.
CREATE TABLE outbox_notifier_state (
    only_row            boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    snapshot            pg_snapshot NOT NULL DEFAULT pg_current_snapshot(),
    rows_notified       bigint      NOT NULL DEFAULT 0,
    last_notified_at    timestamptz
);
INSERT INTO outbox_notifier_state DEFAULT VALUES;

-- The keys notifications are sealed with (pg_outbox.notify_payload = 'sealed', the default).
-- Publishers seal with the key that has no expiry; relays open with every key not yet expired,
-- which they read through outbox_relay_keys() when they connect. outbox_rotate_seal_key() adds a
-- key and gives the previous one a grace period. Nothing is granted on it: see outbox_relay_keys.
CREATE TABLE outbox_seal_keys (
    key         bytea       PRIMARY KEY CHECK (length(key) = 32),
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz
);
CREATE UNIQUE INDEX outbox_seal_keys_current_idx ON outbox_seal_keys ((true)) WHERE expires_at IS NULL;

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

-- pg_dump carries none of these tables' rows, nor the segments: each holds transaction ids of this cluster (xid8,
-- pg_snapshot), which mean nothing in the cluster a dump is restored into. Restored there, events
-- would be delivered again once that cluster's ids passed theirs, and the workers' positions
-- would skip or repeat rows (and the single state rows collided with the ones CREATE EXTENSION
-- inserts). Events are transient (pg_outbox.retention): a restored database starts with an empty
-- outbox, and with a key of its own (outbox_seal_keys is not dumped either: a dump is no place
-- for a secret). pg_upgrade and physical backups keep the ids, and with them everything.
