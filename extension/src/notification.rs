//! The notification documents are `pg_outbox_wire`'s, the crate the client reads them with;
//! this adds what only the server can do for them: render a `jsonb` payload as text.

pub use pg_outbox_wire::{Notification, INLINE_CANDIDATE_BYTES};

/// A jsonb value as JSON text, as `jsonb_out` prints it.
///
/// # Safety
/// `jsonb` must be a non-NULL jsonb datum.
pub unsafe fn jsonb_text(jsonb: pgrx::pg_sys::Datum) -> String {
    use pgrx::pg_sys;
    // SAFETY: jsonb's output function takes a jsonb datum and returns a palloc'd C string.
    unsafe {
        let text = pg_sys::OidOutputFunctionCall(pg_sys::Oid::from(pg_sys::F_JSONB_OUT), jsonb);
        let json = std::ffi::CStr::from_ptr(text)
            .to_string_lossy()
            .into_owned();
        pg_sys::pfree(text.cast());
        json
    }
}
