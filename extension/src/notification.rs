//! The notification document: what a LISTEN session receives for each published event.
//!
//! ```json
//! {"v":1,"id":"…","channel":"chat","user_id":"u1","origin":null,"xid":745,"created_at_us":1764290000123456}
//! ```
//! In inline mode a `"payload"` key carries the event's JSON when the document stays under the
//! 8000-byte NOTIFY limit; without it, the document is a reference and listeners read the row.
//! `xid` is the publishing transaction's id (as stored in `event_outbox.xid`), for snapshot-exact
//! catch-up; `created_at_us` is `created_at` in microseconds since the Unix epoch.

use std::fmt::Write;

use uuid::Uuid;

/// The format's version, the `v` key; a listener refuses versions it does not know.
pub const VERSION: u32 = 1;

/// NOTIFY payloads must be shorter than this (`NOTIFY_PAYLOAD_MAX_LENGTH` in `async.c`).
pub const NOTIFY_PAYLOAD_LIMIT: usize = 8000;

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
        let mut doc = self.open();
        doc.push('}');
        doc
    }

    /// The inline document carrying `payload_json`, or `None` when it would not fit in a
    /// notification (the caller then sends the reference).
    pub fn inline(&self, payload_json: &str) -> Option<String> {
        let mut doc = self.open();
        doc.push_str(",\"payload\":");
        doc.push_str(payload_json);
        doc.push('}');
        (doc.len() < NOTIFY_PAYLOAD_LIMIT).then_some(doc)
    }

    /// The document without its closing brace.
    fn open(&self) -> String {
        let mut doc = String::with_capacity(192 + self.user_id.len());
        // Writing into a String cannot fail.
        let _ = write!(
            doc,
            "{{\"v\":{VERSION},\"id\":\"{}\",\"channel\":{},\"user_id\":{},\"origin\":{},\"xid\":{},\"created_at_us\":{}",
            self.id.hyphenated(),
            json_string(self.channel),
            json_string(self.user_id),
            self.origin.map_or_else(|| "null".to_owned(), json_string),
            self.xid,
            self.created_at_us,
        );
        doc
    }
}

fn json_string(value: &str) -> String {
    serde_json::Value::from(value).to_string()
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::*;
    use pgrx::prelude::*;

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

    #[pg_test]
    fn reference_is_json_without_payload() {
        let doc: serde_json::Value = serde_json::from_str(&sample().reference()).unwrap();
        assert_eq!(doc["v"], 1);
        assert_eq!(doc["user_id"], "user \"1\"\n");
        assert_eq!(doc["origin"], serde_json::Value::Null);
        assert_eq!(doc["xid"], 745);
        assert_eq!(doc["created_at_us"], 1_764_290_000_123_456_i64);
        assert!(doc.get("payload").is_none());
    }

    #[pg_test]
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
}
