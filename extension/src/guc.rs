//! Every `pg_outbox.*` setting: what it means, its default and unit, and a typed accessor, so no
//! caller handles raw integers or units.
//!
//! All settings but `pg_outbox.database` and `pg_outbox.handoff_buffer` reload on SIGHUP.
//! `notify_payload` and `max_payload_bytes` are also settable by a superuser per database or
//! role (`ALTER DATABASE … SET`), since they shape what publishers in that database send.

use std::ffi::CString;
use std::time::Duration;

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};

/// What a notification carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PostgresGucEnum)]
pub enum NotifyPayload {
    /// The id and the metadata a listener needs to filter and order; listeners fetch the payload
    /// from `event_outbox`, so payloads of any size work and stay readable only by roles with
    /// SELECT on the table.
    #[name = c"reference"]
    Reference,
    /// The whole event when it fits in a notification (under 8000 bytes), a reference otherwise.
    /// Every role that can connect can LISTEN, so inline payloads are visible to all of them.
    #[name = c"inline"]
    Inline,
    /// Every notification sealed (encrypted and authenticated) with the current key of
    /// `outbox_seal_keys`, and the whole event inside when it fits (under some 5,950 bytes):
    /// other roles that LISTEN read nothing and cannot forge, and relays, which read the key
    /// when they connect, deliver without a query. The default.
    #[name = c"sealed"]
    Sealed,
}

/// Who sends an event's notification.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PostgresGucEnum)]
pub enum NotifyMode {
    /// The publishing transaction, at its commit. Every such commit takes PostgreSQL's
    /// cluster-wide notify lock through its WAL flush, so concurrent publishers cannot share a
    /// flush (no group commit).
    #[name = c"transaction"]
    Transaction,
    /// The notifier worker, right after the publishing transaction commits: publishers only
    /// INSERT, so they group-commit like any insert. Needs the library preloaded and the
    /// publisher in `pg_outbox.database`; elsewhere publishing falls back to `transaction`.
    #[name = c"worker"]
    Worker,
}

/// Rows older than this are pruned. Seconds.
static RETENTION: GucSetting<i32> = GucSetting::<i32>::new(3600);
/// How much time one segment of the outbox covers; 0 keeps every event in `event_outbox` itself.
/// Seconds.
static SEGMENT_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(600);
/// How often the pruner runs. Seconds.
static PRUNE_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(300);
/// Rows deleted per transaction by the pruner, so a backlog never holds locks for long.
static PRUNE_BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(10_000);
/// The pause between two prune batches, so a large backlog is deleted at a pace that leaves
/// WAL bandwidth to publishers. Milliseconds.
static PRUNE_PAUSE: GucSetting<i32> = GucSetting::<i32>::new(100);
/// The database the workers serve; read once at server start.
static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));
/// The largest payload `outbox_publish` accepts. Bytes.
static MAX_PAYLOAD_BYTES: GucSetting<i32> = GucSetting::<i32>::new(1024 * 1024);
/// The notification queue fraction above which the pruner warns in the server log.
static QUEUE_WARNING: GucSetting<f64> = GucSetting::<f64>::new(0.1);
/// The size of the buffer in shared memory through which publishers hand their events to the
/// notifier (0: none, the notifier reads every batch from the table); read once at server start.
/// Kilobytes.
static HANDOFF_BUFFER: GucSetting<i32> = GucSetting::<i32>::new(4096);
/// The shortest time between two of the notifier's batches: it gathers what commits meanwhile
/// into one batch, sent in as few notifications as fit. Milliseconds.
static NOTIFY_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(4);
/// Who notifies: the publishing transaction or the notifier worker.
static NOTIFY_MODE: GucSetting<NotifyMode> = GucSetting::<NotifyMode>::new(NotifyMode::Transaction);
/// Whether `outbox_publish` also writes each event into the WAL as a logical-decoding message.
static LOGICAL_MESSAGES: GucSetting<bool> = GucSetting::<bool>::new(false);
/// Reference, inline or sealed notifications.
static NOTIFY_PAYLOAD: GucSetting<NotifyPayload> =
    GucSetting::<NotifyPayload>::new(NotifyPayload::Sealed);

/// Registers the settings. `pg_outbox.database` can only be defined while the library is being
/// preloaded: defining a postmaster-level setting later (from `CREATE EXTENSION`) is an error.
pub fn init(preloading: bool) {
    GucRegistry::define_int_guc(
        c"pg_outbox.retention",
        c"How long published events are kept before the pruner deletes them.",
        c"Rows whose created_at is older than this, by the database clock, are pruned.",
        &RETENTION,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_outbox.segment_interval",
        c"How much time each segment of the outbox covers (0: no segments).",
        c"Events are published into the segment of their time, and the pruner drops a segment whole once its last event has expired; events live from retention to retention plus this.",
        &SEGMENT_INTERVAL,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_outbox.prune_interval",
        c"How often the pruner deletes expired events.",
        c"",
        &PRUNE_INTERVAL,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_outbox.prune_batch_size",
        c"How many rows the pruner deletes per transaction.",
        c"Small batches keep each transaction and its locks short while a large backlog drains.",
        &PRUNE_BATCH_SIZE,
        1,
        10_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_outbox.prune_pause",
        c"How long the pruner pauses between two batches.",
        c"Spreads the deletion of a large backlog so that publishers keep their WAL bandwidth; 0 deletes batches back to back.",
        &PRUNE_PAUSE,
        0,
        60_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pg_outbox.notify_interval",
        c"The shortest time between two of the notifier's batches (notify_mode = worker).",
        c"Every listener does the same work per notification, so with many relays a longer interval, more events per notification, costs the server less per relay; it adds up to this much latency.",
        &NOTIFY_INTERVAL,
        1,
        1000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pg_outbox.max_payload_bytes",
        c"The largest payload outbox_publish accepts.",
        c"Measured on the jsonb value; larger payloads are refused with SQLSTATE 54000.",
        &MAX_PAYLOAD_BYTES,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_enum_guc(
        c"pg_outbox.notify_payload",
        c"What each notification carries: 'sealed' (the whole event when it fits, encrypted and authenticated with the key of outbox_seal_keys; the default), 'reference' (id and metadata) or 'inline' (the whole event when it fits, in the clear).",
        c"Every role that can connect can LISTEN and NOTIFY: it reads reference and inline notifications and can send its own; a sealed one it can neither read nor forge.",
        &NOTIFY_PAYLOAD,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_float_guc(
        c"pg_outbox.queue_warning",
        c"How full the cluster's notification queue may get (0 to 1) before the pruner warns.",
        c"PostgreSQL warns at half full; when the queue is full, every transaction that notifies fails at commit.",
        &QUEUE_WARNING,
        0.0,
        1.0,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"pg_outbox.notify_mode",
        c"Who sends notifications: 'transaction' (the publishing transaction) or 'worker' (the notifier worker, after commit).",
        c"In worker mode publishers do not take the cluster-wide notify lock, so they group-commit like plain inserts.",
        &NOTIFY_MODE,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_outbox.logical_messages",
        c"Whether outbox_publish also writes each event as a logical-decoding message (prefix pg_outbox).",
        c"Transactional, like the row: consumers of a replication slot (pgoutput with messages, test_decoding, Debezium) read exactly the committed events, with their payloads whatever their size.",
        &LOGICAL_MESSAGES,
        GucContext::Suset,
        GucFlags::default(),
    );
    if preloading {
        GucRegistry::define_string_guc(
            c"pg_outbox.database",
            c"The database whose event_outbox the pruner and the notifier serve.",
            c"Read at server start; create the extension in this database.",
            &DATABASE,
            GucContext::Postmaster,
            GucFlags::default(),
        );
        GucRegistry::define_int_guc(
            c"pg_outbox.handoff_buffer",
            c"The shared memory through which worker-mode publishers hand their events to the notifier (0: none).",
            c"Read at server start. A transaction whose events do not fit, or any while it is full, is read from event_outbox instead, at more CPU per event.",
            &HANDOFF_BUFFER,
            0,
            1024 * 1024,
            GucContext::Postmaster,
            GucFlags::UNIT_KB,
        );
    }
}

/// See [`HANDOFF_BUFFER`]; read by the postmaster, which sizes the buffer.
pub fn handoff_buffer_bytes() -> usize {
    usize::try_from(HANDOFF_BUFFER.get()).unwrap_or(0) * 1024
}

pub fn retention() -> Duration {
    seconds(RETENTION.get())
}

/// `None` when the outbox is not segmented.
pub fn segment_interval() -> Option<Duration> {
    u64::try_from(SEGMENT_INTERVAL.get())
        .ok()
        .filter(|secs| *secs > 0)
        .map(Duration::from_secs)
}

pub fn prune_interval() -> Duration {
    seconds(PRUNE_INTERVAL.get())
}

pub fn prune_batch_size() -> i64 {
    i64::from(PRUNE_BATCH_SIZE.get())
}

pub fn prune_pause() -> Duration {
    Duration::from_millis(u64::try_from(PRUNE_PAUSE.get()).unwrap_or(0))
}

pub fn notify_interval() -> Duration {
    Duration::from_millis(u64::try_from(NOTIFY_INTERVAL.get()).unwrap_or(4))
}

/// The workers' database, or `postgres` when the setting is empty.
pub fn database() -> String {
    DATABASE
        .get()
        .map(|name| name.to_string_lossy().into_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "postgres".to_owned())
}

pub fn max_payload_bytes() -> usize {
    usize::try_from(MAX_PAYLOAD_BYTES.get()).unwrap_or(usize::MAX)
}

pub fn queue_warning() -> f64 {
    QUEUE_WARNING.get()
}

pub fn notify_mode() -> NotifyMode {
    NOTIFY_MODE.get()
}

pub fn logical_messages() -> bool {
    LOGICAL_MESSAGES.get()
}

pub fn notify_payload() -> NotifyPayload {
    NOTIFY_PAYLOAD.get()
}

fn seconds(value: i32) -> Duration {
    Duration::from_secs(u64::try_from(value).unwrap_or(1))
}
