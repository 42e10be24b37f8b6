//! The server run a backend publishes in, recorded in `outbox_runs` before its first event, so
//! that no event of a run commits before the run is recorded: what lets any relay tell what a
//! position issued on an earlier run saw (`outbox_record_run` in `sql/api.sql` says why the
//! recorded floor is exact).

use std::cell::Cell;

use pgrx::prelude::*;
use pgrx::spi::quote_identifier;

thread_local! {
    /// The run is recorded by a committed transaction: a backend lives in one run (a crash or a
    /// restart ends it, and one on a standby publishes nothing before the promotion).
    static RECORDED: Cell<bool> = const { Cell::new(false) };
}

/// Records the run unless this backend knows it is. Until the transaction that recorded it
/// commits, each publish asks again: a rollback takes the record with it.
pub fn record_before_publishing(namespace: pg_sys::Oid) {
    if RECORDED.get() {
        return;
    }
    // SAFETY: the oid names the schema of the calling function, which exists during the call.
    let schema = unsafe { std::ffi::CStr::from_ptr(pg_sys::get_namespace_name(namespace)) };
    let function = format!(
        "{}.outbox_record_run()",
        quote_identifier(schema.to_string_lossy())
    );
    let exists = Spi::get_one_with_args::<bool>(
        "SELECT pg_catalog.to_regprocedure($1) IS NOT NULL",
        &[function.as_str().into()],
    );
    let recorded = match exists {
        // A database not yet updated to 0.6.0: the update records the run itself.
        Ok(Some(false)) => true,
        Ok(_) => Spi::get_one::<bool>(&format!("SELECT {function}"))
            .unwrap_or_else(|e| {
                pgrx::error!("outbox_publish: could not record the server run: {e}")
            })
            .unwrap_or(false),
        Err(e) => pgrx::error!("outbox_publish: could not look for outbox_record_run(): {e}"),
    };
    RECORDED.set(recorded);
}
