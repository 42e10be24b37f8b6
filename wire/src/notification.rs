//! The notification documents: what a LISTEN session on `pg_outbox` receives, written by the
//! extension ([`Notification`], [`BatchDocuments`]) and read by everything else ([`decode`]).
//!
//! Version 1, one event, sent by `outbox_publish` in transaction mode:
//! ```json
//! {"v":1,"id":"…","channel":"chat","user_id":"u1","origin":null,"xid":745,"created_at_us":1764290000123456}
//! ```
//! In inline mode a `"payload"` key carries the event's JSON when the document stays under the
//! 8000-byte NOTIFY limit; without it, the document is a reference and listeners read the row.
//! `xid` is the publishing transaction's id (as stored in `event_outbox.xid`), for snapshot-exact
//! catch-up; `created_at_us` is `created_at` in microseconds since the Unix epoch.
//!
//! Version 2, the events of one notifier batch, each as in version 1 without its `v`, in as few
//! documents as fit under the limit: `{"v":2,"events":[{"id":…},…]}`. Every notification costs a
//! queue entry, a protocol message and a wakeup in every listener, whatever it carries.
//!
//! `v` comes first, and decides how the rest is read. Unknown keys are ignored; an unknown `v`
//! is an error.

use std::fmt::{self, Write};
use std::time::{Duration, SystemTime};

use serde::de::value::MapAccessDeserializer;
use serde::de::{Error as _, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use uuid::Uuid;

/// The notification channel.
pub const CHANNEL: &str = "pg_outbox";

/// The version of a document that carries one event.
pub const VERSION: u32 = 1;

/// NOTIFY payloads must be shorter than this (`NOTIFY_PAYLOAD_MAX_LENGTH` in `async.c`).
pub const NOTIFY_PAYLOAD_LIMIT: usize = 8000;

/// Payloads whose binary (jsonb) size is above this are never rendered to go inline: their
/// text could not fit in a notification (the binary size is a cheap upper-bound proxy, and
/// skipping the rendering saves the work).
pub const INLINE_CANDIDATE_BYTES: usize = 2 * NOTIFY_PAYLOAD_LIMIT;

/// The metadata of one published event, as it goes into its notification.
#[derive(Debug, Clone)]
pub struct Notification<'a> {
    pub id: Uuid,
    pub channel: &'a str,
    pub user_id: &'a str,
    pub origin: Option<&'a str>,
    pub xid: u64,
    pub created_at_us: i64,
}

impl Notification<'_> {
    /// The reference document: everything but the payload.
    pub fn reference(&self) -> String {
        self.document(None)
    }

    /// The inline document carrying `payload_json`, or `None` when it would not fit in a
    /// notification (the caller then sends the reference).
    pub fn inline(&self, payload_json: &str) -> Option<String> {
        self.inline_within(payload_json, NOTIFY_PAYLOAD_LIMIT)
    }

    /// The inline document carrying `payload_json`, or `None` unless it is shorter than
    /// `limit` bytes (for a sealed notification, [`SEALED_DOCUMENT_LIMIT`]).
    ///
    /// [`SEALED_DOCUMENT_LIMIT`]: crate::SEALED_DOCUMENT_LIMIT
    pub fn inline_within(&self, payload_json: &str, limit: usize) -> Option<String> {
        let doc = self.document(Some(payload_json));
        (doc.len() < limit).then_some(doc)
    }

    /// The reference document if it is shorter than `limit` bytes; otherwise the same without
    /// the user id and origin, which always fits. Only a sealed notification's limit can be
    /// reached, by a user id of control characters (escaped six bytes each): a relay reads the
    /// row it announces, user id and origin included, anyway.
    pub fn reference_within(&self, limit: usize) -> String {
        let doc = self.reference();
        if doc.len() < limit {
            return doc;
        }
        self.bare().reference()
    }

    /// This event without its user id and origin.
    fn bare(&self) -> Notification<'_> {
        Notification {
            user_id: "",
            origin: None,
            ..self.clone()
        }
    }

    /// The version 1 document carrying `payload_json`, whatever its size: what goes where no
    /// NOTIFY limit applies (a logical-decoding message).
    pub fn with_payload(&self, payload_json: &str) -> String {
        self.document(Some(payload_json))
    }

    /// The version 1 document.
    fn document(&self, payload_json: Option<&str>) -> String {
        let mut doc =
            String::with_capacity(200 + self.user_id.len() + payload_json.map_or(0, str::len));
        // Writing into a String cannot fail.
        let _ = write!(doc, "{{\"v\":{VERSION},");
        self.write_fields(&mut doc, payload_json);
        doc.push('}');
        doc
    }

    /// Writes the event's keys and values, without braces, and the payload when given.
    fn write_fields(&self, out: &mut String, payload_json: Option<&str>) {
        let _ = write!(
            out,
            "\"id\":\"{}\",\"channel\":{},\"user_id\":{},\"origin\":{},\"xid\":{},\"created_at_us\":{}",
            self.id.hyphenated(),
            json_string(self.channel),
            json_string(self.user_id),
            self.origin.map_or_else(|| "null".to_owned(), json_string),
            self.xid,
            self.created_at_us,
        );
        if let Some(payload) = payload_json {
            out.push_str(",\"payload\":");
            out.push_str(payload);
        }
    }
}

fn json_string(value: &str) -> String {
    serde_json::Value::from(value).to_string()
}

/// How a version 2 document starts.
const BATCH_OPEN: &str = "{\"v\":2,\"events\":[";
const BATCH_CLOSE: &str = "]}";

/// Packs the events of one notifier batch into version 2 documents, each sent through `send`
/// as soon as the next event does not fit in it.
pub struct BatchDocuments<F: FnMut(&str)> {
    doc: String,
    events: usize,
    /// Every document is shorter than this.
    limit: usize,
    send: F,
}

impl<F: FnMut(&str)> BatchDocuments<F> {
    pub fn new(send: F) -> Self {
        Self::with_limit(NOTIFY_PAYLOAD_LIMIT, send)
    }

    /// Documents each shorter than `limit` bytes (for sealed notifications,
    /// [`SEALED_DOCUMENT_LIMIT`](crate::SEALED_DOCUMENT_LIMIT)).
    pub fn with_limit(limit: usize, send: F) -> Self {
        let mut doc = String::with_capacity(limit);
        doc.push_str(BATCH_OPEN);
        BatchDocuments {
            doc,
            events: 0,
            limit,
            send,
        }
    }

    /// Adds an event: inline when `payload_json` is given and the event fits in a document of
    /// its own, as a reference otherwise.
    pub fn push(&mut self, event: &Notification, payload_json: Option<&str>) {
        if self.append(event, payload_json) {
            return;
        }
        if self.events > 0 {
            self.flush();
            if self.append(event, payload_json) {
                return;
            }
        }
        // A reference alone fits under the NOTIFY limit: `outbox_publish` bounds the user id
        // (escaped, at most 6 × 1024 bytes, `USER_ID_MAX_BYTES`) and allows the channel and
        // origin only characters JSON does not escape (63 and 255 bytes). Under a sealed
        // document's limit, without its user id and origin it does.
        let appended = self.append(event, None) || self.append(&event.bare(), None);
        debug_assert!(appended, "a reference alone fits in a notification");
    }

    /// Sends the last document.
    pub fn finish(mut self) {
        self.flush();
    }

    /// Appends the event if the document still fits under the limit with it.
    fn append(&mut self, event: &Notification, payload_json: Option<&str>) -> bool {
        let start = self.doc.len();
        self.doc.push_str(if self.events == 0 { "{" } else { ",{" });
        event.write_fields(&mut self.doc, payload_json);
        self.doc.push('}');
        if self.doc.len() + BATCH_CLOSE.len() < self.limit {
            self.events += 1;
            true
        } else {
            self.doc.truncate(start);
            false
        }
    }

    fn flush(&mut self) {
        if self.events == 0 {
            return;
        }
        self.doc.push_str(BATCH_CLOSE);
        (self.send)(&self.doc);
        self.doc.truncate(BATCH_OPEN.len());
        self.events = 0;
    }
}

/// A decoded notification: the row's identity, and its payload when it was sent inline.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub id: Uuid,
    pub channel: String,
    pub user_id: String,
    pub origin: Option<String>,
    pub xid: u64,
    pub created_at: SystemTime,
    /// `Some` in inline mode (even when the payload is JSON `null`), `None` for a reference.
    pub payload: Option<serde_json::Value>,
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
pub fn decode(payload: &str) -> Result<Vec<Notice>, NotificationError> {
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
    }

    #[test]
    fn decodes_an_inline_payload_even_null() {
        let text = reference().replace("}", r#","payload":{"text":"hi"}}"#);
        let payload = one(&text).payload.unwrap();
        assert_eq!(payload["text"], "hi");

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

    fn sample() -> Notification<'static> {
        Notification {
            id: Uuid::nil(),
            channel: "chat",
            user_id: "user \"1\"\n",
            origin: None,
            xid: 745,
            created_at_us: 1_764_290_000_123_456,
        }
    }

    #[test]
    fn reference_is_json_without_payload() {
        let doc: serde_json::Value = serde_json::from_str(&sample().reference()).unwrap();
        assert_eq!(doc["v"], 1);
        assert_eq!(doc["user_id"], "user \"1\"\n");
        assert_eq!(doc["origin"], serde_json::Value::Null);
        assert_eq!(doc["xid"], 745);
        assert_eq!(doc["created_at_us"], 1_764_290_000_123_456_i64);
        assert!(doc.get("payload").is_none());
    }

    #[test]
    fn inline_carries_payload_until_the_limit() {
        let n = Notification {
            origin: Some("replica-a"),
            ..sample()
        };
        let doc: serde_json::Value =
            serde_json::from_str(&n.inline(r#"{"a": [1, 2]}"#).unwrap()).unwrap();
        assert_eq!(doc["payload"]["a"][1], 2);
        assert_eq!(doc["origin"], "replica-a");
        let big = format!("\"{}\"", "x".repeat(NOTIFY_PAYLOAD_LIMIT));
        assert_eq!(n.inline(&big), None);
    }

    /// Packs `events` (each with its payload, if inline) and returns the documents sent.
    fn pack(events: &[(Notification, Option<String>)]) -> Vec<serde_json::Value> {
        let mut sent = Vec::new();
        let mut documents = BatchDocuments::new(|doc: &str| {
            assert!(doc.len() < NOTIFY_PAYLOAD_LIMIT, "{} bytes", doc.len());
            sent.push(serde_json::from_str(doc).unwrap());
        });
        for (event, payload) in events {
            documents.push(event, payload.as_deref());
        }
        documents.finish();
        sent
    }

    #[test]
    fn a_batch_goes_out_in_as_few_documents_as_fit_in_order() {
        let event = |xid, payload: Option<usize>| {
            let n = Notification { xid, ..sample() };
            (n, payload.map(|len| format!("\"{}\"", "x".repeat(len))))
        };
        assert!(pack(&[]).is_empty());

        // 100 references of some 130 bytes: two documents, every event once, in order.
        let references: Vec<_> = (0..100).map(|xid| event(xid, None)).collect();
        let sent = pack(&references);
        assert_eq!(sent.len(), 2);
        let xids: Vec<u64> = sent
            .iter()
            .flat_map(|doc| {
                assert_eq!(doc["v"], 2);
                doc["events"].as_array().unwrap().clone()
            })
            .map(|e| {
                assert!(e.get("v").is_none() && e.get("payload").is_none());
                e["xid"].as_u64().unwrap()
            })
            .collect();
        assert_eq!(xids, (0..100).collect::<Vec<_>>());

        // An inline event too large for the current document starts the next one; one too
        // large for any goes as a reference, in the next document if this one is too full.
        let sent = pack(&[
            event(1, Some(10)),
            event(2, Some(7700)),
            event(3, Some(NOTIFY_PAYLOAD_LIMIT)),
            event(4, Some(10)),
        ]);
        let events: Vec<Vec<(u64, bool)>> = sent
            .iter()
            .map(|doc| {
                doc["events"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| (e["xid"].as_u64().unwrap(), e.get("payload").is_some()))
                    .collect()
            })
            .collect();
        assert_eq!(
            events,
            vec![
                vec![(1, true)],
                vec![(2, true)],
                vec![(3, false), (4, true)]
            ]
        );
    }

    #[test]
    fn under_the_sealed_limit_documents_shrink_and_a_huge_reference_goes_bare() {
        use crate::SEALED_DOCUMENT_LIMIT;
        // A user id of 1,024 control characters escapes to 6,144 bytes: no room once sealed.
        let user_id = "\u{1}".repeat(1024);
        let huge = Notification {
            user_id: &user_id,
            origin: Some("replica-a"),
            ..sample()
        };
        assert!(huge.reference().len() >= SEALED_DOCUMENT_LIMIT);
        let bare = huge.reference_within(SEALED_DOCUMENT_LIMIT);
        assert!(bare.len() < SEALED_DOCUMENT_LIMIT);
        let notice = &decode(&bare).unwrap()[0];
        assert_eq!(
            (notice.user_id.as_str(), notice.origin.as_deref()),
            ("", None)
        );
        assert_eq!(notice.id, sample().id);
        assert_eq!(
            sample().reference_within(SEALED_DOCUMENT_LIMIT),
            sample().reference()
        );
        assert!(sample()
            .inline_within(&"1".repeat(SEALED_DOCUMENT_LIMIT), SEALED_DOCUMENT_LIMIT)
            .is_none());

        let mut sent = Vec::new();
        let mut documents = BatchDocuments::with_limit(SEALED_DOCUMENT_LIMIT, |doc: &str| {
            sent.push(doc.to_owned())
        });
        let payload = format!("\"{}\"", "x".repeat(5_000));
        documents.push(&sample(), Some(&payload));
        documents.push(&sample(), Some(&payload));
        documents.push(&huge, None);
        documents.finish();
        assert_eq!(sent.len(), 3);
        assert!(sent.iter().all(|doc| doc.len() < SEALED_DOCUMENT_LIMIT));
        assert_eq!(decode(&sent[2]).unwrap()[0].user_id, "");
    }
}
