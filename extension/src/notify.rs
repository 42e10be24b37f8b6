//! A safe wrapper over PostgreSQL's `Async_Notify`, the C function behind `NOTIFY`.
//!
//! Calling it directly instead of `SELECT pg_notify(..)` through SPI saves a plan and an executor
//! run per published event; the semantics are the same: the notification is queued in the
//! current transaction, sent at commit, discarded at rollback.

use std::ffi::CString;

use pgrx::pg_sys::submodules::ffi::pg_guard_ffi_boundary;

unsafe extern "C-unwind" {
    /// Declared in `commands/async.h`, which pgrx's bindings leave out.
    fn Async_Notify(channel: *const std::ffi::c_char, payload: *const std::ffi::c_char);
}

/// The one channel every pg_outbox notification is sent on, so a relay needs one LISTEN.
pub const CHANNEL: &std::ffi::CStr = c"pg_outbox";

/// Queues `payload` on [`CHANNEL`] in the current transaction. Postgres raises its own error
/// (SQLSTATE 22023) for a payload of 8000 bytes or more; callers keep payloads below that.
pub fn notify(payload: &str) {
    // A NUL cannot occur: the payload is JSON, whose strings escape control characters.
    let payload = CString::new(payload).expect("JSON text holds no NUL byte");
    // SAFETY: both pointers are valid NUL-terminated strings that outlive the call, which copies
    // them into the transaction's pending-notification list; we are on the backend's main
    // thread. The guard turns a Postgres ERROR raised inside (payload too long, not allowed in
    // this transaction) into a Rust panic that pgrx re-raises as the same ERROR at the function
    // boundary, so Rust frames unwind properly.
    unsafe { pg_guard_ffi_boundary(|| Async_Notify(CHANNEL.as_ptr(), payload.as_ptr())) }
}
