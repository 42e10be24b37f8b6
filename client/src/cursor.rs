//! The gap-free cursor: a snapshot `S` below which everything was delivered, the ids delivered
//! beyond it, and the queue of notified rows waiting for their turn.
//!
//! Pure logic, no I/O: the listener feeds it decoded notifications and the results of advances
//! and delivers what it returns, in that order.
//!
//! Invariant: every row whose xid is visible in `S` was delivered (or reported missing), and
//! `delivered` holds the ids delivered whose xid is not visible in `S`. A row is new iff its xid is
//! not visible in `S` and its id is not in `delivered`. An advance to `S2` reads exactly the rows
//! visible in `S2` and not in `S` (PgQ's batch rule), so every committed row is seen, and the
//! dedupe set makes it delivered once, whatever order transactions commit in.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};

use uuid::Uuid;

use pg_outbox_wire::Snapshot;

use crate::event::{Event, Gap};
use crate::incoming::{self, Notice};
use crate::rows::{Row, RowKey, Unreadable, Visible};

/// What the cursor asks the listener to do, in order.
#[derive(Debug)]
pub(crate) enum Step {
    /// Deliver this event; `notified` is false when it was found by an advance without its
    /// notification having been seen first (caught up).
    Deliver { event: Event, notified: bool },
    /// A notification for something already delivered.
    Duplicate,
    /// Report a gap.
    Gap(Gap),
    /// A row this client cannot parse: its subscribers are told with a [`Gap::Unreadable`],
    /// which takes the row's place in their positions, so that it is reported once per
    /// subscription, resumes included.
    Unreadable(Unreadable),
    /// A notice that no row stands behind, and whose row cannot have been pruned: its
    /// transaction never committed (an advance's snapshot taken after the notice cannot see
    /// it), or committed without it above what pruning has reached. Any role that can connect
    /// can send one; subscribers hear nothing of it.
    Forged,
    /// A notice dropped because [`MAX_WAITING`] rows already wait; the next advance reads its
    /// row, if there is one.
    Overflow,
}

/// A notified row waiting for its turn: ready (inline), or a reference to fetch.
#[derive(Debug)]
enum Pending {
    Ready(Event),
    Reference(Notice),
}

impl Pending {
    fn id(&self) -> Uuid {
        match self {
            Pending::Ready(event) => event.id(),
            Pending::Reference(notice) => notice.id,
        }
    }

    fn xid(&self) -> u64 {
        match self {
            Pending::Ready(event) => event.xid(),
            Pending::Reference(notice) => notice.xid,
        }
    }
}

/// At most this many notified rows wait in the queue. A notification beyond it is dropped: its
/// row, if it exists, is read by the next advance anyway (caught up, in xid order), so the bound
/// costs order, never an event, and a flood of forged notifications cannot grow the relay.
pub(crate) const MAX_WAITING: usize = 65_536;

/// A row settled beyond the cursor's snapshot.
#[derive(Debug)]
struct Settled {
    xid: u64,
    /// [`Cursor::heard`] when it was settled.
    heard: u64,
}

/// How many of the rows with the greatest xids the cursor keeps as witnesses.
pub(crate) const WITNESSES: usize = 256;

/// The rows with the greatest xids among those the cursor has covered (delivered, skipped, or
/// already there when it started): after the server lost part of its history, the greatest of
/// them that still exists bounds the xids the server may have handed out again.
#[derive(Debug, Default)]
struct Witnesses(BinaryHeap<Reverse<RowKey>>);

impl Witnesses {
    fn add(&mut self, row: RowKey) {
        if self.0.len() >= WITNESSES {
            match self.0.peek() {
                Some(Reverse(least)) if least.xid >= row.xid => return,
                _ => {}
            }
            self.0.pop();
        }
        self.0.push(Reverse(row));
    }
}

/// The relay's position in the outbox.
#[derive(Debug)]
pub(crate) struct Cursor {
    snapshot: Snapshot,
    /// Ids delivered whose xid is not visible in `snapshot`, with their xid and when they were
    /// delivered (see `heard`).
    delivered: HashMap<Uuid, Settled>,
    /// Notified rows not yet delivered, in notification (= commit) order. Its head is never
    /// `Ready`: ready events are delivered as soon as nothing is ahead of them.
    queue: VecDeque<Pending>,
    queued: HashSet<Uuid>,
    /// When each queued row's notice was heard (see [`Cursor::heard`]), parallel to `queue`.
    heard_at: VecDeque<u64>,
    /// How many notices were heard so far: the clock that tells a forged notice from a genuine
    /// one. PostgreSQL delivers a notification only once its sender's transaction is visible to
    /// new snapshots, so a notice heard before an advance's query was sent whose xid that query's
    /// snapshot still cannot see names a transaction that never committed: it was forged.
    heard: u64,
    witnesses: Witnesses,
}

impl Cursor {
    /// A cursor at `snapshot`: everything visible in it counts as delivered.
    pub fn new(snapshot: Snapshot) -> Cursor {
        Cursor {
            snapshot,
            delivered: HashMap::new(),
            queue: VecDeque::new(),
            queued: HashSet::new(),
            heard_at: VecDeque::new(),
            heard: 0,
            witnesses: Witnesses::default(),
        }
    }

    /// The notice clock: pass it to [`Cursor::on_advance`] with the result of the next advance.
    pub fn heard(&self) -> u64 {
        self.heard
    }

    /// Rows visible in the starting snapshot, as witnesses (see [`Cursor::witnesses`]).
    pub fn witness(&mut self, rows: impl IntoIterator<Item = RowKey>) {
        for row in rows {
            self.witnesses.add(row);
        }
    }

    /// The covered rows a recovery checks for: the witnesses and the ids delivered beyond the
    /// snapshot.
    pub fn witnesses(&self) -> Vec<RowKey> {
        let mut rows: Vec<RowKey> = self.witnesses.0.iter().map(|r| r.0).collect();
        rows.extend(self.delivered.iter().map(|(id, settled)| RowKey {
            xid: settled.xid,
            id: *id,
        }));
        rows
    }

    /// After the server lost part of its history: forgets everything from xid `floor` on, so
    /// the next advance reads those xids again. Below `floor` the old history holds; from it on,
    /// every row the cursor covered is gone, so none is delivered twice. The queue is dropped:
    /// what it announced is read again, or is gone.
    pub fn rewind(&mut self, floor: u64) {
        self.snapshot = self.snapshot.below(floor);
        self.delivered.retain(|_, settled| settled.xid < floor);
        self.queue.clear();
        self.queued.clear();
        self.heard_at.clear();
        self.witnesses.0.retain(|Reverse(row)| row.xid < floor);
    }

    /// The snapshot `S`.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// How many notified rows wait for an advance: references, and the events behind them.
    pub fn waiting(&self) -> usize {
        self.queue.len()
    }

    /// How many delivered ids are kept beyond `S` (memory held by the dedupe set, and rows the
    /// next advance reads again).
    pub fn delivered_beyond(&self) -> usize {
        self.delivered.len()
    }

    fn is_seen(&self, id: Uuid, xid: u64) -> bool {
        self.snapshot.is_visible(xid) || self.delivered.contains_key(&id)
    }

    fn settle(&mut self, id: Uuid, xid: u64) {
        let heard = self.heard;
        self.delivered.insert(id, Settled { xid, heard });
    }

    fn deliver(&mut self, event: Event, notified: bool, out: &mut Vec<Step>) {
        self.settle(event.id(), event.xid());
        out.push(Step::Deliver { event, notified });
    }

    /// Settles a row that cannot be delivered, and reports it.
    fn skip(&mut self, unreadable: Unreadable, out: &mut Vec<Step>) {
        self.settle(unreadable.id, unreadable.xid);
        out.push(Step::Unreadable(unreadable));
    }

    fn enqueue(&mut self, pending: Pending) {
        self.queued.insert(pending.id());
        self.queue.push_back(pending);
        self.heard_at.push_back(self.heard);
    }

    /// A live notification: deliver it now (inline, nothing ahead of it), queue it, or drop it
    /// as a duplicate.
    pub fn on_notice(&mut self, notice: Notice, out: &mut Vec<Step>) {
        self.heard += 1;
        if self.is_seen(notice.id, notice.xid) || self.queued.contains(&notice.id) {
            out.push(Step::Duplicate);
            return;
        }
        if self.queue.len() >= MAX_WAITING {
            out.push(Step::Overflow);
            return;
        }
        if notice.payload.is_none() {
            self.enqueue(Pending::Reference(notice));
            return;
        }
        let Some(event) = incoming::into_event(notice) else {
            return;
        };
        if self.queue.is_empty() {
            self.deliver(event, true, out);
        } else {
            self.enqueue(Pending::Ready(event));
        }
    }

    /// An advance's result: delivers the queued rows it settles (in notification order), then
    /// the rows it found that no notification announced (in xid order), then moves `S`.
    ///
    /// `heard_before` is [`Cursor::heard`] when the advance's query was sent: every notice
    /// counted in it had its transaction visible to the query's snapshot, if it is genuine.
    pub fn on_advance(&mut self, visible: Visible, heard_before: u64, out: &mut Vec<Step>) {
        let Visible {
            snapshot: next,
            pruned_through_xid,
            rows,
            page_end: _,
        } = visible;
        if self.may_have_lost_to_pruning(&next, pruned_through_xid) {
            out.push(Step::Gap(Gap::Pruned {
                pruned_through_xid,
                cursor_xmin: self.snapshot.xmin(),
            }));
        }

        let mut found: HashMap<Uuid, Row> = HashMap::with_capacity(rows.len());
        let mut order = Vec::with_capacity(rows.len());
        for row in rows {
            let RowKey { xid, id } = RowKey::of(&row);
            if !self.is_seen(id, xid) && !found.contains_key(&id) {
                order.push(id);
                found.insert(id, row);
            }
        }

        let mut later = VecDeque::new();
        let mut later_heard = VecDeque::new();
        let heard_at = std::mem::take(&mut self.heard_at);
        for (pending, heard) in std::mem::take(&mut self.queue).into_iter().zip(heard_at) {
            if !next.is_visible(pending.xid()) {
                if heard <= heard_before {
                    self.queued.remove(&pending.id());
                    out.push(Step::Forged);
                } else {
                    later.push_back(pending);
                    later_heard.push_back(heard);
                }
                continue;
            }
            self.queued.remove(&pending.id());
            let id = pending.id();
            let row = found.remove(&id);
            if self.delivered.contains_key(&id) {
                out.push(Step::Duplicate);
                continue;
            }
            match (pending, row) {
                (Pending::Ready(event), _) => self.deliver(event, true, out),
                (Pending::Reference(_), Some(Ok(event))) => self.deliver(event, true, out),
                (Pending::Reference(_), Some(Err(unreadable))) => self.skip(unreadable, out),
                // Committed (visible in the advance's snapshot), not there, and beyond what
                // pruning has removed: no such row was published.
                (Pending::Reference(notice), None) if notice.xid > pruned_through_xid => {
                    out.push(Step::Forged)
                }
                (Pending::Reference(notice), None) => {
                    // Not there, and pruning has reached its transaction: removed before the
                    // relay could read it.
                    out.push(Step::Gap(Gap::Missing {
                        id: notice.id,
                        channel: notice.channel,
                        user_id: notice.user_id,
                    }));
                }
            }
        }
        for id in order {
            match found.remove(&id) {
                Some(Ok(event)) => self.deliver(event, false, out),
                Some(Err(unreadable)) => self.skip(unreadable, out),
                None => {}
            }
        }

        // Ids delivered beyond the new snapshot stay for the dedupe, but not those whose xid
        // it should see and cannot: forged inline notices, which would otherwise stay forever.
        let (delivered, witnesses) = (&mut self.delivered, &mut self.witnesses);
        delivered.retain(|id, settled| {
            if next.is_visible(settled.xid) {
                witnesses.add(RowKey {
                    xid: settled.xid,
                    id: *id,
                });
                return false;
            }
            settled.heard > heard_before
        });
        self.snapshot = next;
        self.queue = later;
        self.heard_at = later_heard;
        self.pump(out);
    }

    /// Whether rows the cursor has not read may have been pruned, given the greatest pruned xid.
    ///
    /// Rows are pruned by age, so a transaction running in `S` that commits late can have its
    /// rows pruned at once, even below greater xids the cursor already saw. Such a transaction
    /// has ended by the advance's snapshot `next` (rows of one still running cannot have been
    /// pruned); any that is at or below the pruned xid may have lost rows. So may every xid
    /// from `S`'s `xmax` on, which the cursor never saw.
    fn may_have_lost_to_pruning(&self, next: &Snapshot, pruned_through_xid: u64) -> bool {
        pruned_through_xid >= self.snapshot.xmax()
            || self
                .snapshot
                .xip()
                .iter()
                .take_while(|&&xid| xid <= pruned_through_xid)
                .any(|&xid| next.is_visible(xid))
    }

    /// Delivers the ready events at the head of the queue.
    fn pump(&mut self, out: &mut Vec<Step>) {
        while let Some(Pending::Ready(_)) = self.queue.front() {
            let Some(Pending::Ready(event)) = self.queue.pop_front() else {
                break;
            };
            self.heard_at.pop_front();
            self.queued.remove(&event.id());
            if self.is_seen(event.id(), event.xid()) {
                out.push(Step::Duplicate);
            } else {
                self.deliver(event, true, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    fn snap(text: &str) -> Snapshot {
        text.parse().unwrap()
    }

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn event(n: u128, xid: u64) -> Event {
        Event::new(
            id(n),
            "chat".into(),
            "u1".into(),
            None,
            xid,
            SystemTime::UNIX_EPOCH,
            serde_json::json!({ "n": n as u64 }),
        )
    }

    fn notice(n: u128, xid: u64, inline: bool) -> Notice {
        Notice {
            id: id(n),
            channel: "chat".into(),
            user_id: "u1".into(),
            origin: None,
            xid,
            created_at: SystemTime::UNIX_EPOCH,
            payload: inline.then(|| serde_json::json!({ "n": n as u64 })),
        }
    }

    fn advance(snapshot: &str, pruned: u64, rows: &[(u128, u64)]) -> Visible {
        Visible {
            snapshot: snap(snapshot),
            pruned_through_xid: pruned,
            rows: rows.iter().map(|&(n, xid)| Ok(event(n, xid))).collect(),
            page_end: None,
        }
    }

    #[test]
    fn an_unreadable_row_is_settled_and_reported_once() {
        let mut cursor = Cursor::new(snap("100:100:"));
        let mut out = Vec::new();
        cursor.on_notice(notice(1, 100, false), &mut out);
        let unreadable = |n: u128, xid: u64| {
            Err(Unreadable {
                id: id(n),
                xid,
                channel: "chat".into(),
                user_id: "u1".into(),
                reason: "number out of range".into(),
            })
        };
        cursor.on_advance(
            Visible {
                snapshot: snap("103:103:"),
                pruned_through_xid: 0,
                rows: vec![unreadable(1, 100), unreadable(2, 101), Ok(event(3, 102))],
                page_end: None,
            },
            0,
            &mut out,
        );
        let gaps: Vec<Uuid> = out
            .iter()
            .filter_map(|step| match step {
                Step::Unreadable(row) => Some(row.id),
                _ => None,
            })
            .collect();
        assert_eq!(gaps, vec![id(1), id(2)]);
        assert_eq!(delivered(&out), vec![3]);
        // A late duplicate notification of the unreadable row is dropped.
        let mut later = Vec::new();
        cursor.on_notice(notice(2, 101, false), &mut later);
        assert!(matches!(later.as_slice(), [Step::Duplicate]));
    }

    /// The ids delivered, in order.
    fn delivered(out: &[Step]) -> Vec<u128> {
        out.iter()
            .filter_map(|step| match step {
                Step::Deliver { event, .. } => Some(event.id().as_u128()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn inline_notifications_are_delivered_at_once_and_once() {
        let mut cursor = Cursor::new(snap("100:100:"));
        let mut out = Vec::new();
        cursor.on_notice(notice(1, 100, true), &mut out);
        cursor.on_notice(notice(1, 100, true), &mut out);
        cursor.on_notice(notice(2, 99, true), &mut out); // visible in S: old
        assert_eq!(delivered(&out), [1]);
        assert_eq!(cursor.waiting(), 0);
        // The sweep finds the same row: not delivered again, and the dedupe set shrinks.
        let mut out = Vec::new();
        cursor.on_advance(advance("101:101:", 0, &[(1, 100)]), 0, &mut out);
        assert!(delivered(&out).is_empty());
        assert_eq!(cursor.delivered_beyond(), 0);
    }

    #[test]
    fn notifications_applied_while_an_advance_is_out_are_delivered_once() {
        // The listener keeps applying notifications while an advance's query is out, so its
        // result (read with a snapshot taken before some of them committed) comes after them.
        let mut cursor = Cursor::new(snap("100:100:"));
        let mut out = Vec::new();
        // The advance's snapshot: 100 committed, 101 still running.
        let out_there = advance("100:102:101", 0, &[(1, 100)]);
        cursor.on_notice(notice(1, 100, true), &mut out);
        cursor.on_notice(notice(2, 101, true), &mut out); // committed after that snapshot
        assert_eq!(delivered(&out), [1, 2]);
        let mut out = Vec::new();
        cursor.on_advance(out_there, 0, &mut out);
        assert!(delivered(&out).is_empty());
        // 101 is beyond the new snapshot: still remembered, and not delivered again by the next.
        assert_eq!(cursor.delivered_beyond(), 1);
        cursor.on_advance(advance("102:102:", 0, &[(2, 101)]), 0, &mut out);
        assert!(delivered(&out).is_empty());
        assert_eq!(cursor.delivered_beyond(), 0);
    }

    #[test]
    fn references_are_fetched_by_one_advance_in_notification_order() {
        let mut cursor = Cursor::new(snap("100:100:"));
        let mut out = Vec::new();
        // Commit order 102, 100, 101 (xids assigned in another order).
        cursor.on_notice(notice(3, 102, false), &mut out);
        cursor.on_notice(notice(1, 100, false), &mut out);
        cursor.on_notice(notice(2, 101, true), &mut out); // inline, queued behind references
        assert!(out.is_empty());
        assert!(cursor.waiting() > 0);
        cursor.on_advance(
            advance("103:103:", 0, &[(1, 100), (2, 101), (3, 102)]),
            0,
            &mut out,
        );
        assert_eq!(delivered(&out), [3, 1, 2]);
        assert_eq!(cursor.waiting(), 0);
    }

    #[test]
    fn a_reference_committed_after_the_advance_snapshot_waits_for_the_next() {
        let mut cursor = Cursor::new(snap("100:100:"));
        let mut out = Vec::new();
        cursor.on_notice(notice(1, 100, false), &mut out);
        cursor.on_notice(notice(2, 101, false), &mut out);
        cursor.on_notice(notice(3, 102, true), &mut out);
        // The advance's snapshot sees 100 only; 101 and 102 were still running.
        cursor.on_advance(advance("101:103:101,102", 0, &[(1, 100)]), 0, &mut out);
        assert_eq!(delivered(&out), [1]);
        assert!(cursor.waiting() > 0);
        cursor.on_advance(advance("103:103:", 0, &[(2, 101), (3, 102)]), 0, &mut out);
        assert_eq!(delivered(&out), [1, 2, 3]);
    }

    #[test]
    fn rows_no_notification_announced_are_caught_up_in_xid_order() {
        let mut cursor = Cursor::new(snap("100:100:"));
        let mut out = Vec::new();
        cursor.on_advance(advance("103:103:", 0, &[(1, 100), (2, 101)]), 0, &mut out);
        assert!(matches!(
            out[0],
            Step::Deliver {
                notified: false,
                ..
            }
        ));
        assert_eq!(delivered(&out), [1, 2]);
        // Their notifications arrive afterwards: duplicates.
        let mut out = Vec::new();
        cursor.on_notice(notice(1, 100, true), &mut out);
        cursor.on_notice(notice(2, 101, false), &mut out);
        assert!(out.iter().all(|s| matches!(s, Step::Duplicate)));
        assert_eq!(cursor.waiting(), 0);
    }

    #[test]
    fn a_transaction_open_across_the_cursor_is_delivered_when_it_commits() {
        // S taken while 100 was running: 101 committed.
        let mut cursor = Cursor::new(snap("100:102:100"));
        let mut out = Vec::new();
        cursor.on_notice(notice(2, 101, true), &mut out); // visible in S: old
        assert!(delivered(&out).is_empty());
        // Disconnected; 100 commits meanwhile; the catch-up advance finds it.
        cursor.on_advance(advance("102:102:", 0, &[(1, 100)]), 0, &mut out);
        assert_eq!(delivered(&out), [1]);
    }

    #[test]
    fn every_row_lands_once_whatever_the_commit_order() {
        // Exhaustive over a small model: 6 transactions, xid = assignment order, committed in a
        // permuted order; the relay interleaves notifications (some lost, as if disconnected)
        // and advances whose snapshots are taken at arbitrary points of the commit sequence.
        let base = 1000u64;
        let n = 6usize;
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _round in 0..2000 {
            let mut commit_order: Vec<usize> = (0..n).collect();
            for i in (1..n).rev() {
                commit_order.swap(i, (next() % (i as u64 + 1)) as usize);
            }
            // Snapshot after k commits: xmax = all assigned (base + n), running = uncommitted.
            let snapshot_after = |k: usize| {
                let committed: HashSet<usize> = commit_order[..k].iter().copied().collect();
                let running: Vec<u64> = (0..n)
                    .filter(|t| !committed.contains(t))
                    .map(|t| base + t as u64)
                    .collect();
                let xmin = running.first().copied().unwrap_or(base + n as u64);
                let list: Vec<String> = running.iter().map(u64::to_string).collect();
                snap(&format!("{xmin}:{}:{}", base + n as u64, list.join(",")))
            };
            let mut cursor = Cursor::new(snap(&format!("{base}:{base}:")));
            let mut out = Vec::new();
            for k in 1..=n {
                let t = commit_order[k - 1];
                let roll = next() % 4;
                if roll != 0 {
                    cursor.on_notice(notice(t as u128, base + t as u64, roll == 1), &mut out);
                }
                if next() % 3 == 0 || cursor.waiting() > 0 && next() % 2 == 0 {
                    let s2 = snapshot_after(k);
                    let rows = (0..n)
                        .filter(|&t| {
                            let xid = base + t as u64;
                            s2.is_visible(xid) && !cursor.snapshot().is_visible(xid)
                        })
                        .map(|t| Ok(event(t as u128, base + t as u64)))
                        .collect();
                    cursor.on_advance(
                        Visible {
                            snapshot: s2,
                            pruned_through_xid: 0,
                            rows,
                            page_end: None,
                        },
                        0,
                        &mut out,
                    );
                }
            }
            let rows = (0..n).map(|t| event(t as u128, base + t as u64)).collect();
            let rows: Vec<Event> = rows;
            let rows = rows
                .into_iter()
                .filter(|e| !cursor.snapshot().is_visible(e.xid()))
                .map(Ok)
                .collect();
            cursor.on_advance(
                Visible {
                    snapshot: snapshot_after(n),
                    pruned_through_xid: 0,
                    rows,
                    page_end: None,
                },
                0,
                &mut out,
            );
            let mut got = delivered(&out);
            got.sort_unstable();
            assert_eq!(got, (0..n as u128).collect::<Vec<_>>(), "{commit_order:?}");
            assert!(!out.iter().any(|s| matches!(s, Step::Gap(_))));
            assert_eq!(cursor.waiting(), 0);
            assert_eq!(cursor.delivered_beyond(), 0);
        }
    }

    #[test]
    fn pruning_past_the_cursor_is_a_gap() {
        let mut cursor = Cursor::new(snap("100:105:100,103"));
        let mut out = Vec::new();
        // Pruned rows all below the horizon: nothing lost.
        cursor.on_advance(advance("100:105:100,103", 99, &[]), 0, &mut out);
        // Pruned through a row committed before S (visible): nothing lost.
        cursor.on_advance(advance("100:105:100,103", 102, &[]), 0, &mut out);
        assert!(out.is_empty());
        // Pruned through a transaction that was running in S: it may be lost.
        cursor.on_advance(advance("106:106:", 103, &[]), 0, &mut out);
        assert!(matches!(
            out.as_slice(),
            [Step::Gap(Gap::Pruned {
                pruned_through_xid: 103,
                cursor_xmin: 100
            })]
        ));
        // Checked against the old S only: once past it, no repeat.
        let mut out = Vec::new();
        cursor.on_advance(advance("107:107:", 103, &[]), 0, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn a_late_commit_below_the_pruned_xid_is_a_gap_even_when_that_xid_was_seen() {
        // 100 was running in S; 103 committed before S. The pruner then removed rows through
        // 103, and 100, committed late with old rows, may have been among them.
        let mut cursor = Cursor::new(snap("100:105:100"));
        let mut out = Vec::new();
        cursor.on_advance(advance("106:106:", 103, &[]), 0, &mut out);
        assert!(matches!(out.as_slice(), [Step::Gap(Gap::Pruned { .. })]));
    }

    #[test]
    fn a_reference_no_later_snapshot_can_see_is_forged_and_settled() {
        let mut cursor = Cursor::new(snap("100:100:"));
        let mut out = Vec::new();
        cursor.on_notice(notice(1, 5_000, false), &mut out);
        // An advance sent before the notice was heard may not see it yet: it waits.
        cursor.on_advance(advance("101:101:", 0, &[]), 0, &mut out);
        assert!(out.is_empty());
        assert!(cursor.waiting() > 0);
        // One sent after cannot see it either: its transaction never committed.
        let heard = cursor.heard();
        cursor.on_advance(advance("102:102:", 0, &[]), heard, &mut out);
        assert!(matches!(out.as_slice(), [Step::Forged]));
        assert_eq!(cursor.waiting(), 0);
        // A forged inline notice is delivered (inline events cannot be told from real ones), but
        // its id is not kept once an advance shows it false.
        let mut out = Vec::new();
        cursor.on_notice(notice(2, 9_000, true), &mut out);
        assert_eq!(delivered(&out), [2]);
        let heard = cursor.heard();
        cursor.on_advance(advance("103:103:", 0, &[]), heard, &mut out);
        assert_eq!(cursor.delivered_beyond(), 0);
    }

    #[test]
    fn the_queue_is_bounded_and_what_overflows_is_read_by_the_advance() {
        let mut cursor = Cursor::new(snap("100:100:"));
        let mut out = Vec::new();
        for n in 0..MAX_WAITING as u128 {
            cursor.on_notice(notice(n, 100, false), &mut out);
        }
        let overflow = MAX_WAITING as u128;
        cursor.on_notice(notice(overflow, 101, false), &mut out);
        assert!(matches!(out.as_slice(), [Step::Overflow]));
        assert_eq!(cursor.waiting(), MAX_WAITING);
        let mut out = Vec::new();
        let mut rows: Vec<(u128, u64)> = (0..MAX_WAITING as u128).map(|n| (n, 100)).collect();
        rows.push((overflow, 101));
        cursor.on_advance(advance("102:102:", 0, &rows), 0, &mut out);
        assert_eq!(delivered(&out).len(), MAX_WAITING + 1);
        assert_eq!(delivered(&out).last(), Some(&overflow));
    }

    #[test]
    fn a_rewind_reads_reused_xids_again_and_delivers_nothing_twice() {
        let mut cursor = Cursor::new(snap("100:100:"));
        let mut out = Vec::new();
        cursor.on_advance(
            advance("110:110:", 0, &[(1, 100), (2, 104), (3, 108)]),
            0,
            &mut out,
        );
        assert_eq!(delivered(&out), [1, 2, 3]);
        let mut witnesses: Vec<u64> = cursor.witnesses().iter().map(|w| w.xid).collect();
        witnesses.sort_unstable();
        assert_eq!(witnesses, [100, 104, 108]);
        // The server crashed: 108 is gone, and it hands out 105.. again. Row 2 (xid 104)
        // survived, so the floor is 105.
        cursor.rewind(105);
        assert_eq!(cursor.snapshot().to_string(), "105:105:");
        let mut out = Vec::new();
        // The catch-up reads everything the new snapshot sees from the floor on.
        cursor.on_advance(advance("107:107:", 0, &[(4, 105), (5, 106)]), 0, &mut out);
        assert_eq!(delivered(&out), [4, 5]);
    }

    #[test]
    fn a_notified_row_pruned_before_the_fetch_is_a_missing_gap() {
        let mut cursor = Cursor::new(snap("100:100:"));
        let mut out = Vec::new();
        cursor.on_notice(notice(1, 100, false), &mut out);
        // Pruned through 100: the pruned gap of the cursor, and the missing row.
        cursor.on_advance(advance("101:101:", 100, &[]), 0, &mut out);
        assert!(matches!(
            out.as_slice(),
            [
                Step::Gap(Gap::Pruned { .. }),
                Step::Gap(Gap::Missing { .. })
            ]
        ));
        assert_eq!(cursor.waiting(), 0);
    }

    #[test]
    fn a_notified_row_that_never_was_and_was_not_pruned_is_forged() {
        let mut cursor = Cursor::new(snap("100:100:"));
        let mut out = Vec::new();
        // A committed transaction, named by a reference to a row it never wrote.
        cursor.on_notice(notice(1, 100, false), &mut out);
        cursor.on_advance(advance("101:101:", 99, &[]), 0, &mut out);
        assert!(matches!(out.as_slice(), [Step::Forged]));
        assert_eq!(cursor.waiting(), 0);
    }
}
