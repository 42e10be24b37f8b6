#!/usr/bin/env bash
# The pg_outbox demo, on a throwaway cluster it starts and removes itself: events published from
# psql reach a LISTEN session only when their transaction commits, and the pruner worker deletes
# expired events inside the database.
set -euo pipefail

PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
BINDIR=$("$PG_CONFIG" --bindir)
DIR=$(mktemp -d /tmp/pg_outbox-demo.XXXXXX)
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

as_server_user() {
    # Postgres refuses to run as root.
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
psql_demo() {
    "$BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -h "$DIR" -p "$PORT" -U postgres -d postgres "$@"
}
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
cleanup() {
    as_server_user "$BINDIR/pg_ctl" -D "$DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$DIR"
}
trap cleanup EXIT

step "Starting a throwaway cluster in $DIR (port $PORT) with pg_outbox preloaded"
[ "$(id -u)" = 0 ] && chown postgres "$DIR"
as_server_user "$BINDIR/initdb" -D "$DIR/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 --no-sync >/dev/null
cat >>"$DIR/data/postgresql.conf" <<CONF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$DIR'
shared_preload_libraries = 'pg_outbox'
pg_outbox.retention = '1min'
pg_outbox.prune_interval = '1s'
CONF
as_server_user "$BINDIR/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w start >/dev/null
psql_demo -c "CREATE EXTENSION pg_outbox"
grep -h "pg_outbox" "$DIR/server.log" | sed 's/^/  server log: /'

step "A LISTEN session waits on channel pg_outbox (psql prints notifications when its command ends)"
psql_demo -c "LISTEN pg_outbox" -c "SELECT pg_sleep(3)" >"$DIR/listener.out" 2>&1 &
LISTENER=$!
sleep 0.5

step "Publishing from psql"
psql_demo -e <<'SQL'
BEGIN;
SELECT outbox_publish('chat', 'alice', '{"text": "hello"}');
SELECT outbox_publish('chat', 'bob', '{"text": "hi alice"}', 'replica-a');
COMMIT;
BEGIN;
SELECT outbox_publish('chat', 'alice', '{"text": "never sent"}');
ROLLBACK;
SET pg_outbox.notify_payload = 'inline';
SELECT outbox_publish('presence', 'carol', '{"online": true}');
SELECT outbox_publish('files', 'carol', jsonb_build_object('blob', repeat('x', 100000)));
SQL

wait "$LISTENER"
step "What the LISTEN session received: two events of the committed transaction, none of the rolled-back one, one inline, one reference for the 100 kB payload"
sed -n 's/^Asynchronous notification "pg_outbox" with payload "\(.*\)" received from server process.*/  \1/p' "$DIR/listener.out"

step "Bad input is refused with a clear error and writes nothing"
psql_demo -c "SELECT outbox_publish('chat room', 'alice', '{}')" 2>&1 | sed 's/^/  /' || true
psql_demo -c "SELECT outbox_publish('chat', NULL, '{}')" 2>&1 | sed 's/^/  /' || true

step "The pruner deletes events older than pg_outbox.retention (1min here), by the database clock"
psql_demo -c "INSERT INTO event_outbox (id, channel, user_id, payload, created_at)
              SELECT gen_random_uuid(), 'chat', 'old', '{}', now() - interval '2 hours'
              FROM generate_series(1, 1000)"
psql_demo -c "SELECT count(*) AS events_before_pruning FROM event_outbox"
for _ in $(seq 1 50); do
    [ "$(psql_demo -A -t -c "SELECT count(*) FROM event_outbox")" = 4 ] && break
    sleep 0.2
done
psql_demo -c "SELECT count(*) AS events_after_pruning FROM event_outbox"
psql_demo -x -c "SELECT * FROM outbox_stats()"

step "Done; the cluster is stopped and removed"
