//! Sealing notifications with `pg_outbox.seal_key` (`pg_outbox.notify_payload = 'sealed'`);
//! the format is `pg_outbox_wire::seal`'s, which relays open.

use std::cell::RefCell;

use pg_outbox_wire::seal;
use pg_outbox_wire::SealKey;
use pgrx::pg_sys;

use crate::error::OutboxError;
use crate::guc;

/// The setting's text, and the key parsed from it or why it is not one.
type Parsed = (Vec<u8>, Result<SealKey, String>);

thread_local! {
    /// The key as last parsed: parsed again only when the setting's text changes.
    static KEY: RefCell<Option<Parsed>> = const { RefCell::new(None) };
}

/// The key `pg_outbox.seal_key` holds, or why it cannot be used.
pub fn key() -> Result<SealKey, OutboxError> {
    let text = guc::seal_key()
        .map(|text| text.into_bytes())
        .unwrap_or_default();
    KEY.with_borrow_mut(|cached| {
        if cached.as_ref().is_some_and(|(seen, _)| *seen != text) {
            *cached = None;
        }
        let (_, parsed) = cached.get_or_insert_with(|| {
            let parsed = if text.is_empty() {
                Err("it is not set".to_owned())
            } else {
                SealKey::from_base64(&String::from_utf8_lossy(&text)).map_err(|e| e.to_string())
            };
            (text, parsed)
        });
        parsed
            .clone()
            .map_err(|reason| OutboxError::SealKey { reason })
    })
}

/// `document` sealed with `key` under a fresh random nonce.
pub fn seal(key: &SealKey, document: &str) -> String {
    let mut nonce = [0u8; 24];
    // SAFETY: writes exactly `nonce.len()` bytes into the buffer.
    let drawn = unsafe { pg_sys::pg_strong_random(nonce.as_mut_ptr().cast(), nonce.len()) };
    if !drawn {
        pgrx::error!("pg_outbox: could not draw a random nonce to seal a notification");
    }
    seal::seal(key, document, nonce)
}
