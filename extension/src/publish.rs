//! `outbox_publish`: where an event enters the outbox.
//!
//! One call inserts the row and queues its notification in the caller's transaction, so commit
//! publishes both and rollback neither. It is a plain V1 C function rather than a
//! `#[pg_extern]`, so that the jsonb payload is never decoded into Rust: its datum goes straight
//! into the INSERT, and only inline mode renders it as text.

use std::cell::RefCell;
use std::rc::Rc;

use pg_outbox_wire::{SealKey, SEALED_DOCUMENT_LIMIT};
use pgrx::datum::DatumWithOid;
use pgrx::fcinfo::{pg_arg_is_null, pg_getarg, pg_getarg_datum_raw};
use pgrx::prelude::*;
use pgrx::spi::{quote_identifier, OwnedPreparedStatement};
use pgrx::PgOid;
use uuid::Uuid;

use crate::error::OutboxError;
use crate::guc::{self, NotifyPayload};
use crate::logical_message;
use crate::notification::{jsonb_text, Notification, INLINE_CANDIDATE_BYTES};
use crate::notify::notify;
use crate::run;
use crate::seal;
use crate::segment::{self, Column};
use crate::worker::{handoff, shared};

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
    channel: TextArgument<'a>,
    user_id: TextArgument<'a>,
    origin: Option<TextArgument<'a>>,
    payload: pg_sys::Datum,
    /// The function's schema, which is the extension's: where `event_outbox` lives.
    namespace: pg_sys::Oid,
    /// The key to seal the notification with, when `pg_outbox.notify_payload` is `sealed` and
    /// the database has keys (it has none before `ALTER EXTENSION pg_outbox UPDATE` to 0.5.0,
    /// and then sends references).
    seal_key: Option<SealKey>,
}

impl<'a> Publish<'a> {
    /// Reads and checks the arguments, and that this transaction may write.
    ///
    /// # Safety
    /// `fcinfo` must be a valid call of `outbox_publish`.
    unsafe fn from_fcinfo(fcinfo: pg_sys::FunctionCallInfo) -> Result<Self, OutboxError> {
        let nargs = unsafe { (*fcinfo).nargs } as usize;
        // SAFETY: arguments 0, 1 and 2 are text, text and jsonb; 3, when present, is text.
        let required = |n: usize, argument: &'static str| -> Result<(), OutboxError> {
            if unsafe { pg_arg_is_null(fcinfo, n) } {
                Err(OutboxError::NullArgument { argument })
            } else {
                Ok(())
            }
        };
        let text = |n: usize, argument: &'static str| {
            unsafe { TextArgument::read(fcinfo, n) }.ok_or(OutboxError::NullArgument { argument })
        };
        let channel = text(0, "channel")?;
        let user_id = text(1, "user_id")?;
        required(2, "payload")?;
        let origin = if nargs > 3 {
            unsafe { TextArgument::read(fcinfo, 3) }
        } else {
            None
        };
        check_name("channel", channel.text, CHANNEL_MAX_BYTES)?;
        check_user_id(user_id.text)?;
        if let Some(origin) = origin {
            check_name("origin", origin.text, ORIGIN_MAX_BYTES)?;
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
        // A key that cannot be read fails the call before anything is written, in either
        // notify mode (the notifier seals with the same key).
        let seal_key = match guc::notify_payload() {
            NotifyPayload::Sealed => seal::current_key(namespace)?,
            NotifyPayload::Reference | NotifyPayload::Inline => None,
        };
        Ok(Publish {
            channel,
            user_id,
            origin,
            payload,
            namespace,
            seal_key,
        })
    }

    /// Inserts the row, queues the notification (or hands the event over to the notifier
    /// worker), returns the event's id.
    fn run(&self) -> Uuid {
        run::record_before_publishing(self.namespace);
        let deferred = shared::takes_over_notification();
        let id = Uuid::now_v7();
        // SAFETY: plain calls into the transaction manager and the clock. Asking for the
        // top-level id assigns one if the transaction has none yet, as the INSERT would.
        let xid = unsafe { pg_sys::GetTopFullTransactionId() }.value;
        let created_at = unsafe { pg_sys::GetCurrentTimestamp() };

        let row: [Column; 8] = [
            (
                c"id",
                pg_sys::UUIDOID,
                pgrx::Uuid::from_bytes(*id.as_bytes()).into_datum(),
            ),
            (c"channel", pg_sys::TEXTOID, Some(self.channel.datum)),
            (c"user_id", pg_sys::TEXTOID, Some(self.user_id.datum)),
            (c"payload", pg_sys::JSONBOID, Some(self.payload)),
            (c"origin", pg_sys::TEXTOID, self.origin.map(|o| o.datum)),
            (
                c"created_at",
                pg_sys::TIMESTAMPTZOID,
                Some(pg_sys::Datum::from(created_at)),
            ),
            (c"xid", pg_sys::XID8OID, Some(pg_sys::Datum::from(xid))),
            (
                c"notify_deferred",
                pg_sys::BOOLOID,
                Some(pg_sys::Datum::from(deferred)),
            ),
        ];
        // SAFETY: a syscache lookup by name; a missing table is an invalid oid.
        let outbox = unsafe { pg_sys::get_relname_relid(c"event_outbox".as_ptr(), self.namespace) };
        let stored = segment::for_event(self.namespace, outbox, created_at)
            .is_some_and(|segment| segment.insert(&row).is_ok());
        if !stored {
            insert_into_outbox(self.namespace, outbox, &row, deferred);
        }

        let notification = Notification {
            id,
            channel: self.channel.text,
            user_id: self.user_id.text,
            origin: self.origin.map(|o| o.text),
            xid,
            created_at_us: created_at + POSTGRES_EPOCH_UNIX_US,
        };
        if guc::logical_messages() {
            // SAFETY: `payload` is a non-NULL jsonb datum.
            let payload = unsafe { jsonb_text(self.payload) };
            logical_message::emit(&notification.with_payload(&payload));
        }
        if deferred {
            if stored || !segment::has_rules_of_its_own(outbox) {
                handoff::stage(&notification, self.payload);
            } else {
                handoff::leave_to_table(xid);
            }
            return id;
        }
        let document = match &self.seal_key {
            Some(key) => {
                let document = inline_text(self.payload)
                    .and_then(|json| notification.inline_within(&json, SEALED_DOCUMENT_LIMIT))
                    .unwrap_or_else(|| notification.reference_within(SEALED_DOCUMENT_LIMIT));
                seal::seal(key, &document)
            }
            None => match guc::notify_payload() {
                NotifyPayload::Inline => inline_text(self.payload)
                    .and_then(|json| notification.inline(&json))
                    .unwrap_or_else(|| notification.reference()),
                NotifyPayload::Reference | NotifyPayload::Sealed => notification.reference(),
            },
        };
        notify(&document);
        id
    }
}

/// The payload as JSON text, unless it is so large that it could never fit in a notification.
fn inline_text(payload: pg_sys::Datum) -> Option<String> {
    // SAFETY: `payload` is a non-NULL jsonb datum.
    unsafe {
        (pg_sys::toast_raw_datum_size(payload) <= INLINE_CANDIDATE_BYTES)
            .then(|| jsonb_text(payload))
    }
}

/// A text argument as read, and as its datum, which goes into the row unchanged.
#[derive(Clone, Copy)]
struct TextArgument<'a> {
    text: &'a str,
    datum: pg_sys::Datum,
}

impl TextArgument<'_> {
    /// Argument `n`, or `None` when it is NULL.
    ///
    /// # Safety
    /// Argument `n` of `fcinfo` must exist and be of type text.
    unsafe fn read<'a>(fcinfo: pg_sys::FunctionCallInfo, n: usize) -> Option<TextArgument<'a>> {
        // SAFETY: as the caller promises.
        unsafe {
            Some(TextArgument {
                text: pg_getarg(fcinfo, n)?,
                datum: pg_getarg_datum_raw(fcinfo, n),
            })
        }
    }
}

/// A prepared INSERT into `event_outbox`: the table's oid, whether it marks rows deferred, the
/// statement.
type CachedInsert = (pg_sys::Oid, bool, Rc<OwnedPreparedStatement>);

thread_local! {
    /// The prepared INSERTs into `event_outbox`, kept for the life of the backend.
    static INSERTS: RefCell<Vec<CachedInsert>> = const { RefCell::new(Vec::new()) };
}

/// Inserts `row` into `event_outbox` (oid `outbox`) in `namespace` with an INSERT, which applies what a
/// segment would bypass (row-level security, triggers, rules, the caller's privileges) and
/// fills in the defaults of columns the row does not name. The statement is prepared on first
/// use; Postgres re-plans it by itself after DDL on the table, and a table re-created (with the
/// extension) has a new oid and is prepared anew.
///
/// Only deferred rows name `notify_deferred` (its default is false): a server running this
/// library over a database not yet updated from 0.1.0, which lacks the column, still publishes
/// in transaction mode until `ALTER EXTENSION pg_outbox UPDATE` runs.
fn insert_into_outbox(namespace: pg_sys::Oid, outbox: pg_sys::Oid, row: &[Column], deferred: bool) {
    let columns: Vec<&Column> = row
        .iter()
        .filter(|(name, _, _)| deferred || *name != c"notify_deferred")
        .collect();
    let cached = INSERTS.with_borrow(|cached| {
        cached
            .iter()
            .find(|(table, marks, _)| *table == outbox && *marks == deferred)
            .map(|(_, _, s)| Rc::clone(s))
    });
    let statement = cached.unwrap_or_else(|| {
        let statement = Rc::new(prepare_insert(namespace, &columns));
        INSERTS.with_borrow_mut(|cached| {
            cached.retain(|(table, _, _)| *table == outbox);
            cached.push((outbox, deferred, Rc::clone(&statement)));
        });
        statement
    });
    // SAFETY: each datum matches the type oid it is paired with, and lives for the call.
    let args: Vec<DatumWithOid> = columns
        .iter()
        .map(|(_, type_oid, value)| unsafe {
            match value {
                Some(value) => DatumWithOid::new(*value, *type_oid),
                None => DatumWithOid::null_oid(*type_oid),
            }
        })
        .collect();
    Spi::connect_mut(|client| client.update(&*statement, None, &args).map(|_| ()))
        .unwrap_or_else(|e| pgrx::error!("{FUNCTION}: could not insert the event: {e}"));
}

/// Prepares `INSERT INTO <schema>.event_outbox (<columns>) VALUES ($1, ...)`.
fn prepare_insert(namespace: pg_sys::Oid, columns: &[&Column]) -> OwnedPreparedStatement {
    // SAFETY: the oid names the schema this function lives in, which exists during the call.
    let schema = unsafe { std::ffi::CStr::from_ptr(pg_sys::get_namespace_name(namespace)) };
    let names: Vec<String> = columns
        .iter()
        .map(|(name, _, _)| name.to_string_lossy().into_owned())
        .collect();
    let placeholders: Vec<String> = (1..=columns.len()).map(|n| format!("${n}")).collect();
    let sql = format!(
        "INSERT INTO {}.event_outbox ({}) VALUES ({})",
        quote_identifier(schema.to_string_lossy()),
        names.join(", "),
        placeholders.join(", ")
    );
    let types: Vec<PgOid> = columns.iter().map(|(_, t, _)| PgOid::from(*t)).collect();
    Spi::connect(|client| client.prepare_mut(sql.as_str(), &types).map(|s| s.keep()))
        .unwrap_or_else(|e| pgrx::error!("{FUNCTION}: could not prepare the insert: {e}"))
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
