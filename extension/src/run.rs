//! The server run a backend publishes in, recorded in `outbox_runs` before its first event, so
//! that no event of a run commits before the run is recorded: what lets any relay tell what a
//! position issued on an earlier run saw (`outbox_record_run` in `sql/api.sql` says why the
//! recorded floor is exact).

use std::cell::Cell;

use pgrx::prelude::*;
use pgrx::spi::quote_identifier;

/// What this backend knows of the run's record.
#[derive(Clone, Copy, PartialEq)]
enum Known {
    /// Nothing yet: ask.
    Unknown,
    /// Recorded by this (sub)transaction, which a rollback may still take back: asked again
    /// in any other one, not in this one.
    RecordedIn {
        top: pg_sys::TransactionId,
        sub: pg_sys::SubTransactionId,
    },
    /// Recorded by a committed transaction (or by the update to 0.6.0, where the database
    /// predates it): a backend lives in one run (a crash or a restart ends it, and one on a
    /// standby publishes nothing before the promotion).
    Recorded,
}

thread_local! {
    static KNOWN: Cell<Known> = const { Cell::new(Known::Unknown) };
}

/// The (sub)transaction publishing now; the top-level one has an xid (the record took one).
fn current() -> Known {
    // SAFETY: plain reads of the transaction manager's state.
    unsafe {
        Known::RecordedIn {
            top: pg_sys::GetTopTransactionIdIfAny(),
            sub: pg_sys::GetCurrentSubTransactionId(),
        }
    }
}

/// Records the run unless this backend knows it is: once per backend, and until the
/// transaction that recorded it commits, once in each other (sub)transaction that publishes.
pub fn record_before_publishing(namespace: pg_sys::Oid) {
    let known = KNOWN.get();
    if known == Known::Recorded || known == current() {
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
    KNOWN.set(if recorded { Known::Recorded } else { current() });
}
