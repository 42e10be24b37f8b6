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
//! [`shared::unhanded_through`], and the notifier reads its batches from `event_outbox` (exact, with the
//! same snapshots) until every transaction up to that xid has ended:
//! - its events did not fit in the buffer (`pg_outbox.handoff_buffer`, 4 MB by default): a huge
//!   transaction, or a notifier that is down while publishers go on;
//! - it was prepared for two-phase commit: `COMMIT PREPARED` runs in another session, without
//!   the staged events;
//! - it published through a trigger, rule or policy of `event_outbox`, which may have stored
//!   something other than what was published ([`leave_to_table`]);
//! - a notifier stopped while it held drained records of transactions still running: its
//!   successor marks every xid assigned before it started.
//!
//! Its three parts: the buffer in shared memory ([`buffer`]), the format of the records in it
//! ([`record`]), and the publisher's side, which stages events and hands them over at commit
//! ([`publisher`]).

mod buffer;
mod publisher;
mod record;

use pgrx::pg_shmem_init;
use pgrx::prelude::*;

use buffer::BUFFER;
pub use publisher::{leave_to_table, register_callbacks, stage};
pub use record::{Malformed, Record};

/// Reserves the shared memory; called from `_PG_init` while preloading.
pub fn register() {
    pg_shmem_init!(BUFFER = ());
}

/// How many bytes of records the buffer holds (`pg_outbox.handoff_buffer`).
pub fn capacity() -> usize {
    BUFFER.capacity()
}

/// Takes every record out of the buffer (the notifier's side).
pub fn drain() -> Result<Vec<Record>, Malformed> {
    let bytes = BUFFER.locked(|used, bytes| {
        let drained = bytes[..*used].to_vec();
        *used = 0;
        drained
    });
    record::decode_records(&bytes)
}
