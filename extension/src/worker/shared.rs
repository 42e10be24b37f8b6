//! What the workers and the publishing backends share, in shared memory: where the notifier
//! is (to wake it) and which database it serves, whether it is held off, which transactions may
//! be missing from the handoff, and whether it sends payloads inline. Everything here is a few
//! atomics: publishers read them on their hot path, and none of them takes a lock.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PgAtomic};

use crate::guc::{self, NotifyMode};

/// Where the notifier is, in shared memory: the database it serves in the high 32 bits, and its
/// `pgprocno + 1` in the low 32 bits (0 while it is not running). 0 until it first connects.
static NOTIFIER: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"pg_outbox_notifier") };

/// Until when (microseconds since the Unix epoch) the notifier starts no batch: under load its
/// batches run back to back, each reading `event_outbox` and so holding every segment, and a
/// segment can only be dropped between two of them ([`hold_off`]).
static HOLD_OFF_UNTIL: PgAtomic<AtomicU64> =
    unsafe { PgAtomic::new(c"pg_outbox_notifier_hold_off") };

/// Whether this process inherited a preloaded library, so [`NOTIFIER`] exists.
static PRELOADED: AtomicBool = AtomicBool::new(false);

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
    pg_shmem_init!(NOTIFIER = AtomicU64::new(0));
    pg_shmem_init!(HOLD_OFF_UNTIL = AtomicU64::new(0));
    pg_shmem_init!(UNHANDED_THROUGH = AtomicU64::new(0));
    pg_shmem_init!(INLINE = AtomicBool::new(false));
    PRELOADED.store(true, Ordering::Relaxed);
}

/// Whether a publish in this session should leave its notification to the notifier: worker
/// mode is on, and the notifier serves this database.
pub fn takes_over_notification() -> bool {
    if guc::notify_mode() != NotifyMode::Worker || !PRELOADED.load(Ordering::Relaxed) {
        return false;
    }
    let state = NOTIFIER.get().load(Ordering::Acquire);
    // SAFETY: a plain read of this backend's database id.
    let database = u64::from(u32::from(unsafe { pg_sys::MyDatabaseId }));
    state >> 32 == database
}

/// Keeps the notifier from starting a batch for `duration` from now, or lets it go on at once
/// (`None`): for the pruner, while it tries to lock a segment. A batch under way finishes. The
/// hold-off expires by itself, so a pruner that dies holding it delays nothing for long.
pub fn hold_off(duration: Option<Duration>) {
    if !PRELOADED.load(Ordering::Relaxed) {
        return;
    }
    let until = duration.map_or(0, |d| unix_micros().saturating_add(d.as_micros() as u64));
    HOLD_OFF_UNTIL.get().store(until, Ordering::Release);
}

/// How long the notifier is still held off, if it is.
pub fn held_off_for() -> Option<Duration> {
    let until = HOLD_OFF_UNTIL.get().load(Ordering::Acquire);
    until
        .checked_sub(unix_micros())
        .filter(|left| *left > 0)
        .map(Duration::from_micros)
}

fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Sets the notifier's latch, if it is running.
pub fn wake() {
    let procno = NOTIFIER.get().load(Ordering::Acquire) & u64::from(u32::MAX);
    if procno == 0 {
        return; // Not running: it catches up from its stored snapshot when it starts.
    }
    // SAFETY: `procno - 1` was a valid index into ProcGlobal->allProcs when the notifier stored
    // it; the array lives for the whole server. If the notifier died since, the slot may belong
    // to another process, whose latch then wakes up for nothing, which latches allow.
    unsafe {
        let proc = (*pg_sys::ProcGlobal).allProcs.add((procno - 1) as usize);
        pg_sys::SetLatch(&raw mut (*proc).procLatch);
    }
}

/// Publishes (or withdraws) this process as the running notifier, for [`wake`]. The database
/// stays as it is: while a notifier that served it restarts, publishers there go on deferring
/// and its successor catches up from the recorded position.
pub fn advertise(running: bool) {
    // SAFETY: a plain read of this process's own identity.
    let procno = unsafe { (*pg_sys::MyProc).pgprocno };
    let procno = if running {
        u64::try_from(procno).map_or(0, |p| p + 1)
    } else {
        0
    };
    set_bits(u64::from(u32::MAX), procno);
}

/// Says whether publishers in this database leave their notifications to the notifier
/// ([`takes_over_notification`]): not while its objects predate 0.2.0, whose `event_outbox` has
/// no `notify_deferred` column to mark them with.
pub fn serve(serving: bool) {
    // SAFETY: a plain read of this process's database.
    let database = u64::from(u32::from(unsafe { pg_sys::MyDatabaseId }));
    set_bits(
        u64::from(u32::MAX) << 32,
        if serving { database << 32 } else { 0 },
    );
}

/// Replaces the bits of [`NOTIFIER`] under `mask` by `value`.
fn set_bits(mask: u64, value: u64) {
    let _ = NOTIFIER
        .get()
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |state| {
            Some((state & !mask) | value)
        });
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

/// Whether the notifier sends payloads inline (the publishers' side): see [`INLINE`].
pub fn inline() -> bool {
    INLINE.get().load(Ordering::Relaxed)
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
