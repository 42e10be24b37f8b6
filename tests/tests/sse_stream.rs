//! `pg_outbox_sse` on real relays, read as the browser reads it: the first frame's retry hint and
//! position, an event's id and JSON, the position alone when it moves without events for this
//! user, resuming from such an id on another relay, and a reset that carries a fresh position.

use std::time::Duration;

use axum::response::IntoResponse;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use pg_outbox_client::{Relay, Topic};
use pg_outbox_sse::{stream_with, SseConfig};
use pg_outbox_tests::relay::{publish, relay};
use pg_outbox_tests::{Cluster, WAIT};
use uuid::Uuid;

/// One SSE frame, its fields as `EventSource` reads them.
#[derive(Debug, Default)]
struct Frame {
    id: Option<String>,
    event: Option<String>,
    data: Option<serde_json::Value>,
    retry: Option<String>,
    comment: bool,
}

fn parse(text: &str) -> Frame {
    assert!(text.ends_with("\n\n"), "a whole frame: {text:?}");
    let mut frame = Frame::default();
    for line in text.trim_end_matches('\n').lines() {
        let (field, value) = line.split_once(": ").unwrap_or((line, ""));
        match field {
            "" => frame.comment = true,
            "id" => frame.id = Some(value.to_owned()),
            "event" => frame.event = Some(value.to_owned()),
            "retry" => frame.retry = Some(value.to_owned()),
            "data" => frame.data = Some(serde_json::from_str(value).unwrap()),
            other => panic!("unexpected field {other:?} in {text:?}"),
        }
    }
    frame
}

/// The frames of `relay`'s SSE response for u1, from `last_event_id`.
fn frames(relay: &Relay, last_event_id: Option<&str>) -> BoxStream<'static, Frame> {
    let config = SseConfig::default().keep_alive(Duration::from_millis(100));
    let response =
        stream_with(relay, Topic::all().user("u1"), last_event_id, &config).into_response();
    response
        .into_body()
        .into_data_stream()
        .map(|chunk| parse(std::str::from_utf8(&chunk.unwrap()).unwrap()))
        .boxed()
}

async fn next(frames: &mut BoxStream<'static, Frame>) -> Frame {
    tokio::time::timeout(WAIT, frames.next())
        .await
        .expect("a frame")
        .expect("the stream goes on")
}

/// The next frame that is not a keep-alive comment.
async fn next_frame(frames: &mut BoxStream<'static, Frame>) -> Frame {
    loop {
        let frame = next(frames).await;
        if !frame.comment {
            return frame;
        }
    }
}

fn event_id(frame: &Frame) -> Uuid {
    let data = frame.data.as_ref().expect("an event's data");
    data["id"].as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_carry_positions_that_another_relay_resumes_and_idle_ones_stay_fresh() {
    let cluster = Cluster::start();
    let a = relay(&cluster, "sse_stream_a").build().unwrap();
    let b = relay(&cluster, "sse_stream_b").build().unwrap();
    a.start().await.unwrap();
    b.start().await.unwrap();
    let publisher = cluster.connect("postgres").await;

    let mut on_a = frames(&a, None);
    let first = next(&mut on_a).await;
    assert_eq!(first.retry.as_deref(), Some("1000"));
    assert!(
        first.id.is_some(),
        "a running relay gives a position at once"
    );
    assert!(first.data.is_none());

    let e1 = publish(&publisher, "chat", "u1", r#"{"n": 1}"#, None).await;
    let frame = next_frame(&mut on_a).await;
    assert_eq!(frame.event, None, "events use the default type");
    let data = frame.data.as_ref().unwrap();
    assert_eq!(event_id(&frame), e1);
    assert_eq!(
        (&data["channel"], &data["user_id"], &data["payload"]),
        (
            &serde_json::json!("chat"),
            &serde_json::json!("u1"),
            &serde_json::json!({"n": 1})
        )
    );
    assert!(data["created_at_us"].as_u64().is_some_and(|us| us > 0));
    let after_e1 = frame.id.expect("an event's id");
    assert_ne!(Some(&after_e1), first.id.as_ref());

    // Events for u2 only: u1's stream sends no data, but its position moves as the relay
    // advances, and goes out alone.
    publish(&publisher, "chat", "u2", "{}", None).await;
    publish(&publisher, "chat", "u2", "{}", None).await;
    let idle = next_frame(&mut on_a).await;
    assert!(idle.data.is_none() && idle.event.is_none(), "{idle:?}");
    let idle_token = idle.id.expect("the position alone");
    assert_ne!(idle_token, after_e1);
    drop(on_a);

    // Another relay resumes from the id-only frame: what came after it, not e1 again.
    let e2 = publish(&publisher, "chat", "u1", r#"{"n": 2}"#, None).await;
    let mut on_b = frames(&b, Some(&idle_token));
    assert_eq!(next(&mut on_b).await.retry.as_deref(), Some("1000"));
    assert_eq!(event_id(&next_data(&mut on_b).await), e2);
    let e3 = publish(&publisher, "news", "u1", r#"{"n": 3}"#, None).await;
    assert_eq!(event_id(&next_data(&mut on_b).await), e3);

    // A token that is not a position: a reset, with a position to go on from.
    let mut reset = frames(&b, Some("not-a-position"));
    assert_eq!(next(&mut reset).await.retry.as_deref(), Some("1000"));
    let frame = next_frame(&mut reset).await;
    assert_eq!(frame.event.as_deref(), Some("reset"));
    assert_eq!(frame.data.as_ref().unwrap()["reason"], "malformed");
    assert!(frame.id.is_some(), "{frame:?}");
    a.shutdown().await;
    b.shutdown().await;
}

/// The next frame with data (an event or a reset), skipping keep-alives of either kind.
async fn next_data(frames: &mut BoxStream<'static, Frame>) -> Frame {
    loop {
        let frame = next(frames).await;
        if frame.data.is_some() {
            return frame;
        }
    }
}
