#!/usr/bin/env bash
# Installs what building, testing and running pg_outbox needs on Debian 12, skipping whatever is
# already there: PostgreSQL 15 with its server headers, clang for bindgen, PgBouncer (tests show
# what a relay says behind a transaction-mode pooler), sudo (cargo pgrx test runs the test server
# as the postgres user through it), the pinned cargo-pgrx and cargo-cycles (`make lint`), and
# cargo-pgrx's configuration pointing at the system pg_config; for the examples tested in CI: psycopg 3 and psycopg2 (logical replication) for Debian's python3, Node.js with
# npm and examples/node's locked packages, openssl (test certificates for TLS), Chromium (the
# browser test, the demo's browser step and the commit-to-browser benchmark run it headless), and
# prometheus-postgres-exporter (monitoring/postgres_exporter.yaml is tested through it), and
# pg_cron (the SQL edition's pruning by a cron job is tested through it).
# Safe to run again; quiet when nothing is missing.
set -euo pipefail

PG_MAJOR=15
PGRX_VERSION=0.18.0
CARGO_FUZZ_VERSION=0.13.2
CARGO_CYCLES_VERSION=0.2.0
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/$PG_MAJOR/bin/pg_config}
PACKAGES=(postgresql-$PG_MAJOR postgresql-server-dev-$PG_MAJOR clang libclang-dev sudo pgbouncer
    python3-psycopg python3-psycopg2 openssl chromium prometheus-postgres-exporter
    postgresql-$PG_MAJOR-cron)
ROOT=$(cd "$(dirname "$0")/.." && pwd)

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
# Node.js may come from elsewhere (NodeSource ships npm inside nodejs): only add Debian's when
# there is no npm at all.
command -v npm >/dev/null || missing+=(nodejs npm)
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
    echo "setup: cargo is missing; install Rust 1.95 or newer with rustup, then run this again" >&2
    exit 1
fi

if ! cargo pgrx --version 2>/dev/null | grep -q " $PGRX_VERSION\$"; then
    echo "setup: installing cargo-pgrx $PGRX_VERSION (a few minutes, once)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked --quiet
fi

# `make fuzz` (part of `make test`): cargo-fuzz works on stable Rust (see docs/fuzzing.md).
if ! cargo fuzz --version 2>/dev/null | grep -q " $CARGO_FUZZ_VERSION\$"; then
    echo "setup: installing cargo-fuzz $CARGO_FUZZ_VERSION (a few minutes, once)"
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --quiet
fi

# `make lint`: cargo-cycles fails on a circle of module imports in any crate of the workspace.
# (cargo-modules' `dependencies --acyclic` checks items, not modules: a method and its own type
# already count as a circle there.) It runs as `cargo-cycles`: `cargo cycles` passes it an
# argument it refuses.
if ! cargo-cycles --version 2>/dev/null | grep -q " $CARGO_CYCLES_VERSION\$"; then
    echo "setup: installing cargo-cycles $CARGO_CYCLES_VERSION (a minute, once)"
    cargo install cargo-cycles --version "$CARGO_CYCLES_VERSION" --locked --quiet
fi

# `cargo pgrx init` with an explicit pg_config only writes its configuration; plain
# `cargo pgrx init` would try to download PostgreSQL sources.
if ! grep -qs "^pg$PG_MAJOR = \"$PG_CONFIG\"" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    cargo pgrx init --pg$PG_MAJOR "$PG_CONFIG" >/dev/null
fi

# examples/node's packages, exactly as locked.
if [ ! -d "$ROOT/examples/node/node_modules" ] \
    || [ "$ROOT/examples/node/package-lock.json" -nt "$ROOT/examples/node/node_modules" ]; then
    echo "setup: installing examples/node's packages (npm ci)"
    npm ci --prefix "$ROOT/examples/node" --no-audit --no-fund --loglevel=error >/dev/null
fi
