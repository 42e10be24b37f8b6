//! Fan-out to local subscribers: an index from (channel, user) to bounded per-subscriber queues
//! that never block the relay.
//!
//! Subscribers are grouped by their filter, so sorting an event out costs at most four lookups
//! (this channel and user, this channel, this user, everything), however many others are
//! connected: a replica holding a connection per user does not scan them all for each event.
//!
//! A batch is handed over as one shared run per group: each subscriber's queue gets a reference
//! to it, not a copy of each event, and the subscriber takes the whole run out of its queue at
//! once and reads it without a lock. Broadcasting a batch to 1,000 subscribers costs the relay
//! 1,000 pushes and wake-ups however many events the batch holds; each subscriber then pays one
//! reference-count increment per event it reads.
//!
//! The relay pushes with `try`-semantics only: when a subscriber's queue is full, the events
//! beyond its room are dropped for that subscriber alone and a `Lagged { missed }` marker takes
//! their place in the stream (one marker per run of drops, so markers never fill memory). Gaps
//! are always queued. The gap of an unreadable row stands for that row: it is handed out once
//! per subscription, like an event, and counts as seen in its position.
//!
//! Each run carries the relay's *watermark* when it was queued (a snapshot everything under
//! which was handed over before it), from which each subscription keeps its own
//! [`Position`] as it reads: the token a browser resumes from. A resumed subscription first
//! hands out what its relay read for it (the events its position had not seen), then its queue,
//! skipping there what its position covers.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};

use futures_util::Stream;
use tokio::sync::oneshot;

use uuid::Uuid;

use crate::cursor::{self, Unreadable};
use crate::event::{Delivery, Event, Gap, ResetReason};
use crate::position::{Position, Watermark};
use crate::resume::CatchUp;
use crate::topic::Filter;

/// Events of one batch queued for a subscriber, from `next` on; never empty when queued.
/// `events` is shared by the subscribers of the group that wanted them, except when only part
/// of it fitted in this subscriber's room.
struct Run {
    events: Arc<[Event]>,
    next: usize,
    /// The relay's watermark when the run was queued; `None` before the relay has one.
    watermark: Option<Arc<Watermark>>,
}

impl Run {
    fn len(&self) -> usize {
        self.events.len() - self.next
    }

    /// The next event of the run being read, if any, with the run's watermark; the run is let
    /// go with its last event, so an idle subscriber keeps no batch alive.
    fn read(reading: &mut Option<Run>) -> Option<(Event, Option<Arc<Watermark>>)> {
        let run = reading.as_mut()?;
        let event = run.events.get(run.next)?.clone();
        run.next += 1;
        let watermark = if run.len() == 0 {
            reading.take().and_then(|run| run.watermark)
        } else {
            run.watermark.clone()
        };
        Some((event, watermark))
    }
}

enum Queued {
    Events(Run),
    /// A marker; `row` is the `(xid, id)` of the unreadable row a gap stands for.
    Marker {
        delivery: Delivery,
        row: Option<(u64, Uuid)>,
    },
}

struct Queue {
    items: VecDeque<Queued>,
    /// Events queued (markers not counted, nor the run the subscriber is reading).
    events: usize,
    /// Markers queued.
    markers: usize,
    waker: Option<Waker>,
    /// The relay stopped: end the stream once drained.
    closed: bool,
}

impl Queue {
    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    fn push_marker(&mut self, delivery: Delivery, row: Option<(u64, Uuid)>) {
        self.items.push_back(Queued::Marker { delivery, row });
        self.markers += 1;
    }

    /// Takes the next item out: a marker (with the row it stands for, if any), or a run of
    /// events, which becomes the one `reading`.
    fn pop(&mut self, reading: &mut Option<Run>) -> Option<(Delivery, Option<(u64, Uuid)>)> {
        match self.items.pop_front()? {
            Queued::Marker { delivery, row } => {
                self.markers -= 1;
                Some((delivery, row))
            }
            Queued::Events(run) => {
                self.events = self.events.saturating_sub(run.len());
                *reading = Some(run);
                None
            }
        }
    }

    /// The watermark of the first run queued.
    fn first_watermark(&self) -> Option<Arc<Watermark>> {
        self.items.iter().find_map(|item| match item {
            Queued::Events(run) => run.watermark.clone(),
            Queued::Marker { .. } => None,
        })
    }
}

struct Slot {
    filter: Filter,
    capacity: usize,
    queue: Mutex<Queue>,
}

/// Locks a mutex whose data stays consistent even if a holder panicked: nothing under the
/// fan-out's locks can panic between the steps of an update (pushes, pops, counter updates and
/// index insertions only).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        lock(&self.queue)
    }

    /// Queues as many of `events` (all wanted by this subscriber) as its room allows, under one
    /// lock and with one wake-up; returns how many it dropped because its queue was full.
    fn push_events(&self, events: &Arc<[Event]>, watermark: &Option<Arc<Watermark>>) -> u64 {
        let mut queue = self.lock();
        let fits = self.capacity.saturating_sub(queue.events).min(events.len());
        debug_assert!(
            !events.is_empty(),
            "a group's share of a batch is never empty"
        );
        if fits > 0 {
            // A cut run gets its own copy of the part that fits: sharing the whole batch would
            // keep the dropped events in memory for as long as this lagging subscriber takes.
            let events = if fits == events.len() {
                Arc::clone(events)
            } else {
                Arc::from(&events[..fits])
            };
            queue.items.push_back(Queued::Events(Run {
                events,
                next: 0,
                watermark: watermark.clone(),
            }));
            queue.events += fits;
        }
        let dropped = (events.len() - fits) as u64;
        if dropped > 0 {
            match queue.items.back_mut() {
                Some(Queued::Marker {
                    delivery: Delivery::Lagged { missed },
                    ..
                }) => *missed += dropped,
                _ => queue.push_marker(Delivery::Lagged { missed: dropped }, None),
            }
        }
        queue.wake();
        dropped
    }

    fn push_marker(&self, delivery: Delivery, row: Option<(u64, Uuid)>) {
        let mut queue = self.lock();
        queue.push_marker(delivery, row);
        queue.wake();
    }

    fn close(&self) {
        let mut queue = self.lock();
        queue.closed = true;
        queue.wake();
    }
}

/// The subscribers sharing one filter. `id` tells groups apart while a batch is sorted out.
struct Group {
    id: u64,
    slots: Vec<Arc<Slot>>,
}

/// The groups of one channel (or of every channel), by user.
#[derive(Default)]
struct ByUser {
    /// Subscribers of every user.
    everyone: Option<Group>,
    users: HashMap<String, Group>,
}

impl ByUser {
    fn groups_for<'a>(&'a self, user_id: &str) -> impl Iterator<Item = &'a Group> {
        self.everyone.iter().chain(self.users.get(user_id))
    }

    fn group_mut(&mut self, user_id: Option<&String>) -> Option<&mut Group> {
        match user_id {
            None => self.everyone.as_mut(),
            Some(user_id) => self.users.get_mut(user_id),
        }
    }

    fn is_empty(&self) -> bool {
        self.everyone.is_none() && self.users.is_empty()
    }

    fn groups(&self) -> impl Iterator<Item = &Group> {
        self.everyone.iter().chain(self.users.values())
    }
}

/// Every subscriber of one relay, by filter.
#[derive(Default)]
struct Index {
    every_channel: ByUser,
    channels: HashMap<String, ByUser>,
    next_group: u64,
    /// The relay stopped: later subscriptions start closed.
    closed: bool,
}

impl Index {
    /// The groups that want an event of `channel` for `user_id`: at most four.
    fn groups_for<'a>(
        &'a self,
        channel: &str,
        user_id: &'a str,
    ) -> impl Iterator<Item = &'a Group> + 'a {
        self.every_channel.groups_for(user_id).chain(
            self.channels
                .get(channel)
                .into_iter()
                .flat_map(move |by_user| by_user.groups_for(user_id)),
        )
    }

    fn groups(&self) -> impl Iterator<Item = &Group> {
        self.every_channel
            .groups()
            .chain(self.channels.values().flat_map(ByUser::groups))
    }

    /// Files `slot` under its filter.
    fn insert(&mut self, slot: Arc<Slot>) {
        self.next_group += 1;
        let fresh = Group {
            id: self.next_group,
            slots: Vec::new(),
        };
        let by_user = match &slot.filter.channel {
            None => &mut self.every_channel,
            Some(channel) => self.channels.entry(channel.clone()).or_default(),
        };
        let group = match &slot.filter.user_id {
            None => by_user.everyone.get_or_insert(fresh),
            Some(user_id) => by_user.users.entry(user_id.clone()).or_insert(fresh),
        };
        group.slots.push(slot);
    }

    /// Forgets `slot`, and its group and channel once they are empty, so users who come and go
    /// leave nothing behind.
    fn remove(&mut self, slot: &Arc<Slot>) {
        let filter = &slot.filter;
        let by_user = match &filter.channel {
            None => &mut self.every_channel,
            Some(channel) => match self.channels.get_mut(channel) {
                Some(by_user) => by_user,
                None => return,
            },
        };
        if let Some(group) = by_user.group_mut(filter.user_id.as_ref()) {
            group.slots.retain(|other| !Arc::ptr_eq(other, slot));
            if group.slots.is_empty() {
                match &filter.user_id {
                    None => by_user.everyone = None,
                    Some(user_id) => {
                        by_user.users.remove(user_id);
                    }
                }
            }
        }
        if by_user.is_empty() {
            if let Some(channel) = &filter.channel {
                self.channels.remove(channel);
            }
        }
    }
}

/// The subscribers of one relay.
#[derive(Default)]
pub(crate) struct Fanout {
    /// Shared with every [`Subscription`] (weakly), which removes itself when dropped.
    index: Arc<Mutex<Index>>,
    /// The relay's latest watermark: the runs queued from now on carry it, and an idle
    /// subscription's position joins it.
    watermark: Arc<Mutex<Option<Arc<Watermark>>>>,
}

/// What a subscription still has to do before it reads its queue: a resumed one waits for its
/// relay to read what its position has not seen, then hands that out.
enum Resume {
    Waiting(oneshot::Receiver<Result<CatchUp, ResetReason>>),
    Replaying(CatchUp),
}

impl Fanout {
    fn index(&self) -> MutexGuard<'_, Index> {
        lock(&self.index)
    }

    pub fn subscribe(&self, filter: Filter, capacity: usize) -> Subscription {
        self.subscribe_with(filter, capacity, None, None)
    }

    /// A subscription that first waits for `answer`: the events `base` has not seen (or why it
    /// cannot resume), then reads its queue, where its live events pile up meanwhile.
    pub fn subscribe_resumed(
        &self,
        filter: Filter,
        capacity: usize,
        base: Option<Position>,
        answer: oneshot::Receiver<Result<CatchUp, ResetReason>>,
    ) -> Subscription {
        self.subscribe_with(filter, capacity, base, Some(Resume::Waiting(answer)))
    }

    fn subscribe_with(
        &self,
        filter: Filter,
        capacity: usize,
        position: Option<Position>,
        resume: Option<Resume>,
    ) -> Subscription {
        debug_assert!(capacity >= 1, "callers keep a buffer of at least 1");
        let mut index = self.index();
        let slot = Arc::new(Slot {
            filter,
            capacity,
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                events: 0,
                markers: 0,
                waker: None,
                closed: index.closed,
            }),
        });
        if !index.closed {
            index.insert(Arc::clone(&slot));
        }
        Subscription {
            slot,
            index: Arc::downgrade(&self.index),
            reading: None,
            latest: Arc::clone(&self.watermark),
            position,
            absorbed: None,
            generation: 0,
            resume,
        }
    }

    /// Sets the watermark: every event under `watermark` was handed over already.
    pub fn set_watermark(&self, watermark: Arc<Watermark>) {
        *lock(&self.watermark) = Some(watermark);
    }

    /// Hands each event of `batch`, in order, to every matching subscriber; returns how many
    /// (event, subscriber) deliveries were dropped for lag.
    pub fn deliver(&self, batch: &[Event]) -> u64 {
        let index = self.index();
        let watermark = lock(&self.watermark).clone();
        // Sort the batch out by group first, keeping commit order within each, so that every
        // subscriber is locked and woken once per batch and shares its group's run.
        let mut wanted: Vec<(&Group, Vec<Event>)> = Vec::new();
        let mut position: HashMap<u64, usize> = HashMap::new();
        for event in batch {
            for group in index.groups_for(event.channel(), event.user_id()) {
                let at = *position.entry(group.id).or_insert_with(|| {
                    wanted.push((group, Vec::new()));
                    wanted.len() - 1
                });
                wanted[at].1.push(event.clone());
            }
        }
        wanted
            .into_iter()
            .map(|(group, events)| {
                let events: Arc<[Event]> = events.into();
                group
                    .slots
                    .iter()
                    .map(|slot| slot.push_events(&events, &watermark))
                    .sum::<u64>()
            })
            .sum()
    }

    /// Tells the subscribers concerned about a gap: those of its channel and user when it has
    /// them, every one otherwise. An unreadable row goes through [`Fanout::unreadable`].
    pub fn gap(&self, gap: &Gap) {
        let index = self.index();
        let marker = || Delivery::Gap(gap.clone());
        match gap {
            Gap::Missing {
                channel, user_id, ..
            } => index
                .groups_for(channel, user_id)
                .flat_map(|group| &group.slots)
                .for_each(|slot| slot.push_marker(marker(), None)),
            _ => index
                .groups()
                .flat_map(|group| &group.slots)
                .for_each(|slot| slot.push_marker(marker(), None)),
        }
    }

    /// Tells the subscribers of `row`'s channel and user that it cannot be read, with a
    /// [`Gap::Unreadable`] that takes the row's place in their positions.
    pub fn unreadable(&self, row: &Unreadable) {
        let index = self.index();
        let gap = Delivery::Gap(row.clone().into_gap());
        index
            .groups_for(&row.channel, &row.user_id)
            .flat_map(|group| &group.slots)
            .for_each(|slot| slot.push_marker(gap.clone(), Some((row.xid, row.id))));
    }

    /// Ends every stream (after what is queued) and every later subscription.
    pub fn close(&self) {
        let mut index = self.index();
        index
            .groups()
            .flat_map(|group| &group.slots)
            .for_each(|slot| slot.close());
        *index = Index {
            closed: true,
            ..Index::default()
        };
    }
}

/// A stream of [`Delivery`] items for one subscriber, in the relay's delivery order.
///
/// Its buffer holds at most `subscriber_buffer` events (or the topic's own `buffer`) besides
/// the rest of the batch it is reading; when full, later events are dropped for this subscriber only and a
/// [`Delivery::Lagged`] marker says how many. The stream ends when the relay stops. Dropping it
/// unsubscribes.
pub struct Subscription {
    slot: Arc<Slot>,
    index: Weak<Mutex<Index>>,
    /// The run taken out of the queue and being read, without the queue's lock.
    reading: Option<Run>,
    /// The relay's latest watermark.
    latest: Arc<Mutex<Option<Arc<Watermark>>>>,
    /// What this subscription has handed out; `None` until it has read from a relay that has a
    /// watermark (or been given a position to resume from).
    position: Option<Position>,
    /// The watermark last joined into `position`.
    absorbed: Option<Arc<Watermark>>,
    /// The latest [`Watermark::generation`] joined: runs queued under an earlier one are
    /// skipped.
    generation: u64,
    resume: Option<Resume>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(index) = self.index.upgrade() {
            lock(&index).remove(&self.slot);
        }
    }
}

impl Subscription {
    /// The next item, or `None` once the relay stopped and everything queued was read.
    pub async fn recv(&mut self) -> Option<Delivery> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The next item if one is ready, without waiting.
    pub fn try_recv(&mut self) -> Option<Delivery> {
        match self.poll_recv(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(item) => item,
            Poll::Pending => None,
        }
    }

    /// Where this subscription stands: just past the last item it returned, as a token any
    /// replica's [`Relay::subscribe_from`](crate::Relay::subscribe_from) resumes from (for SSE,
    /// the `id:` of that event). It moves on without events too, as the relay advances, when
    /// nothing is queued. `None` before the relay has started.
    ///
    /// Events dropped for lag ([`Delivery::Lagged`]) count as seen once a later watermark is
    /// joined: treat the marker as a reset of what the reader shows.
    pub fn position(&self) -> Option<Position> {
        if self.resume.is_some() {
            return self.position.clone();
        }
        // The watermark first, the queue second: a run queued before the watermark was set is
        // then seen in the queue, and the watermark is not joined past events not yet read.
        let latest = lock(&self.latest).clone();
        let queue = self.slot.lock();
        let idle = self.reading.is_none() && queue.items.is_empty();
        match (self.position.clone(), idle, latest) {
            (Some(mut position), true, Some(latest)) => {
                position.absorb(&latest);
                Some(position)
            }
            (Some(position), _, _) => Some(position),
            (None, true, latest) => latest.map(|latest| Position::at(&latest)),
            // Nothing read yet: everything under the first run's watermark was handed over
            // before it.
            (None, false, _) => queue.first_watermark().map(|first| Position::at(&first)),
        }
    }

    /// How many items are left to read: queued events and markers, the rest of the batch
    /// being read (so up to twice the buffer, and more with markers), and what a resumed
    /// subscription has still to hand out first.
    pub fn len(&self) -> usize {
        let reading = self.reading.as_ref().map_or(0, Run::len);
        let replaying = match &self.resume {
            Some(Resume::Replaying(catch_up)) => catch_up.rows.len(),
            _ => 0,
        };
        let queue = self.slot.lock();
        reading + replaying + queue.events + queue.markers
    }

    /// Its buffer, in events: how many may be queued besides the batch being read before it
    /// lags.
    pub fn capacity(&self) -> usize {
        self.slot.capacity
    }

    /// Whether nothing is left to read.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        loop {
            match self.poll_resume(cx) {
                Poll::Ready(Some(item)) => return Poll::Ready(Some(item)),
                Poll::Ready(None) => {}
                Poll::Pending => return Poll::Pending,
            }
            if let Some((event, watermark)) = Run::read(&mut self.reading) {
                if self.take(&event, watermark) {
                    return Poll::Ready(Some(Delivery::Event(event)));
                }
                continue;
            }
            let mut queue = self.slot.lock();
            match queue.pop(&mut self.reading) {
                Some((marker, row)) => {
                    drop(queue);
                    // The gap of an unreadable row, which a resumed subscription's catch-up
                    // may have reported already.
                    let new = row.is_none_or(|(xid, id)| {
                        self.position
                            .as_mut()
                            .is_none_or(|position| position.see(xid, id))
                    });
                    if new {
                        return Poll::Ready(Some(marker));
                    }
                }
                None if self.reading.is_some() => {}
                None if queue.closed => return Poll::Ready(None),
                None => {
                    queue.waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
        }
    }

    /// What a resumed subscription hands out before its queue: `Ready(None)` once done.
    fn poll_resume(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        loop {
            match &mut self.resume {
                None => return Poll::Ready(None),
                Some(Resume::Waiting(answer)) => match Pin::new(answer).poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(Ok(catch_up))) => {
                        self.position = Some(catch_up.base.clone());
                        self.resume = Some(Resume::Replaying(catch_up));
                    }
                    Poll::Ready(Ok(Err(reason))) => {
                        // Starts over from the relay's stream, as a new subscription does.
                        self.resume = None;
                        self.position = None;
                        return Poll::Ready(Some(Delivery::Reset { reason }));
                    }
                    Poll::Ready(Err(_)) => {
                        // The relay stopped before it answered: its queue ends the stream.
                        self.resume = None;
                        self.position = None;
                    }
                },
                Some(Resume::Replaying(catch_up)) => match catch_up.rows.pop_front() {
                    Some(row) => {
                        let (xid, id) = cursor::row_key(&row);
                        let position = self.position.get_or_insert_with(|| catch_up.base.clone());
                        // The rows come in (xid, id) order: what the catch-up's snapshot sees
                        // below this one's xid is handed out, so the position joins it and
                        // keeps ids of this transaction only, however long the replay.
                        if catch_up.replayed_xid != Some(xid) {
                            catch_up.replayed_xid = Some(xid);
                            position.absorb(&Watermark::new(
                                catch_up.until.epoch,
                                catch_up.until.snapshot.below(xid),
                            ));
                        }
                        if position.see(xid, id) {
                            return Poll::Ready(Some(match row {
                                Ok(event) => Delivery::Event(event),
                                Err(unreadable) => Delivery::Gap(unreadable.into_gap()),
                            }));
                        }
                    }
                    None => {
                        // Everything under the catch-up's snapshot is handed out now: its live
                        // copies in the queue are skipped, and so is what is queued from before
                        // a rewind the catch-up came after.
                        if let Some(position) = &mut self.position {
                            position.absorb(&catch_up.until);
                        }
                        self.generation = self.generation.max(catch_up.until.generation);
                        self.resume = None;
                    }
                },
            }
        }
    }

    /// Joins the watermark of the run `event` came in, and tells whether the event is new to
    /// this subscription's position (noting it if so).
    fn take(&mut self, event: &Event, watermark: Option<Arc<Watermark>>) -> bool {
        let Some(watermark) = watermark else {
            return true;
        };
        if watermark.generation < self.generation {
            // Queued before a rewind that this subscription's catch-up came after: what of it
            // survived, the catch-up read again.
            return false;
        }
        self.generation = watermark.generation;
        let position = self
            .position
            .get_or_insert_with(|| Position::at(&watermark));
        if !self
            .absorbed
            .as_ref()
            .is_some_and(|absorbed| Arc::ptr_eq(absorbed, &watermark))
        {
            position.absorb(&watermark);
            self.absorbed = Some(watermark);
        }
        // The relay hands each event over once, and a resumed subscription's catch-up ended
        // with a snapshot that sees every event its position holds by id: its snapshot alone
        // tells a live copy from a new event, without a scan of the ids.
        if position.snapshot().is_visible(event.xid()) {
            return false;
        }
        position.record(event.xid(), event.id());
        true
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
    use crate::position::RunChange;

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

    fn filter(channel: Option<&str>, user_id: Option<&str>) -> Filter {
        Filter {
            channel: channel.map(Into::into),
            user_id: user_id.map(Into::into),
        }
    }

    fn all() -> Filter {
        filter(None, None)
    }

    #[test]
    fn filters_by_channel_and_user() {
        let fanout = Fanout::default();
        let mut chat = fanout.subscribe(filter(Some("chat"), None), 10);
        let mut u1 = fanout.subscribe(filter(Some("chat"), Some("u1")), 10);
        fanout.deliver(&[event(1, "chat", "u1")]);
        fanout.deliver(&[event(2, "chat", "u2")]);
        fanout.deliver(&[event(3, "other", "u1")]);
        assert_eq!(ids(&mut chat), [1, 2]);
        assert_eq!(ids(&mut u1), [1]);
    }

    fn ids(subscription: &mut Subscription) -> Vec<u128> {
        std::iter::from_fn(|| subscription.try_recv())
            .filter_map(|d| d.into_event())
            .map(|e| e.id().as_u128())
            .collect()
    }

    #[test]
    fn every_kind_of_filter_gets_exactly_its_events_in_commit_order() {
        let fanout = Fanout::default();
        let mut everything = fanout.subscribe(filter(None, None), 10);
        let mut user_a = fanout.subscribe(filter(None, Some("a")), 10);
        let mut chat = fanout.subscribe(filter(Some("chat"), None), 10);
        let mut chat_a = fanout.subscribe(filter(Some("chat"), Some("a")), 10);
        let mut chat_a_too = fanout.subscribe(filter(Some("chat"), Some("a")), 10);
        let mut chat_b = fanout.subscribe(filter(Some("chat"), Some("b")), 10);
        let batch = [
            event(1, "chat", "a"),
            event(2, "news", "a"),
            event(3, "chat", "b"),
            event(4, "chat", "a"),
            event(5, "news", "c"),
        ];
        assert_eq!(fanout.deliver(&batch), 0);
        assert_eq!(ids(&mut everything), [1, 2, 3, 4, 5]);
        assert_eq!(ids(&mut user_a), [1, 2, 4]);
        assert_eq!(ids(&mut chat), [1, 3, 4]);
        assert_eq!(ids(&mut chat_a), [1, 4]);
        assert_eq!(ids(&mut chat_a_too), [1, 4]);
        assert_eq!(ids(&mut chat_b), [3]);
    }

    #[test]
    fn a_gap_reaches_the_subscribers_of_its_event_only() {
        let fanout = Fanout::default();
        let mut chat_a = fanout.subscribe(filter(Some("chat"), Some("a")), 10);
        let mut chat_b = fanout.subscribe(filter(Some("chat"), Some("b")), 10);
        let mut everything = fanout.subscribe(all(), 10);
        fanout.unreadable(&Unreadable {
            id: Uuid::from_u128(1),
            xid: 100,
            channel: "chat".into(),
            user_id: "a".into(),
            reason: "test".into(),
        });
        assert!(matches!(chat_a.try_recv(), Some(Delivery::Gap(_))));
        assert!(chat_b.try_recv().is_none());
        assert!(matches!(everything.try_recv(), Some(Delivery::Gap(_))));
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

    #[test]
    fn a_batch_larger_than_the_room_left_is_cut_where_the_room_ends() {
        let fanout = Fanout::default();
        let mut small = fanout.subscribe(all(), 3);
        let batch: Vec<Event> = (1..=5).map(|n| event(n, "c", "u")).collect();
        assert_eq!(fanout.deliver(&batch), 2);
        assert_eq!(small.len(), 4, "three events and one marker");
        match small.slot.lock().items.front() {
            Some(Queued::Events(run)) => assert_eq!(run.events.len(), 3, "holds no dropped event"),
            _ => panic!("a run first"),
        }
        assert!(matches!(small.try_recv(), Some(Delivery::Event(_))));
        // The run being read no longer takes room: the next batch fits whole.
        assert_eq!(fanout.deliver(&[event(6, "c", "u"), event(7, "c", "u")]), 0);
        let rest: Vec<String> = std::iter::from_fn(|| small.try_recv())
            .map(|d| match d {
                Delivery::Event(e) => e.id().as_u128().to_string(),
                Delivery::Lagged { missed } => format!("lagged {missed}"),
                Delivery::Gap(_) => "gap".into(),
                Delivery::Reset { .. } => "reset".into(),
            })
            .collect();
        assert_eq!(rest, ["2", "3", "lagged 2", "6", "7"]);
        assert!(small.is_empty());
        assert!(small.reading.is_none(), "an idle subscriber holds no batch");
    }

    #[test]
    fn markers_keep_their_place_between_runs_being_read() {
        let fanout = Fanout::default();
        let mut sub = fanout.subscribe(all(), 10);
        fanout.deliver(&[event(1, "c", "u"), event(2, "c", "u")]);
        assert_eq!(
            sub.try_recv()
                .and_then(Delivery::into_event)
                .map(|e| e.id()),
            Some(Uuid::from_u128(1))
        );
        fanout.gap(&Gap::Pruned {
            pruned_through_xid: 9,
            cursor_xmin: 3,
        });
        fanout.deliver(&[event(3, "c", "u")]);
        assert_eq!(sub.len(), 3);
        assert_eq!(
            sub.try_recv()
                .and_then(Delivery::into_event)
                .map(|e| e.id()),
            Some(Uuid::from_u128(2))
        );
        assert!(matches!(sub.try_recv(), Some(Delivery::Gap(_))));
        assert_eq!(
            sub.try_recv()
                .and_then(Delivery::into_event)
                .map(|e| e.id()),
            Some(Uuid::from_u128(3))
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

    #[tokio::test]
    async fn a_stream_reads_a_run_to_its_end_before_what_follows_and_before_it_ends() {
        let fanout = Fanout::default();
        let mut sub = fanout.subscribe(all(), 10);
        fanout.deliver(&[event(1, "c", "u"), event(2, "c", "u"), event(3, "c", "u")]);
        let next_id = |d: Option<Delivery>| d.and_then(Delivery::into_event).map(|e| e.id());
        assert_eq!(next_id(sub.next().await), Some(Uuid::from_u128(1)));
        // Queued while the run is being read: comes after it, and so does the end.
        fanout.deliver(&[event(4, "c", "u")]);
        fanout.close();
        for n in 2..=4 {
            assert_eq!(next_id(sub.next().await), Some(Uuid::from_u128(n)));
        }
        assert!(sub.next().await.is_none());
    }

    #[test]
    fn subscribers_sharing_a_filter_are_cut_each_at_its_own_room() {
        let fanout = Fanout::default();
        let mut roomy = fanout.subscribe(all(), 10);
        let mut cramped = fanout.subscribe(all(), 2);
        let batch: Vec<Event> = (1..=4).map(|n| event(n, "c", "u")).collect();
        assert_eq!(fanout.deliver(&batch), 2);
        assert_eq!(ids(&mut roomy), [1, 2, 3, 4]);
        assert_eq!(cramped.len(), 3);
        assert_eq!(ids(&mut cramped), [1, 2]);
    }

    fn event_at(n: u128, xid: u64) -> Event {
        Event::new(
            Uuid::from_u128(n),
            "c".into(),
            "u".into(),
            None,
            xid,
            SystemTime::UNIX_EPOCH,
            serde_json::Value::Null,
        )
    }

    fn watermark(snapshot: &str) -> Arc<Watermark> {
        Arc::new(Watermark::new(1, snapshot.parse().unwrap()))
    }

    #[test]
    fn a_position_covers_what_was_read_and_joins_watermarks_when_idle() {
        let fanout = Fanout::default();
        let mut sub = fanout.subscribe(all(), 10);
        assert_eq!(sub.position(), None, "no watermark yet");
        fanout.set_watermark(watermark("100:100:"));
        fanout.deliver(&[event_at(1, 100), event_at(2, 101)]);
        // Nothing read: everything under the run's watermark, nothing of the run.
        let before = sub.position().unwrap();
        assert!(!before.covers(100, Uuid::from_u128(1)));
        let first = sub
            .try_recv()
            .and_then(Delivery::into_event)
            .map(|e| e.id());
        assert_eq!(first, Some(Uuid::from_u128(1)));
        // The watermark moved while an event is still queued: not joined yet.
        fanout.set_watermark(watermark("102:102:"));
        let mid = sub.position().unwrap();
        assert!(mid.covers(100, Uuid::from_u128(1)) && !mid.covers(101, Uuid::from_u128(2)));
        assert_eq!(ids(&mut sub), [2]);
        let idle = sub.position().unwrap();
        assert_eq!(idle.snapshot().to_string(), "102:102:");
        assert_eq!(idle.to_string().parse::<Position>(), Ok(idle.clone()));
    }

    #[test]
    fn a_resumed_subscription_hands_out_its_catch_up_then_what_it_does_not_cover() {
        let fanout = Fanout::default();
        fanout.set_watermark(watermark("100:100:"));
        let base = Position::at(&watermark("100:100:"));
        let (answer, answered) = oneshot::channel();
        let mut sub = fanout.subscribe_resumed(all(), 10, Some(base.clone()), answered);
        // Live events pile up while the catch-up is out, and wait.
        fanout.deliver(&[event_at(2, 101), event_at(3, 102)]);
        assert!(sub.try_recv().is_none());
        assert_eq!(sub.position(), Some(base.clone()));
        answer
            .send(Ok(CatchUp {
                replayed_xid: None,
                base,
                rows: [event_at(1, 100), event_at(2, 101)]
                    .into_iter()
                    .map(Ok)
                    .collect(),
                until: Watermark::new(1, "102:102:".parse().unwrap()),
            }))
            .unwrap();
        // 2's live copy is under the catch-up's snapshot: skipped.
        assert_eq!(ids(&mut sub), [1, 2, 3]);
    }

    #[test]
    fn an_unreadable_row_is_reported_once_to_a_resumed_subscription_and_kept_in_its_position() {
        let unreadable = |n: u128, xid: u64| Unreadable {
            id: Uuid::from_u128(n),
            xid,
            channel: "c".into(),
            user_id: "u".into(),
            reason: "number out of range".into(),
        };
        let gaps = |deliveries: &[Delivery]| {
            deliveries
                .iter()
                .filter(|d| matches!(d, Delivery::Gap(Gap::Unreadable { .. })))
                .count()
        };
        let fanout = Fanout::default();
        fanout.set_watermark(watermark("100:100:"));
        let base = Position::at(&watermark("100:100:"));
        let (answer, answered) = oneshot::channel();
        let mut sub = fanout.subscribe_resumed(all(), 10, Some(base.clone()), answered);
        // Row 2 commits after the subscription was filed and before the catch-up's snapshot:
        // the catch-up reads it, and its live gap is queued too.
        fanout.unreadable(&unreadable(2, 101));
        fanout.deliver(&[event_at(3, 102)]);
        answer
            .send(Ok(CatchUp {
                replayed_xid: None,
                base,
                rows: [Ok(event_at(1, 100)), Err(unreadable(2, 101))]
                    .into_iter()
                    .collect(),
                until: Watermark::new(1, "102:102:".parse().unwrap()),
            }))
            .unwrap();
        let first: Vec<Delivery> = std::iter::from_fn(|| sub.try_recv()).take(2).collect();
        assert_eq!(gaps(&first), 1);
        // Right after the gap, the position covers its row: a resume from it does not report
        // the row again.
        let after_gap = sub.position().unwrap();
        assert!(after_gap.covers(101, Uuid::from_u128(2)));
        let rest: Vec<Delivery> = std::iter::from_fn(|| sub.try_recv()).collect();
        assert_eq!(gaps(&rest), 0, "the live copy of the gap is skipped");
        let events: Vec<u128> = first
            .into_iter()
            .chain(rest)
            .filter_map(Delivery::into_event)
            .map(|e| e.id().as_u128())
            .collect();
        assert_eq!(events, [1, 3]);

        // A subscription that was not resumed gets the live gap, and its position covers it.
        let mut live = fanout.subscribe(all(), 10);
        fanout.deliver(&[event_at(4, 103)]);
        fanout.set_watermark(watermark("104:104:"));
        fanout.unreadable(&unreadable(5, 104));
        assert_eq!(ids(&mut live), [4]);
        let position = live.position().unwrap();
        assert!(position.covers(104, Uuid::from_u128(5)));
    }

    #[test]
    fn a_reset_comes_first_and_the_live_stream_follows() {
        let fanout = Fanout::default();
        fanout.set_watermark(watermark("100:100:"));
        let (answer, answered) = oneshot::channel();
        let mut sub = fanout.subscribe_resumed(all(), 10, None, answered);
        fanout.deliver(&[event_at(1, 100)]);
        answer.send(Err(ResetReason::OtherServerRun)).unwrap();
        assert!(matches!(
            sub.try_recv(),
            Some(Delivery::Reset {
                reason: ResetReason::OtherServerRun
            })
        ));
        assert_eq!(ids(&mut sub), [1]);
        // A relay that stops before it answers ends the stream.
        let (answer, answered) = oneshot::channel::<Result<CatchUp, ResetReason>>();
        let mut orphan = fanout.subscribe_resumed(all(), 10, None, answered);
        drop(answer);
        fanout.close();
        assert!(orphan.try_recv().is_none());
        assert_eq!(orphan.len(), 0);
    }

    #[test]
    fn what_was_queued_before_a_rewind_the_catch_up_came_after_is_skipped() {
        let fanout = Fanout::default();
        let run_1 = |snapshot: &str| Arc::new(Watermark::new(1, snapshot.parse().unwrap()));
        fanout.set_watermark(run_1("100:100:"));
        let base = Position::at(&run_1("100:100:"));
        let (answer, answered) = oneshot::channel();
        let mut sub = fanout.subscribe_resumed(all(), 100, Some(base.clone()), answered);
        // Queued live on run 1: xid 105, which survives the failover.
        fanout.deliver(&[event_at(5, 105)]);
        // The relay rewinds to run 2 (floor 110) and reads from there: xid 112.
        let change = Some(RunChange {
            from: 1,
            floor: 110,
        });
        let run_2 = |snapshot: &str| {
            Arc::new(Watermark {
                change,
                generation: 1,
                ..Watermark::new(2, snapshot.parse().unwrap())
            })
        };
        fanout.set_watermark(run_2("100:110:"));
        fanout.deliver(&[event_at(7, 112)]);
        fanout.set_watermark(run_2("113:113:"));
        // Answered on run 2: the catch-up read both.
        answer
            .send(Ok(CatchUp {
                base: base.carried_over(2, 110),
                rows: [event_at(5, 105), event_at(7, 112)]
                    .into_iter()
                    .map(Ok)
                    .collect(),
                until: Watermark {
                    generation: 1,
                    ..Watermark::new(2, "113:113:".parse().unwrap())
                },
                replayed_xid: None,
            }))
            .unwrap();
        assert_eq!(ids(&mut sub), [5, 7], "each event once");
    }

    #[test]
    fn a_long_replay_keeps_the_position_small() {
        let fanout = Fanout::default();
        let start = Arc::new(Watermark::new(1, "100:100:".parse().unwrap()));
        fanout.set_watermark(Arc::clone(&start));
        let base = Position::at(&start);
        let (answer, answered) = oneshot::channel();
        let mut sub = fanout.subscribe_resumed(all(), 100, Some(base.clone()), answered);
        let n = 3_000u64;
        answer
            .send(Ok(CatchUp {
                base,
                rows: (0..n)
                    .map(|i| Ok(event_at(u128::from(i), 100 + i / 2)))
                    .collect(),
                until: Watermark::new(1, format!("{0}:{0}:", 100 + n).parse().unwrap()),
                replayed_xid: None,
            }))
            .unwrap();
        for _ in 0..n - 1 {
            assert!(sub.try_recv().is_some());
            // Two events per transaction: at most one id beyond the snapshot.
            let token = sub.position().unwrap().to_string();
            assert!(token.len() < 60, "{}", token.len());
        }
    }

    #[test]
    fn dropped_subscriptions_are_forgotten() {
        let fanout = Fanout::default();
        let sub = fanout.subscribe(all(), 4);
        drop(sub);
        let _kept = fanout.subscribe(filter(Some("c"), Some("kept")), 4);
        for n in 0..3 {
            drop(fanout.subscribe(filter(Some("c"), Some(&format!("gone-{n}"))), 4));
        }
        drop(fanout.subscribe(filter(Some("elsewhere"), None), 4));
        let index = fanout.index();
        assert_eq!(index.groups().count(), 1);
        assert_eq!(index.channels.len(), 1);
        assert_eq!(index.channels["c"].users.len(), 1);
    }
}
