//! The one decoder of `pg_outbox` notification payloads.
//!
//! A payload is one JSON document per published row:
//! `{"v":1,"id":"…","channel":"chat","user_id":"u1","origin":null,"xid":745,"created_at_us":…}`,
//! plus `"payload": <jsonb>` in inline mode. Unknown keys are ignored; an unknown `v` is an error.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Deserializer};
use uuid::Uuid;

use crate::event::Event;

/// The notification channel the extension sends on.
pub(crate) const CHANNEL: &str = "pg_outbox";

/// The only payload version this crate reads.
const VERSION: u64 = 1;

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
    #[error("unsupported pg_outbox notification version {0} (this client reads version 1)")]
    UnsupportedVersion(String),
    /// A field is out of its range.
    #[error("invalid pg_outbox notification: {0}")]
    Invalid(&'static str),
}

#[derive(Deserialize)]
struct Wire {
    v: u64,
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

#[derive(Deserialize)]
struct Version {
    v: serde_json::Value,
}

/// A key that is present is `Some`, even when its value is `null`.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

/// Decodes one notification payload.
pub(crate) fn decode(payload: &str) -> Result<Notice, NotificationError> {
    let wire: Wire = match serde_json::from_str(payload) {
        Ok(wire) => wire,
        Err(err) => {
            // Name the version when that is the reason the shape did not match.
            return Err(match serde_json::from_str::<Version>(payload) {
                Ok(Version { v }) if v.as_u64() != Some(VERSION) => {
                    NotificationError::UnsupportedVersion(v.to_string())
                }
                _ => NotificationError::Malformed(err),
            });
        }
    };
    if wire.v != VERSION {
        return Err(NotificationError::UnsupportedVersion(wire.v.to_string()));
    }
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

    #[test]
    fn decodes_a_reference() {
        let notice = decode(&reference()).unwrap();
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
        let event = decode(&text).unwrap().into_event().unwrap();
        assert_eq!(event.payload()["text"], "hi");

        let text = reference().replace("}", r#","payload":null}"#);
        let notice = decode(&text).unwrap();
        assert_eq!(notice.payload, Some(serde_json::Value::Null));
    }

    #[test]
    fn null_origin_and_unknown_keys_are_accepted() {
        let text = reference()
            .replace(r#""replica-a""#, "null")
            .replace("}", r#","future":[1,2]}"#);
        let notice = decode(&text).unwrap();
        assert_eq!(notice.origin, None);
    }

    #[test]
    fn unknown_version_is_an_error() {
        let text = reference().replace(r#""v":1"#, r#""v":2"#);
        assert!(matches!(
            decode(&text),
            Err(NotificationError::UnsupportedVersion(v)) if v == "2"
        ));
        // A future version may also change the shape: still reported as a version problem.
        let err = decode(r#"{"v":"two","id":5}"#).unwrap_err();
        assert!(matches!(err, NotificationError::UnsupportedVersion(_)));
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
            r#"{"v":1,"id":"nope","channel":"c","user_id":"u","xid":1,"created_at_us":0}"#,
            r#"{"v":1,"id":"01890a5d-ac96-774b-bcce-b302099a8057","channel":"c","user_id":"u","xid":-1,"created_at_us":0}"#,
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
