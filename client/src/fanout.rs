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
//! beyond its room are dropped for that subscriber alone, a `Lagged { missed }` marker takes
//! their place in the stream, and nothing more of its events is queued until the subscriber
//! reads that marker: it then reads what it missed from the outbox (`crate::subscription`),
//! and its queue takes events again from that moment, so nothing committed meanwhile is
//! missed by both. Gaps are always queued, but the gap of an unreadable row, which stands for
//! that row: it is handed out once per subscription, like an event, counts as seen in its
//! position, and is read again with the row by a catch-up.
//!
//! Each run carries the relay's *watermark* when it was queued (a snapshot everything under
//! which was handed over before it): what a subscriber's stream (`crate::subscription`) keeps
//! its position with.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};

use crate::event::{Delivery, Event, Gap};
use crate::position::Watermark;
use crate::rows::{RowKey, Unreadable};
use crate::topic::Filter;

/// Events of one batch queued for a subscriber, from `next` on; never empty when queued.
/// `events` is shared by the subscribers of the group that wanted them, except when only part
/// of it fitted in this subscriber's room.
struct Run {
    events: Arc<[Event]>,
    next: usize,
    /// The relay's watermark when the run was queued; `None` before the relay has one.
    watermark: Option<Arc<Watermark>>,
    /// The watermark that the run completes, when it is the last the relay queued for this
    /// subscriber before that watermark: everything under it is handed over once the run is
    /// read to its end.
    then: Option<Arc<Watermark>>,
}

impl Run {
    fn len(&self) -> usize {
        self.events.len() - self.next
    }

    /// The next event of the run being read, if any, with the run's watermark, and with the
    /// watermark it completes if that was its last event; the run is let go with its last
    /// event, so an idle subscriber keeps no batch alive.
    fn read(reading: &mut Option<Run>) -> Option<Item> {
        let run = reading.as_mut()?;
        let event = run.events.get(run.next)?.clone();
        run.next += 1;
        let (under, completes) = if run.len() == 0 {
            reading
                .take()
                .map_or((None, None), |run| (run.watermark, run.then))
        } else {
            (run.watermark.clone(), None)
        };
        Some(Item::Event {
            event,
            under,
            completes,
        })
    }
}

enum Queued {
    Events(Run),
    /// A marker; `row` is the unreadable row a gap stands for.
    Marker {
        delivery: Delivery,
        row: Option<RowKey>,
    },
}

struct Queue {
    items: VecDeque<Queued>,
    /// Events queued (markers not counted, nor the run the subscriber is reading).
    events: usize,
    /// Markers queued.
    markers: usize,
    /// Events were dropped for lag and a `Lagged` marker is queued: how many so far. Nothing
    /// more is queued until the subscriber reads the marker.
    lagging: Option<u64>,
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

    fn push_marker(&mut self, delivery: Delivery, row: Option<RowKey>) {
        self.items.push_back(Queued::Marker { delivery, row });
        self.markers += 1;
    }

    /// Takes the next item out: a marker (with the row it stands for, if any), or a run of
    /// events, which becomes the one `reading`.
    fn pop(&mut self, reading: &mut Option<Run>) -> Option<(Delivery, Option<RowKey>)> {
        match self.items.pop_front()? {
            Queued::Marker {
                delivery: Delivery::Lagged { .. },
                row,
            } => {
                // Queueing starts again now, before the subscriber asks for what it missed.
                self.markers -= 1;
                let missed = self.lagging.take().unwrap_or(0);
                Some((Delivery::Lagged { missed }, row))
            }
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
    fn push_events(
        &self,
        events: &Arc<[Event]>,
        watermark: &Option<Arc<Watermark>>,
        then: Option<&Arc<Watermark>>,
    ) -> u64 {
        let mut queue = self.lock();
        if let Some(missed) = &mut queue.lagging {
            *missed += events.len() as u64;
            return events.len() as u64;
        }
        let fits = self.capacity.saturating_sub(queue.events).min(events.len());
        debug_assert!(
            !events.is_empty(),
            "a group's share of a batch is never empty"
        );
        // A cut run is followed by the drops' marker: it completes no watermark.
        let then = then.filter(|_| fits == events.len()).cloned();
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
                then,
            }));
            queue.events += fits;
        }
        let dropped = (events.len() - fits) as u64;
        if dropped > 0 {
            // Its count is the queue's until it is read.
            queue.lagging = Some(dropped);
            queue.push_marker(Delivery::Lagged { missed: 0 }, None);
        }
        queue.wake();
        dropped
    }

    fn push_marker(&self, delivery: Delivery, row: Option<RowKey>) {
        let mut queue = self.lock();
        if row.is_some() && queue.lagging.is_some() {
            // An unreadable row, which the subscriber's catch-up reads again.
            return;
        }
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
    /// Shared with every [`Inbox`] (weakly), which removes itself when dropped.
    index: Arc<Mutex<Index>>,
    /// The relay's latest watermark: the runs queued from now on carry it, and an idle
    /// subscription's position joins it.
    watermark: Arc<Mutex<Option<Arc<Watermark>>>>,
}

impl Fanout {
    fn index(&self) -> MutexGuard<'_, Index> {
        lock(&self.index)
    }

    /// Files a subscriber that wants `filter`, with room for `capacity` events.
    pub fn subscribe(&self, filter: Filter, capacity: usize) -> Inbox {
        debug_assert!(capacity >= 1, "callers keep a buffer of at least 1");
        let mut index = self.index();
        let slot = Arc::new(Slot {
            filter,
            capacity,
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                events: 0,
                markers: 0,
                lagging: None,
                waker: None,
                closed: index.closed,
            }),
        });
        if !index.closed {
            index.insert(Arc::clone(&slot));
        }
        Inbox {
            slot,
            index: Arc::downgrade(&self.index),
            reading: None,
            latest: Arc::clone(&self.watermark),
        }
    }

    /// Sets the watermark: every event under `watermark` was handed over already.
    pub fn set_watermark(&self, watermark: Arc<Watermark>) {
        *lock(&self.watermark) = Some(watermark);
    }

    /// Hands each event of `batch`, in order, to every matching subscriber; returns how many
    /// (event, subscriber) deliveries were dropped for lag. `then`: the watermark the relay
    /// sets next, nothing else being queued before it, so that every subscriber that reads its
    /// share of `batch` to the end has been handed everything under it.
    pub fn deliver(&self, batch: &[Event], then: Option<&Arc<Watermark>>) -> u64 {
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
                    .map(|slot| slot.push_events(&events, &watermark, then))
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
            .for_each(|slot| slot.push_marker(gap.clone(), Some(row.key())));
    }

    /// How many subscriptions there are, and how many events wait in their queues (besides
    /// the batch each is reading): for the metrics, not the hot path.
    #[cfg(feature = "metrics")]
    pub fn load(&self) -> (usize, usize) {
        let index = self.index();
        index
            .groups()
            .flat_map(|group| &group.slots)
            .fold((0, 0), |(subscriptions, queued), slot| {
                (subscriptions + 1, queued + slot.lock().events)
            })
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

/// What a subscriber's queue hands out next.
pub(crate) enum Item {
    /// An event, with the watermark of the run it came in (`None` before the relay had one),
    /// and the watermark that reading it completes (see [`Run::then`]).
    Event {
        event: Event,
        under: Option<Arc<Watermark>>,
        completes: Option<Arc<Watermark>>,
    },
    /// A marker, with the unreadable row a gap stands for.
    Marker(Delivery, Option<RowKey>),
}

/// Where a subscriber's queue stands, read under one lock after the relay's latest watermark:
/// so a run queued before that watermark was set is seen in the queue, and the watermark is
/// never joined past events not yet read.
pub(crate) enum Standing {
    /// Nothing left to read: everything under `latest` was handed out.
    Idle { latest: Option<Arc<Watermark>> },
    /// Something left to read: everything under the first queued run's watermark was handed
    /// out before it.
    Busy { first: Option<Arc<Watermark>> },
}

/// One subscriber's end of the fan-out: its queue, the run it is reading, and the relay's
/// latest watermark. Dropping it unsubscribes.
pub(crate) struct Inbox {
    slot: Arc<Slot>,
    index: Weak<Mutex<Index>>,
    /// The run taken out of the queue and being read, without the queue's lock.
    reading: Option<Run>,
    /// The relay's latest watermark.
    latest: Arc<Mutex<Option<Arc<Watermark>>>>,
}

impl Drop for Inbox {
    fn drop(&mut self) {
        if let Some(index) = self.index.upgrade() {
            lock(&index).remove(&self.slot);
        }
    }
}

impl Inbox {
    /// The next item; `Ready(None)` once the relay stopped and everything queued was read.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        loop {
            if let Some(item) = Run::read(&mut self.reading) {
                return Poll::Ready(Some(item));
            }
            let mut queue = self.slot.lock();
            match queue.pop(&mut self.reading) {
                Some((marker, row)) => return Poll::Ready(Some(Item::Marker(marker, row))),
                None if self.reading.is_some() => {}
                None if queue.closed => return Poll::Ready(None),
                None => {
                    queue.waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
        }
    }

    pub fn standing(&self) -> Standing {
        let latest = lock(&self.latest).clone();
        let queue = self.slot.lock();
        if self.reading.is_none() && queue.items.is_empty() {
            Standing::Idle { latest }
        } else {
            Standing::Busy {
                first: queue.first_watermark(),
            }
        }
    }

    /// Queued events and markers, and the rest of the run being read.
    pub fn len(&self) -> usize {
        let reading = self.reading.as_ref().map_or(0, Run::len);
        let queue = self.slot.lock();
        reading + queue.events + queue.markers
    }

    pub fn capacity(&self) -> usize {
        self.slot.capacity
    }

    pub fn filter(&self) -> &Filter {
        &self.slot.filter
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use uuid::Uuid;

    use super::*;

    fn delivery(item: Item) -> Delivery {
        match item {
            Item::Event { event, .. } => Delivery::Event(event),
            Item::Marker(marker, _) => marker,
        }
    }

    /// The next item if one is ready, as a subscriber with no position reads it.
    fn try_next(inbox: &mut Inbox) -> Option<Delivery> {
        match inbox.poll_next(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(item) => item.map(delivery),
            Poll::Pending => None,
        }
    }

    async fn next(inbox: &mut Inbox) -> Option<Delivery> {
        std::future::poll_fn(|cx| inbox.poll_next(cx).map(|item| item.map(delivery))).await
    }

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
        fanout.deliver(&[event(1, "chat", "u1")], None);
        fanout.deliver(&[event(2, "chat", "u2")], None);
        fanout.deliver(&[event(3, "other", "u1")], None);
        assert_eq!(ids(&mut chat), [1, 2]);
        assert_eq!(ids(&mut u1), [1]);
    }

    fn ids(inbox: &mut Inbox) -> Vec<u128> {
        std::iter::from_fn(|| try_next(inbox))
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
        assert_eq!(fanout.deliver(&batch, None), 0);
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
        assert!(matches!(try_next(&mut chat_a), Some(Delivery::Gap(_))));
        assert!(try_next(&mut chat_b).is_none());
        assert!(matches!(try_next(&mut everything), Some(Delivery::Gap(_))));
    }

    #[test]
    fn a_full_subscriber_gets_one_lagged_marker_and_others_everything() {
        let fanout = Fanout::default();
        let mut slow = fanout.subscribe(all(), 2);
        let mut fast = fanout.subscribe(all(), 100);
        let mut lagged = 0;
        for n in 0..10 {
            lagged += fanout.deliver(&[event(n, "c", "u")], None);
            while try_next(&mut fast).is_some() {}
        }
        assert_eq!(lagged, 8);
        assert!(matches!(try_next(&mut slow), Some(Delivery::Event(_))));
        assert!(matches!(try_next(&mut slow), Some(Delivery::Event(_))));
        assert!(matches!(
            try_next(&mut slow),
            Some(Delivery::Lagged { missed: 8 })
        ));
        assert!(try_next(&mut slow).is_none());
        // Room again: delivery resumes.
        assert_eq!(fanout.deliver(&[event(10, "c", "u")], None), 0);
        assert_eq!(
            try_next(&mut slow)
                .and_then(|d| d.into_event())
                .map(|e| e.id()),
            Some(Uuid::from_u128(10))
        );
    }

    #[test]
    fn a_batch_larger_than_the_room_left_is_cut_where_the_room_ends() {
        let fanout = Fanout::default();
        let mut small = fanout.subscribe(all(), 3);
        let batch: Vec<Event> = (1..=5).map(|n| event(n, "c", "u")).collect();
        assert_eq!(fanout.deliver(&batch, None), 2);
        assert_eq!(small.len(), 4, "three events and one marker");
        match small.slot.lock().items.front() {
            Some(Queued::Events(run)) => assert_eq!(run.events.len(), 3, "holds no dropped event"),
            _ => panic!("a run first"),
        }
        assert!(matches!(try_next(&mut small), Some(Delivery::Event(_))));
        // Until the subscriber reads the marker, nothing more is queued, although there is
        // room: it reads all it missed from the outbox once it gets there.
        assert_eq!(fanout.deliver(&[event(6, "c", "u")], None), 1);
        let mut rest: Vec<String> = Vec::new();
        let read = |small: &mut Inbox| {
            std::iter::from_fn(|| try_next(small))
                .map(|d| match d {
                    Delivery::Event(e) => e.id().as_u128().to_string(),
                    Delivery::Lagged { missed } => format!("lagged {missed}"),
                    Delivery::Gap(_) => "gap".into(),
                    Delivery::Reset { .. } => "reset".into(),
                })
                .collect::<Vec<String>>()
        };
        rest.extend(read(&mut small));
        // Once it is read, events are queued again.
        assert_eq!(
            fanout.deliver(&[event(7, "c", "u"), event(8, "c", "u")], None),
            0
        );
        rest.extend(read(&mut small));
        assert_eq!(rest, ["2", "3", "lagged 3", "7", "8"]);
        assert_eq!(small.len(), 0);
        assert!(small.reading.is_none(), "an idle subscriber holds no batch");
    }

    #[test]
    fn markers_keep_their_place_between_runs_being_read() {
        let fanout = Fanout::default();
        let mut sub = fanout.subscribe(all(), 10);
        fanout.deliver(&[event(1, "c", "u"), event(2, "c", "u")], None);
        assert_eq!(
            try_next(&mut sub)
                .and_then(Delivery::into_event)
                .map(|e| e.id()),
            Some(Uuid::from_u128(1))
        );
        fanout.gap(&Gap::Pruned {
            pruned_through_xid: 9,
            cursor_xmin: 3,
        });
        fanout.deliver(&[event(3, "c", "u")], None);
        assert_eq!(sub.len(), 3);
        assert_eq!(
            try_next(&mut sub)
                .and_then(Delivery::into_event)
                .map(|e| e.id()),
            Some(Uuid::from_u128(2))
        );
        assert!(matches!(try_next(&mut sub), Some(Delivery::Gap(_))));
        assert_eq!(
            try_next(&mut sub)
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
            pusher.deliver(&[event(1, "c", "u")], None);
            pusher.close();
        });
        assert!(matches!(next(&mut sub).await, Some(Delivery::Event(_))));
        assert!(next(&mut sub).await.is_none());
        task.await.unwrap();
        // Subscribing after close gives an ended stream.
        let mut late = fanout.subscribe(all(), 4);
        assert!(next(&mut late).await.is_none());
    }

    #[tokio::test]
    async fn a_stream_reads_a_run_to_its_end_before_what_follows_and_before_it_ends() {
        let fanout = Fanout::default();
        let mut sub = fanout.subscribe(all(), 10);
        fanout.deliver(
            &[event(1, "c", "u"), event(2, "c", "u"), event(3, "c", "u")],
            None,
        );
        let next_id = |d: Option<Delivery>| d.and_then(Delivery::into_event).map(|e| e.id());
        assert_eq!(next_id(next(&mut sub).await), Some(Uuid::from_u128(1)));
        // Queued while the run is being read: comes after it, and so does the end.
        fanout.deliver(&[event(4, "c", "u")], None);
        fanout.close();
        for n in 2..=4 {
            assert_eq!(next_id(next(&mut sub).await), Some(Uuid::from_u128(n)));
        }
        assert!(next(&mut sub).await.is_none());
    }

    #[test]
    fn subscribers_sharing_a_filter_are_cut_each_at_its_own_room() {
        let fanout = Fanout::default();
        let mut roomy = fanout.subscribe(all(), 10);
        let mut cramped = fanout.subscribe(all(), 2);
        let batch: Vec<Event> = (1..=4).map(|n| event(n, "c", "u")).collect();
        assert_eq!(fanout.deliver(&batch, None), 2);
        assert_eq!(ids(&mut roomy), [1, 2, 3, 4]);
        assert_eq!(cramped.len(), 3);
        assert_eq!(ids(&mut cramped), [1, 2]);
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
