//! What each delivery becomes on the wire: an event's `data`, a reset's `data`.

use std::time::{SystemTime, UNIX_EPOCH};

use pg_outbox_client::{Delivery, Event};
use serde_json::{json, Value};

/// The `data` of an event's frame: one line of JSON, `{"id", "channel", "user_id", "payload",
/// "created_at_us"}` (see the crate documentation).
pub fn event_data(event: &Event) -> String {
    event_json(
        &event.id().to_string(),
        event.channel(),
        event.user_id(),
        event.payload(),
        event.created_at(),
    )
}

fn event_json(
    id: &str,
    channel: &str,
    user_id: &str,
    payload: &Value,
    created_at: SystemTime,
) -> String {
    let created_at_us = created_at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_micros());
    json!({
        "id": id,
        "channel": channel,
        "user_id": user_id,
        "payload": payload,
        "created_at_us": created_at_us,
    })
    .to_string()
}

/// The `data` of the `event: reset` frame that `delivery` becomes, or `None` for an event
/// (see the crate documentation for the reasons).
pub fn reset_data(delivery: &Delivery) -> Option<String> {
    let (reason, message): (&str, String) = match delivery {
        Delivery::Event(_) => return None,
        Delivery::Lagged { missed } => {
            return Some(
                json!({
                    "reason": "lagged",
                    "missed": missed,
                    "message": format!("this connection fell behind: {missed} events were dropped for it"),
                })
                .to_string(),
            )
        }
        Delivery::Gap(gap) => (gap.kind(), gap.to_string()),
        Delivery::Reset { reason } => (reason.kind(), format!("Last-Event-ID: {reason}")),
        _ => ("other", "the stream cannot be followed exactly here".into()),
    };
    Some(json!({ "reason": reason, "message": message }).to_string())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use pg_outbox_client::{Gap, Position, ResetReason};

    use super::*;

    /// The JSON of a frame's data, parsed back.
    fn parse(data: &str) -> Value {
        assert!(!data.contains('\n'), "one line: {data}");
        serde_json::from_str(data).unwrap()
    }

    #[test]
    fn an_event_is_one_line_of_json_with_what_the_page_needs() {
        let data = event_json(
            "01a21fa8-bb11-747f-8924-37cb92a08747",
            "chat",
            "u1",
            &json!({"text": "two\nlines", "n": 1}),
            UNIX_EPOCH + Duration::from_micros(1_795_827_481_361_761),
        );
        assert_eq!(
            parse(&data),
            json!({
                "id": "01a21fa8-bb11-747f-8924-37cb92a08747",
                "channel": "chat",
                "user_id": "u1",
                "payload": {"text": "two\nlines", "n": 1},
                "created_at_us": 1_795_827_481_361_761_u64,
            })
        );
    }

    #[test]
    fn each_break_in_the_stream_has_its_reason() {
        let malformed = "nope".parse::<Position>().unwrap_err();
        let cases = [
            (Delivery::Lagged { missed: 12 }, "lagged"),
            (
                Delivery::Gap(Gap::Pruned {
                    pruned_through_xid: 9,
                    cursor_xmin: 3,
                }),
                "pruned",
            ),
            (Delivery::Gap(Gap::Rewound { floor_xid: 4 }), "rewound"),
            (
                Delivery::Reset {
                    reason: ResetReason::Malformed(malformed),
                },
                "malformed",
            ),
            (
                Delivery::Reset {
                    reason: ResetReason::Expired {
                        pruned_through_xid: 9,
                        position_xmin: 3,
                    },
                },
                "expired",
            ),
            (
                Delivery::Reset {
                    reason: ResetReason::OtherServerRun,
                },
                "other_server_run",
            ),
            (
                Delivery::Reset {
                    reason: ResetReason::Ahead {
                        position_xmax: 9,
                        server_xmax: 3,
                    },
                },
                "ahead",
            ),
        ];
        for (delivery, reason) in cases {
            let data = parse(&reset_data(&delivery).unwrap());
            assert_eq!(data["reason"], reason, "{delivery:?}");
            assert!(data["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
        let lagged = parse(&reset_data(&Delivery::Lagged { missed: 12 }).unwrap());
        assert_eq!(lagged["missed"], 12);
    }
}
