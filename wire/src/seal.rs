//! Sealed notifications: a notification document encrypted and authenticated with a key that
//! the server and the relays hold and other database roles cannot read.
//!
//! Any role that can connect may LISTEN to `pg_outbox` and NOTIFY on it: an inline payload is
//! readable by all of them and forgeable by any. A sealed notification is neither: its text is
//! `s1.` followed by base64url (no padding) of a 24-byte nonce and the document
//! encrypted with XChaCha20-Poly1305 (associated data [`ASSOCIATED_DATA`]). A relay with the
//! key takes what opens as genuine, inline payloads included, and so needs no query to deliver
//! them; whatever does not open was forged (or sealed with another key).
//!
//! Nonces must never repeat for one key; XChaCha20's 192 bits leave room for a random part per
//! sealing process and a counter (the extension's choice), or for wholly random ones. A
//! captured notification can be sent again by a role that can connect: it names an event the
//! relay has delivered already (or that its starting snapshot covers), so the relay drops it as
//! a duplicate.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::notification::NOTIFY_PAYLOAD_LIMIT;

/// How a sealed notification starts: never how a JSON document starts.
pub const SEALED_PREFIX: &str = "s1.";

/// Bound into every seal, so a sealed text means nothing outside pg_outbox's notifications.
pub const ASSOCIATED_DATA: &[u8] = b"pg_outbox sealed notification v1";

const NONCE_BYTES: usize = 24;
const TAG_BYTES: usize = 16;

/// Documents shorter than this (5,957 bytes) fit in a notification once sealed: the prefix, and
/// base64 of the nonce, the document and the tag, stay under [`NOTIFY_PAYLOAD_LIMIT`].
pub const SEALED_DOCUMENT_LIMIT: usize =
    (NOTIFY_PAYLOAD_LIMIT - 1 - SEALED_PREFIX.len()) / 4 * 3 - NONCE_BYTES - TAG_BYTES;
const _: () = assert!(SEALED_DOCUMENT_LIMIT > 5_900);

/// The 32-byte key of sealed notifications.
#[derive(Clone)]
pub struct SealKey([u8; 32]);

/// A key that is not 32 bytes in base64.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a pg_outbox seal key is 32 random bytes in base64 (for example `openssl rand -base64 32`): {0}")]
pub struct SealKeyError(&'static str);

/// A sealed notification that did not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Not base64url, or too short to hold a nonce and a tag.
    #[error("a sealed pg_outbox notification that is not one")]
    Malformed,
    /// The tag did not match: forged, damaged, or sealed with another key.
    #[error("a sealed pg_outbox notification that does not open with this key: forged, or sealed with another key")]
    Unauthentic,
}

impl SealKey {
    /// The key from its base64 text (standard or URL-safe alphabet, padded or not, surrounding
    /// whitespace ignored), as `pg_outbox.seal_key` holds it.
    pub fn from_base64(text: &str) -> Result<SealKey, SealKeyError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(SealKeyError("it is empty"));
        }
        let normalized: String = text
            .trim_end_matches('=')
            .chars()
            .map(|c| match c {
                '+' => '-',
                '/' => '_',
                c => c,
            })
            .collect();
        let bytes = URL_SAFE_NO_PAD
            .decode(normalized)
            .map_err(|_| SealKeyError("it is not base64"))?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| SealKeyError("it is not 32 bytes long"))?;
        Ok(SealKey(key))
    }

    /// The key as standard base64, the form `pg_outbox.seal_key` takes.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> SealKey {
        SealKey(bytes)
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&self.0).into())
    }
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(..)")
    }
}

/// Whether a notification's text is sealed.
pub fn is_sealed(text: &str) -> bool {
    text.starts_with(SEALED_PREFIX)
}

/// `document` sealed with `key` and `nonce`, which must never repeat for one key: draw it from
/// a strong random source, or put a counter after a part drawn once per process.
pub fn seal(key: &SealKey, document: &str, nonce: [u8; NONCE_BYTES]) -> String {
    let sealed = key
        .cipher()
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: document.as_bytes(),
                aad: ASSOCIATED_DATA,
            },
        )
        // Encryption fails only for messages beyond 256 GiB.
        .unwrap_or_default();
    let mut bytes = Vec::with_capacity(NONCE_BYTES + sealed.len());
    bytes.extend_from_slice(&nonce);
    bytes.extend_from_slice(&sealed);
    let mut text = String::with_capacity(SEALED_PREFIX.len() + bytes.len() * 4 / 3 + 4);
    text.push_str(SEALED_PREFIX);
    URL_SAFE_NO_PAD.encode_string(bytes, &mut text);
    text
}

/// The document a sealed notification carries, if it opens with `key`.
pub fn open(key: &SealKey, text: &str) -> Result<String, OpenError> {
    let encoded = text
        .strip_prefix(SEALED_PREFIX)
        .ok_or(OpenError::Malformed)?;
    let bytes = URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|_| OpenError::Malformed)?;
    if bytes.len() < NONCE_BYTES + TAG_BYTES {
        return Err(OpenError::Malformed);
    }
    let (nonce, sealed) = bytes.split_at(NONCE_BYTES);
    let document = key
        .cipher()
        .decrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: sealed,
                aad: ASSOCIATED_DATA,
            },
        )
        .map_err(|_| OpenError::Unauthentic)?;
    String::from_utf8(document).map_err(|_| OpenError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> SealKey {
        SealKey::from_bytes([byte; 32])
    }

    #[test]
    fn a_sealed_document_opens_with_its_key_only() {
        let document = r#"{"v":1,"id":"x","payload":{"secret":"s3cr3t"}}"#;
        let sealed = seal(&key(1), document, [7; 24]);
        assert!(is_sealed(&sealed));
        assert!(!sealed.contains("s3cr3t"));
        assert_eq!(open(&key(1), &sealed).as_deref(), Ok(document));
        assert_eq!(open(&key(2), &sealed), Err(OpenError::Unauthentic));
        // Every byte matters.
        let mut tampered = sealed.clone().into_bytes();
        let last = tampered.len() - 1;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert!(open(&key(1), &tampered).is_err());
        for bad in ["", "s1.", "s1.!!!", "s1.AAAA", document] {
            assert_eq!(open(&key(1), bad), Err(OpenError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn the_document_limit_keeps_a_sealed_notification_under_the_notify_limit() {
        let largest = "x".repeat(SEALED_DOCUMENT_LIMIT - 1);
        let sealed = seal(&key(3), &largest, [0; 24]);
        assert!(sealed.len() < NOTIFY_PAYLOAD_LIMIT, "{}", sealed.len());
    }

    #[test]
    fn keys_read_from_either_base64_alphabet() {
        let bytes: [u8; 32] = std::array::from_fn(|n| (n * 37 + 250) as u8);
        let standard = STANDARD.encode(bytes);
        assert!(standard.contains('+') || standard.contains('/'));
        for text in [
            standard.clone(),
            format!("  {standard}\n"),
            URL_SAFE_NO_PAD.encode(bytes),
        ] {
            assert_eq!(SealKey::from_base64(&text).unwrap().0, bytes, "{text:?}");
        }
        assert_eq!(SealKey::from_bytes(bytes).to_base64(), standard);
        for bad in ["", "not base64 at all", "AAAA", &STANDARD.encode([0u8; 31])] {
            assert!(SealKey::from_base64(bad).is_err(), "{bad:?}");
        }
        assert_eq!(format!("{:?}", SealKey::from_bytes(bytes)), "SealKey(..)");
    }
}
