//! pg_outbox: a transactional outbox for PostgreSQL.
//!
//! - Where publish happens: `outbox_publish()` ([`publish`]) stores the event into the current
//!   segment of `event_outbox` ([`segment`]) and sends its notification ([`notify`]; the
//!   documents are `pg_outbox_wire`'s, [`notification`]) in the caller's transaction, or, in
//!   worker mode, hands the event over through shared memory ([`worker::handoff`]) to the
//!   notifier ([`worker::notifier`]), which notifies right after the commit.
//! - Where pruning happens: the pruner worker ([`worker::pruner`]) drops expired segments and
//!   deletes expired rows ([`prune`]), by the database clock.
//! - Where the server's runs are recorded, so relays resume positions across restarts and
//!   failovers: [`run`] (before a backend's first event).
//! - What the workers and publishers share in shared memory: [`worker::shared`]. Settings, with
//!   typed accessors: [`guc`]. Errors and their SQLSTATEs: [`error`]. Catalog look-ups:
//!   [`catalog`].

mod catalog;
mod error;
mod guc;
mod logical_message;
mod notification;
mod notify;
mod privilege;
mod prune;
mod publish;
mod run;
mod seal;
mod segment;
mod worker;

::pgrx::pg_module_magic!(name, version);

pgrx::extension_sql_file!("../../sql/schema.sql", name = "schema", bootstrap);
pgrx::extension_sql_file!("../../sql/api.sql", name = "api", finalize);

/// Runs when the library is loaded: at server start when preloaded, otherwise at the first use
/// in a session. Only a preloaded library can start the pruner.
#[allow(non_snake_case)]
#[pgrx::pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: a plain read of a flag the postmaster sets while it loads preloaded libraries.
    let preloading = unsafe { pgrx::pg_sys::process_shared_preload_libraries_in_progress };
    guc::init(preloading);
    if preloading {
        worker::register();
        // Inherited by every backend: only a preloaded library stages events
        // (`shared::takes_over_notification`), and a staging backend must find them there.
        worker::handoff::register_callbacks();
    }
}

#[cfg(any(test, feature = "pg_test"))]
mod sql_api_tests;
#[cfg(any(test, feature = "pg_test"))]
mod wire_tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
