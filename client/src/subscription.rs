//! A subscriber's stream: what it reads from its fan-out queue, the [`Position`] it keeps as it
//! reads (the token a browser resumes from), and, for a resumed subscription, the replay of
//! what its relay read for it before the queue.
//!
//! Each run in the queue carries the relay's watermark when it was queued; the position joins
//! it as the run is read, so it covers everything handed out, and only ids beyond the
//! watermark's snapshot are kept. A resumed subscription first hands out the rows of its
//! catch-up (those its position had not seen), then its queue, skipping there what its position
//! covers: the live copies of those rows.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use futures_util::Stream;
use tokio::sync::{mpsc, oneshot};

use crate::event::{Delivery, Event, ResetReason};
use crate::fanout::{Inbox, Item, Standing};
use crate::position::{Position, Watermark};
use crate::resume::{CatchUp, ResumeRequest};
use crate::rows::RowKey;

/// What a resumed subscription still has to do before it reads its queue: wait for its relay
/// to read what its position has not seen, then hand that out.
enum Resume {
    Waiting(oneshot::Receiver<Result<CatchUp, ResetReason>>),
    Replaying(Box<CatchUp>),
}

/// A stream of [`Delivery`] items for one subscriber, in the relay's delivery order.
///
/// Its buffer holds at most `subscriber_buffer` events (or the topic's own `buffer`) besides
/// the rest of the batch it is reading. When it is full, the relay stops queueing for this
/// subscriber alone; once the subscriber has read what was queued, it reads what it missed
/// from the outbox, from its own position (as a resume does: coalesced with the other
/// catch-ups, a page of 1,000 rows and the rest of a transaction at a time), then rejoins its
/// queue. So a slow reader gets every event once, in `xid` order past the point where it fell
/// behind, and holds at most its buffer and one page meanwhile. It gets a
/// [`Delivery::Reset`] instead only if what it missed was pruned, and a [`Delivery::Lagged`]
/// only if it fell behind before the relay had a position to give it. The stream ends when
/// the relay stops. Dropping it unsubscribes.
pub struct Subscription {
    inbox: Inbox,
    /// What this subscription has handed out; `None` until it has read from a relay that has a
    /// watermark (or been given a position to resume from).
    position: Option<Position>,
    /// The watermark last joined into `position`.
    absorbed: Option<Arc<Watermark>>,
    /// The latest [`Watermark::generation`] joined: runs queued under an earlier one are
    /// skipped.
    generation: u64,
    resume: Option<Resume>,
    /// Where it asks its relay to read from the outbox what its position has not seen.
    resumes: mpsc::UnboundedSender<ResumeRequest>,
}

impl Subscription {
    /// A subscription that reads its queue from now on.
    pub(crate) fn live(
        inbox: Inbox,
        resumes: mpsc::UnboundedSender<ResumeRequest>,
    ) -> Subscription {
        Subscription {
            inbox,
            position: None,
            absorbed: None,
            generation: 0,
            resume: None,
            resumes,
        }
    }

    /// A subscription that first asks its relay for the events `position` has not seen, then
    /// reads its queue, where its live events pile up meanwhile (filed before the request
    /// goes: see the `resume` module for why).
    pub(crate) fn resumed(
        inbox: Inbox,
        position: Position,
        resumes: mpsc::UnboundedSender<ResumeRequest>,
    ) -> Subscription {
        let mut subscription = Subscription::live(inbox, resumes);
        subscription.ask(position, 0);
        subscription
    }

    /// A subscription that starts with `reset`, then reads its queue.
    pub(crate) fn reset(
        inbox: Inbox,
        reset: ResetReason,
        resumes: mpsc::UnboundedSender<ResumeRequest>,
    ) -> Subscription {
        let (answer, answered) = oneshot::channel();
        let _ = answer.send(Err(reset));
        Subscription {
            resume: Some(Resume::Waiting(answered)),
            ..Subscription::live(inbox, resumes)
        }
    }

    /// Asks the relay for what `position` has not seen, from xid `read_from` on, and waits for
    /// the answer before reading the queue further. A relay that stopped drops the request,
    /// and with it the answer: the stream then ends.
    fn ask(&mut self, position: Position, read_from: u64) {
        let (answer, answered) = oneshot::channel();
        let _ = self.resumes.send(ResumeRequest {
            filter: self.inbox.filter().clone(),
            position: position.clone(),
            read_from,
            answer,
        });
        self.position = Some(position);
        self.resume = Some(Resume::Waiting(answered));
    }

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
    /// joined: treat the marker as a reset of what the reader shows. (A subscription that
    /// falls behind its buffer reads what it missed from the outbox instead: see above.)
    pub fn position(&self) -> Option<Position> {
        if self.resume.is_some() {
            return self.position.clone();
        }
        match (self.position.clone(), self.inbox.standing()) {
            (
                Some(mut position),
                Standing::Idle {
                    latest: Some(latest),
                },
            ) => {
                position.absorb(&latest);
                Some(position)
            }
            (Some(position), _) => Some(position),
            (None, Standing::Idle { latest }) => latest.map(|latest| Position::at(&latest)),
            (None, Standing::Busy { first }) => first.map(|first| Position::at(&first)),
        }
    }

    /// How many items are left to read: queued events and markers, the rest of the batch
    /// being read (so up to twice the buffer, and more with markers), and what a resumed
    /// subscription has still to hand out first.
    pub fn len(&self) -> usize {
        let replaying = match &self.resume {
            Some(Resume::Replaying(catch_up)) => catch_up.rows.len(),
            _ => 0,
        };
        replaying + self.inbox.len()
    }

    /// Its buffer, in events: how many may be queued besides the batch being read before it
    /// lags.
    pub fn capacity(&self) -> usize {
        self.inbox.capacity()
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
            match self.inbox.poll_next(cx) {
                Poll::Ready(Some(Item::Event {
                    event,
                    under,
                    completes,
                })) => {
                    let new = self.take(&event, under);
                    if let Some(completed) = completes {
                        self.join(completed);
                    }
                    if new {
                        return Poll::Ready(Some(Delivery::Event(event)));
                    }
                }
                Poll::Ready(Some(Item::Marker(Delivery::Lagged { missed }, None))) => {
                    // What it missed is in the outbox: read it from there.
                    match self.position.clone() {
                        Some(position) => self.ask(position, 0),
                        None => return Poll::Ready(Some(Delivery::Lagged { missed })),
                    }
                }
                Poll::Ready(Some(Item::Marker(marker, row))) => {
                    // The gap of an unreadable row, which a resumed subscription's catch-up
                    // may have reported already.
                    let new = row.is_none_or(|row| {
                        self.position
                            .as_mut()
                            .is_none_or(|position| position.see(row))
                    });
                    if new {
                        return Poll::Ready(Some(marker));
                    }
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// What a resumed subscription hands out before its queue: `Ready(None)` once done.
    fn poll_resume(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        loop {
            match &mut self.resume {
                None => return Poll::Ready(None),
                Some(Resume::Waiting(answer)) => {
                    let answer = std::task::ready!(Pin::new(answer).poll(cx));
                    if let Some(reset) = self.answered(answer) {
                        return Poll::Ready(Some(reset));
                    }
                }
                Some(Resume::Replaying(_)) => {
                    if let Some(item) = self.replay() {
                        return Poll::Ready(Some(item));
                    }
                }
            }
        }
    }

    /// Takes the relay's answer to the resume: the rows to replay, or a reset to hand out.
    fn answered(
        &mut self,
        answer: Result<Result<CatchUp, ResetReason>, oneshot::error::RecvError>,
    ) -> Option<Delivery> {
        match answer {
            Ok(Ok(catch_up)) => {
                self.position = Some(catch_up.base.clone());
                self.resume = Some(Resume::Replaying(Box::new(catch_up)));
                None
            }
            Ok(Err(reason)) => {
                // Starts over from the relay's stream, as a new subscription does.
                self.resume = None;
                self.position = None;
                Some(Delivery::Reset { reason })
            }
            Err(_) => {
                // The relay stopped before it answered: its queue ends the stream.
                self.resume = None;
                self.position = None;
                None
            }
        }
    }

    /// The next row of the replay that the position has not seen, if any; once the replay is
    /// done, joins the catch-up's snapshot and ends the resume.
    fn replay(&mut self) -> Option<Delivery> {
        let Some(Resume::Replaying(catch_up)) = &mut self.resume else {
            return None;
        };
        let Some(row) = catch_up.rows.pop_front() else {
            // Everything under the catch-up's snapshot is handed out now: its live copies in
            // the queue are skipped, and so is what is queued from before a rewind the
            // catch-up came after.
            if let Some(position) = &mut self.position {
                position.absorb(&catch_up.until);
            }
            self.generation = self.generation.max(catch_up.until.generation);
            let next_page = catch_up.next_page;
            self.resume = None;
            if let (Some(read_from), Some(position)) = (next_page, self.position.clone()) {
                self.ask(position, read_from);
            }
            return None;
        };
        let key = RowKey::of(&row);
        let position = self.position.get_or_insert_with(|| catch_up.base.clone());
        // The rows come in (xid, id) order: what the catch-up's snapshot sees below this one's
        // xid is handed out, so the position joins it and keeps ids of this transaction only,
        // however long the replay.
        if catch_up.replayed_xid != Some(key.xid) {
            catch_up.replayed_xid = Some(key.xid);
            position.absorb(&Watermark::new(
                catch_up.until.epoch,
                catch_up.until.snapshot.below(key.xid),
            ));
        }
        if !position.see(key) {
            return None;
        }
        Some(match row {
            Ok(event) => Delivery::Event(event),
            Err(unreadable) => Delivery::Gap(unreadable.into_gap()),
        })
    }

    /// Joins the watermark of the run `event` came in, and tells whether the event is new to
    /// this subscription's position (noting it if so).
    fn take(&mut self, event: &Event, watermark: Option<Arc<Watermark>>) -> bool {
        let Some(watermark) = watermark else {
            return true;
        };
        let Some(position) = self.join(watermark) else {
            // Queued before a rewind that this subscription's catch-up came after: what of it
            // survived, the catch-up read again.
            return false;
        };
        // The relay hands each event over once, and a resumed subscription's catch-up ended
        // with a snapshot that sees every event its position holds by id: its snapshot alone
        // tells a live copy from a new event, without a scan of the ids.
        if position.snapshot().is_visible(event.xid()) {
            return false;
        }
        position.record(RowKey::of_event(event));
        true
    }

    /// Joins `watermark` (everything under it was handed over) into the position, unless it
    /// comes from before a rewind this subscription has seen past; returns the position.
    fn join(&mut self, watermark: Arc<Watermark>) -> Option<&mut Position> {
        if watermark.generation < self.generation {
            return None;
        }
        self.generation = watermark.generation;
        let fresh = !self
            .absorbed
            .as_ref()
            .is_some_and(|absorbed| Arc::ptr_eq(absorbed, &watermark));
        let position = self
            .position
            .get_or_insert_with(|| Position::at(&watermark));
        if fresh {
            position.absorb(&watermark);
            self.absorbed = Some(watermark);
        }
        Some(position)
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
            .field("filter", self.inbox.filter())
            .field("capacity", &self.capacity())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use uuid::Uuid;

    use super::*;
    use crate::event::Gap;
    use crate::fanout::Fanout;
    use crate::position::RunChange;
    use crate::rows::Unreadable;
    use crate::topic::Filter;
    use pg_outbox_wire::Snapshot;

    /// A relay's end of the resume requests, kept open so that requests wait for an answer.
    fn requests() -> (
        mpsc::UnboundedSender<ResumeRequest>,
        mpsc::UnboundedReceiver<ResumeRequest>,
    ) {
        mpsc::unbounded_channel()
    }

    /// A subscription resumed from `base`, and the answer its relay would send.
    fn resumed(
        fanout: &Fanout,
        capacity: usize,
        base: Position,
    ) -> (Subscription, oneshot::Sender<Result<CatchUp, ResetReason>>) {
        let (resumes, mut requests) = requests();
        let sub = Subscription::resumed(fanout.subscribe(all(), capacity), base, resumes);
        let request = requests.try_recv().expect("the subscription asked");
        (sub, request.answer)
    }

    fn all() -> Filter {
        Filter {
            channel: None,
            user_id: None,
        }
    }

    fn key(xid: u64, n: u128) -> RowKey {
        RowKey {
            xid,
            id: Uuid::from_u128(n),
        }
    }

    fn ids(subscription: &mut Subscription) -> Vec<u128> {
        std::iter::from_fn(|| subscription.try_recv())
            .filter_map(|d| d.into_event())
            .map(|e| e.id().as_u128())
            .collect()
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
        let mut sub = Subscription::live(fanout.subscribe(all(), 10), requests().0);
        assert_eq!(sub.position(), None, "no watermark yet");
        fanout.set_watermark(watermark("100:100:"));
        fanout.deliver(&[event_at(1, 100), event_at(2, 101)], None);
        // Nothing read: everything under the run's watermark, nothing of the run.
        let before = sub.position().unwrap();
        assert!(!before.covers(key(100, 1)));
        let first = sub
            .try_recv()
            .and_then(Delivery::into_event)
            .map(|e| e.id());
        assert_eq!(first, Some(Uuid::from_u128(1)));
        // The watermark moved while an event is still queued: not joined yet.
        fanout.set_watermark(watermark("102:102:"));
        let mid = sub.position().unwrap();
        assert!(mid.covers(key(100, 1)) && !mid.covers(key(101, 2)));
        assert_eq!(ids(&mut sub), [2]);
        let idle = sub.position().unwrap();
        assert_eq!(idle.snapshot().to_string(), "102:102:");
        assert_eq!(idle.to_string().parse::<Position>(), Ok(idle.clone()));
    }

    #[test]
    fn reading_an_advance_to_its_end_joins_the_watermark_it_completes() {
        let fanout = Fanout::default();
        fanout.set_watermark(watermark("100:100:"));
        let mut reader = Subscription::live(fanout.subscribe(all(), 10), requests().0);
        let (resumes, _requests) = requests();
        let mut cramped = Subscription::live(fanout.subscribe(all(), 1), resumes);
        let next = watermark("103:103:");
        fanout.deliver(&[event_at(1, 100), event_at(2, 101)], Some(&next));
        // Read before the relay sets that watermark, as a subscriber on another thread may:
        // its position is the watermark alone, with no ids beyond it.
        let mut positions = Vec::new();
        while let Some(delivery) = reader.try_recv() {
            assert!(delivery.into_event().is_some());
            positions.push(reader.position().unwrap());
        }
        assert!(!positions[0].covers(key(101, 2)), "not past the first");
        assert_eq!(positions[1], Position::at(&next));
        assert!(positions[1].to_string().len() < positions[0].to_string().len());
        // A run cut for lag completes nothing: what was dropped is not seen, and the
        // subscription waits for its catch-up.
        assert_eq!(ids(&mut cramped), [1]);
        let cut = cramped.position().unwrap();
        assert!(cut.covers(key(100, 1)) && !cut.covers(key(101, 2)));
    }

    #[test]
    fn a_resumed_subscription_hands_out_its_catch_up_then_what_it_does_not_cover() {
        let fanout = Fanout::default();
        fanout.set_watermark(watermark("100:100:"));
        let base = Position::at(&watermark("100:100:"));
        let (mut sub, answer) = resumed(&fanout, 10, base.clone());
        // Live events pile up while the catch-up is out, and wait.
        fanout.deliver(&[event_at(2, 101), event_at(3, 102)], None);
        assert!(sub.try_recv().is_none());
        assert_eq!(sub.position(), Some(base.clone()));
        answer
            .send(Ok(CatchUp {
                replayed_xid: None,
                next_page: None,
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
        let (mut sub, answer) = resumed(&fanout, 10, base.clone());
        // Row 2 commits after the subscription was filed and before the catch-up's snapshot:
        // the catch-up reads it, and its live gap is queued too.
        fanout.unreadable(&unreadable(2, 101));
        fanout.deliver(&[event_at(3, 102)], None);
        answer
            .send(Ok(CatchUp {
                replayed_xid: None,
                next_page: None,
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
        assert!(after_gap.covers(key(101, 2)));
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
        let mut live = Subscription::live(fanout.subscribe(all(), 10), requests().0);
        fanout.deliver(&[event_at(4, 103)], None);
        fanout.set_watermark(watermark("104:104:"));
        fanout.unreadable(&unreadable(5, 104));
        assert_eq!(ids(&mut live), [4]);
        let position = live.position().unwrap();
        assert!(position.covers(key(104, 5)));
    }

    #[test]
    fn a_reset_comes_first_and_the_live_stream_follows() {
        let fanout = Fanout::default();
        fanout.set_watermark(watermark("100:100:"));
        let (mut sub, answer) = resumed(&fanout, 10, Position::at(&watermark("100:100:")));
        fanout.deliver(&[event_at(1, 100)], None);
        answer.send(Err(ResetReason::OtherServerRun)).unwrap();
        assert!(matches!(
            sub.try_recv(),
            Some(Delivery::Reset {
                reason: ResetReason::OtherServerRun
            })
        ));
        assert_eq!(ids(&mut sub), [1]);
        // A relay that stops before it answers ends the stream.
        let (mut orphan, answer) = resumed(&fanout, 10, Position::at(&watermark("100:100:")));
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
        let (mut sub, answer) = resumed(&fanout, 100, base.clone());
        // Queued live on run 1: xid 105, which survives the failover.
        fanout.deliver(&[event_at(5, 105)], None);
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
        fanout.deliver(&[event_at(7, 112)], None);
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
                next_page: None,
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
        let (mut sub, answer) = resumed(&fanout, 100, base.clone());
        let n = 3_000u64;
        answer
            .send(Ok(CatchUp {
                base,
                rows: (0..n)
                    .map(|i| Ok(event_at(u128::from(i), 100 + i / 2)))
                    .collect(),
                until: Watermark::new(1, format!("{0}:{0}:", 100 + n).parse().unwrap()),
                replayed_xid: None,
                next_page: None,
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
    fn a_reader_that_overflows_catches_up_from_the_outbox_then_rejoins_its_queue() {
        let fanout = Fanout::default();
        fanout.set_watermark(watermark("100:100:"));
        let (resumes, mut requests) = requests();
        let mut slow = Subscription::live(fanout.subscribe(all(), 2), resumes);
        // 100 and 101 fit; 102 to 104 are dropped, and so is 105, queued after the cut.
        fanout.deliver(
            &[event_at(1, 100), event_at(2, 101), event_at(3, 102)],
            None,
        );
        fanout.deliver(&[event_at(4, 103), event_at(5, 104)], None);
        fanout.deliver(&[event_at(6, 105)], None);
        assert_eq!(ids(&mut slow), [1, 2], "then it waits for its catch-up");
        let request = requests.try_recv().expect("it asked for what it missed");
        assert_eq!(request.read_from, 0);
        assert!(request.position.covers(key(101, 2)) && !request.position.covers(key(102, 3)));
        // Queued from the moment it asked: 106, and 105 again, committed late.
        fanout.deliver(&[event_at(6, 105), event_at(7, 106)], None);
        // A first page: up to 103 only.
        request
            .answer
            .send(Ok(CatchUp {
                base: request.position.clone(),
                rows: [event_at(3, 102), event_at(4, 103)]
                    .into_iter()
                    .map(Ok)
                    .collect(),
                until: Watermark::new(1, "106:106:".parse::<Snapshot>().unwrap().below(104)),
                replayed_xid: None,
                next_page: Some(104),
            }))
            .unwrap();
        assert_eq!(ids(&mut slow), [3, 4], "then it asks for the next page");
        let next = requests.try_recv().expect("the next page");
        assert_eq!(next.read_from, 104);
        next.answer
            .send(Ok(CatchUp {
                base: next.position.clone(),
                rows: [event_at(5, 104), event_at(6, 105)]
                    .into_iter()
                    .map(Ok)
                    .collect(),
                until: Watermark::new(1, "106:106:".parse().unwrap()),
                replayed_xid: None,
                next_page: None,
            }))
            .unwrap();
        // 105's queued copy is skipped: each event once, no marker.
        let rest: Vec<Delivery> = std::iter::from_fn(|| slow.try_recv()).collect();
        let events: Vec<u128> = rest
            .iter()
            .filter_map(|d| d.event().map(|e| e.id().as_u128()))
            .collect();
        assert_eq!(events, [5, 6, 7]);
        assert_eq!(rest.len(), 3);
        assert!(requests.try_recv().is_err());
    }
}
