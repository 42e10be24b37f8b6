-- pg_outbox from psql: publish in a transaction that commits and in one that rolls back.
--
--     psql -d app -f examples/sql/publish.sql
--
-- To watch the notifications, run `LISTEN pg_outbox;` in another psql session: psql prints
-- what arrived after each command you run there (an empty `;` will do).

\echo 'Publishing inside transactions: an event exists only if its transaction commits.'

BEGIN;
-- Your business write goes here, in the same transaction.
SELECT outbox_publish('chat', 'alice', '{"text": "hello from psql"}') AS committed_id \gset
COMMIT;

BEGIN;
SELECT outbox_publish('chat', 'alice', '{"text": "never delivered"}') AS rolled_back_id \gset
ROLLBACK;

\echo committed :committed_id
\echo rolled_back :rolled_back_id

-- The relay reads committed events from event_outbox; the rolled-back one left nothing.
SELECT count(*) AS rolled_back_rows FROM event_outbox WHERE id = :'rolled_back_id';

-- Several publishes in one transaction are delivered in order, with the origin of the
-- publishing replica (a relay with that instance id skips them).
BEGIN;
SELECT outbox_publish('chat', 'bob', '{"n": 1}', 'replica-a');
SELECT outbox_publish('chat', 'bob', '{"n": 2}', 'replica-a');
COMMIT;

-- Monitoring: size, pruner, notification queue.
SELECT rows_estimate, worker_state, notification_queue_usage FROM outbox_stats();
