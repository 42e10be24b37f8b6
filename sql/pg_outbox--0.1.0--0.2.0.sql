-- pg_outbox 0.1.0 -> 0.2.0
-- * notify_mode = 'worker': rows record whether their transaction left the notification to the
--   notifier worker, and the worker keeps its position in outbox_notifier_state.
-- * outbox_stats() and outbox_prune() run with their owner's rights, so EXECUTE is all a
--   monitoring or pruning role needs.
-- * pg_dump no longer carries the events or the prune record: their transaction ids belong to
--   this cluster (see schema.sql). Taking a table out of the extension and back in forgets its
--   dump registration.
\echo Use "ALTER EXTENSION pg_outbox UPDATE TO '0.2.0'" to load this file. \quit

-- A constant default: no table rewrite, whatever the outbox holds.
ALTER TABLE event_outbox ADD COLUMN notify_deferred boolean NOT NULL DEFAULT false;

CREATE TABLE outbox_notifier_state (
    only_row            boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    snapshot            pg_snapshot NOT NULL DEFAULT pg_current_snapshot(),
    rows_notified       bigint      NOT NULL DEFAULT 0,
    last_notified_at    timestamptz
);
INSERT INTO outbox_notifier_state DEFAULT VALUES;
REVOKE ALL ON TABLE outbox_notifier_state FROM PUBLIC;

ALTER FUNCTION outbox_prune(interval) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION outbox_stats() SECURITY DEFINER;

ALTER EXTENSION pg_outbox DROP TABLE event_outbox;
ALTER EXTENSION pg_outbox ADD TABLE event_outbox;
ALTER EXTENSION pg_outbox DROP TABLE outbox_prune_state;
ALTER EXTENSION pg_outbox ADD TABLE outbox_prune_state;
