//! What the extension looks up in the catalog of the database it runs in.

use pgrx::prelude::*;
use pgrx::spi::SpiResult;

/// The extension's schema, quoted, when `pg_outbox` is installed in this database.
pub fn extension_schema() -> SpiResult<Option<String>> {
    Spi::get_one(
        "SELECT quote_ident(n.nspname) FROM pg_catalog.pg_extension e \
         JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace \
         WHERE e.extname = 'pg_outbox'",
    )
}

/// The schema `pg_outbox` is installed in, in this database.
pub fn extension_namespace() -> SpiResult<Option<pg_sys::Oid>> {
    Spi::get_one("SELECT extnamespace FROM pg_catalog.pg_extension WHERE extname = 'pg_outbox'")
}
