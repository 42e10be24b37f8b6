//! The publisher's side: each event published in worker mode is staged in the backend, and
//! the transaction hands its record over just before it commits, or marks its xid for the
//! table when it cannot.

use std::cell::{Cell, RefCell};

use pgrx::prelude::*;

use super::buffer::BUFFER;
use super::record::{encode_event, RECORD_HEADER};
use crate::notification::{Notification, INLINE_CANDIDATE_BYTES};
use crate::worker::shared;

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
    let payload = shared::inline().then(|| {
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
        shared::mark_unhanded(xid);
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
        shared::mark_unhanded(staged.xid);
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
                shared::wake();
            }
            HANDED_OVER.set(false);
            take_staged();
        }
        // It commits later, in whatever session runs COMMIT PREPARED.
        XACT_EVENT_PRE_PREPARE => {
            HANDED_OVER.set(true);
            if let Some(staged) = take_staged() {
                shared::mark_unhanded(staged.xid);
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
