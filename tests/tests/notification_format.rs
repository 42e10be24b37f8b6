//! The notification format from both ends, without a server.
//!
//! - A round trip: the extension's own encoder (`pg_outbox_wire`, the crate the extension
//!   writes its notifications with) encodes any event or batch of events, and the client's
//!   decoder gives back exactly those events. Documents the extension really sends are decoded
//!   too.
//! - A bounded fuzz that `cargo test` runs: the decoder, the snapshot parser and the cursor fed
//!   with arbitrary, mutated and hostile input never panic. `make fuzz` runs libFuzzer on the same
//!   entry points for longer (see docs/fuzzing.md).

use std::time::{Duration, SystemTime};

use pg_outbox_client::{__decode_notification, __fuzz_relay_input, Event};
use pg_outbox_wire::Snapshot;
use pg_outbox_wire::{BatchDocuments, NOTIFY_PAYLOAD_LIMIT};
use proptest::prelude::*;
use serde_json::{json, Value};
use uuid::Uuid;

/// One published event's notification metadata, owned (the encoder borrows it).
#[derive(Clone, Debug)]
struct Notification {
    id: Uuid,
    channel: String,
    user_id: String,
    origin: Option<String>,
    xid: u64,
    created_at_us: i64,
}

impl Notification {
    /// What the extension encodes.
    fn wire(&self) -> pg_outbox_wire::Notification<'_> {
        pg_outbox_wire::Notification {
            id: self.id,
            channel: &self.channel,
            user_id: &self.user_id,
            origin: self.origin.as_deref(),
            xid: self.xid,
            created_at_us: self.created_at_us,
        }
    }
}

/// The documents the extension's notifier sends for a batch of `events`, each checked to fit
/// under the NOTIFY limit.
fn encode_batch(events: &[(Notification, Option<String>)]) -> Vec<String> {
    let mut sent = Vec::new();
    let mut documents = BatchDocuments::new(|doc: &str| {
        assert!(doc.len() < NOTIFY_PAYLOAD_LIMIT, "{} bytes", doc.len());
        sent.push(doc.to_owned());
    });
    for (n, payload) in events {
        documents.push(&n.wire(), payload.as_deref());
    }
    documents.finish();
    sent
}

/// Whether an event with `payload` fits in a version 2 document of its own: its version 1
/// inline document is 13 bytes shorter (`{"v":1,` against `{"v":2,"events":[{` and `]}`).
fn fits_a_batch_alone(n: &Notification, payload: &str) -> bool {
    n.wire()
        .inline(payload)
        .is_some_and(|doc| doc.len() + 13 < NOTIFY_PAYLOAD_LIMIT)
}

/// The one event of a document, and whether it came inline.
fn decode_one(doc: &str) -> (Event, bool) {
    let mut events = __decode_notification(doc).unwrap();
    assert_eq!(events.len(), 1, "{doc}");
    events.remove(0)
}

fn unix_micros(us: i64) -> SystemTime {
    let magnitude = Duration::from_micros(us.unsigned_abs());
    if us >= 0 {
        SystemTime::UNIX_EPOCH + magnitude
    } else {
        SystemTime::UNIX_EPOCH - magnitude
    }
}

/// Names as `outbox_publish` accepts them for channels and origins.
fn name(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[A-Za-z0-9_.:-]{{1,{max}}}")).unwrap()
}

/// Any non-empty text without NUL (Postgres text cannot hold one), within the 1024-byte limit.
fn user_id() -> impl Strategy<Value = String> {
    "[^\u{0}]{1,300}".prop_filter("at most 1024 bytes", |s| s.len() <= 1024)
}

fn notification() -> impl Strategy<Value = Notification> {
    (
        any::<u128>(),
        name(63),
        user_id(),
        proptest::option::of(name(255)),
        any::<u64>(),
        any::<i64>(),
    )
        .prop_map(
            |(id, channel, user_id, origin, xid, created_at_us)| Notification {
                id: Uuid::from_u128(id),
                channel,
                user_id,
                origin,
                xid,
                created_at_us,
            },
        )
}

/// Any JSON value jsonb can hold.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (any::<i32>(), 0..20u32).prop_map(|(m, e)| json!(f64::from(m) / f64::from(1u32 << e))),
        "[^\u{0}]{0,40}".prop_map(Value::from),
    ];
    leaf.prop_recursive(5, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::from),
            proptest::collection::btree_map("[^\u{0}]{0,12}", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Fails the case unless `event` carries `n`'s metadata.
fn same_metadata(event: &Event, n: &Notification) -> Result<(), TestCaseError> {
    prop_assert_eq!(event.id(), n.id);
    prop_assert_eq!(event.channel(), n.channel.as_str());
    prop_assert_eq!(event.user_id(), n.user_id.as_str());
    prop_assert_eq!(event.origin(), n.origin.as_deref());
    prop_assert_eq!(event.xid(), n.xid);
    prop_assert_eq!(event.created_at(), unix_micros(n.created_at_us));
    Ok(())
}

proptest! {
    #[test]
    fn every_reference_decodes_to_what_was_encoded(n in notification()) {
        let doc = n.wire().reference();
        prop_assert!(doc.len() < NOTIFY_PAYLOAD_LIMIT);
        let (event, inline) = decode_one(&doc);
        prop_assert!(!inline);
        same_metadata(&event, &n)?;
        prop_assert_eq!(event.payload(), &Value::Null);
    }

    #[test]
    fn every_inline_payload_decodes_to_what_was_encoded(
        n in notification(),
        payload in json_value(),
        pretty in any::<bool>(),
    ) {
        // jsonb_out writes `{"a": 1, "b": [2, 3]}`; any valid JSON text must do.
        let text = if pretty {
            serde_json::to_string_pretty(&payload).unwrap()
        } else {
            payload.to_string()
        };
        let Some(doc) = n.wire().inline(&text) else {
            // Only a document that would not fit goes as a reference instead.
            prop_assert!(n.wire().reference().len() + text.len() >= NOTIFY_PAYLOAD_LIMIT - 20);
            return Ok(());
        };
        prop_assert!(doc.len() < NOTIFY_PAYLOAD_LIMIT);
        let (event, inline) = decode_one(&doc);
        prop_assert!(inline);
        same_metadata(&event, &n)?;
        // Numbers are serde_json's to parse (without its `float_roundtrip` feature a float may
        // come back one ulp off): the payload is what serde_json reads from the text.
        let expected: Value = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(event.payload(), &expected);
    }

    #[test]
    fn every_batch_decodes_to_its_events_in_order(
        events in proptest::collection::vec(
            (notification(), proptest::option::of(json_value().prop_map(|v| v.to_string()))),
            0..80,
        ),
    ) {
        let documents = encode_batch(&events);
        let mut decoded = Vec::new();
        for doc in &documents {
            decoded.extend(__decode_notification(doc).unwrap());
        }
        prop_assert_eq!(decoded.len(), events.len());
        for ((event, inline), (n, payload)) in decoded.iter().zip(&events) {
            same_metadata(event, n)?;
            let sent_inline = payload.as_deref().is_some_and(|p| fits_a_batch_alone(n, p));
            prop_assert_eq!(*inline, sent_inline);
            let expected: Value = match payload {
                Some(text) if sent_inline => serde_json::from_str(text).unwrap(),
                _ => Value::Null,
            };
            prop_assert_eq!(event.payload(), &expected);
        }
    }
}

#[test]
fn documents_the_extension_sends_decode() {
    // From the README, and from the extension's own tests (jsonb_out's spacing).
    let readme = r#"{"v":1,"id":"01a21fa8-bb11-747f-8924-37cb92a08747","channel":"chat","user_id":"alice","origin":null,"xid":726,"created_at_us":1795827481361761}"#;
    let (event, inline) = decode_one(readme);
    assert!(!inline);
    assert_eq!(event.xid(), 726);
    assert_eq!(event.created_at(), unix_micros(1_795_827_481_361_761));

    let n = Notification {
        id: Uuid::nil(),
        channel: "chat".into(),
        user_id: "user \"1\"\n".into(),
        origin: Some("replica-a".into()),
        xid: 745,
        created_at_us: 1_764_290_000_123_456,
    };
    let (event, inline) = decode_one(&n.wire().inline(r#"{"a": [1, 2]}"#).unwrap());
    assert!(inline);
    assert_eq!(event.user_id(), "user \"1\"\n");
    assert_eq!(event.payload()["a"][1], 2);
    // An inline `null` payload is still inline.
    let (_, inline) = decode_one(&n.wire().inline("null").unwrap());
    assert!(inline);
}

/// A valid document (either version) with random edits: what a forged or truncated
/// notification looks like.
fn mutated_document() -> impl Strategy<Value = String> {
    let edit = (
        any::<prop::sample::Index>(),
        0..4usize,
        "[{}\\[\\]\":,0-9a-z\\\\ -]{0,4}",
    );
    let document = prop_oneof![
        notification().prop_map(|n| n.wire().inline(r#"{"k": [1, "x"]}"#).unwrap()),
        proptest::collection::vec(notification(), 1..4).prop_map(|events| {
            let events: Vec<_> = events
                .into_iter()
                .map(|n| (n, Some("[1]".to_owned())))
                .collect();
            // Up to three events, each under 2.2 kB, always fit in one document.
            encode_batch(&events).concat()
        }),
    ];
    (document, proptest::collection::vec(edit, 1..6)).prop_map(|(doc, edits)| {
        let mut doc: Vec<char> = doc.chars().collect();
        for (at, remove, insert) in edits {
            let at = at.index(doc.len() + 1);
            let end = (at + remove).min(doc.len());
            doc.splice(at..end, insert.chars());
        }
        doc.into_iter().collect()
    })
}

/// Snapshot-like text: mostly digits, colons and commas.
fn snapshot_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9:,]{0,30}",
        (
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(any::<u64>(), 0..5)
        )
            .prop_map(|(a, b, xip)| {
                let list: Vec<String> = xip.iter().map(u64::to_string).collect();
                format!("{a}:{b}:{}", list.join(","))
            }),
        (
            0..50u64,
            0..50u64,
            proptest::collection::vec(0..50u64, 0..5)
        )
            .prop_map(|(a, b, xip)| {
                let list: Vec<String> = xip.iter().map(u64::to_string).collect();
                format!("{a}:{}:{}", a + b, list.join(","))
            }),
        ".{0,30}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn the_decoder_never_panics(text in prop_oneof![".{0,200}", mutated_document()]) {
        let _ = __decode_notification(&text);
    }

    #[test]
    fn snapshots_parse_without_panics_and_print_back(text in snapshot_text()) {
        if let Ok(snapshot) = text.parse::<Snapshot>() {
            let again: Snapshot = snapshot.to_string().parse().unwrap();
            prop_assert_eq!(&again, &snapshot);
            prop_assert!(snapshot.xmin() <= snapshot.xmax());
        }
    }

    #[test]
    fn the_cursor_takes_any_decoded_input_without_panics(
        start in snapshot_text(),
        next in snapshot_text(),
        payloads in proptest::collection::vec(mutated_document(), 0..6),
        valid in proptest::collection::vec((notification(), any::<bool>()), 0..6),
    ) {
        let mut all: Vec<String> = payloads;
        all.extend(valid.iter().map(|(n, inline)| match inline {
            true => n.wire().inline("{}").unwrap(),
            false => n.wire().reference(),
        }));
        let batch: Vec<_> = valid
            .into_iter()
            .map(|(n, inline)| (n, inline.then(|| "{}".to_owned())))
            .collect();
        all.extend(encode_batch(&batch));
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        __fuzz_relay_input(&start, &refs, &next);
    }
}
