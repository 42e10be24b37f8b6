//! The handoff: how a publishing transaction gives its events to the notifier, so that the
//! notifier's common path reads no table. Reading `event_outbox` for every batch (a plan over
//! every segment, a scan, a row per event through SPI) was most of the notifier's CPU, and at 64
//! writers on two cores every microsecond of it is taken from the publishers.
//!
//! In worker mode `outbox_publish` stages each event in its backend ([`stage`]). Just before the
//! transaction commits (`PRE_COMMIT`) its events go into one shared buffer as one record, and
//! once it has committed the notifier is woken. Each batch, the notifier takes a snapshot, then
//! drains the buffer ([`drain`]): a record whose transaction the new snapshot sees and the old
//! one did not goes out if that transaction committed, and one whose transaction is still
//! running waits for a later batch.
//!
//! Why this is exact: a record enters the buffer before its transaction commits, so a
//! transaction that a snapshot sees as ended had its record in the buffer before the snapshot
//! was taken, and the notifier drains after taking it. A transaction that fails after
//! `PRE_COMMIT` leaves a record whose transaction never committed, which is dropped. Savepoints
//! rolled back take their events out of the staged ones.
//!
//! When a transaction's events are not all in the buffer, the greatest such xid is kept in
//! [`UNHANDED_THROUGH`], and the notifier reads its batches from `event_outbox` (exact, with the
//! same snapshots) until every transaction up to that xid has ended:
//! - its events did not fit in the buffer (`pg_outbox.handoff_buffer`, 4 MB by default): a huge
//!   transaction, or a notifier that is down while publishers go on;
//! - it was prepared for two-phase commit: `COMMIT PREPARED` runs in another session, without
//!   the staged events;
//! - it published through a trigger, rule or policy of `event_outbox`, which may have stored
//!   something other than what was published ([`leave_to_table`]);
//! - a notifier stopped while it held drained records of transactions still running: its
//!   successor marks every xid assigned before it started.

use std::cell::{Cell, RefCell, UnsafeCell};
use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PgAtomic, PgSharedMemoryInitialization};
use uuid::Uuid;

use crate::guc;
use crate::notification::{jsonb_text, Notification, INLINE_CANDIDATE_BYTES};
use crate::worker::notifier;

static BUFFER: SharedBuffer = SharedBuffer {
    name: c"pg_outbox_handoff",
    head: UnsafeCell::new(std::ptr::null_mut()),
};

/// The greatest xid whose events may be missing from the buffer: the notifier reads
/// `event_outbox` while its position has not seen every transaction up to it.
static UNHANDED_THROUGH: PgAtomic<AtomicU64> =
    unsafe { PgAtomic::new(c"pg_outbox_unhanded_through") };

/// Whether the notifier sends payloads inline, as it last read `pg_outbox.notify_payload`:
/// publishers hand payloads over only then, which in reference mode saves copying them and
/// leaves the buffer to metadata. An event handed over without one goes out as a reference.
static INLINE: PgAtomic<AtomicBool> = unsafe { PgAtomic::new(c"pg_outbox_handoff_inline") };

/// Reserves the shared memory; called from `_PG_init` while preloading.
pub fn register() {
    pg_shmem_init!(BUFFER = ());
    pg_shmem_init!(UNHANDED_THROUGH = AtomicU64::new(0));
    pg_shmem_init!(INLINE = AtomicBool::new(false));
}

/// Registers the transaction callbacks, from `_PG_init` while preloading: every process
/// inherits them. Registered at a first publish made inside another extension's `PRE_COMMIT`
/// callback, they would miss that `PRE_COMMIT` (PostgreSQL prepends, and is mid-walk), and the
/// staged events would be dropped at COMMIT, neither handed over nor marked unhanded.
pub fn register_callbacks() {
    // SAFETY: callbacks that live as long as the library, registered once per process.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_transaction_end), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subtransaction_end), std::ptr::null_mut());
    }
}

/// Says whether the notifier sends payloads inline (the notifier's side).
pub fn set_inline(inline: bool) {
    INLINE.get().store(inline, Ordering::Relaxed);
}

/// Marks the events of `xid` and of every earlier transaction as possibly missing from the
/// buffer.
pub fn mark_unhanded(xid: u64) {
    UNHANDED_THROUGH.get().fetch_max(xid, Ordering::AcqRel);
}

/// How many bytes of records the buffer holds (`pg_outbox.handoff_buffer`).
pub fn capacity() -> usize {
    BUFFER.capacity()
}

/// See [`UNHANDED_THROUGH`].
pub fn unhanded_through() -> u64 {
    UNHANDED_THROUGH.get().load(Ordering::Acquire)
}

/// Marks every xid assigned so far as possibly missing: for a notifier that starts (its
/// predecessor's drained records died with it) or that found the buffer unreadable.
pub fn mark_all_unhanded() {
    // SAFETY: reads the next xid under its own lock.
    let next = unsafe { pg_sys::ReadNextFullTransactionId() }.value;
    mark_unhanded(next.saturating_sub(1));
}

// ---------------------------------------------------------------------------------------------
// The shared buffer

/// The head of the shared buffer; `capacity` bytes of records follow it, appended one after the
/// other, and the notifier takes them all at once. A record takes some 100 bytes per event plus
/// the user id, channel and origin, and the payload when it may go inline: at 10,000 events/s
/// and a batch every 4 ms the notifier drains a few tens of kilobytes at a time.
#[repr(C)]
struct Head {
    lock: *mut pg_sys::LWLock,
    capacity: usize,
    used: usize,
}

/// The buffer in shared memory, set up by hand: its size is a setting.
struct SharedBuffer {
    name: &'static CStr,
    head: UnsafeCell<*mut Head>,
}

// SAFETY: the pointer is set once in the postmaster, before any backend forks, and the buffer
// it points to is only touched under its LWLock.
unsafe impl Sync for SharedBuffer {}

impl PgSharedMemoryInitialization for SharedBuffer {
    type Value = ();

    unsafe fn on_shmem_request(&'static self) {
        // SAFETY: called from the shmem request hook, as the trait requires.
        unsafe {
            pg_sys::RequestAddinShmemSpace(size_of::<Head>() + guc::handoff_buffer_bytes());
            pg_sys::RequestNamedLWLockTranche(self.name.as_ptr(), 1);
        }
    }

    unsafe fn on_shmem_startup(&'static self, _: ()) {
        // SAFETY: called from the shmem startup hook, as the trait requires; 21 is
        // AddinShmemInitLock, which every extension takes around ShmemInitStruct.
        unsafe {
            let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
            pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
            let capacity = guc::handoff_buffer_bytes();
            let mut found = false;
            let head = pg_sys::ShmemInitStruct(
                self.name.as_ptr(),
                size_of::<Head>() + capacity,
                &mut found,
            )
            .cast::<Head>();
            if !found {
                let lock = &raw mut (*pg_sys::GetNamedLWLockTranche(self.name.as_ptr())).lock;
                head.write(Head {
                    lock,
                    capacity,
                    used: 0,
                });
            }
            *self.head.get() = head;
            pg_sys::LWLockRelease(init_lock);
        }
    }
}

impl SharedBuffer {
    /// How many bytes of records the buffer holds.
    fn capacity(&self) -> usize {
        // SAFETY: set before any backend forked; `capacity` never changes after.
        unsafe {
            self.head
                .get()
                .read()
                .as_ref()
                .map_or(0, |head| head.capacity)
        }
    }

    /// Runs `f` on the used length and the bytes under the buffer's lock. `f` must not raise
    /// a PostgreSQL error.
    fn locked<R>(&self, f: impl FnOnce(&mut usize, &mut [u8]) -> R) -> R {
        // SAFETY: set before any backend forked, in every process that preloaded the library,
        // which is the only kind that hands events over.
        let head = unsafe { *self.head.get() };
        assert!(
            !head.is_null(),
            "pg_outbox: the handoff buffer is not set up"
        );
        // SAFETY: the buffer is valid for the server's life, its bytes right after the head;
        // the lock serialises access to it.
        unsafe {
            let lock = (*head).lock;
            pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
            let bytes = std::slice::from_raw_parts_mut(head.add(1).cast::<u8>(), (*head).capacity);
            let result = f(&mut (*head).used, bytes);
            pg_sys::LWLockRelease(lock);
            result
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The record format: a header (length, database, xid), then each event:
// id (16 bytes), created_at_us (i64), the lengths of channel, user id (u16 each), origin (u16,
// ABSENT_16 for NULL) and payload (u32, ABSENT_32 when not handed over), then those bytes. The
// payload is the jsonb value itself, so the notifier renders it only if it sends it inline.

const RECORD_HEADER: usize = 4 + 4 + 8;
const ABSENT_16: u16 = u16::MAX;
const ABSENT_32: u32 = u32::MAX;

/// The record of one committed transaction, as the notifier drained it.
pub struct Record {
    pub database: u32,
    pub xid: u64,
    pub events: Vec<HandedEvent>,
}

/// One event of a [`Record`].
pub struct HandedEvent {
    id: Uuid,
    created_at_us: i64,
    channel: String,
    user_id: String,
    origin: Option<String>,
    /// The jsonb value, with its varlena header, when it was small enough to go inline.
    payload: Option<Vec<u8>>,
}

impl HandedEvent {
    pub fn notification(&self, xid: u64) -> Notification<'_> {
        Notification {
            id: self.id,
            channel: &self.channel,
            user_id: &self.user_id,
            origin: self.origin.as_deref(),
            xid,
            created_at_us: self.created_at_us,
        }
    }

    /// The payload as JSON text, when it was handed over.
    pub fn payload_json(&self) -> Option<String> {
        let bytes = self.payload.as_ref()?;
        // SAFETY: a palloc'd copy is aligned as a varlena must be; the bytes are a whole jsonb
        // value with its 4-byte header, written by `encode_event`.
        unsafe {
            let copy = pg_sys::palloc(bytes.len()).cast::<u8>();
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), copy, bytes.len());
            let json = jsonb_text(pg_sys::Datum::from(copy));
            pg_sys::pfree(copy.cast());
            Some(json)
        }
    }
}

/// The buffer held bytes that are not records as [`encode_event`] writes them.
#[derive(Debug)]
pub struct Malformed;

/// Appends one event to `out`. `payload` is a whole jsonb value with its varlena header.
fn encode_event(out: &mut Vec<u8>, event: &Notification, payload: Option<&[u8]>) {
    out.extend_from_slice(event.id.as_bytes());
    out.extend_from_slice(&event.created_at_us.to_ne_bytes());
    // The lengths are bounded by outbox_publish's checks: 63, 1024 and 255 bytes.
    let len16 = |s: &str| u16::try_from(s.len()).unwrap_or(ABSENT_16 - 1);
    out.extend_from_slice(&len16(event.channel).to_ne_bytes());
    out.extend_from_slice(&len16(event.user_id).to_ne_bytes());
    out.extend_from_slice(&event.origin.map_or(ABSENT_16, len16).to_ne_bytes());
    let payload_len = payload.map_or(ABSENT_32, |p| p.len() as u32);
    out.extend_from_slice(&payload_len.to_ne_bytes());
    out.extend_from_slice(event.channel.as_bytes());
    out.extend_from_slice(event.user_id.as_bytes());
    out.extend_from_slice(event.origin.unwrap_or_default().as_bytes());
    out.extend_from_slice(payload.unwrap_or_default());
}

/// Reads the records in `bytes`, as the buffer held them.
fn decode_records(mut bytes: &[u8]) -> Result<Vec<Record>, Malformed> {
    let mut records = Vec::new();
    while !bytes.is_empty() {
        let mut header = Reader(bytes);
        let len = header.u32()? as usize;
        let database = header.u32()?;
        let xid = header.u64()?;
        if len < RECORD_HEADER || len > bytes.len() {
            return Err(Malformed);
        }
        let mut events = Reader(&bytes[RECORD_HEADER..len]);
        bytes = &bytes[len..];
        let mut record = Record {
            database,
            xid,
            events: Vec::new(),
        };
        while !events.0.is_empty() {
            record.events.push(events.event()?);
        }
        records.push(record);
    }
    Ok(records)
}

/// Reads the fields [`encode_event`] writes, refusing any that would run past the end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        let (taken, rest) = self.0.split_at_checked(n).ok_or(Malformed)?;
        self.0 = rest;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Malformed> {
        self.take(N)?.try_into().map_err(|_| Malformed)
    }

    fn u16(&mut self) -> Result<u16, Malformed> {
        self.array().map(u16::from_ne_bytes)
    }

    fn u32(&mut self) -> Result<u32, Malformed> {
        self.array().map(u32::from_ne_bytes)
    }

    fn u64(&mut self) -> Result<u64, Malformed> {
        self.array().map(u64::from_ne_bytes)
    }

    fn text(&mut self, len: usize) -> Result<String, Malformed> {
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| Malformed)
    }

    fn event(&mut self) -> Result<HandedEvent, Malformed> {
        let id = Uuid::from_bytes(self.array()?);
        let created_at_us = i64::from_ne_bytes(self.array()?);
        let channel_len = self.u16()?;
        let user_id_len = self.u16()?;
        let origin_len = self.u16()?;
        let payload_len = self.u32()?;
        Ok(HandedEvent {
            id,
            created_at_us,
            channel: self.text(channel_len.into())?,
            user_id: self.text(user_id_len.into())?,
            origin: match origin_len {
                ABSENT_16 => None,
                len => Some(self.text(len.into())?),
            },
            payload: match payload_len {
                ABSENT_32 => None,
                len => Some(self.take(len as usize)?.to_vec()),
            },
        })
    }
}

/// Takes every record out of the buffer (the notifier's side).
pub fn drain() -> Result<Vec<Record>, Malformed> {
    let bytes = BUFFER.locked(|used, bytes| {
        let drained = bytes[..*used].to_vec();
        *used = 0;
        drained
    });
    decode_records(&bytes)
}

// ---------------------------------------------------------------------------------------------
// The publisher's side

/// The events of the current transaction, until it commits.
struct Staged {
    xid: u64,
    /// The events, encoded as in a record.
    events: Vec<u8>,
    /// Where each event starts in `events`, and the subtransaction that published it.
    starts: Vec<(pg_sys::SubTransactionId, usize)>,
    /// Some events cannot be handed over: the notifier reads this transaction from the table.
    from_table: bool,
}

thread_local! {
    static STAGED: RefCell<Option<Staged>> = const { RefCell::new(None) };
    /// The current transaction is past `PRE_COMMIT`: its record is in the buffer already.
    static HANDED_OVER: Cell<bool> = const { Cell::new(false) };
    /// Whether the committing transaction handed events over (or left them to the table).
    static WAKE_AT_COMMIT: Cell<bool> = const { Cell::new(false) };
}

/// Stages one event of the current transaction for the notifier; `payload` is its jsonb datum.
pub fn stage(event: &Notification, payload: pg_sys::Datum) {
    // Detoasted before anything is borrowed: reading a toasted value can wait, and a FATAL
    // raised meanwhile runs the callbacks below on the way out.
    let payload = INLINE.get().load(Ordering::Relaxed).then(|| {
        // SAFETY: a non-NULL jsonb datum is a varlena; its size is read without detoasting,
        // and a detoasted copy has a 4-byte header and lives in the current memory context.
        unsafe {
            (pg_sys::toast_raw_datum_size(payload) <= INLINE_CANDIDATE_BYTES).then(|| {
                let value = pg_sys::pg_detoast_datum(payload.cast_mut_ptr());
                std::slice::from_raw_parts(value.cast::<u8>(), pgrx::varlena::varsize_any(value))
            })
        }
    });
    // SAFETY: a plain read of the transaction state.
    let subtransaction = unsafe { pg_sys::GetCurrentSubTransactionId() };
    with_staged(event.xid, |staged| {
        if staged.from_table {
            return;
        }
        staged.starts.push((subtransaction, staged.events.len()));
        encode_event(&mut staged.events, event, payload.flatten());
        if RECORD_HEADER + staged.events.len() > BUFFER.capacity() {
            staged.from_table = true;
        }
    });
}

/// Leaves the events of transaction `xid` to the notifier's read of the table: for a publish
/// that went through `event_outbox`'s own triggers, rules or policies, which may have stored
/// something other than what was published, or nothing.
pub fn leave_to_table(xid: u64) {
    with_staged(xid, |staged| staged.from_table = true);
}

/// Runs `f` on the staged events of transaction `xid`.
fn with_staged(xid: u64, f: impl FnOnce(&mut Staged)) {
    if HANDED_OVER.get() {
        // Published at PRE_COMMIT or PRE_PREPARE (by another extension's callback), after
        // this transaction handed its record over; it has not ended, so marking it is still in
        // time.
        mark_unhanded(xid);
        WAKE_AT_COMMIT.set(true);
        return;
    }
    STAGED.with_borrow_mut(|staged| {
        let staged = match staged {
            Some(staged) if staged.xid == xid => staged,
            _ => staged.insert(Staged {
                xid,
                events: Vec::new(),
                starts: Vec::new(),
                from_table: false,
            }),
        };
        f(staged);
        if staged.from_table {
            staged.events = Vec::new();
            staged.starts = Vec::new();
        }
    });
}

/// Takes the staged events out, unless they are borrowed: only by [`stage`], which a FATAL
/// can interrupt, and then the process is on its way out anyway.
fn take_staged() -> Option<Staged> {
    STAGED.with(|staged| staged.try_borrow_mut().ok()?.take())
}

/// Puts a committing transaction's record into the buffer, or marks its xid when it does not
/// fit.
fn hand_over(staged: Staged) {
    if staged.starts.is_empty() && !staged.from_table {
        return; // Every event was rolled back with its savepoint.
    }
    WAKE_AT_COMMIT.set(true);
    // SAFETY: a plain read of this backend's database.
    let database = u32::from(unsafe { pg_sys::MyDatabaseId });
    let len = RECORD_HEADER + staged.events.len();
    let handed = !staged.from_table
        && BUFFER.locked(|used, bytes| {
            let Some(record) = bytes.get_mut(*used..*used + len) else {
                return false;
            };
            record[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
            record[4..8].copy_from_slice(&database.to_ne_bytes());
            record[8..16].copy_from_slice(&staged.xid.to_ne_bytes());
            record[RECORD_HEADER..].copy_from_slice(&staged.events);
            *used += len;
            true
        });
    if !handed {
        mark_unhanded(staged.xid);
    }
}

/// Runs at the end of every transaction of every process of a server that preloads the library.
#[pg_guard]
unsafe extern "C-unwind" fn on_transaction_end(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    match event {
        // Still in progress: the notifier cannot see it as ended until its record is in.
        XACT_EVENT_PRE_COMMIT => {
            HANDED_OVER.set(true);
            if let Some(staged) = take_staged() {
                hand_over(staged);
            }
        }
        // Visible to new snapshots now, so the woken notifier finds it ended.
        XACT_EVENT_COMMIT => {
            if WAKE_AT_COMMIT.replace(false) {
                notifier::wake();
            }
            HANDED_OVER.set(false);
            take_staged();
        }
        // It commits later, in whatever session runs COMMIT PREPARED.
        XACT_EVENT_PRE_PREPARE => {
            HANDED_OVER.set(true);
            if let Some(staged) = take_staged() {
                mark_unhanded(staged.xid);
            }
        }
        XACT_EVENT_ABORT | XACT_EVENT_PREPARE => {
            take_staged();
            HANDED_OVER.set(false);
            WAKE_AT_COMMIT.set(false);
        }
        _ => {}
    }
}

/// Drops the events of a subtransaction that rolls back, and of the ones it started: their
/// subtransaction ids are all at least its own.
#[pg_guard]
unsafe extern "C-unwind" fn on_subtransaction_end(
    event: pg_sys::SubXactEvent::Type,
    subtransaction: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event != pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        return;
    }
    STAGED.with(|staged| {
        let Ok(mut staged) = staged.try_borrow_mut() else {
            return; // Borrowed by a stage() that a FATAL interrupted: the process is exiting.
        };
        let Some(staged) = staged.as_mut() else {
            return;
        };
        if let Some(first) = staged
            .starts
            .iter()
            .position(|(published_in, _)| *published_in >= subtransaction)
        {
            staged.events.truncate(staged.starts[first].1);
            staged.starts.truncate(first);
        }
    });
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use super::{decode_records, encode_event, Malformed, RECORD_HEADER};
    use crate::notification::Notification;

    fn record(xid: u64, events: &[(Notification, Option<&[u8]>)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (event, payload) in events {
            encode_event(&mut body, event, *payload);
        }
        let mut record = Vec::new();
        record.extend_from_slice(&((RECORD_HEADER + body.len()) as u32).to_ne_bytes());
        record.extend_from_slice(&5_u32.to_ne_bytes());
        record.extend_from_slice(&xid.to_ne_bytes());
        record.extend_from_slice(&body);
        record
    }

    fn event<'a>(channel: &'a str, origin: Option<&'a str>) -> Notification<'a> {
        Notification {
            id: uuid::Uuid::now_v7(),
            channel,
            user_id: "ü-1",
            origin,
            xid: 0,
            created_at_us: -7,
        }
    }

    #[pg_test]
    fn records_read_back_as_written_and_a_cut_or_garbled_one_is_refused() {
        let first = [event("chat", None), event("a", Some("pod-1"))];
        let second = [event("c", Some(""))];
        let payload = [9_u8, 0, 0, 0, 1];
        let mut bytes = record(
            42,
            &[(first[0].clone(), Some(&payload)), (first[1].clone(), None)],
        );
        bytes.extend(record(41, &[(second[0].clone(), None)]));

        let records = decode_records(&bytes).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!((records[0].database, records[0].xid), (5, 42));
        assert_eq!(records[1].xid, 41);
        let decoded: Vec<_> = records
            .iter()
            .flat_map(|r| r.events.iter().map(|e| e.notification(r.xid)))
            .collect();
        for (got, want) in decoded.iter().zip(first.iter().chain(&second)) {
            assert_eq!(
                (
                    got.id,
                    got.channel,
                    got.user_id,
                    got.origin,
                    got.created_at_us
                ),
                (
                    want.id,
                    want.channel,
                    want.user_id,
                    want.origin,
                    want.created_at_us
                )
            );
        }
        assert_eq!(records[0].events[0].payload.as_deref(), Some(&payload[..]));
        assert_eq!(records[0].events[1].payload, None);

        for cut in 1..bytes.len() {
            if cut == bytes.len() - record(41, &[(second[0].clone(), None)]).len() {
                continue; // A whole first record.
            }
            assert!(
                matches!(decode_records(&bytes[..cut]), Err(Malformed)),
                "cut at {cut}"
            );
        }
        let mut garbled = bytes.clone();
        garbled[RECORD_HEADER + 16 + 8 + 6 + 4] = 0xff; // The first byte of the channel.
        assert!(decode_records(&garbled).is_err());
    }

    #[pg_test]
    fn a_handed_over_payload_renders_as_jsonb_prints_it() {
        let json = r#"{"n": 1, "text": "hé \"quoted\""}"#;
        let datum = Spi::get_one_with_args::<pgrx::JsonB>("SELECT $1::jsonb", &[json.into()])
            .unwrap()
            .unwrap()
            .into_datum()
            .unwrap();
        // SAFETY: a jsonb datum just built, detoasted as `stage` does.
        let raw = unsafe {
            let value = pg_sys::pg_detoast_datum(datum.cast_mut_ptr());
            std::slice::from_raw_parts(value.cast::<u8>(), pgrx::varlena::varsize_any(value))
        };
        let record = record(1, &[(event("chat", None), Some(raw))]);
        let records = decode_records(&record).unwrap();
        let expected = Spi::get_one_with_args::<String>("SELECT $1::jsonb::text", &[json.into()])
            .unwrap()
            .unwrap();
        assert_eq!(records[0].events[0].payload_json(), Some(expected));
    }
}
