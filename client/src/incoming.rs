//! Notifications as the relay reads them. The one decoder is `pg_outbox_wire`'s, shared with
//! the extension's encoder; this opens sealed ones, and turns what an inline notification
//! carries into an [`Event`].

use pg_outbox_wire::seal::{self, OpenError};
use pg_outbox_wire::NotificationError;
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

/// A notification opened: the events it announces, and whether it came sealed (and opened
/// with the key), which is what the relay's policy weighs to trust it.
pub(crate) struct Opened {
    pub notices: Vec<Notice>,
    pub sealed: bool,
}

/// Opens a notification: a sealed one with `key` (an error without one), a plain one as it is.
pub(crate) fn open(text: &str, key: Option<&SealKey>) -> Result<Opened, ReadError> {
    if !seal::is_sealed(text) {
        return Ok(Opened {
            notices: decode(text)?,
            sealed: false,
        });
    }
    let document = seal::open(key.ok_or(ReadError::NoKey)?, text)?;
    Ok(Opened {
        notices: decode(&document)?,
        sealed: true,
    })
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
