# pg_outbox: `make demo` runs the demo, `make test` runs every test. Both install what is missing.

PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
PG_FEATURE ?= pg15
# cargo pgrx test's throwaway server; its parent must be writable by the server's user.
PGRX_TEST_DIR ?= /tmp/pg_outbox-pgrx-test

ifeq ($(shell id -u),0)
  # Postgres refuses to run as root: run the test server as the postgres OS user.
  RUNAS := --runas postgres
  SUDO :=
else
  RUNAS :=
  SUDO := --sudo
endif

.PHONY: all setup install install-debug demo test lint test-extension test-e2e fuzz bench bench-smoke soak clean

all: install

setup:
	@scripts/setup.sh

VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
EXTENSION_DIR = $(shell $(PG_CONFIG) --sharedir)/extension
# Where cargo pgrx package lays out the files, under their installed paths.
PACKAGE_TREE := target/release/pg_outbox-$(PG_FEATURE)
PACKAGE := target/pg_outbox-$(VERSION)-$(PG_FEATURE)-$(shell uname -m)-linux.tar.gz
# The hand-written install scripts of earlier versions and the upgrade scripts between them,
# which cargo pgrx does not copy.
SQL_SCRIPTS := $(wildcard sql/pg_outbox--*.sql)
# The SQL-only edition, pg_outbox_sql: a control file and scripts, nothing to build.
SQL_EDITION := $(wildcard sql/edition/pg_outbox_sql*)

## install: build the extension (release) into pg_config's directories; with DESTDIR=dir, into
## that staging directory instead (for packagers), through `make package`
ifdef DESTDIR
install: package
	mkdir -p $(DESTDIR)
	cp -a $(PACKAGE_TREE)/. $(DESTDIR)/
else
install: setup
	cd extension && cargo pgrx install --release $(SUDO) --pg-config $(PG_CONFIG)
	$(if $(SUDO),sudo) cp $(SQL_SCRIPTS) $(SQL_EDITION) $(EXTENSION_DIR)/
endif

install-debug: setup
	cd extension && cargo pgrx install $(SUDO) --pg-config $(PG_CONFIG)
	$(if $(SUDO),sudo) cp $(SQL_SCRIPTS) $(SQL_EDITION) $(EXTENSION_DIR)/

## package: `cargo pgrx package` (release) plus the upgrade scripts, as a tarball of the files
## under their installed paths
package: setup
	cd extension && cargo pgrx package --pg-config $(PG_CONFIG)
	cp $(SQL_SCRIPTS) $(SQL_EDITION) $(PACKAGE_TREE)$(EXTENSION_DIR)/
	tar -C $(PACKAGE_TREE) -czf $(PACKAGE) .
	@echo "package: $(PACKAGE)"

## demo: a throwaway cluster with the extension preloaded, events published and relayed, pruning
demo: install
	scripts/demo.sh

## test: formatting, lints, the extension's in-database tests, end-to-end tests, a minute of
## fuzzing, and every benchmark figure run tiny so the benchmark cannot rot
test: setup lint test-extension test-e2e fuzz bench-smoke

## lint: formatting, clippy, and no circle of module imports in any crate of the workspace
lint: setup
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo-cycles --workspace .

test-extension: setup
	mkdir -p $(PGRX_TEST_DIR)
	$(if $(RUNAS),chown postgres $(PGRX_TEST_DIR))
	cd extension && cargo pgrx test $(PG_FEATURE) $(RUNAS) --pgdata $(PGRX_TEST_DIR)/data

# cargo pgrx test installs its own test build; put the real extension back before end-to-end
# tests use it. The fixture is another extension that publishes from its PRE_COMMIT callback.
FIXTURE := tests/fixtures/pre_commit_publisher
test-e2e: install-debug
	$(MAKE) -C $(FIXTURE) PG_CONFIG=$(PG_CONFIG) with_llvm=no
	$(if $(SUDO),sudo) $(MAKE) -C $(FIXTURE) PG_CONFIG=$(PG_CONFIG) with_llvm=no install
	cargo test --workspace --exclude pg_outbox

## fuzz: libFuzzer on everything the client parses from the network, for FUZZ_SECONDS;
## FUZZ_SANITIZER=address adds ASan (on stable Rust through RUSTC_BOOTSTRAP=1). docs/fuzzing.md
FUZZ_SECONDS ?= 60
FUZZ_SANITIZER ?= none
fuzz: setup
	mkdir -p fuzz/corpus/relay_input
	cd fuzz && $(if $(filter-out none,$(FUZZ_SANITIZER)),RUSTC_BOOTSTRAP=1) cargo fuzz run \
		--sanitizer $(FUZZ_SANITIZER) relay_input corpus/relay_input seeds/relay_input \
		-- -max_total_time=$(FUZZ_SECONDS)

## bench: every figure of BENCHMARKS.md on a throwaway cluster (about 40 minutes); a quiet
## machine gives steadier ratios
bench: install
	cargo build --release -p pg_outbox_bench -p pg_outbox_cli -p pg_outbox_sse_example
	target/release/pg-outbox-bench | tee target/bench-results.md

bench-smoke: install-debug
	cargo build -p pg_outbox_bench -p pg_outbox_cli -p pg_outbox_sse_example
	target/debug/pg-outbox-bench --smoke

## soak: SOAK_EVENTS events (1M) at SOAK_RATE a second (5000) through 4 relay processes with
## connection kills; prints memory, table size, lost, duplicated (minutes: not in test). docs/soak.md
SOAK_EVENTS ?= 1000000
soak: setup
	SOAK_EVENTS=$(SOAK_EVENTS) cargo test --release -p pg_outbox_tests --test soak -- \
		--ignored --nocapture --test-threads 1

clean:
	cargo clean
	$(MAKE) -C $(FIXTURE) PG_CONFIG=$(PG_CONFIG) clean
	rm -rf $(PGRX_TEST_DIR)
