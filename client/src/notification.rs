//! Notifications as the relay reads them. The one decoder is `pg_outbox_wire`'s, shared with
//! the extension's encoder; this opens sealed ones, and turns what an inline notification
//! carries into an [`Event`].

use pg_outbox_wire::seal::{self, OpenError};
pub use pg_outbox_wire::NotificationError;
use pg_outbox_wire::SealKey;
pub(crate) use pg_outbox_wire::{decode, Notice, CHANNEL};

use crate::event::Event;

/// Why a notification was skipped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error(transparent)]
    Decode(#[from] NotificationError),
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(
        "a sealed pg_outbox notification, and this relay has no seal key (RelayBuilder::seal_key)"
    )]
    NoKey,
}

impl ReadError {
    /// Whether the notification was sealed and did not open: forged, or another key's.
    pub fn is_forged(&self) -> bool {
        matches!(self, ReadError::Open(OpenError::Unauthentic))
    }
}

/// The events a notification announces, and whether what it says can be trusted: a sealed
/// notification that opens with `key` can; so can any when the relay has no key (it reads
/// inline payloads as they come); an unsealed one when the relay has a key cannot.
pub(crate) fn read(text: &str, key: Option<&SealKey>) -> Result<(Vec<Notice>, bool), ReadError> {
    if !seal::is_sealed(text) {
        return Ok((decode(text)?, key.is_none()));
    }
    let document = seal::open(key.ok_or(ReadError::NoKey)?, text)?;
    Ok((decode(&document)?, true))
}

/// The event an inline notification carries; `None` for a reference.
pub(crate) fn into_event(mut notice: Notice) -> Option<Event> {
    let payload = notice.payload.take()?;
    Some(event_with(notice, payload))
}

/// The event `notice` announces, with `payload`.
pub(crate) fn event_with(notice: Notice, payload: serde_json::Value) -> Event {
    Event::new(
        notice.id,
        notice.channel,
        notice.user_id,
        notice.origin,
        notice.xid,
        notice.created_at,
        payload,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCUMENT: &str = r#"{"v":1,"id":"01890a5d-ac96-774b-bcce-b302099a8057","channel":"chat","user_id":"u1","origin":null,"xid":745,"created_at_us":1764290000123456,"payload":{"n":1}}"#;

    #[test]
    fn only_what_opens_with_the_key_is_taken_at_its_word() {
        let key = SealKey::from_bytes([9; 32]);
        let sealed = seal::seal(&key, DOCUMENT, [1; 24]);
        let (notices, trusted) = read(&sealed, Some(&key)).unwrap();
        assert!(trusted && notices[0].payload.is_some());
        // Unsealed: trusted only by a relay that expects nothing sealed.
        assert!(!read(DOCUMENT, Some(&key)).unwrap().1);
        assert!(read(DOCUMENT, None).unwrap().1);
        assert!(matches!(read(&sealed, None), Err(ReadError::NoKey)));
        let other = SealKey::from_bytes([8; 32]);
        assert!(read(&sealed, Some(&other)).unwrap_err().is_forged());
        assert!(!read("s1.AAAA", Some(&key)).unwrap_err().is_forged());
    }
}
