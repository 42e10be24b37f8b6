#!/usr/bin/env bash
# Installs what building, testing and running pg_outbox needs on Debian 12, skipping whatever is
# already there: PostgreSQL 15 with its server headers, clang for bindgen, PgBouncer (tests show
# what a relay says behind a transaction-mode pooler), sudo (cargo pgrx test runs the test server
# as the postgres user through it), the pinned cargo-pgrx, and its configuration pointing at the
# system pg_config. Safe to run again; quiet when nothing is missing.
set -euo pipefail

PG_MAJOR=15
PGRX_VERSION=0.18.0
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/$PG_MAJOR/bin/pg_config}
PACKAGES=(postgresql-$PG_MAJOR postgresql-server-dev-$PG_MAJOR clang libclang-dev sudo pgbouncer)

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
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

# `cargo pgrx init` with an explicit pg_config only writes its configuration; plain
# `cargo pgrx init` would try to download PostgreSQL sources.
if ! grep -qs "^pg$PG_MAJOR = \"$PG_CONFIG\"" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    cargo pgrx init --pg$PG_MAJOR "$PG_CONFIG" >/dev/null
fi
