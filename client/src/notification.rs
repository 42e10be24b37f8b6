//! Notifications as the relay reads them. The one decoder is `pg_outbox_wire`'s, shared with
//! the extension's encoder; this turns what an inline notification carries into an [`Event`].

pub use pg_outbox_wire::NotificationError;
pub(crate) use pg_outbox_wire::{decode, Notice, CHANNEL};

use crate::event::Event;

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
