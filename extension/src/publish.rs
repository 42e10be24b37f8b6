//! `outbox_publish`: where an event enters the outbox.
//!
//! One call inserts the row and queues its notification in the caller's transaction, so commit
//! publishes both and rollback neither. It is a plain V1 C function rather than a
//! `#[pg_extern]`, so that the jsonb payload is never decoded into Rust: its datum goes straight
//! into the INSERT, and only inline mode renders it as text.

use std::cell::RefCell;
use std::rc::Rc;

use pgrx::datum::DatumWithOid;
use pgrx::fcinfo::{pg_arg_is_null, pg_getarg, pg_getarg_datum_raw};
use pgrx::prelude::*;
use pgrx::spi::{quote_identifier, OwnedPreparedStatement};
use pgrx::PgOid;
use uuid::Uuid;

use crate::error::OutboxError;
use crate::guc::{self, NotifyPayload};
use crate::notification::{Notification, NOTIFY_PAYLOAD_LIMIT};
use crate::notify::notify;
use crate::segment::{self, Segment};
use crate::worker::notifier;

const FUNCTION: &str = "outbox_publish";

/// A channel is a name listeners filter on: short and plain, so it can never break a
/// notification or a log line.
pub const CHANNEL_MAX_BYTES: usize = 63;
/// Bounded so that a reference notification always fits under the NOTIFY limit, even with
/// every character escaped.
pub const USER_ID_MAX_BYTES: usize = 1024;
/// An instance id: a host, pod or replica name.
pub const ORIGIN_MAX_BYTES: usize = 255;

/// Microseconds from the Unix epoch to the PostgreSQL epoch (2000-01-01).
const POSTGRES_EPOCH_UNIX_US: i64 = 946_684_800_000_000;

#[unsafe(no_mangle)]
#[doc(hidden)]
pub extern "C" fn pg_finfo_outbox_publish() -> &'static pg_sys::Pg_finfo_record {
    const V1_API: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1_API
}

/// `outbox_publish(channel text, user_id text, payload jsonb, origin text DEFAULT NULL) RETURNS uuid`
///
/// # Safety
/// Called by the function manager with a valid `fcinfo` for the signature above (see
/// `sql/api.sql`).
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn outbox_publish(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: the function manager passes four arguments of the declared types.
    let publish = unsafe { Publish::from_fcinfo(fcinfo) }.unwrap_or_else(|e| e.report(FUNCTION));
    let id = publish.run();
    // SAFETY: `from_bytes` copies into a palloc'd value, as the uuid type expects.
    pgrx::Uuid::from_bytes(*id.as_bytes())
        .into_datum()
        .expect("a uuid is never NULL")
}

/// One validated call.
struct Publish<'a> {
    channel: &'a str,
    user_id: &'a str,
    origin: Option<&'a str>,
    payload: pg_sys::Datum,
    /// The function's schema, which is the extension's: where `event_outbox` lives.
    namespace: pg_sys::Oid,
}

impl<'a> Publish<'a> {
    /// Reads and checks the arguments, and that this transaction may write.
    ///
    /// # Safety
    /// `fcinfo` must be a valid call of `outbox_publish`.
    unsafe fn from_fcinfo(fcinfo: pg_sys::FunctionCallInfo) -> Result<Self, OutboxError> {
        let nargs = unsafe { (*fcinfo).nargs } as usize;
        let required = |n: usize, argument: &'static str| -> Result<(), OutboxError> {
            if unsafe { pg_arg_is_null(fcinfo, n) } {
                Err(OutboxError::NullArgument { argument })
            } else {
                Ok(())
            }
        };
        required(0, "channel")?;
        required(1, "user_id")?;
        required(2, "payload")?;
        // SAFETY: arguments 0 and 1 are non-NULL text; 3, when present and non-NULL, is text.
        let channel: &str = unsafe { pg_getarg(fcinfo, 0) }.unwrap_or_default();
        let user_id: &str = unsafe { pg_getarg(fcinfo, 1) }.unwrap_or_default();
        let origin: Option<&str> = if nargs > 3 {
            unsafe { pg_getarg(fcinfo, 3) }
        } else {
            None
        };
        check_name("channel", channel, CHANNEL_MAX_BYTES)?;
        check_user_id(user_id)?;
        if let Some(origin) = origin {
            check_name("origin", origin, ORIGIN_MAX_BYTES)?;
        }

        let payload = unsafe { pg_getarg_datum_raw(fcinfo, 2) };
        // SAFETY: a non-NULL jsonb datum is a varlena; this reads its header (and a TOAST
        // pointer's size fields) without detoasting it.
        let size = unsafe { pg_sys::toast_raw_datum_size(payload) };
        check_payload_size(size, guc::max_payload_bytes())?;

        // SAFETY: plain reads of backend-global state.
        if unsafe { pg_sys::RecoveryInProgress() } {
            return Err(OutboxError::Standby);
        }
        if unsafe { pg_sys::XactReadOnly } {
            return Err(OutboxError::ReadOnlyTransaction);
        }

        // SAFETY: flinfo is set for every call made through the function manager.
        let namespace = unsafe { pg_sys::get_func_namespace((*(*fcinfo).flinfo).fn_oid) };
        Ok(Publish {
            channel,
            user_id,
            origin,
            payload,
            namespace,
        })
    }

    /// Inserts the row, queues the notification (or leaves it to the notifier worker), returns
    /// the event's id.
    fn run(&self) -> Uuid {
        let deferred = notifier::takes_over_notification();
        let id = Uuid::now_v7();
        // SAFETY: plain calls into the transaction manager and the clock. Asking for the
        // top-level id assigns one if the transaction has none yet, as the INSERT would.
        let xid = unsafe { pg_sys::GetTopFullTransactionId() }.value;
        let created_at = unsafe { pg_sys::GetCurrentTimestamp() };

        // SAFETY: each datum matches the type oid it is paired with, and lives for the call.
        let args = unsafe {
            [
                DatumWithOid::from(pgrx::Uuid::from_bytes(*id.as_bytes())),
                DatumWithOid::from(self.channel),
                DatumWithOid::from(self.user_id),
                DatumWithOid::new(self.payload, pg_sys::JSONBOID),
                self.origin.map_or_else(
                    || DatumWithOid::null_oid(pg_sys::TEXTOID),
                    DatumWithOid::from,
                ),
                DatumWithOid::new(pg_sys::Datum::from(created_at), pg_sys::TIMESTAMPTZOID),
                DatumWithOid::new(pg_sys::Datum::from(xid), pg_sys::XID8OID),
            ]
        };
        // SAFETY: a syscache lookup by name; a missing table is an invalid oid.
        let outbox = unsafe { pg_sys::get_relname_relid(c"event_outbox".as_ptr(), self.namespace) };
        let segment = segment::for_event(self.namespace, outbox, created_at);
        let insert = insert_statement(self.namespace, outbox, segment.as_deref(), deferred);
        let run = || Spi::connect_mut(|client| client.update(&*insert, None, &args).map(|_| ()));
        match &segment {
            Some(segment) => segment.as_owner(run),
            None => run(),
        }
        .unwrap_or_else(|e| pgrx::error!("{FUNCTION}: could not insert the event: {e}"));

        if deferred {
            notifier::wake_at_commit();
            return id;
        }
        let notification = Notification {
            id,
            channel: self.channel,
            user_id: self.user_id,
            origin: self.origin,
            xid,
            created_at_us: created_at + POSTGRES_EPOCH_UNIX_US,
        };
        let document = match guc::notify_payload() {
            NotifyPayload::Reference => notification.reference(),
            NotifyPayload::Inline => inline_text(self.payload)
                .and_then(|json| notification.inline(&json))
                .unwrap_or_else(|| notification.reference()),
        };
        notify(&document);
        id
    }
}

/// The payload as JSON text, unless it is so large that it could never fit in a notification
/// (its binary size is a cheap upper-bound proxy; skipping the rendering saves the work).
fn inline_text(payload: pg_sys::Datum) -> Option<String> {
    // SAFETY: `payload` is a non-NULL jsonb datum.
    let size = unsafe { pg_sys::toast_raw_datum_size(payload) };
    if size > 2 * NOTIFY_PAYLOAD_LIMIT {
        return None;
    }
    // SAFETY: jsonb's output function takes a jsonb datum and returns a palloc'd C string.
    unsafe {
        let text = pg_sys::OidOutputFunctionCall(pg_sys::Oid::from(pg_sys::F_JSONB_OUT), payload);
        Some(
            std::ffi::CStr::from_ptr(text)
                .to_string_lossy()
                .into_owned(),
        )
    }
}

/// A prepared INSERT: the table it inserts into, whether it marks rows deferred, the statement.
type CachedInsert = (pg_sys::Oid, bool, Rc<OwnedPreparedStatement>);

thread_local! {
    /// The prepared INSERTs into `event_outbox` and into the current segment, kept for the life
    /// of the backend (a segment's until the next one takes over).
    static INSERTS: RefCell<Vec<CachedInsert>> = const { RefCell::new(Vec::new()) };
}

/// The prepared INSERT into `segment`, or into `event_outbox` (oid `outbox`) in `namespace`
/// when there is none; prepared on first use. Postgres re-plans it by itself after DDL on the
/// table; a table re-created (with the extension) has a new oid and is prepared anew.
///
/// Only deferred rows name `notify_deferred` (its default is false): a server running this
/// library over a database not yet updated from 0.1.0, which lacks the column, still publishes
/// in transaction mode until `ALTER EXTENSION pg_outbox UPDATE` runs.
fn insert_statement(
    namespace: pg_sys::Oid,
    outbox: pg_sys::Oid,
    segment: Option<&Segment>,
    deferred: bool,
) -> Rc<OwnedPreparedStatement> {
    let relid = segment.map_or(outbox, |s| s.relid);
    if let Some(statement) = INSERTS.with_borrow(|cached| {
        cached
            .iter()
            .find(|(table, marks, _)| *table == relid && *marks == deferred)
            .map(|(_, _, s)| Rc::clone(s))
    }) {
        return statement;
    }
    let table = match segment {
        Some(segment) => segment.table.clone(),
        None => {
            // SAFETY: the oid names the schema this function lives in, which exists during the
            // call.
            let schema = unsafe { std::ffi::CStr::from_ptr(pg_sys::get_namespace_name(namespace)) };
            format!(
                "{}.event_outbox",
                quote_identifier(schema.to_string_lossy())
            )
        }
    };
    let (deferred_column, deferred_value) = if deferred {
        (", notify_deferred", ", true")
    } else {
        ("", "")
    };
    let sql = format!(
        "INSERT INTO {table} \
         (id, channel, user_id, payload, origin, created_at, xid{deferred_column}) \
         VALUES ($1, $2, $3, $4, $5, $6, $7{deferred_value})"
    );
    let types = [
        pg_sys::UUIDOID,
        pg_sys::TEXTOID,
        pg_sys::TEXTOID,
        pg_sys::JSONBOID,
        pg_sys::TEXTOID,
        pg_sys::TIMESTAMPTZOID,
        pg_sys::XID8OID,
    ]
    .map(PgOid::from);
    let prepare =
        || Spi::connect(|client| client.prepare_mut(sql.as_str(), &types).map(|s| s.keep()));
    let statement = match segment {
        Some(segment) => segment.as_owner_pinned(prepare),
        None => prepare(),
    }
    .unwrap_or_else(|e| pgrx::error!("{FUNCTION}: could not prepare the insert: {e}"));
    let statement = Rc::new(statement);
    INSERTS.with_borrow_mut(|cached| {
        // Segments that were left behind are never inserted into again.
        cached.retain(|(table, _, _)| *table == outbox || *table == relid);
        cached.push((relid, deferred, Rc::clone(&statement)));
    });
    statement
}

/// Channels and origins: 1 to `limit` bytes of [`crate::error::NAME_CHARACTERS`].
pub fn check_name(argument: &'static str, value: &str, limit: usize) -> Result<(), OutboxError> {
    if value.is_empty() {
        return Err(OutboxError::Empty { argument });
    }
    if value.len() > limit {
        return Err(OutboxError::TooLong {
            argument,
            length: value.len(),
            limit,
        });
    }
    match value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')))
    {
        Some(character) => Err(OutboxError::BadCharacter {
            argument,
            value: value.to_owned(),
            character,
        }),
        None => Ok(()),
    }
}

/// User ids are opaque text, non-empty and bounded.
pub fn check_user_id(value: &str) -> Result<(), OutboxError> {
    if value.is_empty() {
        return Err(OutboxError::Empty {
            argument: "user_id",
        });
    }
    if value.len() > USER_ID_MAX_BYTES {
        return Err(OutboxError::TooLong {
            argument: "user_id",
            length: value.len(),
            limit: USER_ID_MAX_BYTES,
        });
    }
    Ok(())
}

fn check_payload_size(size: usize, limit: usize) -> Result<(), OutboxError> {
    if size > limit {
        Err(OutboxError::PayloadTooLarge { size, limit })
    } else {
        Ok(())
    }
}
