//! The notifier: with `pg_outbox.notify_mode = 'worker'`, publishing transactions only INSERT
//! (so they group-commit like plain inserts, instead of serialising on PostgreSQL's cluster-wide
//! notify lock), and this worker sends their notifications right after they commit.
//!
//! How it stays exact, PgQ-style: the worker's position is the last snapshot it has covered.
//! Each batch takes a new snapshot and notifies the deferred events of the transactions that
//! are visible in the new snapshot and not in the old one: every committed event lands in
//! exactly one batch whatever order transactions commit in, and a rolled-back one in none. A
//! batch goes out in as few notifications as fit (version 2 documents, see
//! [`pg_outbox_wire::notification`]), not one per event: each is a queue entry, and a message and a
//! wakeup in every listener.
//!
//! Where the events come from: publishers hand them over through shared memory
//! ([`crate::worker::handoff`]), so a batch reads no table. When some may be missing there (a
//! transaction too large for the buffer, a prepared one, a notifier that restarted), batches
//! read the same rows from `event_outbox`, with the same snapshots, until those transactions
//! have all ended.
//!
//! The position is recorded in `outbox_notifier_state.snapshot` at most every
//! [`RECORD_INTERVAL`] (with that batch) and when the worker stops, so a worker that resumes
//! after a crash or an error notifies at most that last stretch again, and relays drop what they
//! already have.
//!
//! How it wakes: a publishing backend that handed events over sets this worker's latch from its
//! commit callback, after the commit is visible. Without publishers it wakes every
//! [`IDLE_TICK`] to move its snapshot forward (so the next batch's range stays small) and to
//! pick up transactions committed by `COMMIT PREPARED`, which runs no callback of the publisher.

use std::cell::Cell;
use std::ffi::CString;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::AtomicU32;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder};
use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use pgrx::{pg_shmem_init, PgAtomic, PgOid};

use crate::catalog::{extension_namespace, extension_schema};
use crate::guc::{self, NotifyPayload};
use crate::notify::notify;
use crate::seal;
use crate::worker::handoff::{self, Record};
use crate::worker::session::{
    self, report_activity, ConnectAttempts, Waiting, WAITING_FOR_EXTENSION,
};
use crate::worker::shared;
use pg_outbox_wire::{
    BatchDocuments, Notification, SealKey, Snapshot, NOTIFY_PAYLOAD_LIMIT, SEALED_DOCUMENT_LIMIT,
};

/// The name shown as `backend_type` in `pg_stat_activity`.
pub const BACKEND_TYPE: &str = "pg_outbox notifier";

/// How long the postmaster waits before starting the worker again after it exits.
const RESTART_AFTER: Duration = Duration::from_secs(1);

/// How often the worker runs a batch when no publisher wakes it.
const IDLE_TICK: Duration = Duration::from_secs(5);

/// At most this many rows go into one batch: after the worker was down for a while, its backlog
/// goes out in transactions of this size instead of one holding every notification in memory.
/// A transaction that published more rows than this still goes out whole, in a batch of its own.
const MAX_BATCH_ROWS: usize = 10_000;

/// How often the worker records its position. Recording it with every batch rewrote one row
/// hundreds of times a second, and reading past that row's dead versions took a third of the
/// worker's time under load.
const RECORD_INTERVAL: Duration = Duration::from_secs(1);

/// The notifier's failed connection attempts in a row (see [`session::connect`]).
static CONNECT_ATTEMPTS: ConnectAttempts = unsafe { PgAtomic::new(c"pg_outbox_notifier_connect") };

/// Reserves the shared memory and registers the worker; called from `_PG_init` while
/// preloading.
pub fn register() {
    pg_shmem_init!(CONNECT_ATTEMPTS = AtomicU32::new(0));
    shared::register();
    handoff::register();
    BackgroundWorkerBuilder::new(BACKEND_TYPE)
        .set_type(BACKEND_TYPE)
        .set_library("pg_outbox")
        .set_function("pg_outbox_notifier_main")
        .enable_spi_access()
        .set_restart_time(Some(RESTART_AFTER))
        .load();
}

/// The worker's entry point.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_outbox_notifier_main(_arg: pg_sys::Datum) {
    let database = guc::database();
    session::connect(&CONNECT_ATTEMPTS, BACKEND_TYPE, &database);
    // Whether publishers defer is left as an earlier notifier left it until `Setup::look` says.
    shared::advertise(true);
    match handoff::capacity() {
        0 => log!(
            "pg_outbox notifier started in database \"{database}\", without a handoff buffer (pg_outbox.handoff_buffer = 0): it reads every batch from event_outbox"
        ),
        bytes => log!(
            "pg_outbox notifier started in database \"{database}\", with a {} kB handoff buffer",
            bytes / 1024
        ),
    }
    // A batch's commit need not wait for its WAL flush: if it is lost in a crash, the restarted
    // worker sends those notifications again, and relays drop what they already have. Its
    // statements keep one plan (the xid index, whatever the snapshots) instead of being planned
    // again for every batch, which took a third of its time.
    BackgroundWorker::transaction(|| {
        Spi::run("SET synchronous_commit = off; SET plan_cache_mode = force_generic_plan")
    })
    .unwrap_or_else(|e| pgrx::error!("pg_outbox notifier: {e}"));

    let mut setup = Setup::NotInstalled;
    let mut last_batch = Instant::now();
    let mut waiting = Waiting::default();
    let mut catching_up = false;
    loop {
        if BackgroundWorker::sighup_received() {
            // SAFETY: called from the worker's main loop, outside any transaction.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        // Prepared once: if the extension is dropped later, the next batch fails, the worker
        // exits with that error and its successor looks again.
        if !matches!(setup, Setup::Ready(_)) {
            setup = BackgroundWorker::transaction(Setup::look);
            shared::serve(!matches!(setup, Setup::NeedsUpdate));
        }
        match &mut setup {
            Setup::Ready(batches) => {
                waiting.over();
                // The pruner is dropping a segment: let it find the outbox unread.
                while let Some(left) = shared::held_off_for() {
                    // SAFETY: a plain sleep, bounded by the pruner's short hold-off.
                    unsafe { pg_sys::pg_usleep(left.min(Duration::from_millis(1)).as_micros() as _) };
                }
                // Under a stream of commits, gather what commits meanwhile into the next batch
                // rather than running one batch per commit. The interval between the starts of
                // two batches (`pg_outbox.notify_interval`) is at most the latency it adds, and
                // at most its inverse batches run per second however many commits wake it. Most
                // of a batch's cost is per notification, not per event: a commit, and every
                // listening backend and relay woken to read it. So the interval trades latency
                // against the worker's CPU per event (4 ms measured cheaper than 2 ms at 10,000
                // events/s) and against what each relay costs the server (BENCHMARKS.md has
                // the figures).
                let interval = guc::notify_interval();
                let since = last_batch.elapsed();
                if since < interval {
                    // SAFETY: a plain sleep; the latch stays set for the next wait.
                    unsafe { pg_sys::pg_usleep((interval - since).as_micros() as _) };
                }
                last_batch = Instant::now();
                report_activity(c"notifying");
                // A failed batch ends the worker, so `batches` is never seen half-updated.
                let sent = BackgroundWorker::transaction(AssertUnwindSafe(|| batches.run()));
                if sent.notified > 0 {
                    debug2!("pg_outbox notifier sent {} notifications", sent.notified);
                }
                if sent.more != catching_up {
                    catching_up = sent.more;
                    if catching_up {
                        log!(
                            "pg_outbox notifier is catching up on a backlog, in batches of {MAX_BATCH_ROWS} rows"
                        );
                    } else {
                        log!("pg_outbox notifier caught up");
                    }
                }
                report_activity(&batches.state());
            }
            Setup::NotInstalled => waiting.wait(WAITING_FOR_EXTENSION, || {
                format!(
                    "pg_outbox is not installed in database \"{database}\"; the notifier waits for CREATE EXTENSION pg_outbox there"
                )
            }),
            Setup::NeedsUpdate => waiting.wait(c"waiting for ALTER EXTENSION pg_outbox UPDATE", || {
                format!(
                    "pg_outbox in database \"{database}\" predates the notifier (before 0.2.0): worker mode waits for ALTER EXTENSION pg_outbox UPDATE there, and until then publishers there notify in their own transactions (transaction mode)"
                )
            }),
        }
        // Through a backlog, batch after batch; the latch wait still answers SIGTERM and SIGHUP.
        let wait = if catching_up {
            Duration::ZERO
        } else {
            IDLE_TICK
        };
        if !BackgroundWorker::wait_latch(Some(wait)) {
            break;
        }
    }
    if let Setup::Ready(batches) = &mut setup {
        BackgroundWorker::transaction(AssertUnwindSafe(|| batches.record()));
    }
    shared::advertise(false);
    log!("pg_outbox notifier stopping");
    // Exit with 1 so that the postmaster restarts a worker stopped by pg_terminate_backend.
    // SAFETY: ends this process the way Postgres expects a backend to end.
    unsafe { pg_sys::proc_exit(1) };
}

/// What the worker found in its database.
enum Setup {
    NotInstalled,
    /// The extension's objects are from before 0.2.0: no `outbox_notifier_state` yet.
    NeedsUpdate,
    Ready(Batches),
}

impl Setup {
    /// Looks for the extension and its notifier state, and prepares the batch statements.
    fn look() -> Setup {
        let Some(schema) = extension_schema().ok().flatten() else {
            return Setup::NotInstalled;
        };
        let updated = Spi::get_one_with_args::<bool>(
            "SELECT to_regclass($1) IS NOT NULL",
            &[format!("{schema}.outbox_notifier_state").into()],
        );
        match updated {
            Ok(Some(true)) => Setup::Ready(Batches::prepare(&schema)),
            _ => Setup::NeedsUpdate,
        }
    }
}

/// The worker's position and its statements, prepared once per worker: a batch plans nothing.
struct Batches {
    /// The extension's schema, where the seal keys are.
    namespace: pg_sys::Oid,
    /// The snapshot covered by the last committed batch.
    position: Snapshot,
    /// Rows notified since the position was last recorded.
    unrecorded_rows: i64,
    /// Whether `position` moved since it was last recorded.
    moved: bool,
    recorded_at: Instant,
    /// Handed-over records of transactions that had not ended at the position.
    waiting: Vec<Record>,
    /// Whether the last batch read `event_outbox`, and through which xid it must.
    from_table: bool,
    unhanded_through: u64,
    /// How many batches ran since the worker started, and how many of them read `event_outbox`.
    batches: u64,
    table_batches: u64,
    source_changes: SourceChanges,
    /// The current snapshot.
    snapshot: OwnedPreparedStatement,
    /// The deferred rows of the transactions visible in the new snapshot and not in the old
    /// one; one row of NULLs when there are none.
    rows: OwnedPreparedStatement,
    /// Records the position and counts what was sent.
    record: OwnedPreparedStatement,
}

impl Batches {
    /// Prepares the statements and takes up the recorded position. Locking the state row keeps
    /// a worker from starting while another still holds it (one that is recording as it stops).
    fn prepare(schema: &str) -> Batches {
        let text = PgOid::from(pg_sys::TEXTOID);
        let prepare = |sql: String, types: &[PgOid]| {
            Spi::connect(|client| client.prepare_mut(sql.as_str(), types).map(|s| s.keep()))
                .unwrap_or_else(|e| pgrx::error!("pg_outbox notifier: {e}"))
        };
        let position = Spi::get_one::<String>(&format!(
            "SELECT snapshot::text FROM {schema}.outbox_notifier_state FOR UPDATE"
        ))
        .ok()
        .flatten()
        .unwrap_or_else(|| pgrx::error!("pg_outbox notifier: outbox_notifier_state has no row"));
        // Publishers hand payloads over only when the notifier sends them inline. Said before
        // the mark below: a transaction that gets its xid after the mark stages its events
        // after this, and those before are read from the table.
        let namespace = extension_namespace()
            .ok()
            .flatten()
            .unwrap_or_else(|| pgrx::error!("pg_outbox notifier: pg_outbox is not installed"));
        shared::set_inline(Form::current(namespace).inline());
        // An earlier notifier may have drained records of transactions still running, which
        // died with it: until every transaction that exists now has ended, read the table.
        shared::mark_all_unhanded();
        Batches {
            namespace,
            position: parse_snapshot(&position),
            unrecorded_rows: 0,
            moved: false,
            recorded_at: Instant::now(),
            waiting: Vec::new(),
            from_table: true,
            unhanded_through: 0,
            batches: 0,
            table_batches: 0,
            source_changes: SourceChanges::default(),
            snapshot: prepare("SELECT pg_current_snapshot()::text".to_owned(), &[]),
            rows: prepare(
                // The snapshots are parsed once, in the CTE: under a generic plan a cast of a
                // parameter in the WHERE clause is evaluated again for every row, and parsing
                // them took a sixth of the worker's time at 64 writers. The scan runs on a
                // snapshot taken after the new one, so it sees every row visible in it.
                format!(
                    "WITH s AS MATERIALIZED ( \
                         SELECT $1::pg_snapshot AS old, $2::pg_snapshot AS new) \
                     SELECT e.id, e.channel, e.user_id, e.origin, e.xid::text::int8, \
                            (extract(epoch FROM e.created_at) * 1000000)::int8, \
                            CASE WHEN $3 THEN e.payload::text END \
                     FROM s LEFT JOIN LATERAL ( \
                         SELECT * FROM {schema}.event_outbox \
                         WHERE xid >= pg_snapshot_xmin(s.old) \
                           AND xid < pg_snapshot_xmax(s.new) \
                           AND pg_visible_in_snapshot(xid, s.new) \
                           AND NOT pg_visible_in_snapshot(xid, s.old) \
                           AND notify_deferred) e ON true \
                     ORDER BY e.xid, e.id"
                ),
                &[text, text, PgOid::from(pg_sys::BOOLOID)],
            ),
            record: prepare(
                format!(
                    "UPDATE {schema}.outbox_notifier_state SET snapshot = $1::pg_snapshot, \
                         rows_notified = rows_notified + $2, \
                         last_notified_at = CASE WHEN $2 > 0 THEN clock_timestamp() \
                                                 ELSE last_notified_at END"
                ),
                &[text, PgOid::from(pg_sys::INT8OID)],
            ),
        }
    }

    /// One batch, in the caller's transaction: notifies the deferred events of the
    /// transactions that committed since the position and moves it forward, recording it when
    /// [`RECORD_INTERVAL`] has passed. If the transaction fails the worker exits, so the
    /// position in memory never runs ahead of a committed batch.
    ///
    /// The snapshot is taken before the handoff buffer is drained, and [`handoff`] says why
    /// that makes the records of every transaction it sees ended already drained.
    fn run(&mut self) -> Sent {
        let form = Form::current(self.namespace);
        let inline = form.inline();
        shared::set_inline(inline);
        let new = Spi::connect(|client| {
            client
                .select(&self.snapshot, None, &[])?
                .first()
                .get_one::<String>()
        })
        .unwrap_or_else(|e| pgrx::error!("pg_outbox notifier: {e}"))
        .unwrap_or_else(|| pgrx::error!("pg_outbox notifier: pg_current_snapshot() returned NULL"));
        let new = parse_snapshot(&new);
        let mut records = std::mem::take(&mut self.waiting);
        match handoff::drain() {
            Ok(drained) => records.extend(drained),
            Err(handoff::Malformed) => {
                warning!("pg_outbox notifier: the handoff buffer held malformed records; reading event_outbox instead");
                shared::mark_all_unhanded();
            }
        }
        // Read after the snapshot, so that it covers every transaction the snapshot sees.
        let unhanded_through = shared::unhanded_through();
        let from_table = unhanded_through >= self.position.xmin();
        self.unhanded_through = unhanded_through;
        self.batches += 1;
        self.table_batches += u64::from(from_table);
        if from_table != self.from_table {
            self.from_table = from_table;
            self.source_changes.note(from_table, || {
                if from_table {
                    format!(
                        "pg_outbox notifier reads event_outbox until the transactions through xid {unhanded_through} have ended: their events were not all handed over (too many at once, a prepared transaction, a trigger, rule or policy on event_outbox, or a restart)"
                    )
                } else {
                    "pg_outbox notifier takes events from the publishers' handoff".to_owned()
                }
            });
        }

        let mut documents = BatchDocuments::with_limit(form.limit(), |doc: &str| form.send(doc));
        let (reached, mut notified, more) = if from_table {
            self.send_from_table(&new, inline, &mut documents)
        } else {
            (new, 0, false)
        };
        // SAFETY: a plain read of this backend's database.
        let database = u32::from(unsafe { pg_sys::MyDatabaseId });
        let mut committed = Vec::new();
        for record in records {
            if record.database != database || self.position.is_visible(record.xid) {
                continue; // Not this database's, or covered by an earlier batch.
            }
            if !reached.is_visible(record.xid) {
                if more {
                    // Catching up from the table, far behind: keeping every newer record until
                    // then would hold the whole backlog in memory. The table has them too.
                    shared::mark_unhanded(record.xid);
                } else {
                    self.waiting.push(record);
                }
            } else if !from_table && did_commit(record.xid) {
                committed.push(record);
            }
        }
        committed.sort_by_key(|record| record.xid);
        for record in &committed {
            for event in &record.events {
                let payload = if inline { event.payload_json() } else { None };
                documents.push(&event.notification(record.xid), payload.as_deref());
                notified += 1;
            }
        }
        documents.finish();

        self.moved |= reached != self.position;
        self.position = reached;
        self.unrecorded_rows += notified;
        if self.recorded_at.elapsed() >= RECORD_INTERVAL {
            self.record();
        }
        Sent { notified, more }
    }

    /// What the worker reports in `pg_stat_activity.query` between batches: where the last one
    /// took its events from, and how many read `event_outbox` since it started, so that an
    /// operator (or a test) sees the slow path taken without reading the log.
    fn state(&self) -> CString {
        let source = if self.from_table {
            format!("event_outbox through xid {}", self.unhanded_through)
        } else {
            "handoff".to_owned()
        };
        CString::new(format!(
            "idle (last batch from {source}; {} of {} batches read event_outbox)",
            self.table_batches, self.batches
        ))
        .unwrap_or_default()
    }

    /// Sends the deferred rows of `event_outbox` of the transactions visible in `new` and not
    /// in the position; returns the snapshot they cover, how many went out, and whether more
    /// wait.
    ///
    /// More than [`MAX_BATCH_ROWS`] rows to send: the batch ends before the transaction of the
    /// row after the first [`MAX_BATCH_ROWS`]. It has sent what `new` cut off there
    /// ([`Snapshot::below`]) sees, so it ends at the position joined with that
    /// ([`Snapshot::union`]): the cut alone would forget the transactions above the cut that the
    /// position had seen ended, and the next batch would send them again.
    fn send_from_table<F: FnMut(&str)>(
        &self,
        new: &Snapshot,
        inline: bool,
        documents: &mut BatchDocuments<F>,
    ) -> (Snapshot, i64, bool) {
        let position = self.position.to_string();
        Spi::connect_mut(|client| {
            let mut rows = client.select(
                &self.rows,
                Some((MAX_BATCH_ROWS + 1) as _),
                &[
                    position.as_str().into(),
                    new.to_string().into(),
                    inline.into(),
                ],
            )?;
            let mut reached = new.clone();
            // Rows from this xid on wait for the next batch.
            let mut stop_at = None;
            let more = rows.len() > MAX_BATCH_ROWS;
            if more {
                let xid = |row: Option<pgrx::spi::SpiHeapTupleData>| {
                    row.and_then(|row| row.get::<i64>(5).ok().flatten())
                        .and_then(|xid| u64::try_from(xid).ok())
                        .unwrap_or_else(|| pgrx::error!("pg_outbox notifier: a row without xid"))
                };
                let first = xid(rows.next());
                let after_last = xid(rows.nth(MAX_BATCH_ROWS - 1));
                if after_last > first {
                    stop_at = Some(after_last);
                    reached = self.position.union(&new.below(after_last));
                    rows = rows.rewind();
                } else {
                    // The first transaction alone has more rows than a batch: all of it, alone.
                    let sent = new.below(first + 1);
                    reached = self.position.union(&sent);
                    rows = client.select(
                        &self.rows,
                        None,
                        &[
                            position.as_str().into(),
                            sent.to_string().into(),
                            inline.into(),
                        ],
                    )?;
                }
            }
            let mut notified = 0_i64;
            for row in rows {
                let (Some(id), Some(channel), Some(user_id), Some(xid), Some(created_at_us)) = (
                    row.get::<pgrx::Uuid>(1)?,
                    row.get::<&str>(2)?,
                    row.get::<&str>(3)?,
                    row.get::<i64>(5)?,
                    row.get::<i64>(6)?,
                ) else {
                    // No row to notify (the columns are NOT NULL): the one row of a batch
                    // without any.
                    continue;
                };
                let xid = u64::try_from(xid).unwrap_or_default();
                if stop_at.is_some_and(|stop_at| xid >= stop_at) {
                    break;
                }
                let notification = Notification {
                    id: uuid::Uuid::from_bytes(*id.as_bytes()),
                    channel,
                    user_id,
                    origin: row.get::<&str>(4)?,
                    xid,
                    created_at_us,
                };
                documents.push(&notification, row.get::<&str>(7)?);
                notified += 1;
            }
            Ok::<_, pgrx::spi::SpiError>((reached, notified, more))
        })
        .unwrap_or_else(|e| pgrx::error!("pg_outbox notifier: {e}"))
    }

    /// Records the position, in the caller's transaction, if it moved.
    fn record(&mut self) {
        if self.moved {
            Spi::connect_mut(|client| {
                client.update(
                    &self.record,
                    None,
                    &[
                        self.position.to_string().into(),
                        self.unrecorded_rows.into(),
                    ],
                )?;
                Ok::<_, pgrx::spi::SpiError>(())
            })
            .unwrap_or_else(|e| pgrx::error!("pg_outbox notifier: {e}"));
        }
        self.moved = false;
        self.unrecorded_rows = 0;
        self.recorded_at = Instant::now();
    }
}

/// Logs where batches take their events from when it changes, each way at most once per
/// [`SOURCE_CHANGE_LOG_INTERVAL`]: with a trigger on `event_outbox`, every publish sends the
/// notifier to the table for a batch or two.
#[derive(Default)]
struct SourceChanges {
    /// When a change to the table, and one to the handoff, were last logged.
    logged_at: [Option<Instant>; 2],
}

/// See [`SourceChanges`].
const SOURCE_CHANGE_LOG_INTERVAL: Duration = Duration::from_secs(60);

impl SourceChanges {
    fn note(&mut self, to_table: bool, message: impl FnOnce() -> String) {
        let logged_at = &mut self.logged_at[usize::from(to_table)];
        if logged_at.is_none_or(|at| at.elapsed() >= SOURCE_CHANGE_LOG_INTERVAL) {
            *logged_at = Some(Instant::now());
            log!("{}", message());
        }
    }
}

/// What one batch did.
struct Sent {
    notified: i64,
    /// It stopped at [`MAX_BATCH_ROWS`]: more committed rows wait.
    more: bool,
}

fn parse_snapshot(text: &str) -> Snapshot {
    text.parse()
        .unwrap_or_else(|e| pgrx::error!("pg_outbox notifier: {e}"))
}

/// Whether `xid`, which a snapshot sees as ended, committed (rather than rolled back).
fn did_commit(xid: u64) -> bool {
    // The low 32 bits name it in the commit log, which keeps far older transactions than any
    // still in the buffer.
    // SAFETY: a commit log lookup of an ended transaction.
    unsafe { pg_sys::TransactionIdDidCommit(pg_sys::TransactionId::from(xid as u32)) }
}

/// How the notifier's documents go out, as `pg_outbox.notify_payload` and `outbox_seal_keys`
/// say at the start of a batch.
enum Form {
    Reference,
    Inline,
    Sealed(SealKey),
    /// Sealed, without a usable key: nothing is sent (the relays' sweeps read the rows), as an
    /// unsealed notification would show other roles what sealing hides.
    Unsealable,
}

thread_local! {
    /// Whether the notifier has said, since the key last worked, that it cannot seal.
    static SAID_UNSEALABLE: Cell<bool> = const { Cell::new(false) };
}

impl Form {
    fn current(namespace: pg_sys::Oid) -> Form {
        match guc::notify_payload() {
            NotifyPayload::Reference => Form::Reference,
            NotifyPayload::Inline => Form::Inline,
            NotifyPayload::Sealed => match seal::current_key(namespace) {
                // A database not yet updated to 0.5.0 has no keys: references, as publishers
                // send in transaction mode.
                Ok(None) => Form::Reference,
                Ok(Some(key)) => {
                    SAID_UNSEALABLE.set(false);
                    Form::Sealed(key)
                }
                Err(err) => {
                    if !SAID_UNSEALABLE.replace(true) {
                        warning!("pg_outbox notifier sends no notification until it can seal them: {err}");
                    }
                    Form::Unsealable
                }
            },
        }
    }

    /// Whether payloads go inside the notifications.
    fn inline(&self) -> bool {
        matches!(self, Form::Inline | Form::Sealed(_))
    }

    /// Every document is shorter than this.
    fn limit(&self) -> usize {
        match self {
            Form::Sealed(_) | Form::Unsealable => SEALED_DOCUMENT_LIMIT,
            Form::Reference | Form::Inline => NOTIFY_PAYLOAD_LIMIT,
        }
    }

    fn send(&self, document: &str) {
        match self {
            Form::Reference | Form::Inline => notify(document),
            Form::Sealed(key) => notify(&seal::seal(key, document)),
            Form::Unsealable => {}
        }
    }
}
