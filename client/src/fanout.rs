//! Fan-out to local subscribers: bounded per-subscriber queues that never block the relay.
//!
//! The relay pushes with `try`-semantics only: when a subscriber's queue is full, the event is
//! dropped for that subscriber alone and a `Lagged { missed }` marker takes its place in the
//! stream (one marker per run of drops, so markers never fill memory). Gaps are always queued.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use futures_util::Stream;

use crate::event::{Delivery, Event, Gap};

/// Which events a subscription wants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Filter {
    /// `None`: every channel.
    pub channel: Option<String>,
    /// `None`: every user.
    pub user_id: Option<String>,
}

impl Filter {
    fn matches(&self, channel: &str, user_id: &str) -> bool {
        self.channel.as_deref().is_none_or(|c| c == channel)
            && self.user_id.as_deref().is_none_or(|u| u == user_id)
    }
}

struct Queue {
    items: VecDeque<Delivery>,
    /// Events queued (markers not counted).
    events: usize,
    waker: Option<Waker>,
    /// The relay stopped: end the stream once drained.
    closed: bool,
}

struct Slot {
    filter: Filter,
    capacity: usize,
    queue: Mutex<Queue>,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding this lock cannot leave the queue inconsistent (every update is
        // a single push or pop), so a poisoned lock is still usable.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues the events of `batch` this subscriber wants, under one lock and with one wake-up;
    /// returns how many it dropped because its queue was full.
    fn push_events(&self, batch: &[Event]) -> u64 {
        let mut matching = batch
            .iter()
            .filter(|event| self.filter.matches(event.channel(), event.user_id()))
            .peekable();
        if matching.peek().is_none() {
            return 0;
        }
        let mut queue = self.lock();
        let mut dropped = 0;
        for event in matching {
            if queue.events < self.capacity {
                queue.items.push_back(Delivery::Event(event.clone()));
                queue.events += 1;
            } else {
                match queue.items.back_mut() {
                    Some(Delivery::Lagged { missed }) => *missed += 1,
                    _ => queue.items.push_back(Delivery::Lagged { missed: 1 }),
                }
                dropped += 1;
            }
        }
        if let Some(waker) = queue.waker.take() {
            waker.wake();
        }
        dropped
    }

    fn push_marker(&self, delivery: Delivery) {
        let mut queue = self.lock();
        queue.items.push_back(delivery);
        if let Some(waker) = queue.waker.take() {
            waker.wake();
        }
    }

    fn close(&self) {
        let mut queue = self.lock();
        queue.closed = true;
        if let Some(waker) = queue.waker.take() {
            waker.wake();
        }
    }
}

/// The set of subscribers of one relay.
#[derive(Default)]
pub(crate) struct Fanout {
    slots: Mutex<Vec<Arc<Slot>>>,
    closed: Mutex<bool>,
}

impl Fanout {
    fn slots(&self) -> MutexGuard<'_, Vec<Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn subscribe(&self, filter: Filter, capacity: usize) -> Subscription {
        let slot = Arc::new(Slot {
            filter,
            capacity: capacity.max(1),
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                events: 0,
                waker: None,
                closed: *self.closed.lock().unwrap_or_else(|e| e.into_inner()),
            }),
        });
        self.slots().push(Arc::clone(&slot));
        Subscription { slot }
    }

    /// Hands each event of `batch`, in order, to every matching subscriber; returns how many
    /// (event, subscriber) deliveries were dropped for lag.
    pub fn deliver(&self, batch: &[Event]) -> u64 {
        let mut slots = self.slots();
        // A subscription dropped by its owner leaves only our reference behind.
        slots.retain(|slot| Arc::strong_count(slot) > 1);
        slots.iter().map(|slot| slot.push_events(batch)).sum()
    }

    /// Tells the subscribers concerned about a gap.
    pub fn gap(&self, gap: &Gap) {
        for slot in self.slots().iter() {
            let concerned = match gap {
                Gap::Missing {
                    channel, user_id, ..
                }
                | Gap::Unreadable {
                    channel, user_id, ..
                } => slot.filter.matches(channel, user_id),
                _ => true,
            };
            if concerned {
                slot.push_marker(Delivery::Gap(gap.clone()));
            }
        }
    }

    /// Ends every stream (after what is queued) and every later subscription.
    pub fn close(&self) {
        *self.closed.lock().unwrap_or_else(|e| e.into_inner()) = true;
        for slot in self.slots().drain(..) {
            slot.close();
        }
    }
}

/// A stream of [`Delivery`] items for one subscriber, in commit order.
///
/// Its buffer holds at most the relay's `subscriber_buffer` events; when full, later events are
/// dropped for this subscriber only and a [`Delivery::Lagged`] marker says how many. The stream
/// ends when the relay stops. Dropping it unsubscribes.
pub struct Subscription {
    slot: Arc<Slot>,
}

impl Subscription {
    /// The next item, or `None` once the relay stopped and everything queued was read.
    pub async fn recv(&mut self) -> Option<Delivery> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The next item if one is queued, without waiting.
    pub fn try_recv(&mut self) -> Option<Delivery> {
        let mut queue = self.slot.lock();
        let item = queue.items.pop_front();
        if let Some(Delivery::Event(_)) = item {
            queue.events = queue.events.saturating_sub(1);
        }
        item
    }

    /// How many items are queued.
    pub fn len(&self) -> usize {
        self.slot.lock().items.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        let mut queue = self.slot.lock();
        match queue.items.pop_front() {
            Some(item) => {
                if let Delivery::Event(_) = item {
                    queue.events = queue.events.saturating_sub(1);
                }
                Poll::Ready(Some(item))
            }
            None if queue.closed => Poll::Ready(None),
            None => {
                queue.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Stream for Subscription {
    type Item = Delivery;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        self.get_mut().poll_recv(cx)
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("filter", &self.slot.filter)
            .field("capacity", &self.slot.capacity)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use futures_util::StreamExt;
    use uuid::Uuid;

    use super::*;

    fn event(n: u128, channel: &str, user: &str) -> Event {
        Event::new(
            Uuid::from_u128(n),
            channel.into(),
            user.into(),
            None,
            1,
            SystemTime::UNIX_EPOCH,
            serde_json::Value::Null,
        )
    }

    fn all() -> Filter {
        Filter {
            channel: None,
            user_id: None,
        }
    }

    #[test]
    fn filters_by_channel_and_user() {
        let fanout = Fanout::default();
        let mut chat = fanout.subscribe(
            Filter {
                channel: Some("chat".into()),
                user_id: None,
            },
            10,
        );
        let mut u1 = fanout.subscribe(
            Filter {
                channel: Some("chat".into()),
                user_id: Some("u1".into()),
            },
            10,
        );
        fanout.deliver(&[event(1, "chat", "u1")]);
        fanout.deliver(&[event(2, "chat", "u2")]);
        fanout.deliver(&[event(3, "other", "u1")]);
        let ids = |s: &mut Subscription| {
            std::iter::from_fn(|| s.try_recv())
                .filter_map(|d| d.into_event())
                .map(|e| e.id().as_u128())
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&mut chat), [1, 2]);
        assert_eq!(ids(&mut u1), [1]);
    }

    #[test]
    fn a_full_subscriber_gets_one_lagged_marker_and_others_everything() {
        let fanout = Fanout::default();
        let mut slow = fanout.subscribe(all(), 2);
        let mut fast = fanout.subscribe(all(), 100);
        let mut lagged = 0;
        for n in 0..10 {
            lagged += fanout.deliver(&[event(n, "c", "u")]);
            while fast.try_recv().is_some() {}
        }
        assert_eq!(lagged, 8);
        assert!(matches!(slow.try_recv(), Some(Delivery::Event(_))));
        assert!(matches!(slow.try_recv(), Some(Delivery::Event(_))));
        assert!(matches!(
            slow.try_recv(),
            Some(Delivery::Lagged { missed: 8 })
        ));
        assert!(slow.try_recv().is_none());
        // Room again: delivery resumes.
        assert_eq!(fanout.deliver(&[event(10, "c", "u")]), 0);
        assert_eq!(
            slow.try_recv().and_then(|d| d.into_event()).map(|e| e.id()),
            Some(Uuid::from_u128(10))
        );
    }

    #[tokio::test]
    async fn streams_wake_on_delivery_and_end_on_close() {
        let fanout = Arc::new(Fanout::default());
        let mut sub = fanout.subscribe(all(), 4);
        let pusher = Arc::clone(&fanout);
        let task = tokio::spawn(async move {
            tokio::task::yield_now().await;
            pusher.deliver(&[event(1, "c", "u")]);
            pusher.close();
        });
        assert!(matches!(sub.next().await, Some(Delivery::Event(_))));
        assert!(sub.next().await.is_none());
        task.await.unwrap();
        // Subscribing after close gives an ended stream.
        let mut late = fanout.subscribe(all(), 4);
        assert!(late.next().await.is_none());
    }

    #[test]
    fn dropped_subscriptions_are_forgotten() {
        let fanout = Fanout::default();
        let sub = fanout.subscribe(all(), 4);
        drop(sub);
        fanout.deliver(&[event(1, "c", "u")]);
        assert!(fanout.slots().is_empty());
    }
}
