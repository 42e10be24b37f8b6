//! [pg_outbox] events as server-sent events for [axum]: each browser gets its user's events
//! exactly once, across reconnects to any replica of the app.
//!
//! Every event goes out with its subscription's [`Position`](pg_outbox_client::Position) as its
//! SSE `id:`. When the connection drops (a deploy, a crashed replica, a flaky network), the
//! browser's `EventSource` reconnects on its own and sends the last id it saw as the
//! `Last-Event-ID` header; whichever replica takes the reconnect resumes from it with
//! [`Relay::subscribe_from`](pg_outbox_client::Relay::subscribe_from): the events the browser
//! had not seen, then the live stream, none twice and none missed, whatever order publishers
//! committed in.
//!
//! ```no_run
//! use axum::extract::{Query, State};
//! use axum::{routing::get, Router};
//! use pg_outbox_client::{Relay, Topic};
//! use pg_outbox_sse::{EventStream, LastEventId};
//!
//! #[derive(serde::Deserialize)]
//! struct Who {
//!     user: String, // in a real app: the user your authentication says
//! }
//!
//! async fn events(
//!     State(relay): State<Relay>,
//!     Query(who): Query<Who>,
//!     last_event_id: LastEventId,
//! ) -> axum::response::sse::Sse<EventStream> {
//!     pg_outbox_sse::stream(&relay, Topic::all().user(who.user), last_event_id.as_deref())
//! }
//!
//! # fn app(relay: Relay) -> Router {
//! Router::new().route("/events", get(events)).with_state(relay)
//! # }
//! ```
//!
//! # What the browser receives
//!
//! | frame | when | what the page does |
//! |---|---|---|
//! | `retry: 1000` (and `id: <position>` once the relay runs) | first, at every connection | nothing: `EventSource` keeps both |
//! | `id: <position>` `data: {"id":…,"channel":…,"user_id":…,"payload":…,"created_at_us":…}` | each event | `onmessage`: `JSON.parse(message.data)` |
//! | `id: <position>` alone | idle for [`SseConfig::keep_alive`], when the position moved meanwhile (the relay advanced) | nothing: `EventSource` keeps the fresher id, so a reconnect after a long quiet spell resumes cheaply and never from an expired position |
//! | `: keep-alive` (a comment) | idle for [`SseConfig::keep_alive`], position unchanged | nothing: keeps proxies from closing the connection |
//! | `event: reset` `data: {"reason":…,"message":…}` | the browser may have missed events: see below | reload the state it shows, then go on with the stream |
//!
//! The event's `data` is one line of JSON: `id` (the event's UUID), `channel`, `user_id`,
//! `payload` (the JSON it was published with) and `created_at_us` (its publication time, in
//! microseconds since the Unix epoch, by the database's clock). Events use the default SSE
//! event type, so `EventSource.onmessage` gets them.
//!
//! # `event: reset`
//!
//! Sent where the exact stream is broken, so the page cannot just apply the events that follow
//! to what it shows. Its `data` is `{"reason": R, "message": text}` (plus `"missed": n` for
//! `lagged`), with `R` one of:
//!
//! | reason | from | meaning |
//! |---|---|---|
//! | `malformed`, `expired`, `other_server_run`, `ahead` | [`Delivery::Reset`](pg_outbox_client::Delivery::Reset) | the `Last-Event-ID` could not be resumed exactly: not a position, older than the outbox's retention, from a server run the database's history does not hold (lost in a failover or a restore), or naming transactions the server never started |
//! | `lagged` | [`Delivery::Lagged`](pg_outbox_client::Delivery::Lagged) | the browser fell behind before its relay had started: `missed` events were dropped for it (later, a slow browser reads what it missed from the outbox) |
//! | `pruned`, `missing`, `unreadable`, `rewound` | [`Delivery::Gap`](pg_outbox_client::Delivery::Gap) | the relay itself could not deliver some events (see [`Gap`](pg_outbox_client::Gap)) |
//! | `other` | a kind of delivery this version does not know | as above |
//!
//! A reset frame carries the position from which the stream goes on when the relay has one, so
//! a reconnect after it resumes from there instead of resetting again.
//!
//! # Exactly once, per browser
//!
//! Each event the page's `EventSource` dispatches is one the browser had not received on this
//! page, and no committed event for the user is skipped, as long as the stream sends no
//! `reset`: across reconnects to the same or another replica, replicas killed mid-stream, and
//! publishers that commit out of order. It holds for one `EventSource` (one page): two tabs are
//! two streams, each complete. What the page did with an event before the connection dropped is
//! up to the page; a page reloaded from scratch starts a new stream (load the state, then open
//! the `EventSource`).
//!
//! The browser only moves its `Last-Event-ID` once a frame has arrived whole, and a position
//! names exactly the events before it, so a frame cut by a crash is sent again on the next
//! connection, and one that arrived is not.
//!
//! [pg_outbox]: https://github.com/pg-outbox/pg_outbox
//! [axum]: https://docs.rs/axum

#![warn(missing_docs)]

mod frame;
mod header;
mod stream;

use std::time::Duration;

use axum::response::sse::Sse;
use pg_outbox_client::{Relay, Topic};

pub use frame::{event_data, reset_data};
pub use header::LastEventId;
pub use stream::EventStream;

/// How the stream talks to `EventSource`: its reconnect hint and its keep-alives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SseConfig {
    retry: Duration,
    keep_alive: Duration,
}

impl Default for SseConfig {
    /// A `retry` of 1 s and a keep-alive after 15 s of silence.
    fn default() -> SseConfig {
        SseConfig {
            retry: Duration::from_millis(1000),
            keep_alive: Duration::from_secs(15),
        }
    }
}

impl SseConfig {
    /// The reconnect delay the browser is asked to wait after the connection drops (`retry:`,
    /// sent first on every connection). Default: 1 s. Browsers may wait longer.
    pub fn retry(mut self, retry: Duration) -> SseConfig {
        self.retry = retry;
        self
    }

    /// How long the stream may be silent before it sends a keep-alive: the position alone when
    /// it moved, else a comment. Default: 15 s. Keep it under your proxies' idle timeout. Taken
    /// as at least 1 ms.
    pub fn keep_alive(mut self, keep_alive: Duration) -> SseConfig {
        self.keep_alive = keep_alive.max(Duration::from_millis(1));
        self
    }

    /// The `retry` hint.
    pub fn retry_interval(&self) -> Duration {
        self.retry
    }

    /// The keep-alive interval.
    pub fn keep_alive_interval(&self) -> Duration {
        self.keep_alive
    }
}

/// The events of `topic` (for a browser: `Topic::all().user(id)`) as an SSE response, with the
/// default [`SseConfig`]: from `last_event_id` (the request's `Last-Event-ID`, see
/// [`LastEventId`]) when the browser reconnects, from now otherwise.
pub fn stream(relay: &Relay, topic: Topic, last_event_id: Option<&str>) -> Sse<EventStream> {
    stream_with(relay, topic, last_event_id, &SseConfig::default())
}

/// [`stream`] with its own [`SseConfig`].
pub fn stream_with(
    relay: &Relay,
    topic: Topic,
    last_event_id: Option<&str>,
    config: &SseConfig,
) -> Sse<EventStream> {
    let subscription = match last_event_id {
        Some(token) => relay.subscribe_from(topic, token),
        None => relay.subscribe_to(topic),
    };
    Sse::new(EventStream::new(subscription, last_event_id, config))
}
