//! Notifications as the relay reads them. The one decoder is `pg_outbox_wire`'s, shared with
//! the extension's encoder; sealed ones are opened by the relay's keyring (`keyring.rs`).
//! This says why one is skipped, and turns what an inline notification carries into an
//! [`Event`].

use pg_outbox_wire::seal::OpenError;
use pg_outbox_wire::NotificationError;
pub(crate) use pg_outbox_wire::{decode, Notice, CHANNEL};

use crate::event::Event;

/// Why a notification was skipped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error(transparent)]
    Decode(#[from] NotificationError),
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("a sealed pg_outbox notification, and the database gave this relay no key")]
    NoKey,
    #[error("an unsealed pg_outbox notification, and the database seals every notification")]
    Unsealed,
}

impl ReadError {
    /// Whether the notification was not sent by `outbox_publish`: sealed with no key the relay
    /// holds, or unsealed where every notification is sealed.
    pub fn is_forged(&self) -> bool {
        matches!(
            self,
            ReadError::Open(OpenError::Unauthentic) | ReadError::Unsealed
        )
    }

    /// Whether the notification may open with keys made since the relay read them.
    pub fn may_open_with_new_keys(&self) -> bool {
        matches!(
            self,
            ReadError::Open(OpenError::Unauthentic) | ReadError::NoKey
        )
    }
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
