//! Where pruning happens: deleting expired events in batches, by the database clock.
//!
//! The pruner worker runs [`prune_batch`] in a transaction of its own per batch;
//! `outbox_prune()` runs the batches in the caller's transaction, for servers that cannot
//! preload the library.

use pgrx::datum::DatumWithOid;
use pgrx::datum::Interval;
use pgrx::prelude::*;
use pgrx::spi::SpiResult;

use crate::error::OutboxError;
use crate::guc;

/// The extension's schema, quoted, when `pg_outbox` is installed in this database.
pub fn extension_schema() -> SpiResult<Option<String>> {
    Spi::get_one(
        "SELECT quote_ident(n.nspname) FROM pg_catalog.pg_extension e \
         JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace \
         WHERE e.extname = 'pg_outbox'",
    )
}

/// Deletes up to `batch_size` of the oldest rows created more than `older_than` before now (or
/// `pg_outbox.retention` when `None`), records them in `outbox_prune_state`, and returns how
/// many it deleted. Rows another transaction has locked are left for the next batch.
pub fn prune_batch(schema: &str, older_than: Option<Interval>, batch_size: i64) -> SpiResult<i64> {
    // The state row records the greatest xid ever pruned: a relay whose cursor is older than
    // that knows it may have missed rows, and reports a gap instead of pretending.
    let sql = format!(
        "WITH gone AS ( \
            DELETE FROM {schema}.event_outbox WHERE ctid = ANY(ARRAY( \
                SELECT ctid FROM {schema}.event_outbox \
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
/// caller's transaction, rows older than `older_than` (default `pg_outbox.retention`), and
/// returns how many it deleted.
///
/// It runs with its owner's rights (with a pinned `search_path`), so a pruning role needs only
/// EXECUTE on it, not the row locks and writes on both tables that pruning takes.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn outbox_prune(older_than: default!(Option<Interval>, "NULL")) -> i64 {
    if older_than.is_some_and(Interval::is_negative) {
        OutboxError::NegativeAge.report("outbox_prune");
    }
    let schema = extension_schema().ok().flatten().unwrap_or_else(|| {
        pgrx::error!("outbox_prune: pg_outbox is not installed in this database")
    });
    let batch_size = guc::prune_batch_size();
    let mut total = 0;
    loop {
        let deleted = prune_batch(&schema, older_than, batch_size)
            .unwrap_or_else(|e| pgrx::error!("outbox_prune: {e}"));
        total += deleted;
        if deleted < batch_size {
            return total;
        }
    }
}
