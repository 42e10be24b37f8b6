//! Where an event row is stored into its segment without a query: the tuple is built from the
//! call's own datums and stored the way logical replication's apply worker stores a row
//! (`ExecSimpleRelationInsert`), with constraints checked and indexes maintained, but no plan
//! to check, no SPI and no second executor. Starting an executor for the INSERT cost
//! `outbox_publish` about as much as the caller's own statement did (BENCHMARKS.md).
//!
//! Privileges are not checked here: [`super::for_event`] checked the caller's INSERT on
//! `event_outbox`, whose grants are the ones users manage (segments carry none), and routes to
//! `event_outbox` itself whenever it has row-level security, triggers or rules to apply.

use std::ffi::CStr;

use pgrx::{pg_sys, PgMemoryContexts};

use super::Segment;

/// One column of an event's row: its name, its type, its value (`None` for NULL).
pub type Column = (&'static CStr, pg_sys::Oid, Option<pg_sys::Datum>);

/// The row cannot be stored without an INSERT: the segment has a column the row does not fill
/// or fills with another type (columns added to `event_outbox` reach its segments, and only an
/// INSERT fills in their defaults), or something of its own for an INSERT to apply (triggers,
/// rules, row-level security), or the call runs in parallel mode, where an INSERT refuses.
#[derive(Debug)]
pub struct Unfit;

impl Segment {
    /// Stores `row` in this segment, which [`super::for_event`] locked in this transaction.
    /// Columns are matched by name. On [`Unfit`] nothing was written.
    pub fn insert(&self, row: &[Column]) -> Result<(), Unfit> {
        // SAFETY: the segment is locked (RowExclusiveLock) and exists, so it opens without
        // another lock; every pointer used below comes from Postgres for this relation and
        // lives until the matching close or free. An ERROR raised inside (a constraint, a
        // duplicate id) aborts the transaction, which releases what is still open.
        unsafe {
            if pg_sys::IsInParallelMode() {
                return Err(Unfit);
            }
            let relation = pg_sys::table_open(self.relid, pg_sys::NoLock as i32);
            let class = &*(*relation).rd_rel;
            let descriptor = (*relation).rd_att;
            let natts = usize::try_from((*descriptor).natts).unwrap_or_default();
            let tuple = (class.relkind == pg_sys::RELKIND_RELATION as std::ffi::c_char
                && !(class.relhastriggers || class.relhasrules || class.relrowsecurity))
                .then(|| tuple_for((*descriptor).attrs.as_slice(natts), row))
                .flatten();
            let Some((values, nulls)) = tuple else {
                pg_sys::table_close(relation, pg_sys::NoLock as i32);
                return Err(Unfit);
            };

            // Everything the insert allocates (the slot, the indexes' descriptions, TOAST's
            // scratch) goes into the executor state's context, freed with it: a caller may
            // publish many events in one long-lived memory context.
            let estate = pg_sys::CreateExecutorState();
            PgMemoryContexts::For((*estate).es_query_cxt).switch_to(|_| {
                let rte = pg_sys::palloc0(size_of::<pg_sys::RangeTblEntry>())
                    .cast::<pg_sys::RangeTblEntry>();
                (*rte).type_ = pg_sys::NodeTag::T_RangeTblEntry;
                (*rte).rtekind = pg_sys::RTEKind::RTE_RELATION;
                (*rte).relid = self.relid;
                (*rte).relkind = class.relkind;
                (*rte).rellockmode = pg_sys::RowExclusiveLock as i32;
                // The columns this call provides, which an error's "Failing row contains"
                // detail may show to a caller without SELECT on the segment, as for an INSERT.
                for (index, null) in nulls.iter().enumerate() {
                    if !*null {
                        (*rte).insertedCols = pg_sys::bms_add_member(
                            (*rte).insertedCols,
                            index as i32 + 1 - pg_sys::FirstLowInvalidHeapAttributeNumber,
                        );
                    }
                }
                pg_sys::ExecInitRangeTable(
                    estate,
                    pg_sys::lappend(std::ptr::null_mut(), rte.cast()),
                );
                let info = pg_sys::palloc0(size_of::<pg_sys::ResultRelInfo>())
                    .cast::<pg_sys::ResultRelInfo>();
                (*info).type_ = pg_sys::NodeTag::T_ResultRelInfo;
                pg_sys::InitResultRelInfo(info, relation, 1, std::ptr::null_mut(), 0);
                // Where AFTER triggers look their relation up, as in the apply worker.
                (*estate).es_opened_result_relations =
                    pg_sys::lappend((*estate).es_opened_result_relations, info.cast());
                (*estate).es_output_cid = pg_sys::GetCurrentCommandId(true);

                let slot =
                    pg_sys::ExecInitExtraTupleSlot(estate, descriptor, &pg_sys::TTSOpsVirtual);
                std::slice::from_raw_parts_mut((*slot).tts_values, natts).copy_from_slice(&values);
                std::slice::from_raw_parts_mut((*slot).tts_isnull, natts).copy_from_slice(&nulls);
                pg_sys::ExecStoreVirtualTuple(slot);

                pg_sys::AfterTriggerBeginQuery();
                pg_sys::ExecOpenIndices(info, false);
                pg_sys::ExecSimpleRelationInsert(info, estate, slot);
                pg_sys::ExecCloseIndices(info);
                pg_sys::AfterTriggerEndQuery(estate);
                pg_sys::ExecResetTupleTable((*estate).es_tupleTable, false);
            });
            pg_sys::FreeExecutorState(estate);
            pg_sys::table_close(relation, pg_sys::NoLock as i32);
        }
        Ok(())
    }
}

/// The values and NULL flags of a tuple of `attributes` holding `row`, or `None` unless the
/// live attributes are exactly `row`'s columns, with their types and no type modifier (which
/// only an INSERT applies). Dropped attributes are NULL.
fn tuple_for(
    attributes: &[pg_sys::FormData_pg_attribute],
    row: &[Column],
) -> Option<(Vec<pg_sys::Datum>, Vec<bool>)> {
    let mut values = Vec::with_capacity(attributes.len());
    let mut nulls = Vec::with_capacity(attributes.len());
    let mut filled = 0;
    for attribute in attributes {
        let value = if attribute.attisdropped {
            None
        } else {
            // SAFETY: an attribute name is a NUL-terminated NameData.
            let name = unsafe { CStr::from_ptr(attribute.attname.data.as_ptr()) };
            let (_, _, value) = row.iter().find(|(column, type_oid, _)| {
                *column == name && *type_oid == attribute.atttypid && attribute.atttypmod == -1
            })?;
            filled += 1;
            *value
        };
        values.push(value.unwrap_or(pg_sys::Datum::from(0)));
        nulls.push(value.is_none());
    }
    (filled == row.len()).then_some((values, nulls))
}
