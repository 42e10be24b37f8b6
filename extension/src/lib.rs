//! pg_outbox: a transactional outbox for PostgreSQL.
//!
//! `outbox_publish()` inserts an event into `event_outbox` and sends its notification in the
//! caller's transaction ([`publish`]); a background worker deletes expired events inside the
//! database ([`worker::pruner`], [`prune`]); every setting lives in [`guc`].

mod error;
mod guc;
mod notification;
mod notify;
mod prune;
mod publish;
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
        // (`notifier::takes_over_notification`), and a staging backend must find them there.
        worker::handoff::register_callbacks();
    }
}

#[cfg(any(test, feature = "pg_test"))]
mod sql_api_tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
