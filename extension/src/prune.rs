//! Where pruning happens: dropping expired segments ([`crate::segment`]) and deleting the
//! expired events of `event_outbox` itself in batches, by the database clock.
//!
//! The pruner worker runs each drop and each [`prune_batch`] in a transaction of its own;
//! `outbox_prune()` runs them all in the caller's transaction, for servers that cannot preload
//! the library.

use pgrx::datum::DatumWithOid;
use pgrx::datum::Interval;
use pgrx::prelude::*;
use pgrx::spi::{quote_identifier, SpiResult};

use crate::catalog::extension_schema;
use crate::error::OutboxError;
use crate::guc;
use crate::segment;

/// The outbox table, whose own rows (not its segments') are deleted in batches.
pub const OUTBOX: &str = "event_outbox";

/// Deletes up to `batch_size` of the oldest rows of `table` (`event_outbox` or one segment, by
/// itself: ONLY) created more than `older_than` before now (or `pg_outbox.retention` when
/// `None`), records them in `outbox_prune_state`, and returns how many it deleted. Rows another
/// transaction has locked are left for the next batch.
pub fn prune_batch(
    schema: &str,
    table: &str,
    older_than: Option<Interval>,
    batch_size: i64,
) -> SpiResult<i64> {
    // The state row records the greatest xid ever pruned: a relay whose cursor is older than
    // that knows it may have missed rows, and reports a gap instead of pretending. ONLY on both
    // sides: a ctid is unique within one table, not across a table and its segments.
    let sql = format!(
        "WITH gone AS ( \
            DELETE FROM ONLY {schema}.{table} WHERE ctid = ANY(ARRAY( \
                SELECT ctid FROM ONLY {schema}.{table} \
                WHERE created_at < clock_timestamp() - coalesce($1, make_interval(secs => $2)) \
                ORDER BY created_at LIMIT $3 FOR UPDATE SKIP LOCKED)) \
            RETURNING xid), \
         batch AS ( \
            SELECT count(*) AS rows, (SELECT xid FROM gone ORDER BY xid DESC LIMIT 1) AS max_xid FROM gone), \
         recorded AS ( \
            UPDATE {schema}.outbox_prune_state SET \
                rows_pruned = rows_pruned + batch.rows, \
                pruned_through_xid = greatest(pruned_through_xid, batch.max_xid), \
                last_pruned_at = clock_timestamp() \
            FROM batch RETURNING 1) \
         SELECT rows FROM batch"
    );
    let retention_secs = guc::retention().as_secs_f64();
    let args: [DatumWithOid; 3] = [
        older_than.map_or_else(
            || DatumWithOid::null_oid(pg_sys::INTERVALOID),
            DatumWithOid::from,
        ),
        retention_secs.into(),
        batch_size.into(),
    ];
    Spi::connect_mut(|client| {
        client
            .update(sql.as_str(), None, &args)?
            .first()
            .get_one::<i64>()
            .map(Option::unwrap_or_default)
    })
}

/// `outbox_prune(older_than interval DEFAULT NULL) RETURNS bigint`: prunes now, in the
/// caller's transaction, events older than `older_than` (default `pg_outbox.retention`):
/// drops the segments whose every event is, deletes those of `event_outbox` itself, and
/// returns how many it removed. Without `older_than` it prunes as the worker does, and leaves
/// the events of a segment until all of them have expired; with it, it also deletes the older
/// events of the segments that still hold younger ones, so that none older is left. It also
/// creates the current segment and the next, as the worker does, so that calling it from a
/// scheduler at least every `segment_interval` is all a server without the worker needs.
///
/// It runs with its owner's rights (with a pinned `search_path`), so a pruning role needs only
/// EXECUTE on it, not the row locks, writes and DDL that pruning takes. Call it in a
/// transaction of its own, READ COMMITTED (the default): a segment it drops stays locked until
/// that transaction ends.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn outbox_prune(older_than: default!(Option<Interval>, "NULL")) -> i64 {
    if older_than.is_some_and(Interval::is_negative) {
        OutboxError::NegativeAge.report("outbox_prune");
    }
    let schema = extension_schema().ok().flatten().unwrap_or_else(|| {
        pgrx::error!("outbox_prune: pg_outbox is not installed in this database")
    });
    // SAFETY: a plain read of backend-global state.
    if unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 {
        OutboxError::SnapshotIsolation.report("outbox_prune");
    }
    let fail = |e: pgrx::spi::Error| -> ! { pgrx::error!("outbox_prune: {e}") };
    segment::create_ahead(&schema).unwrap_or_else(|e| fail(e));
    let expired = segment::expired(&schema, older_than).unwrap_or_else(|e| fail(e));
    let mut tables = vec![OUTBOX.to_owned()];
    if let Some(older_than) = older_than {
        let started = segment::started_before(&schema, older_than).unwrap_or_else(|e| fail(e));
        tables.extend(
            started
                .iter()
                .filter(|name| !expired.contains(name))
                .map(quote_identifier),
        );
    }
    let batch_size = guc::prune_batch_size();
    let mut total = 0;
    for table in &tables {
        loop {
            let deleted =
                prune_batch(&schema, table, older_than, batch_size).unwrap_or_else(|e| fail(e));
            total += deleted;
            if deleted < batch_size {
                break;
            }
        }
    }
    // Last: a dropped segment stays locked until the caller's transaction ends, and relays'
    // reads of event_outbox wait for it meanwhile.
    for name in &expired {
        total += segment::drop(&schema, name)
            .unwrap_or_else(|e| fail(e))
            .unwrap_or_default();
    }
    total
}
