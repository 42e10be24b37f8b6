#!/usr/bin/env bash
# The pg_outbox demo, on a throwaway cluster it starts and removes itself:
# 1. events published from psql reach a LISTEN session only when their transaction commits;
# 2. three relay replicas (client/examples/relay_demo.rs) receive events published from psql and
#    from Rust (client/examples/publisher.rs), some in rolled-back transactions, while one
#    replica's connection is killed: each reports received, lost (0), duplicated (0), caught up,
#    and commit-to-delivery latency;
# 3. if Chromium is there (scripts/setup.sh installs it): a page in headless Chromium follows user
#    u1's events over SSE (examples/sse) through a proxy in front of two replicas while
#    publishers commit out of order; the page's replica is SIGKILLed mid-stream and its
#    EventSource resumes on the other: received, lost (0), duplicated (0);
# 4. a replica's metrics as Prometheus scrapes them (GET /metrics of examples/sse);
# 5. the pruner worker drops expired segments and deletes expired events inside the database.
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

step "Building the demo's relay replica and Rust publisher (client/examples)"
cargo build --quiet --release -p pg_outbox_client --examples
TARGET=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
EXAMPLES=$TARGET/release/examples
CONN="host=$DIR port=$PORT user=postgres dbname=postgres"

step "Starting a throwaway cluster in $DIR (port $PORT) with pg_outbox preloaded"
[ "$(id -u)" = 0 ] && chown postgres "$DIR"
as_server_user "$BINDIR/initdb" -D "$DIR/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 --no-sync >/dev/null
cat >>"$DIR/data/postgresql.conf" <<CONF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$DIR'
shared_preload_libraries = 'pg_outbox'
pg_outbox.retention = '10min'
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
SET pg_outbox.notify_payload = 'reference';
SELECT outbox_publish('presence', 'carol', '{"online": true}');
SQL

wait "$LISTENER"
step "What the LISTEN session received: the two events of the committed transaction, sealed (the default: any role that can connect may LISTEN, and reads random text; relays open them with the database's key, no query), none of the rolled-back one, and a reference (notify_payload = 'reference': ids and metadata, no payload)"
sed -n 's/^Asynchronous notification "pg_outbox" with payload "\(.*\)" received from server process.*/\1/p' "$DIR/listener.out" \
    | cut -c1-100 | sed 's/^/  /'
echo "  the key: $(psql_demo -A -t -c "SELECT count(*) || ' key(s) in outbox_seal_keys, readable through outbox_relay_keys() by the roles that may read event_outbox.payload' FROM outbox_seal_keys")"

step "Bad input is refused with a clear error and writes nothing"
psql_demo -c "SELECT outbox_publish('chat room', 'alice', '{}')" 2>&1 | sed 's/^/  /' || true
psql_demo -c "SELECT outbox_publish('chat', NULL, '{}')" 2>&1 | sed 's/^/  /' || true

step "Three relay replicas start; each returns from start() once LISTEN is in effect"
REPLICAS=(replica-a replica-b replica-c)
RELAY_PIDS=()
for replica in "${REPLICAS[@]}"; do
    "$EXAMPLES/relay_demo" "$CONN" "$replica" 3 >"$DIR/$replica.out" 2>"$DIR/$replica.err" &
    RELAY_PIDS+=($!)
done
for replica in "${REPLICAS[@]}"; do
    for _ in $(seq 1 100); do grep -q ready "$DIR/$replica.out" 2>/dev/null && break; sleep 0.1; done
    sed 's/^/  /' "$DIR/$replica.out"
done

step "Publishing: 1000 events from Rust (origin replica-a, every fifth transaction rolled back) and 300 from psql (a third rolled back), killing replica-b's connection halfway"
"$EXAMPLES/publisher" "$CONN" replica-a 1000 | sed 's/^/  /' &
PUBLISHER=$!
for n in $(seq 1 30); do
    if [ $((n % 3)) = 0 ]; then end=ROLLBACK; else end=COMMIT; fi
    psql_demo -c "BEGIN" \
        -c "SELECT outbox_publish('chat', 'user-' || i % 5, jsonb_build_object('psql', $n, 'i', i)) FROM generate_series(1, 10) i" \
        -c "$end" >/dev/null
    if [ "$n" = 15 ]; then
        # Its two sessions: once the first is gone the relay closes the second itself, which
        # may then no longer be there to terminate (a WARNING, not an error): say nothing.
        killed=$(psql_demo -A -t -c "SET client_min_messages = error" -c "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'pg_outbox_relay_replica-b'")
        echo "  killed replica-b's connection ($killed of its backends); it reconnects and catches up"
    fi
done
echo "  psql: committed 200 events, rolled back 100"
wait "$PUBLISHER"

step "Each replica, once idle for 3 s: replica-a skips the 800 events it published itself"
wait "${RELAY_PIDS[@]}"
for replica in "${REPLICAS[@]}"; do
    sed '/ready/d; s/^/  /' "$DIR/$replica.out"
done

step "A browser over SSE: headless Chromium shows u1's events through a proxy in front of two replicas (examples/sse); the page's replica is SIGKILLed mid-stream"
CHROMIUM_PATH=${CHROMIUM:-/usr/bin/chromium}
if [ -x "$CHROMIUM_PATH" ]; then
    cargo build --quiet -p pg_outbox_sse_example
    cargo build --quiet -p pg_outbox_tests --example browser_failover
    PG_OUTBOX_SSE_EXAMPLE=$TARGET/debug/pg-outbox-sse-example \
        "$TARGET/debug/examples/browser_failover" "$CONN"
else
    echo "  skipped: no Chromium at $CHROMIUM_PATH (scripts/setup.sh installs it)"
fi

step "The relay's metrics as Prometheus scrapes them: GET /metrics of an examples/sse replica after one publish"
cargo build --quiet -p pg_outbox_sse_example
"$TARGET/debug/pg-outbox-sse-example" --db "$CONN" --listen 127.0.0.1:0 --name metrics >"$DIR/sse.out" 2>"$DIR/sse.err" &
SSE=$!
for _ in $(seq 1 100); do grep -q "^listening on" "$DIR/sse.out" 2>/dev/null && break; sleep 0.1; done
python3 - "$(sed -n 's/^listening on //p' "$DIR/sse.out")" <<'PY'
import json, sys, time, urllib.request
url = sys.argv[1]
event = {"channel": "chat", "user_id": "u1", "payload": {"text": "counted"}}
urllib.request.urlopen(urllib.request.Request(
    url + "/publish", data=json.dumps(event).encode(), headers={"Content-Type": "application/json"}))
for _ in range(50):  # the relay's counters are copied to the exporter once a second
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    if 'pg_outbox_relay_events_delivered_total{relay="pg_outbox_sse_metrics"} 1' in text:
        break
    time.sleep(0.1)
shown = ("pg_outbox_relay_events_delivered_total", "pg_outbox_relay_health{",
         "pg_outbox_relay_lag_seconds_count", "pg_outbox_relay_subscriptions")
for line in text.splitlines():
    if line.startswith(shown):
        print("  " + line)
PY
kill "$SSE"
wait "$SSE" 2>/dev/null || true

step "Events live in segments, child tables of event_outbox that the pruner drops whole once expired"
psql_demo -c "SELECT tableoid::regclass AS segment, count(*) AS events FROM event_outbox GROUP BY 1 ORDER BY 1"
psql_demo -c "SELECT name, starts_at, ends_at FROM outbox_segments ORDER BY starts_at"

step "The pruner deletes events older than pg_outbox.retention (10min here), by the database clock"
psql_demo -c "INSERT INTO event_outbox (id, channel, user_id, payload, created_at)
              SELECT gen_random_uuid(), 'chat', 'old', '{}', now() - interval '2 hours'
              FROM generate_series(1, 1000)"
psql_demo -c "SELECT count(*) AS events_before_pruning FROM event_outbox"
for _ in $(seq 1 50); do
    [ "$(psql_demo -A -t -c "SELECT count(*) FROM event_outbox WHERE user_id = 'old'")" = 0 ] && break
    sleep 0.2
done
psql_demo -c "SELECT count(*) AS events_after_pruning FROM event_outbox"
psql_demo -x -c "SELECT * FROM outbox_stats()"

step "Done; the cluster is stopped and removed"
