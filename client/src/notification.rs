//! The one decoder of `pg_outbox` notification payloads.
//!
//! A payload is one JSON document, its version `v` first:
//! - version 1, one event, from `outbox_publish` in transaction mode:
//!   `{"v":1,"id":"…","channel":"chat","user_id":"u1","origin":null,"xid":745,"created_at_us":…}`,
//!   plus `"payload": <jsonb>` in inline mode;
//! - version 2, the events of one batch of the notifier worker (`notify_mode = 'worker'`):
//!   `{"v":2,"events":[{"id":"…","channel":"chat",…},…]}`, each event as in version 1 without
//!   its `v`. One notification per batch instead of one per event: every notification is a
//!   queue entry, a protocol message and a wakeup for every listener.
//!
//! Unknown keys are ignored; an unknown `v` is an error.

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::de::value::MapAccessDeserializer;
use serde::de::{Error as _, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use uuid::Uuid;

use crate::event::Event;

/// The notification channel the extension sends on.
pub(crate) const CHANNEL: &str = "pg_outbox";

/// A decoded notification: the row's identity, and its payload when it was sent inline.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Notice {
    pub id: Uuid,
    pub channel: String,
    pub user_id: String,
    pub origin: Option<String>,
    pub xid: u64,
    pub created_at: SystemTime,
    /// `Some` in inline mode (even when the payload is JSON `null`), `None` for a reference.
    pub payload: Option<serde_json::Value>,
}

impl Notice {
    /// The event, when the payload came inline.
    pub fn into_event(self) -> Option<Event> {
        match self.payload {
            Some(payload) => Some(Event::new(
                self.id,
                self.channel,
                self.user_id,
                self.origin,
                self.xid,
                self.created_at,
                payload,
            )),
            None => None,
        }
    }
}

/// Why a notification payload was not understood.
#[derive(Debug, thiserror::Error)]
pub enum NotificationError {
    /// The payload is not a JSON object with the required keys and types.
    #[error("malformed pg_outbox notification: {0}")]
    Malformed(#[source] serde_json::Error),
    /// The payload's version is not one this crate reads (upgrade the client).
    #[error("unsupported pg_outbox notification version {0} (this client reads versions 1 and 2)")]
    UnsupportedVersion(String),
    /// A field is out of its range.
    #[error("invalid pg_outbox notification: {0}")]
    Invalid(&'static str),
}

/// One event as the wire carries it.
#[derive(Deserialize)]
struct WireEvent {
    id: Uuid,
    channel: String,
    user_id: String,
    #[serde(default)]
    origin: Option<String>,
    xid: u64,
    created_at_us: i64,
    #[serde(default, deserialize_with = "present")]
    payload: Option<serde_json::Value>,
}

/// What follows `"v":2`.
#[derive(Deserialize)]
struct Batch {
    events: Vec<WireEvent>,
}

/// A key that is present is `Some`, even when its value is `null`.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

/// A whole document, read in one pass: its version decides how the keys after it are read.
enum Document {
    Events(Vec<WireEvent>),
    /// A version this crate does not read, as it was written.
    Unsupported(String),
}

impl<'de> Deserialize<'de> for Document {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(DocumentVisitor)
    }
}

struct DocumentVisitor;

impl<'de> Visitor<'de> for DocumentVisitor {
    type Value = Document;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a pg_outbox notification: a JSON object whose first key is \"v\"")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Document, A::Error> {
        if map.next_key::<String>()?.as_deref() != Some("v") {
            return Err(A::Error::custom(
                "the first key of a pg_outbox notification must be \"v\", its version",
            ));
        }
        let version: serde_json::Value = map.next_value()?;
        let rest = MapAccessDeserializer::new(map);
        match version.as_u64() {
            Some(1) => Ok(Document::Events(vec![WireEvent::deserialize(rest)?])),
            Some(2) => Ok(Document::Events(Batch::deserialize(rest)?.events)),
            _ => {
                // Another version may have another shape: skip it, and name the version.
                IgnoredAny::deserialize(rest)?;
                Ok(Document::Unsupported(version.to_string()))
            }
        }
    }
}

/// Decodes one notification payload into the events it carries, in the order they were sent.
pub(crate) fn decode(payload: &str) -> Result<Vec<Notice>, NotificationError> {
    let events = match serde_json::from_str(payload).map_err(NotificationError::Malformed)? {
        Document::Events(events) => events,
        Document::Unsupported(version) => {
            return Err(NotificationError::UnsupportedVersion(version))
        }
    };
    events.into_iter().map(Notice::try_from).collect()
}

impl TryFrom<WireEvent> for Notice {
    type Error = NotificationError;

    fn try_from(wire: WireEvent) -> Result<Notice, NotificationError> {
        if wire.channel.is_empty() {
            return Err(NotificationError::Invalid("empty channel"));
        }
        let created_at = from_unix_micros(wire.created_at_us)
            .ok_or(NotificationError::Invalid("created_at_us out of range"))?;
        Ok(Notice {
            id: wire.id,
            channel: wire.channel,
            user_id: wire.user_id,
            origin: wire.origin,
            xid: wire.xid,
            created_at,
            payload: wire.payload,
        })
    }
}

/// Unix epoch microseconds as a `SystemTime`, `None` when it does not fit.
fn from_unix_micros(us: i64) -> Option<SystemTime> {
    let magnitude = Duration::from_micros(us.unsigned_abs());
    if us >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(magnitude)
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(magnitude)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "01890a5d-ac96-774b-bcce-b302099a8057";

    fn reference() -> String {
        format!(
            r#"{{"v":1,"id":"{ID}","channel":"chat","user_id":"u1","origin":"replica-a","xid":745,"created_at_us":1764290000123456}}"#
        )
    }

    /// The one event of a document.
    fn one(text: &str) -> Notice {
        let mut notices = decode(text).unwrap();
        assert_eq!(notices.len(), 1, "{text}");
        notices.remove(0)
    }

    #[test]
    fn decodes_a_reference() {
        let notice = one(&reference());
        assert_eq!(notice.id.to_string(), ID);
        assert_eq!(notice.channel, "chat");
        assert_eq!(notice.user_id, "u1");
        assert_eq!(notice.origin.as_deref(), Some("replica-a"));
        assert_eq!(notice.xid, 745);
        assert_eq!(
            notice.created_at,
            SystemTime::UNIX_EPOCH + Duration::from_micros(1_764_290_000_123_456)
        );
        assert!(notice.payload.is_none());
        assert!(notice.into_event().is_none());
    }

    #[test]
    fn decodes_an_inline_payload_even_null() {
        let text = reference().replace("}", r#","payload":{"text":"hi"}}"#);
        let event = one(&text).into_event().unwrap();
        assert_eq!(event.payload()["text"], "hi");

        let text = reference().replace("}", r#","payload":null}"#);
        assert_eq!(one(&text).payload, Some(serde_json::Value::Null));
    }

    #[test]
    fn null_origin_and_unknown_keys_are_accepted() {
        let text = reference()
            .replace(r#""replica-a""#, "null")
            .replace("}", r#","future":[1,2]}"#);
        assert_eq!(one(&text).origin, None);
    }

    #[test]
    fn a_batch_decodes_to_its_events_in_order() {
        let text = format!(
            r#"{{"v":2,"events":[{{"id":"{ID}","channel":"a","user_id":"u1","origin":null,"xid":7,"created_at_us":1}},{{"id":"{ID}","channel":"b","user_id":"u2","origin":"r","xid":8,"created_at_us":2,"payload":[1]}}],"future":{{}}}}"#
        );
        let notices = decode(&text).unwrap();
        assert_eq!(notices.len(), 2);
        assert_eq!((notices[0].channel.as_str(), notices[0].xid), ("a", 7));
        assert_eq!(notices[0].payload, None);
        assert_eq!((notices[1].channel.as_str(), notices[1].xid), ("b", 8));
        assert_eq!(notices[1].payload, Some(serde_json::json!([1])));
        assert!(decode(r#"{"v":2,"events":[]}"#).unwrap().is_empty());
    }

    #[test]
    fn one_bad_event_rejects_its_whole_batch() {
        let text = format!(
            r#"{{"v":2,"events":[{{"id":"{ID}","channel":"a","user_id":"u","xid":7,"created_at_us":1}},{{"id":"{ID}","channel":"","user_id":"u","xid":8,"created_at_us":1}}]}}"#
        );
        assert!(matches!(decode(&text), Err(NotificationError::Invalid(_))));
        for text in [
            r#"{"v":2}"#,
            r#"{"v":2,"events":{}}"#,
            r#"{"v":2,"events":[{"v":1}]}"#,
        ] {
            assert!(
                matches!(decode(text), Err(NotificationError::Malformed(_))),
                "{text}"
            );
        }
    }

    #[test]
    fn unknown_version_is_an_error() {
        let text = reference().replace(r#""v":1"#, r#""v":3"#);
        assert!(matches!(
            decode(&text),
            Err(NotificationError::UnsupportedVersion(v)) if v == "3"
        ));
        // A future version may also change the shape: still reported as a version problem.
        let err = decode(r#"{"v":"two","id":5,"rest":[{"deep":[]}]}"#).unwrap_err();
        assert!(matches!(err, NotificationError::UnsupportedVersion(v) if v == r#""two""#));
    }

    #[test]
    fn garbage_is_malformed_never_a_panic() {
        for text in [
            "",
            "not json",
            "{}",
            "[]",
            "null",
            r#"{"v":1}"#,
            r#"{"id":"01890a5d-ac96-774b-bcce-b302099a8057","v":1,"channel":"c","user_id":"u","xid":1,"created_at_us":0}"#,
            r#"{"v":1,"id":"nope","channel":"c","user_id":"u","xid":1,"created_at_us":0}"#,
            r#"{"v":1,"id":"01890a5d-ac96-774b-bcce-b302099a8057","channel":"c","user_id":"u","xid":-1,"created_at_us":0}"#,
            r#"{"v":3,"unterminated":["#,
            "\u{0}\u{ffff}",
        ] {
            assert!(
                matches!(decode(text), Err(NotificationError::Malformed(_))),
                "{text:?}"
            );
        }
    }

    #[test]
    fn out_of_range_values_are_invalid() {
        let text = reference().replace(r#""chat""#, r#""""#);
        assert!(matches!(decode(&text), Err(NotificationError::Invalid(_))));
        let text = reference().replace("1764290000123456", &i64::MIN.to_string());
        // Either representable (platform dependent) or invalid, never a panic.
        let _ = decode(&text);
        let text = reference().replace("1764290000123456", "-5");
        assert!(decode(&text).is_ok());
    }
}
