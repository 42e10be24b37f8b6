//! The relay handle: subscribe, start, watch health, read metrics, shut down.

use std::sync::Arc;

use tokio::sync::{mpsc, watch, Mutex};
use tokio::task::JoinHandle;
use tracing::warn;

use crate::config::{RelayBuilder, Settings};
use crate::error::{Error, Kind};
use crate::event::ResetReason;
use crate::fanout::Fanout;
use crate::health::Health;
use crate::listener::Listener;
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::position::{Position, PositionError};
use crate::resume::ResumeRequest;
use crate::shared::Shared;
use crate::subscription::Subscription;
use crate::topic::{Filter, Topic};

/// Relays `pg_outbox` events from PostgreSQL to this process's subscribers.
///
/// Build one per process with [`RelayBuilder`], subscribe, [`start`](Relay::start) it. Cloning
/// gives another handle to the same relay; when the last handle is dropped the relay stops.
#[derive(Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Arc<Settings>,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    state: Mutex<State>,
    /// The listener's end of [`Shared::resumes`], until it starts.
    resumes: std::sync::Mutex<Option<mpsc::UnboundedReceiver<ResumeRequest>>>,
}

enum State {
    NotStarted,
    Running(JoinHandle<()>),
    Stopped,
}

impl RelayBuilder {
    /// Checks the settings and builds the relay (not started: subscribe, then
    /// [`Relay::start`]).
    pub fn build(self) -> Result<Relay, Error> {
        self.settings().map(Relay::new)
    }
}

impl Relay {
    fn new(settings: Settings) -> Relay {
        let (health, _) = watch::channel(Health::NotStarted);
        let (shutdown, _) = watch::channel(false);
        let (resumes, resume_queue) = mpsc::unbounded_channel();
        Relay {
            inner: Arc::new(Inner {
                settings: Arc::new(settings),
                shared: Arc::new(Shared {
                    fanout: Fanout::default(),
                    metrics: Metrics::default(),
                    health,
                    resumes,
                }),
                shutdown,
                state: Mutex::new(State::NotStarted),
                resumes: std::sync::Mutex::new(Some(resume_queue)),
            }),
        }
    }

    /// Events matching `topic` (a channel or every one, optionally one user), with its own
    /// buffer size if it sets one.
    pub fn subscribe_to(&self, topic: Topic) -> Subscription {
        let (filter, buffer) = self.topic_parts(topic);
        Subscription::live(
            self.inner.shared.fanout.subscribe(filter, buffer),
            self.inner.shared.resumes.clone(),
        )
    }

    /// Resumes a subscription from `last_seen`: a [`Position`] from [`Subscription::position`]
    /// on this relay or any other on the same database, or its token as text (for SSE, the
    /// `Last-Event-ID` header). It hands out the events matching `topic` that the position had
    /// not seen,
    /// in `(xid, id)` order, then the live stream, with no event twice and none missed, whatever
    /// order publishers committed in.
    ///
    /// A token that is malformed, older than the retention (events it had not seen may be
    /// pruned), issued on another run of the server that this relay cannot match, or naming
    /// transactions the server has not started (forged), makes the first item a
    /// [`Delivery::Reset`](crate::Delivery::Reset) with the reason; the stream then goes on from
    /// now, as [`subscribe_to`](Relay::subscribe_to)'s does.
    ///
    /// The catch-up is one query; subscriptions resuming together share it (see
    /// [`MetricsSnapshot::resume_queries`]). It runs once the relay is started and connected.
    pub fn subscribe_from<P>(&self, topic: Topic, last_seen: P) -> Subscription
    where
        P: TryInto<Position>,
        P::Error: Into<PositionError>,
    {
        let (filter, buffer) = self.topic_parts(topic);
        let shared = &self.inner.shared;
        let inbox = shared.fanout.subscribe(filter, buffer);
        match last_seen.try_into() {
            Ok(position) => Subscription::resumed(inbox, position, shared.resumes.clone()),
            Err(err) => {
                // Counted as the listener counts the resumes it answers.
                let reason = ResetReason::Malformed(err.into());
                Metrics::add(&shared.metrics.resumes, 1);
                shared.metrics.count_reset(&reason);
                Subscription::reset(inbox, reason, shared.resumes.clone())
            }
        }
    }

    /// A topic's filter and buffer, checked against the relay's configuration.
    fn topic_parts(&self, topic: Topic) -> (Filter, usize) {
        if let Some(channel) = &topic.filter.channel {
            if !self.inner.settings.policy.wants(channel) {
                warn!(
                    channel = %channel,
                    "subscribing to a channel this relay does not relay (see RelayBuilder::channels)"
                );
            }
        }
        let buffer = match topic.buffer {
            Some(0) => {
                warn!("Topic::buffer(0): a subscription's buffer is at least 1 event; using 1");
                1
            }
            Some(events) => events,
            None => self.inner.settings.subscriber_buffer,
        };
        (topic.filter, buffer)
    }

    /// Connects, LISTENs, proves LISTEN holds, and takes the starting snapshot; then relays in
    /// a background task. When it returns `Ok`, every event committed afterwards will be
    /// delivered (events committed before are not replayed).
    ///
    /// Fails fast: a first connection that cannot be made, a standby, a transaction-mode pooler
    /// or a missing extension is an error here (the relay can be started again). Later losses
    /// are retried in the background and reported through [`health`](Relay::health).
    pub async fn start(&self) -> Result<(), Error> {
        let mut state = self.inner.state.lock().await;
        match *state {
            State::NotStarted => {}
            State::Running(_) => return Err(Error::from(Kind::AlreadyStarted)),
            State::Stopped => return Err(Error::from(Kind::Stopped)),
        }
        let listener = Listener::start(
            Arc::clone(&self.inner.settings),
            Arc::clone(&self.inner.shared),
            self.inner.shutdown.subscribe(),
        )
        .await?;
        let resumes = self
            .inner
            .resumes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or(Error::from(Kind::AlreadyStarted))?;
        self.inner.shared.health.send_replace(Health::Listening);
        #[cfg(feature = "metrics")]
        tokio::spawn(crate::export::run(
            Arc::downgrade(&self.inner.shared),
            self.inner
                .settings
                .pg
                .get_application_name()
                .unwrap_or_default()
                .to_owned(),
            self.inner.shared.health.subscribe(),
        ));
        if let Some(every) = self.inner.settings.prune_every {
            tokio::spawn(crate::pruning::run(
                Arc::clone(&self.inner.settings),
                Arc::clone(&self.inner.shared),
                every,
                self.inner.shutdown.subscribe(),
            ));
        }
        *state = State::Running(tokio::spawn(listener.run(resumes)));
        Ok(())
    }

    /// The current health.
    pub fn health(&self) -> Health {
        self.inner.shared.health.borrow().clone()
    }

    /// A receiver that sees every change of health (`changed()`, `wait_for(…)`).
    pub fn watch_health(&self) -> watch::Receiver<Health> {
        self.inner.shared.health.subscribe()
    }

    /// A copy of the counters and the latency histogram.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.inner.shared.metrics.snapshot()
    }

    /// The instance id events are deduplicated against.
    pub fn instance_id(&self) -> Option<&str> {
        self.inner.settings.policy.instance_id()
    }

    /// Stops the relay: closes its connection, ends every subscription's stream (after what is
    /// already queued), and sets health to `Stopped`. Idempotent.
    pub async fn shutdown(&self) {
        let mut state = self.inner.state.lock().await;
        self.inner.shutdown.send_replace(true);
        if let State::Running(task) = std::mem::replace(&mut *state, State::Stopped) {
            if let Err(err) = task.await {
                warn!(error = %err, "the pg_outbox relay task ended abnormally");
            }
        }
        self.inner.shared.fanout.close();
        self.inner.shared.health.send_replace(Health::Stopped);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone. A running listener sees its shutdown channel close and stops
        // by itself; a relay never started must still end its subscribers' streams.
        if matches!(self.state.get_mut(), State::NotStarted) {
            self.shared.fanout.close();
            self.shared.health.send_replace(Health::Stopped);
        }
    }
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("instance_id", &self.instance_id())
            .field("health", &self.health())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dropping_a_relay_never_started_ends_its_streams() {
        let relay = RelayBuilder::from_connection_string("host=/nonexistent")
            .unwrap()
            .build()
            .unwrap();
        let mut subscription = relay.subscribe_to(Topic::all());
        let health = relay.watch_health();
        assert_eq!(*health.borrow(), Health::NotStarted);
        drop(relay);
        assert!(subscription.recv().await.is_none());
        assert_eq!(*health.borrow(), Health::Stopped);
    }

    #[tokio::test]
    async fn a_topic_buffer_of_zero_is_a_buffer_of_one() {
        let relay = RelayBuilder::from_connection_string("host=/nonexistent")
            .unwrap()
            .build()
            .unwrap();
        let subscription = relay.subscribe_to(Topic::all().buffer(0));
        assert_eq!(subscription.capacity(), 1);
    }

    #[tokio::test]
    async fn shutdown_before_start_stops_for_good() {
        let relay = RelayBuilder::from_connection_string("host=/nonexistent")
            .unwrap()
            .build()
            .unwrap();
        relay.shutdown().await;
        assert_eq!(relay.health(), Health::Stopped);
        assert!(relay.start().await.is_err_and(|err| err.is_stopped()));
    }
}
