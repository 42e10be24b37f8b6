//! The notification documents: what a LISTEN session receives.
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

use std::fmt::Write;

use uuid::Uuid;

/// The version of a document that carries one event.
pub const VERSION: u32 = 1;

/// NOTIFY payloads must be shorter than this (`NOTIFY_PAYLOAD_MAX_LENGTH` in `async.c`).
pub const NOTIFY_PAYLOAD_LIMIT: usize = 8000;

/// Payloads whose binary (jsonb) size is above this are never rendered to go inline: their
/// text could not fit in a notification (the binary size is a cheap upper-bound proxy, and
/// skipping the rendering saves the work).
pub const INLINE_CANDIDATE_BYTES: usize = 2 * NOTIFY_PAYLOAD_LIMIT;

/// A jsonb value as JSON text, as `jsonb_out` prints it.
///
/// # Safety
/// `jsonb` must be a non-NULL jsonb datum.
pub unsafe fn jsonb_text(jsonb: pgrx::pg_sys::Datum) -> String {
    use pgrx::pg_sys;
    // SAFETY: jsonb's output function takes a jsonb datum and returns a palloc'd C string.
    unsafe {
        let text = pg_sys::OidOutputFunctionCall(pg_sys::Oid::from(pg_sys::F_JSONB_OUT), jsonb);
        let json = std::ffi::CStr::from_ptr(text)
            .to_string_lossy()
            .into_owned();
        pg_sys::pfree(text.cast());
        json
    }
}

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
        let doc = self.document(Some(payload_json));
        (doc.len() < NOTIFY_PAYLOAD_LIMIT).then_some(doc)
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
    send: F,
}

impl<F: FnMut(&str)> BatchDocuments<F> {
    pub fn new(send: F) -> Self {
        let mut doc = String::with_capacity(NOTIFY_PAYLOAD_LIMIT);
        doc.push_str(BATCH_OPEN);
        BatchDocuments {
            doc,
            events: 0,
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
        // A reference alone always fits: `outbox_publish` bounds the user id (escaped, at most
        // 6 × 1024 bytes, `USER_ID_MAX_BYTES`) and allows the channel and origin only
        // characters JSON does not escape (63 and 255 bytes).
        let appended = self.append(event, None);
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
        if self.doc.len() + BATCH_CLOSE.len() < NOTIFY_PAYLOAD_LIMIT {
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

    #[pg_test]
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
}
