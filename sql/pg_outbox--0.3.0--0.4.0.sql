-- pg_outbox 0.3.0 -> 0.4.0
-- * No change to the extension's objects: 0.4.0 reshapes the Rust client's public API (see
--   CHANGELOG.md). The version moves with the workspace's, so the extension gets this script.
\echo Use "ALTER EXTENSION pg_outbox UPDATE TO '0.4.0'" to load this file. \quit
