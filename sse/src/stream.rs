//! A subscription as a stream of SSE frames, with its keep-alives.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::response::sse::Event;
use futures_util::stream::{self, BoxStream, Stream};
use pg_outbox_client::{Delivery, Subscription};
use tracing::debug;

use crate::frame::{event_data, reset_data};
use crate::SseConfig;

/// The frames of one browser's connection, for [`Sse`](axum::response::sse::Sse): made by
/// [`stream`](crate::stream), or by [`EventStream::new`] from a subscription of your own.
/// It ends when the relay stops (the browser then reconnects, to whichever replica is up).
pub struct EventStream {
    frames: BoxStream<'static, Result<Event, Infallible>>,
}

impl EventStream {
    /// The frames of `subscription` (made with
    /// [`Relay::subscribe_from`](pg_outbox_client::Relay::subscribe_from) from
    /// `last_event_id` when the browser sent one, else with
    /// [`Relay::subscribe_to`](pg_outbox_client::Relay::subscribe_to)).
    pub fn new(
        subscription: Subscription,
        last_event_id: Option<&str>,
        config: &SseConfig,
    ) -> EventStream {
        let state = State {
            subscription,
            config: config.clone(),
            browser_id: last_event_id.map(str::to_owned),
            greeted: false,
        };
        EventStream {
            frames: Box::pin(stream::unfold(state, |mut state| async move {
                let frame = state.next_frame().await?;
                Some((Ok(frame), state))
            })),
        }
    }
}

impl Stream for EventStream {
    type Item = Result<Event, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.frames.as_mut().poll_next(cx)
    }
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream").finish_non_exhaustive()
    }
}

struct State {
    subscription: Subscription,
    config: SseConfig,
    /// The last id the browser was sent (or sent us): what its `Last-Event-ID` is.
    browser_id: Option<String>,
    /// Whether the first frame (the `retry` hint) went out.
    greeted: bool,
}

impl State {
    async fn next_frame(&mut self) -> Option<Event> {
        if !self.greeted {
            self.greeted = true;
            let frame = Event::default().retry(self.config.retry_interval());
            return Some(match self.fresh_token() {
                Some(token) => frame.id(token),
                None => frame,
            });
        }
        loop {
            let silence = tokio::time::sleep(self.config.keep_alive_interval());
            let item = tokio::select! {
                item = self.subscription.recv() => item?,
                () = silence => {
                    return Some(match self.fresh_token() {
                        Some(token) => Event::default().id(token),
                        None => Event::default().comment("keep-alive"),
                    });
                }
            };
            if let Some(frame) = self.frame_of(item) {
                return Some(frame);
            }
        }
    }

    /// The frame a delivery becomes, if any, with the position just past it as its id.
    fn frame_of(&mut self, item: Delivery) -> Option<Event> {
        let frame = match &item {
            Delivery::Event(event) => Event::default().data(event_data(event)),
            other => {
                let data = reset_data(other)?;
                debug!(%data, "pg_outbox_sse: the browser is told to reset");
                Event::default().event("reset").data(data)
            }
        };
        Some(match self.subscription.position() {
            Some(position) => {
                let token = position.to_string();
                let frame = frame.id(&token);
                self.browser_id = Some(token);
                frame
            }
            None => frame,
        })
    }

    /// The subscription's position as a token, when the browser does not hold it yet.
    fn fresh_token(&mut self) -> Option<String> {
        let token = self.subscription.position()?.to_string();
        if self.browser_id.as_deref() == Some(token.as_str()) {
            return None;
        }
        self.browser_id = Some(token.clone());
        Some(token)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::body::Bytes;
    use axum::response::IntoResponse;
    use futures_util::StreamExt;
    use pg_outbox_client::{Relay, RelayBuilder, Topic};

    use crate::{stream_with, SseConfig};

    /// A relay that is never started: its subscriptions yield what needs no server.
    fn relay() -> Relay {
        RelayBuilder::from_connection_string("host=/nonexistent")
            .unwrap()
            .build()
            .unwrap()
    }

    /// The response's body, frame by frame, as the browser reads it.
    fn body(response: axum::response::Response) -> impl futures_util::Stream<Item = String> {
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        response.into_body().into_data_stream().map(|frame| {
            let frame: Bytes = frame.unwrap();
            String::from_utf8(frame.to_vec()).unwrap()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_malformed_last_event_id_is_a_reset_after_the_retry_hint_then_keep_alives() {
        let relay = relay();
        let config = SseConfig::default()
            .retry(Duration::from_millis(250))
            .keep_alive(Duration::from_secs(5));
        let sse = stream_with(&relay, Topic::all().user("u1"), Some("garbage"), &config);
        let mut frames = Box::pin(body(sse.into_response()));
        assert_eq!(frames.next().await.unwrap(), "retry: 250\n\n");
        let reset = frames.next().await.unwrap();
        // No position to go on from before the relay runs: no id, so the browser keeps its own.
        assert!(
            reset.starts_with("event: reset\ndata: {") && reset.ends_with("}\n\n"),
            "{reset:?}"
        );
        let data: serde_json::Value =
            serde_json::from_str(reset["event: reset\ndata: ".len()..].trim_end()).unwrap();
        assert_eq!(data["reason"], "malformed");
        let before = tokio::time::Instant::now();
        assert_eq!(frames.next().await.unwrap(), ": keep-alive\n\n");
        assert_eq!(before.elapsed(), Duration::from_secs(5));
        assert_eq!(frames.next().await.unwrap(), ": keep-alive\n\n");
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_connection_waits_for_events_and_ends_with_the_relay() {
        let relay = relay();
        let sse = stream_with(&relay, Topic::all().user("u1"), None, &SseConfig::default());
        let mut frames = Box::pin(body(sse.into_response()));
        assert_eq!(frames.next().await.unwrap(), "retry: 1000\n\n");
        assert_eq!(frames.next().await.unwrap(), ": keep-alive\n\n");
        drop(relay);
        assert_eq!(frames.next().await, None);
    }
}
