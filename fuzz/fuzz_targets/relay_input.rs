//! Everything `pg_outbox_client` parses from the network, as one target: notification payloads
//! (any text a role that can connect may send with `NOTIFY pg_outbox, '...'`) and `pg_snapshot`
//! text, fed through the relay's cursor as the listener does. Rows are typed by tokio-postgres;
//! the only text the relay parses from them is the snapshot and the xid (plain `u64` parsing).
//!
//! The input is split on NUL bytes (which neither a notification nor a snapshot can contain):
//! the first part is the cursor's snapshot, the second the advance's, the rest are payloads.
//! Every payload is also decoded alone, so the decoder sees the raw bytes too. Every part is
//! also read as a position token, which browsers send back (SSE's `Last-Event-ID`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.split('\0');
    let snapshot = parts.next().unwrap_or_default();
    let next = parts.next().unwrap_or_default();
    let payloads: Vec<&str> = parts.collect();

    // The whole input as one payload, then each part.
    let _ = pg_outbox_client::__decode_notification(text);
    for payload in &payloads {
        let events = pg_outbox_client::__decode_notification(payload).unwrap_or_default();
        for (event, inline) in events {
            // What a subscriber may call on any event.
            let _ = (event.id(), event.channel(), event.user_id(), event.origin());
            let _ = (event.xid(), event.created_at(), inline);
            let _ = event.decode::<serde_json::Value>();
        }
    }
    if let Ok(parsed) = snapshot.parse::<pg_outbox_wire::Snapshot>() {
        // Printing and parsing again is the identity (the relay sends its cursor back as text).
        let again: pg_outbox_wire::Snapshot = parsed.to_string().parse().expect("round trip");
        assert_eq!(again, parsed);
        let _ = parsed.is_visible(parsed.xmin()) || parsed.is_visible(u64::MAX);
    }
    for part in text.split('\0') {
        if let Ok(position) = part.parse::<pg_outbox_client::Position>() {
            // A token read back is the position it came from.
            let again: pg_outbox_client::Position =
                position.to_string().parse().expect("round trip");
            assert_eq!(again, position);
        }
    }
    pg_outbox_client::__fuzz_relay_input(snapshot, &payloads, next);
});
