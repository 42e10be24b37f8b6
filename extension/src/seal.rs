//! Sealed notifications (`pg_outbox.notify_payload = 'sealed'`, the default): where their key
//! is kept, how publishers and relays get it, and sealing. The format is
//! `pg_outbox_wire::seal`'s, which relays open.
//!
//! The keys live in `outbox_seal_keys`, which `CREATE EXTENSION` fills with a random key and
//! `outbox_rotate_seal_key()` rotates. No role is granted anything on it:
//! - publishers seal with the current key, read with the table owner's rights, so a role that
//!   may publish but not read events cannot open other publishers' notifications;
//! - relays read every key not yet expired through `outbox_relay_keys()`, which answers exactly
//!   the roles that may read `event_outbox.payload`: whoever can read the payloads loses nothing
//!   by reading the key, and nobody else gets it.
//!
//! A backend reads the current key once and keeps it until the table changes: a statement
//! trigger on the table invalidates its relcache entry, which every backend hears at its next
//! transaction (or statement), and drops its copy.

use std::cell::{Cell, RefCell};
use std::ffi::CStr;

use pg_outbox_wire::seal;
use pg_outbox_wire::SealKey;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::spi::quote_identifier;

use crate::error::OutboxError;
use crate::guc::{self, NotifyPayload};
use crate::privilege::{as_user, owner};

const KEYS_TABLE: &CStr = c"outbox_seal_keys";

/// The current key as a backend last read it.
struct Cached {
    table: pg_sys::Oid,
    key: Result<SealKey, String>,
}

thread_local! {
    static CURRENT: RefCell<Option<Cached>> = const { RefCell::new(None) };
    static LISTENING_FOR_CHANGES: Cell<bool> = const { Cell::new(false) };
}

/// The key to seal with in `namespace`, the extension's schema; `None` when it has no
/// `outbox_seal_keys` (a database not yet updated to 0.5.0 with `ALTER EXTENSION`), where
/// publishers send references.
pub fn current_key(namespace: pg_sys::Oid) -> Result<Option<SealKey>, OutboxError> {
    // SAFETY: a syscache look-up by name; a missing table is an invalid oid.
    let table = unsafe { pg_sys::get_relname_relid(KEYS_TABLE.as_ptr(), namespace) };
    if table == pg_sys::Oid::INVALID {
        return Ok(None);
    }
    let cached = CURRENT.with_borrow(|cached| {
        cached
            .as_ref()
            .filter(|cached| cached.table == table)
            .map(|cached| cached.key.clone())
    });
    let key = match cached {
        Some(key) => key,
        None => {
            listen_for_changes();
            let key = read_current(namespace, table);
            CURRENT.set(Some(Cached {
                table,
                key: key.clone(),
            }));
            key
        }
    };
    key.map(Some)
        .map_err(|reason| OutboxError::SealKey { reason })
}

/// Reads the key without an expiry, as the table's owner.
fn read_current(namespace: pg_sys::Oid, table: pg_sys::Oid) -> Result<SealKey, String> {
    let sql = format!(
        "SELECT key FROM {}.outbox_seal_keys WHERE expires_at IS NULL",
        schema_name(namespace)
    );
    let key = as_user(owner(table), || {
        Spi::connect(|client| {
            let rows = client.select(&sql, Some(1), &[])?;
            if rows.is_empty() {
                return Ok(None);
            }
            rows.first().get_one::<Vec<u8>>()
        })
        .map_err(|e: pgrx::spi::Error| e.to_string())
    })?;
    let bytes = key.ok_or_else(|| "outbox_seal_keys holds no current key".to_owned())?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| "the current key of outbox_seal_keys is not 32 bytes long".to_owned())?;
    Ok(SealKey::from_bytes(bytes))
}

/// Registers, once per backend, the callback that drops the cached key when the table changes.
fn listen_for_changes() {
    if LISTENING_FOR_CHANGES.replace(true) {
        return;
    }
    // SAFETY: registers a callback for the life of the backend; it only clears a thread-local.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(forget_key), pg_sys::Datum::from(0));
    }
}

/// Relcache invalidation: of the keys table (or of every relation), so the key may have changed.
unsafe extern "C-unwind" fn forget_key(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    CURRENT.with_borrow_mut(|cached| {
        if relid == pg_sys::Oid::INVALID || cached.as_ref().is_some_and(|c| c.table == relid) {
            *cached = None;
        }
    });
}

/// A process's nonces: 16 bytes drawn from the strong random source once per process, then a
/// counter. XChaCha20's 24-byte nonce leaves room for both, so no two seals of one key share a
/// nonce (processes' random parts collide with odds of 2^-128), and a seal costs no draw.
struct Nonces {
    /// The process they were drawn in: a process forked after the draw draws its own.
    pid: i32,
    random: [u8; 16],
    counter: u64,
}

thread_local! {
    static NONCES: RefCell<Option<Nonces>> = const { RefCell::new(None) };
}

/// The next nonce of this process.
fn next_nonce() -> [u8; 24] {
    // SAFETY: a plain read of the process's pid, set when the process started.
    let pid = unsafe { pg_sys::MyProcPid };
    NONCES.with_borrow_mut(|nonces| {
        let nonces = match nonces {
            Some(n) if n.pid == pid => n,
            _ => nonces.insert(Nonces {
                pid,
                random: draw(),
                counter: 0,
            }),
        };
        nonces.counter += 1;
        let mut nonce = [0u8; 24];
        nonce[..16].copy_from_slice(&nonces.random);
        nonce[16..].copy_from_slice(&nonces.counter.to_le_bytes());
        nonce
    })
}

fn draw() -> [u8; 16] {
    let mut random = [0u8; 16];
    // SAFETY: writes exactly `random.len()` bytes into the buffer.
    let drawn = unsafe { pg_sys::pg_strong_random(random.as_mut_ptr().cast(), random.len()) };
    if !drawn {
        pgrx::error!("pg_outbox: could not draw random bytes to seal notifications");
    }
    random
}

/// `document` sealed with `key` under this process's next nonce.
pub fn seal(key: &SealKey, document: &str) -> String {
    seal::seal(key, document, next_nonce())
}

#[unsafe(no_mangle)]
#[doc(hidden)]
pub extern "C" fn pg_finfo_outbox_seal_keys_changed() -> &'static pg_sys::Pg_finfo_record {
    const V1_API: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1_API
}

/// The statement trigger of `outbox_seal_keys`: invalidates the table's relcache entry, which
/// PostgreSQL sends to every backend when this transaction commits, so publishers read the key
/// again (see [`forget_key`]).
///
/// # Safety
/// Called by the trigger manager with a valid `fcinfo`.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn outbox_seal_keys_changed(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: a trigger call's context is its TriggerData, whose relation is open.
    unsafe {
        let context = (*fcinfo).context;
        if context.is_null() || (*context).type_ != pg_sys::NodeTag::T_TriggerData {
            pgrx::error!("outbox_seal_keys_changed() is the trigger of outbox_seal_keys");
        }
        let trigger = context.cast::<pg_sys::TriggerData>();
        pg_sys::CacheInvalidateRelcache((*trigger).tg_relation);
    }
    pg_sys::Datum::from(0)
}

/// `outbox_relay_keys()`: the keys a relay opens sealed notifications with (every key of
/// `outbox_seal_keys` not yet expired, the current one first), and the `notify_payload` in
/// effect for the caller, which tells a relay whether to expect every notification sealed.
#[pg_extern(volatile, parallel_unsafe)]
fn outbox_relay_keys() -> TableIterator<
    'static,
    (
        name!(keys, Vec<Vec<u8>>),
        name!(notify_payload, &'static str),
    ),
> {
    let namespace = crate::catalog::extension_namespace()
        .ok()
        .flatten()
        .unwrap_or_else(|| pgrx::error!("outbox_relay_keys: pg_outbox is not installed"));
    // SAFETY: syscache look-ups by name.
    let (outbox, keys_table) = unsafe {
        (
            pg_sys::get_relname_relid(c"event_outbox".as_ptr(), namespace),
            pg_sys::get_relname_relid(KEYS_TABLE.as_ptr(), namespace),
        )
    };
    if !may_read_payloads(outbox) {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "outbox_relay_keys: the seal keys are given to the roles that may read event_outbox.payload, and this role may not",
            "outbox_relay_keys",
        )
        .set_hint("Grant the relay's role SELECT on event_outbox (GRANT SELECT ON event_outbox TO <role>).")
        .report(PgLogLevel::ERROR);
    }
    let sql = format!(
        "SELECT key FROM {}.outbox_seal_keys WHERE expires_at IS NULL OR expires_at > now() \
         ORDER BY expires_at DESC NULLS FIRST, created_at DESC",
        schema_name(namespace)
    );
    let keys = as_user(owner(keys_table), || {
        Spi::connect(|client| {
            client
                .select(&sql, None, &[])?
                .map(|row| row.get::<Vec<u8>>(1))
                .collect::<Result<Vec<_>, _>>()
        })
    })
    .unwrap_or_else(|e| pgrx::error!("outbox_relay_keys: could not read the keys: {e}"))
    .into_iter()
    .flatten()
    .collect();
    let notify_payload = match guc::notify_payload() {
        NotifyPayload::Sealed => "sealed",
        NotifyPayload::Reference => "reference",
        NotifyPayload::Inline => "inline",
    };
    TableIterator::once((keys, notify_payload))
}

/// Whether the current role may read `event_outbox.payload`, by a grant on the table or on the
/// column.
fn may_read_payloads(outbox: pg_sys::Oid) -> bool {
    if outbox == pg_sys::Oid::INVALID {
        return false;
    }
    // SAFETY: catalog look-ups and privilege checks on an existing table. The column check
    // considers only grants on the column itself.
    unsafe {
        let (user, select) = (pg_sys::GetUserId(), pg_sys::ACL_SELECT as pg_sys::AclMode);
        if pg_sys::pg_class_aclcheck(outbox, user, select) == pg_sys::AclResult::ACLCHECK_OK {
            return true;
        }
        let payload = pg_sys::get_attnum(outbox, c"payload".as_ptr());
        payload != pg_sys::InvalidAttrNumber as i16
            && pg_sys::pg_attribute_aclcheck(outbox, payload, user, select)
                == pg_sys::AclResult::ACLCHECK_OK
    }
}

fn schema_name(namespace: pg_sys::Oid) -> String {
    // SAFETY: the namespace exists while the extension's functions run.
    let name = unsafe { pg_sys::get_namespace_name(namespace) };
    if name.is_null() {
        pgrx::error!("pg_outbox: schema {namespace:?} vanished");
    }
    // SAFETY: get_namespace_name returns a palloc'd C string.
    quote_identifier(unsafe { CStr::from_ptr(name) }.to_string_lossy())
}
