//! The background workers pg_outbox registers when it is preloaded: the pruner deletes expired
//! events, the notifier sends the notifications of transactions that deferred them.

use std::ffi::CStr;

use pgrx::pg_sys;

pub mod notifier;
pub mod pruner;

/// What `pg_stat_activity.query` shows while the extension is missing from the database.
pub const WAITING_FOR_EXTENSION: &CStr = c"waiting for CREATE EXTENSION pg_outbox";

/// Registers both workers (and the notifier's shared memory); called from `_PG_init` while
/// preloading.
pub fn register() {
    pruner::register();
    notifier::register();
}

/// Shows what a worker does in `pg_stat_activity.query`.
pub fn report_activity(activity: &'static CStr) {
    // SAFETY: the string is static; pgstat copies it into shared memory.
    unsafe {
        pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, activity.as_ptr())
    };
}
