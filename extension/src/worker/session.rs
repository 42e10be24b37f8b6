//! What each worker does with its own session, whichever its work: connect (waiting longer
//! after failed attempts), fix its settings, and show in `pg_stat_activity` what it waits for.

use std::ffi::CStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::PgAtomic;

/// What `pg_stat_activity.query` shows while the extension is missing from the database.
pub const WAITING_FOR_EXTENSION: &CStr = c"waiting for CREATE EXTENSION pg_outbox";

/// A worker's connection attempts in a row that did not get through, in shared memory, so that
/// it outlives the process: a worker whose database is gone exits FATAL while connecting, at
/// every start, and would otherwise be restarted every few seconds, for ever.
pub type ConnectAttempts = PgAtomic<AtomicU32>;

/// The wait before the second attempt; it doubles with each further one.
const FIRST_RETRY: Duration = Duration::from_secs(5);
/// The longest wait between two attempts.
const LONGEST_RETRY: Duration = Duration::from_secs(300);

/// Attaches the signal handlers and connects this worker to `database`, first waiting longer
/// and longer (5 s, 10 s, ... up to 5 min) when its earlier attempts did not get through, and
/// saying why once per attempt. Exits if SIGTERM arrives meanwhile.
pub fn connect(attempts: &'static ConnectAttempts, worker: &str, database: &str) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let failed = attempts.get().fetch_add(1, Ordering::Relaxed);
    if failed > 0 {
        let wait = FIRST_RETRY
            .saturating_mul(1 << (failed - 1).min(10))
            .min(LONGEST_RETRY);
        log!(
            "{worker}: could not connect to database \"{database}\" at its last {failed} start(s) (does it exist? see pg_outbox.database); next attempt in {} s",
            wait.as_secs()
        );
        // The latch may be set already (or by a SIGHUP meanwhile): wait out the whole delay.
        let until = Instant::now() + wait;
        while let Some(left) = until
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
        {
            if !BackgroundWorker::wait_latch(Some(left)) {
                // SAFETY: ends this process the way Postgres expects a backend to end.
                unsafe { pg_sys::proc_exit(1) };
            }
        }
    }
    // A missing database ends the process here with FATAL; the count above stays.
    BackgroundWorker::connect_worker_to_spi(Some(database), None);
    attempts.get().store(0, Ordering::Relaxed);
    // The workers run as a superuser and name their own objects with their schema: no function
    // or operator that some role created in public may be picked up in their place.
    set_for_session(c"search_path", c"pg_catalog, pg_temp");
}

/// Sets `name` to `value` for the rest of this worker's session, over any configured value;
/// called between transactions.
pub fn set_for_session(name: &CStr, value: &CStr) {
    // SAFETY: sets this process's own setting, outside any transaction.
    unsafe {
        pg_sys::SetConfigOption(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_OVERRIDE,
        )
    };
}

/// A worker's waits for something to change in its database, each logged once when it begins
/// (not once per loop) and shown in `pg_stat_activity` for as long as it lasts.
#[derive(Default)]
pub struct Waiting {
    /// The wait under way, if it was logged.
    logged: Option<&'static CStr>,
}

impl Waiting {
    /// The worker waits for `activity`: says why (`reason`) if that wait has just begun.
    pub fn wait(&mut self, activity: &'static CStr, reason: impl FnOnce() -> String) {
        if self.logged != Some(activity) {
            log!("{}", reason());
            self.logged = Some(activity);
        }
        report_activity(activity);
    }

    /// The worker stopped waiting: the next wait is logged again.
    pub fn over(&mut self) {
        self.logged = None;
    }
}

/// Shows what a worker does in `pg_stat_activity.query`.
pub fn report_activity(activity: &CStr) {
    // SAFETY: a valid C string; pgstat copies it into shared memory.
    unsafe {
        pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, activity.as_ptr())
    };
}
