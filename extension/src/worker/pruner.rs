//! The pruner: one background worker per server that keeps the `event_outbox` of the database
//! named by `pg_outbox.database`, every `pg_outbox.prune_interval`: it creates the segments
//! ahead, drops the expired ones, and deletes the expired events of `event_outbox` itself in
//! batches of `pg_outbox.prune_batch_size`. Each of these is a transaction of its own, so a
//! large backlog never becomes one long transaction holding many locks.
//!
//! It shows in `pg_stat_activity` with `backend_type = 'pg_outbox pruner'`, and its `query`
//! column tells what it is doing. It reloads its settings on SIGHUP, exits promptly on SIGTERM,
//! and is restarted by the postmaster after a crash or `pg_terminate_backend`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use std::sync::atomic::AtomicU32;

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder};
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PgAtomic};

use crate::catalog::extension_schema;
use crate::guc;
use crate::prune::{prune_batch, OUTBOX};
use crate::segment;
use crate::worker::session::{
    self, report_activity, ConnectAttempts, Waiting, WAITING_FOR_EXTENSION,
};

/// The name shown as `backend_type` in `pg_stat_activity`.
pub const BACKEND_TYPE: &str = "pg_outbox pruner";

/// Passes in a row an expired segment may stay busy before the pruner warns.
const BUSY_PASSES_BEFORE_WARNING: u32 = 10;

/// How long the postmaster waits before starting the worker again after it exits.
const RESTART_AFTER: Duration = Duration::from_secs(5);

/// The pruner's failed connection attempts in a row (see [`session::connect`]).
static CONNECT_ATTEMPTS: ConnectAttempts = unsafe { PgAtomic::new(c"pg_outbox_pruner_connect") };

/// Registers the pruner with the postmaster; called from `_PG_init` while preloading.
pub fn register() {
    pg_shmem_init!(CONNECT_ATTEMPTS = AtomicU32::new(0));
    BackgroundWorkerBuilder::new(BACKEND_TYPE)
        .set_type(BACKEND_TYPE)
        .set_library("pg_outbox")
        .set_function("pg_outbox_pruner_main")
        .enable_spi_access()
        .set_restart_time(Some(RESTART_AFTER))
        .load();
}

/// The worker's entry point.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_outbox_pruner_main(_arg: pg_sys::Datum) {
    let database = guc::database();
    session::connect(&CONNECT_ATTEMPTS, BACKEND_TYPE, &database);
    log!("pg_outbox pruner started in database \"{database}\"");

    // A snapshot taken at a transaction's start could miss rows of a segment it drops.
    session::set_for_session(c"default_transaction_isolation", c"read committed");
    let mut pruner = Pruner {
        database,
        waiting: Waiting::default(),
        busy_segments: HashMap::new(),
        next_segments: None,
    };
    let mut next_pass = Instant::now();
    let mut last_pass = Instant::now();
    loop {
        let wake = pruner
            .next_segments
            .map_or(next_pass, |at| at.min(next_pass));
        if !BackgroundWorker::wait_latch(Some(wake.saturating_duration_since(Instant::now()))) {
            break;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: called from the worker's main loop, outside any transaction, as the
            // postmaster's own processes do on SIGHUP.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            next_pass = last_pass + guc::prune_interval();
        }
        if Instant::now() >= next_pass {
            pruner.pass();
            last_pass = Instant::now();
            next_pass = last_pass + guc::prune_interval();
        } else if pruner.next_segments.is_some_and(|at| Instant::now() >= at) {
            pruner.segments_due();
        }
        if shutdown_requested() {
            break;
        }
    }
    log!("pg_outbox pruner stopping");
    // Exit with 1, not 0: a worker that exits with 0 is unregistered for good, and one killed
    // by pg_terminate_backend should come back after its restart time.
    // SAFETY: ends this process the way Postgres expects a backend to end.
    unsafe { pg_sys::proc_exit(1) };
}

struct Pruner {
    database: String,
    waiting: Waiting,
    /// Expired segments the last passes could not drop, and in how many passes in a row.
    busy_segments: HashMap<String, u32>,
    /// When to create the next segments, if before the next pass.
    next_segments: Option<Instant>,
}

impl Pruner {
    /// Deletes every expired row, a batch per transaction, stopping early on shutdown.
    fn pass(&mut self) {
        report_activity(c"checking for the extension");
        let (schema, queue_usage) = BackgroundWorker::transaction(|| {
            if let Err(e) = compress_full_page_images() {
                warning!("pg_outbox pruner: could not set wal_compression for its deletes: {e}");
            }
            (
                extension_schema().ok().flatten(),
                Spi::get_one::<f64>("SELECT pg_notification_queue_usage()")
                    .ok()
                    .flatten(),
            )
        });
        warn_about_the_queue(queue_usage.unwrap_or(0.0));
        let Some(schema) = schema else {
            self.waiting.wait(WAITING_FOR_EXTENSION, || {
                format!(
                    "pg_outbox is not installed in database \"{}\"; the pruner waits for CREATE EXTENSION pg_outbox there (or set pg_outbox.database)",
                    self.database
                )
            });
            return;
        };
        self.waiting.over();

        report_activity(c"pruning");
        self.create_segments(&schema);
        let mut total = 0;
        let expired = BackgroundWorker::transaction(|| segment::expired(&schema, None))
            .unwrap_or_else(|e| pgrx::error!("pg_outbox pruner: {e}"));
        self.busy_segments.retain(|name, _| expired.contains(name));
        for name in expired {
            match BackgroundWorker::transaction(|| segment::drop(&schema, &name))
                .unwrap_or_else(|e| pgrx::error!("pg_outbox pruner: {e}"))
            {
                Some(rows) => {
                    total += rows;
                    self.busy_segments.remove(&name);
                }
                None => self.segment_busy(name),
            }
            if shutdown_requested() {
                return;
            }
        }
        let batch_size = guc::prune_batch_size();
        loop {
            let deleted =
                BackgroundWorker::transaction(|| prune_batch(&schema, OUTBOX, None, batch_size))
                    .unwrap_or_else(|e| pgrx::error!("pg_outbox pruner: {e}"));
            total += deleted;
            if deleted < batch_size || shutdown_requested() {
                break;
            }
            // A full batch: more is waiting. Pause (SIGTERM cuts it short) so that a backlog
            // is deleted at a pace publishers do not feel.
            let pause = guc::prune_pause();
            if !pause.is_zero() && !BackgroundWorker::wait_latch(Some(pause)) {
                break;
            }
        }
        // A pass slowed by a large backlog must not outrun the segments created ahead.
        self.create_segments(&schema);
        if total > 0 {
            debug1!("pg_outbox pruner deleted {total} expired events");
            // A background worker's table statistics are only published when it asks, and
            // outbox_stats() reads the row estimate from them.
            // SAFETY: called between transactions, as backends do when idle.
            unsafe { pg_sys::pgstat_report_stat(true) };
        }
        report_activity(c"idle");
    }

    /// Creates the current segment and the next, and sets when to come back for more: one
    /// interval before they run out.
    fn create_segments(&mut self, schema: &str) {
        let covered = segment::interval().and_then(|interval| {
            BackgroundWorker::transaction(|| segment::create_ahead(schema))
                .unwrap_or_else(|e| pgrx::error!("pg_outbox pruner: {e}"))
                .map(|covered| covered.saturating_sub(interval))
        });
        self.next_segments = covered.map(|wait| Instant::now() + wait);
    }

    /// Creates segments between passes, when they are about to run out.
    fn segments_due(&mut self) {
        let schema = BackgroundWorker::transaction(|| extension_schema().ok().flatten());
        match schema {
            Some(schema) => self.create_segments(&schema),
            None => self.next_segments = None,
        }
    }

    /// An expired segment could not be dropped without waiting. It is tried again next pass;
    /// after [`BUSY_PASSES_BEFORE_WARNING`] passes in a row, and as many after each warning, the
    /// server log says why it may be.
    fn segment_busy(&mut self, name: String) {
        let passes = self.busy_segments.entry(name.clone()).or_insert(0);
        *passes += 1;
        if passes.is_multiple_of(BUSY_PASSES_BEFORE_WARNING) {
            warning!(
                "pg_outbox pruner: expired segment {name} could not be dropped in the last {passes} passes: a transaction that published into it is still open, or sessions keep event_outbox locked (look for old transactions in pg_stat_activity)"
            );
        } else {
            debug1!("pg_outbox pruner: segment {name} is in use; dropping it next pass");
        }
    }
}

/// Compresses the full-page images this worker's deletes write while the server's
/// `wal_compression` is at its built-in default, `off`; a value configured anywhere (file,
/// command line, database, role), `off` included, is followed. Expired rows usually sit on
/// pages last written checkpoints ago, so the first change to each page logs the whole page:
/// pruning 1M rows wrote 221 MB of WAL, 101 MB compressed, and publishers' commits queue behind
/// that WAL. pglz rather than lz4 (94 MB): every server can replay pglz, while a standby or a
/// point-in-time restore built without lz4 could not replay lz4 images. The RESET each pass is
/// what lets a reloaded configuration win over the session's own setting.
fn compress_full_page_images() -> pgrx::spi::Result<()> {
    Spi::run("RESET wal_compression")?;
    Spi::run(
        "SELECT pg_catalog.set_config('wal_compression', 'pglz', false) \
         FROM pg_catalog.pg_settings WHERE name = 'wal_compression' AND source = 'default'",
    )
}

/// Warns, every pass while it lasts, that the cluster's notification queue is filling past
/// `pg_outbox.queue_warning` (by default a tenth, far below PostgreSQL's own warning at half
/// full, so operators hear of a listener that stopped reading while gigabytes remain): when it
/// is full every transaction that notifies fails at commit.
fn warn_about_the_queue(usage: f64) {
    if usage > 0.0 && usage >= guc::queue_warning() {
        warning!(
            "pg_outbox: the notification queue is {:.1}% full: a session that ran LISTEN is not reading (often one idle in transaction); end it (pg_terminate_backend) or COMMIT it. When the queue is full, every transaction that sends a notification fails at commit. See outbox_stats().notification_queue_usage",
            usage * 100.0
        );
    }
}

/// Whether SIGTERM arrived: the flag Postgres's own handler sets, which stays set.
fn shutdown_requested() -> bool {
    // SAFETY: a plain read of a flag set by the signal handler.
    unsafe { pg_sys::ShutdownRequestPending != 0 }
}
