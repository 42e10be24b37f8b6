//! The event as a logical-decoding message, for what reads the WAL rather than LISTENs: with
//! `pg_outbox.logical_messages = on`, `outbox_publish` also writes each event with the C
//! function behind `pg_logical_emit_message`, transactional and with the prefix `pg_outbox`, so
//! that a replication slot's consumers (pgoutput with `messages`, test_decoding, Debezium) get
//! exactly the committed events, in commit order, without a second outbox. The message is the
//! notification document with the payload, whatever its size: no NOTIFY limit applies.

use std::ffi::{c_char, CStr};

use pgrx::pg_sys::submodules::ffi::pg_guard_ffi_boundary;

unsafe extern "C-unwind" {
    /// Declared in `replication/message.h`, which pgrx's bindings leave out.
    fn LogLogicalMessage(
        prefix: *const c_char,
        message: *const c_char,
        size: usize,
        transactional: bool,
    ) -> u64;
}

/// The prefix every pg_outbox message carries, for consumers to pick them out.
pub const PREFIX: &CStr = c"pg_outbox";

/// Writes `document` into the WAL as a transactional message: decoded only if the current
/// transaction commits, at its place in commit order.
pub fn emit(document: &str) {
    // SAFETY: the prefix is a NUL-terminated string and the message `size` valid bytes, both
    // alive for the call, which copies them into the WAL record; we are on the backend's main
    // thread. The guard turns a Postgres ERROR raised inside into a Rust panic that pgrx
    // re-raises as the same ERROR at the function boundary.
    unsafe {
        pg_guard_ffi_boundary(|| {
            LogLogicalMessage(
                PREFIX.as_ptr(),
                document.as_ptr().cast(),
                document.len(),
                true,
            )
        })
    };
}
