//! Where the outbox is cut into segments: child tables of `event_outbox`, each holding the events
//! published in one span of `pg_outbox.segment_interval`. The pruner creates them ahead of time
//! and drops each whole once its last event has expired, instead of deleting its rows one by
//! one: a drop writes no WAL per row and leaves nothing for vacuum. Deleting a backlog of 1M
//! expired rows wrote 101 MB of WAL and cost publishers a sixth of their rate while it lasted
//! (BENCHMARKS.md).
//!
//! Inheritance children, not declarative partitions: a partition can be neither dropped nor
//! detached without an exclusive lock on the partitioned table, which queues behind every
//! publisher and then blocks them all, and even an INSERT straight into a partition locks the
//! partitioned table. A child table is created while relays read `event_outbox`, and dropped
//! while publishers insert into its siblings. Readers query `event_outbox`, which reads its
//! children too, and need no change.
//!
//! Publishers find their segment themselves ([`for_event`]) and store their row into it directly
//! ([`Segment::insert`]). When no segment covers their clock (segments turned off, a pruner that
//! has not run yet, a restored dump), they insert into `event_outbox` itself, whose rows the
//! pruner deletes one by one as before.

use std::cell::RefCell;
use std::ffi::CStr;
use std::rc::Rc;
use std::time::Duration;

use pgrx::datum::{DatumWithOid, Interval};
use pgrx::prelude::*;
use pgrx::spi::{quote_identifier, SpiResult};

use crate::guc;
use crate::privilege::as_user;
use crate::worker::shared;

mod insert;

pub use insert::Column;

/// The most segments `pg_outbox.retention` spans: a longer `segment_interval` is used when the
/// configured one is shorter than a 24th of the retention. Every read of `event_outbox` opens
/// and locks each segment and its indexes, and a day of 10-minute segments would take some 600
/// locks per query, enough for a few relays to exhaust the lock table.
const MOST_SEGMENTS_PER_RETENTION: u32 = 24;

/// How many segments one pass creates at most, so that a tiny `segment_interval` against a long
/// `prune_interval` cannot fill the catalog: time no segment covers goes to `event_outbox`.
const MOST_CREATED_AT_ONCE: i64 = 24;

/// How often a drop tries to lock a segment away from the relays reading it, and the wait
/// between two tries: about 200 ms in all. It never queues for the lock: a queued exclusive lock
/// would hold up every read of `event_outbox` behind it. Tries 0.7 ms apart fall at a different
/// point of a periodic reader's cycle each time (the notifier's is 4 ms), so they find the gap
/// between two reads; tries every 2 ms or 4 ms could keep landing inside them.
const EXCLUSIVE_LOCK_ATTEMPTS: u32 = 300;
const EXCLUSIVE_LOCK_RETRY_AFTER: Duration = Duration::from_micros(700);

/// How long a publisher that found no segment for its clock goes on inserting into
/// `event_outbox` itself before it looks again. Microseconds.
const NO_SEGMENT_RECHECK_US: i64 = 1_000_000;

/// Takes the lock that keeps two pruners (the worker and a caller of `outbox_prune()`) from
/// changing the segments at once, without waiting. False when another holds it, or when this
/// database's objects predate segments (0.2.0, before `ALTER EXTENSION pg_outbox UPDATE`):
/// either way there is nothing to do now. It does not conflict with publishers' reads.
fn lock_segments(schema: &str) -> SpiResult<bool> {
    // SAFETY: a conditional lock never waits; it is released when the transaction ends.
    Ok(segments_relid(schema)?.is_some_and(|relid| unsafe {
        pg_sys::ConditionalLockRelationOid(relid, pg_sys::ShareRowExclusiveLock as i32)
    }))
}

/// The time each new segment covers: `pg_outbox.segment_interval`, at least a
/// [`MOST_SEGMENTS_PER_RETENTION`]th of the retention; `None` when segments are off.
pub fn interval() -> Option<Duration> {
    guc::segment_interval().map(|i| i.max(guc::retention() / MOST_SEGMENTS_PER_RETENTION))
}

/// `outbox_create_first_segments()`: the first segments, for `CREATE EXTENSION` only, so that
/// the first events go into a segment rather than into `event_outbox` itself; the pruner (or
/// `outbox_prune()`) creates the next ones. `sql/api.sql` declares it, calls it and drops it:
/// no SQL function of that name outlives the install script.
#[pg_extern(sql = false)]
fn outbox_create_first_segments() {
    let schema = crate::catalog::extension_schema()
        .ok()
        .flatten()
        .unwrap_or_else(|| {
            pgrx::error!("pg_outbox: creating the first segments outside its install script")
        });
    if let Err(e) = create_ahead(&schema) {
        pgrx::error!("pg_outbox: creating the first segments: {e}");
    }
}

/// Creates the current segment and the next, those of them that do not exist yet, each with
/// `event_outbox`'s columns, defaults and indexes, owned by `event_outbox`'s owner and
/// belonging to the extension. Returns how long from now the segments cover, when there are
/// segments. Segments start at multiples of the interval since the Unix epoch, or where the
/// last one ends. No more are created ahead: every read of `event_outbox` opens each of them,
/// empty or not (the worker comes back before they run out).
pub fn create_ahead(schema: &str) -> SpiResult<Option<Duration>> {
    let Some(interval) = interval() else {
        return Ok(None);
    };
    // SAFETY: plain reads of backend-global state.
    let in_extension_script = unsafe { pg_sys::creating_extension };
    if in_extension_script
        && unsafe {
            pg_sys::CurrentExtensionObject != pg_sys::get_extension_oid(c"pg_outbox".as_ptr(), true)
        }
    {
        // Called from another extension's script: what it creates would belong to that one.
        return Ok(None);
    }
    if !lock_segments(schema)? {
        return Ok(None);
    }
    let horizon = 2 * interval;
    let names = Spi::connect_mut(|client| {
        client
            .update(
                format!(
                    "WITH step AS (SELECT make_interval(secs => $1) AS step), \
                     first AS ( \
                        SELECT greatest( \
                            (SELECT max(ends_at) FROM {schema}.outbox_segments), \
                            to_timestamp(floor(extract(epoch FROM clock_timestamp())::float8 / $1) * $1) \
                        ) AS first) \
                     INSERT INTO {schema}.outbox_segments (name, starts_at, ends_at) \
                     SELECT n.name, s, s + step.step \
                     FROM step, first, \
                          generate_series(first.first, clock_timestamp() + make_interval(secs => $2), step.step) s, \
                          LATERAL (SELECT format('event_outbox_%s', \
                              to_char(s AT TIME ZONE 'UTC', 'YYYYMMDD\"_\"HH24MISS')) AS name) n \
                     WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_class \
                         WHERE relnamespace = '{schema}'::regnamespace AND relname = n.name) \
                     ORDER BY s LIMIT $3 \
                     RETURNING name::text"
                )
                .as_str(),
                None,
                &[
                    interval.as_secs_f64().into(),
                    horizon.as_secs_f64().into(),
                    MOST_CREATED_AT_ONCE.into(),
                ],
            )?
            .map(|row| row.get::<String>(1).map(Option::unwrap_or_default))
            .collect::<SpiResult<Vec<String>>>()
    })?;
    if !names.is_empty() {
        create_tables(schema, &names, in_extension_script)?;
    }
    let covered = Spi::get_one::<f64>(&format!(
        "SELECT extract(epoch FROM max(ends_at) - clock_timestamp())::float8 \
         FROM {schema}.outbox_segments"
    ))?;
    Ok(covered.map(|secs| Duration::from_secs_f64(secs.max(0.0))))
}

/// Creates the tables of the new segments `names`; objects that CREATE EXTENSION's script
/// creates belong to the extension already.
fn create_tables(schema: &str, names: &[String], in_extension_script: bool) -> SpiResult<()> {
    let owner = Spi::get_one::<String>(&format!(
        "SELECT relowner::regrole::text FROM pg_catalog.pg_class \
         WHERE oid = '{schema}.event_outbox'::regclass"
    ))?
    .unwrap_or_default();
    for name in names {
        let table = format!("{schema}.{}", quote_identifier(name));
        Spi::run(&format!(
            "CREATE TABLE {table} (LIKE {schema}.event_outbox INCLUDING ALL); \
             ALTER TABLE {table} INHERIT {schema}.event_outbox; \
             ALTER TABLE {table} OWNER TO {owner}; \
             COMMENT ON TABLE {table} IS \
                'pg_outbox: a segment of event_outbox (see outbox_segments), dropped by the pruner once its events expire'"
        ))?;
        if !in_extension_script {
            Spi::run(&format!("ALTER EXTENSION pg_outbox ADD TABLE {table}"))?;
        }
    }
    debug1!("pg_outbox: created {} segments", names.len());
    Ok(())
}

/// `outbox_segments`, if this database's objects have segments: not before `ALTER EXTENSION
/// pg_outbox UPDATE` from 0.2.0.
fn segments_relid(schema: &str) -> SpiResult<Option<pg_sys::Oid>> {
    Spi::get_one_with_args::<pg_sys::Oid>(
        "SELECT to_regclass(format('%s.outbox_segments', $1::text))::oid",
        &[schema.into()],
    )
}

/// The segments whose last event is older than `older_than` (or `pg_outbox.retention` when
/// `None`), oldest first.
pub fn expired(schema: &str, older_than: Option<Interval>) -> SpiResult<Vec<String>> {
    let older_than = older_than.map_or_else(
        || DatumWithOid::null_oid(pg_sys::INTERVALOID),
        DatumWithOid::from,
    );
    names_where(
        schema,
        "ends_at <= clock_timestamp() - coalesce($1, make_interval(secs => $2))",
        &[older_than, guc::retention().as_secs_f64().into()],
    )
}

/// The segments that began more than `older_than` ago: those that hold events that old.
pub fn started_before(schema: &str, older_than: Interval) -> SpiResult<Vec<String>> {
    names_where(
        schema,
        "starts_at < clock_timestamp() - $1",
        &[older_than.into()],
    )
}

/// The names of the segments that meet `condition`, oldest first; none before the objects have
/// segments.
fn names_where(schema: &str, condition: &str, args: &[DatumWithOid]) -> SpiResult<Vec<String>> {
    if segments_relid(schema)?.is_none() {
        return Ok(Vec::new());
    }
    Spi::connect(|client| {
        client
            .select(
                format!(
                    "SELECT name::text FROM {schema}.outbox_segments \
                     WHERE {condition} ORDER BY starts_at"
                )
                .as_str(),
                None,
                args,
            )?
            .map(|row| row.get::<String>(1).map(Option::unwrap_or_default))
            .collect()
    })
}

/// Drops the expired segment `name` and records its rows in `outbox_prune_state`, as a prune
/// batch does; returns how many rows it held. `None` when it cannot be dropped now without
/// waiting: a transaction that wrote in it is still open, or relays kept reading it; the next
/// pass tries again.
pub fn drop(schema: &str, name: &str) -> SpiResult<Option<i64>> {
    // The count below must see every committed row, which a snapshot taken at the
    // transaction's start may not.
    // SAFETY: a plain read of backend-global state.
    if unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 {
        return Ok(None);
    }
    if !lock_segments(schema)? {
        return Ok(None);
    }
    // The prune record's row before any segment lock: once a segment is locked exclusively
    // nothing is waited for, so no one waiting for the segment waits for us in turn.
    let record = Spi::get_one::<bool>(&format!(
        "SELECT true FROM {schema}.outbox_prune_state FOR UPDATE SKIP LOCKED"
    ))?;
    if record != Some(true) {
        return Ok(None);
    }
    let forget = || {
        Spi::run_with_args(
            &format!("DELETE FROM {schema}.outbox_segments WHERE name = $1"),
            &[name.into()],
        )
    };
    let relid = Spi::get_one_with_args::<pg_sys::Oid>(
        "SELECT to_regclass(format('%s.%I', $1::text, $2::text))::oid",
        &[schema.into(), name.into()],
    )?;
    let Some(relid) = relid else {
        forget()?;
        return Ok(Some(0));
    };
    // Writers first: SHARE waits for no reader and lets none in, so the count below is final.
    // SAFETY: conditional locks never wait; they are released when the transaction ends.
    if !unsafe { pg_sys::ConditionalLockRelationOid(relid, pg_sys::ShareLock as i32) } {
        debug1!("pg_outbox: segment {name} is still being written into (or vacuumed)");
        return Ok(None);
    }
    let table = format!("{schema}.{}", quote_identifier(name));
    // What DROP TABLE would fail on, and so stop all pruning: a view built on the segment, or
    // the segment taken out of the extension by hand. It stays, with a warning each pass.
    let (views, member) = Spi::get_two_with_args::<bool, bool>(
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_depend \
                         WHERE refclassid = 'pg_catalog.pg_class'::regclass AND refobjid = $1 \
                           AND classid = 'pg_catalog.pg_rewrite'::regclass), \
                EXISTS (SELECT FROM pg_catalog.pg_depend \
                         WHERE classid = 'pg_catalog.pg_class'::regclass AND objid = $1 \
                           AND deptype = 'e')",
        &[relid.into()],
    )?;
    if views == Some(true) {
        warning!(
            "pg_outbox: segment {table} has expired but a view depends on it; drop the view so that the pruner can drop the segment"
        );
        return Ok(None);
    }
    let (rows, max_xid) = Spi::get_two::<i64, String>(&format!(
        "SELECT count(*), max(xid)::text FROM ONLY {table}"
    ))?;
    if !lock_exclusively(relid) {
        debug1!("pg_outbox: segment {name} is being read");
        return Ok(None);
    }
    if member == Some(true) {
        Spi::run(&format!("ALTER EXTENSION pg_outbox DROP TABLE {table}"))?;
    }
    Spi::run(&format!("DROP TABLE {table}"))?;
    forget()?;
    let rows = rows.unwrap_or_default();
    Spi::run_with_args(
        &format!(
            "UPDATE {schema}.outbox_prune_state SET \
                rows_pruned = rows_pruned + $1, \
                pruned_through_xid = greatest(pruned_through_xid, $2::xid8), \
                last_pruned_at = clock_timestamp()"
        ),
        &[
            rows.into(),
            max_xid.as_deref().map_or_else(
                || DatumWithOid::null_oid(pg_sys::TEXTOID),
                DatumWithOid::from,
            ),
        ],
    )?;
    Ok(Some(rows))
}

/// Takes ACCESS EXCLUSIVE on `relid` in a few tries: the relays' reads of `event_outbox` hold
/// its segments for a moment each. The notifier starts no batch meanwhile (its batches, back to
/// back under load, would otherwise leave no gap), and goes on as soon as this returns.
fn lock_exclusively(relid: pg_sys::Oid) -> bool {
    shared::hold_off(Some(
        EXCLUSIVE_LOCK_RETRY_AFTER * EXCLUSIVE_LOCK_ATTEMPTS + EXCLUSIVE_LOCK_RETRY_AFTER,
    ));
    let mut locked = false;
    for attempt in 1..=EXCLUSIVE_LOCK_ATTEMPTS {
        // SAFETY: a conditional lock never waits; it is released when the transaction ends.
        if unsafe { pg_sys::ConditionalLockRelationOid(relid, pg_sys::AccessExclusiveLock as i32) }
        {
            locked = true;
            break;
        }
        if attempt < EXCLUSIVE_LOCK_ATTEMPTS {
            // SAFETY: a plain sleep; the tries are few and short.
            unsafe { pg_sys::pg_usleep(EXCLUSIVE_LOCK_RETRY_AFTER.as_micros() as _) };
        }
    }
    shared::hold_off(None);
    locked
}

/// A segment a publisher inserts into.
pub struct Segment {
    pub relid: pg_sys::Oid,
}

/// What a backend knows of the segments: which covers `from..until` (PostgreSQL timestamps),
/// if any, for `event_outbox` with oid `parent`.
struct Route {
    parent: pg_sys::Oid,
    from: i64,
    until: i64,
    segment: Option<Rc<Segment>>,
}

thread_local! {
    /// Looked up once per segment and backend.
    static ROUTE: RefCell<Option<Route>> = const { RefCell::new(None) };
}

/// The segment an event created at `created_at` goes into, locked for this transaction so that
/// no drop can take it away before the INSERT; `None` to insert into `event_outbox` (`parent`)
/// itself. That is also the answer whenever `event_outbox` has something of its own to apply:
/// row-level security, triggers or rules, or the caller's missing INSERT privilege (whose
/// error the INSERT then raises as usual).
pub fn for_event(
    namespace: pg_sys::Oid,
    parent: pg_sys::Oid,
    created_at: i64,
) -> Option<Rc<Segment>> {
    let owner = parent_owner_if_plain(parent)?;
    let cached = ROUTE.with_borrow(|route| {
        route
            .as_ref()
            .filter(|r| r.parent == parent && r.from <= created_at && created_at < r.until)
            .map(|r| r.segment.clone())
    });
    let segment = match cached {
        Some(segment) => segment,
        None => {
            let route = look_up(namespace, parent, owner, created_at);
            let segment = route.segment.clone();
            ROUTE.with_borrow_mut(|cached| *cached = Some(route));
            segment
        }
    }?;
    // SAFETY: the lock the INSERT takes anyway, taken first; then the catalog is read again
    // (taking a new lock processes pending invalidations) to see that the table still exists.
    let exists = unsafe {
        pg_sys::LockRelationOid(segment.relid, pg_sys::RowExclusiveLock as i32);
        pg_sys::SearchSysCacheExists(
            pg_sys::SysCacheIdentifier::RELOID as i32,
            pg_sys::Datum::from(segment.relid),
            pg_sys::Datum::from(0),
            pg_sys::Datum::from(0),
            pg_sys::Datum::from(0),
        )
    };
    if !exists {
        // SAFETY: releases the lock taken above on a table that is gone.
        unsafe { pg_sys::UnlockRelationOid(segment.relid, pg_sys::RowExclusiveLock as i32) };
        ROUTE.with_borrow_mut(|cached| *cached = None);
        return None;
    }
    Some(segment)
}

/// `event_outbox`'s owner, when the caller may insert into it and it has no row-level security,
/// trigger or rule of its own (a segment would bypass them).
fn parent_owner_if_plain(parent: pg_sys::Oid) -> Option<pg_sys::Oid> {
    if parent == pg_sys::Oid::INVALID {
        return None;
    }
    // SAFETY: a plain privilege check.
    if unsafe { pg_sys::pg_class_aclcheck(parent, pg_sys::GetUserId(), pg_sys::ACL_INSERT as _) }
        != pg_sys::AclResult::ACLCHECK_OK
    {
        return None;
    }
    let (owner, own_rules) = owner_and_rules(parent)?;
    (!own_rules).then_some(owner)
}

/// Whether `event_outbox` (`parent`) has row-level security, rules or INSERT triggers of its
/// own: an INSERT into it may then store something other than the values given, or nothing.
pub fn has_rules_of_its_own(parent: pg_sys::Oid) -> bool {
    owner_and_rules(parent).is_none_or(|(_, own_rules)| own_rules)
}

/// The table's owner, and whether it has row-level security, rules or triggers that fire on
/// INSERT (the extension's own statement trigger on DELETE does not).
fn owner_and_rules(relid: pg_sys::Oid) -> Option<(pg_sys::Oid, bool)> {
    // SAFETY: a relcache lookup and its release; the fields read are plain values, and the
    // trigger description, when there is one, is the relcache entry's.
    unsafe {
        let relation = pg_sys::RelationIdGetRelation(relid);
        if relation.is_null() {
            return None;
        }
        let class = &*(*relation).rd_rel;
        let triggers = (*relation).trigdesc;
        let fires_on_insert = !triggers.is_null() && {
            let t = &*triggers;
            t.trig_insert_before_row
                || t.trig_insert_after_row
                || t.trig_insert_instead_row
                || t.trig_insert_before_statement
                || t.trig_insert_after_statement
                || t.trig_insert_new_table
        };
        let own_rules = class.relrowsecurity || fires_on_insert || class.relhasrules;
        let owner = class.relowner;
        pg_sys::RelationClose(relation);
        Some((owner, own_rules))
    }
}

/// Reads `outbox_segments` (with `event_outbox`'s owner's rights: publishers have no grant on
/// it) for the segment that covers `created_at`, or how long none does.
fn look_up(
    namespace: pg_sys::Oid,
    parent: pg_sys::Oid,
    owner: pg_sys::Oid,
    created_at: i64,
) -> Route {
    let none_until = |until: i64| Route {
        parent,
        from: created_at,
        until: until.min(created_at + NO_SEGMENT_RECHECK_US),
        segment: None,
    };
    // SAFETY: catalog lookups by oid and name; a missing table is an invalid oid, not an error.
    let (segments, schema) = unsafe {
        (
            pg_sys::get_relname_relid(c"outbox_segments".as_ptr(), namespace),
            pg_sys::get_namespace_name(namespace),
        )
    };
    // Before ALTER EXTENSION pg_outbox UPDATE there is no outbox_segments.
    if segments == pg_sys::Oid::INVALID || schema.is_null() {
        return none_until(i64::MAX);
    }
    // SAFETY: get_namespace_name returned a palloc'd C string.
    let schema = quote_identifier(unsafe { CStr::from_ptr(schema) }.to_string_lossy());
    let sql = format!(
        "SELECT c.oid, \
                (extract(epoch FROM s.starts_at) * 1000000)::int8 - 946684800000000, \
                (extract(epoch FROM s.ends_at) * 1000000)::int8 - 946684800000000 \
         FROM {schema}.outbox_segments s \
         LEFT JOIN pg_catalog.pg_class c ON c.relname = s.name AND c.relnamespace = $2 \
         WHERE s.ends_at > $1 ORDER BY s.starts_at LIMIT 1"
    );
    let found = as_user(owner, || {
        Spi::connect(|client| {
            // SAFETY: a timestamptz datum is its 64-bit value.
            let at = unsafe {
                DatumWithOid::new(pg_sys::Datum::from(created_at), pg_sys::TIMESTAMPTZOID)
            };
            let row = client
                .select(sql.as_str(), Some(1), &[at, namespace.into()])?
                .first();
            if row.is_empty() {
                return Ok(None);
            }
            Ok::<_, pgrx::spi::Error>(Some((
                row.get::<pg_sys::Oid>(1)?,
                row.get::<i64>(2)?.unwrap_or_default(),
                row.get::<i64>(3)?.unwrap_or_default(),
            )))
        })
    });
    match found {
        Ok(Some((Some(relid), from, until))) if from <= created_at => Route {
            parent,
            from,
            until,
            segment: Some(Rc::new(Segment { relid })),
        },
        Ok(Some((_, from, _))) if from > created_at => none_until(from),
        _ => none_until(i64::MAX),
    }
}
