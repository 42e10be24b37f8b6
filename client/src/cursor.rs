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

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

use crate::event::{Event, Gap};
use crate::notification::Notice;

/// A `pg_snapshot` (text form `xmin:xmax:xip1,xip2,…`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    xmin: u64,
    xmax: u64,
    /// Sorted, each in `xmin..xmax`.
    xip: Vec<u64>,
}

/// A snapshot's text form was not understood.
#[derive(Debug, thiserror::Error)]
#[error("invalid pg_snapshot {text:?}: {reason}")]
pub struct SnapshotParseError {
    text: String,
    reason: &'static str,
}

impl Snapshot {
    /// The oldest transaction id still running in this snapshot: every xid below it is settled.
    pub fn xmin(&self) -> u64 {
        self.xmin
    }

    /// The first transaction id not yet assigned in this snapshot.
    pub fn xmax(&self) -> u64 {
        self.xmax
    }

    /// Whether transaction `xid` had committed (or aborted) when this snapshot was taken, as
    /// `pg_visible_in_snapshot` decides it.
    pub fn is_visible(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && self.xip.binary_search(&xid).is_err())
    }
}

impl FromStr for Snapshot {
    type Err = SnapshotParseError;

    fn from_str(text: &str) -> Result<Snapshot, SnapshotParseError> {
        let err = |reason| SnapshotParseError {
            text: text.chars().take(200).collect(),
            reason,
        };
        let mut parts = text.trim().splitn(3, ':');
        let xmin = parts.next().ok_or_else(|| err("no xmin"))?;
        let xmax = parts.next().ok_or_else(|| err("no xmax"))?;
        let xip = parts.next().ok_or_else(|| err("no xip list"))?;
        let xmin: u64 = xmin.parse().map_err(|_| err("xmin is not a number"))?;
        let xmax: u64 = xmax.parse().map_err(|_| err("xmax is not a number"))?;
        if xmin > xmax {
            return Err(err("xmin is above xmax"));
        }
        let mut list = Vec::new();
        for item in xip.split(',').filter(|s| !s.is_empty()) {
            let xid: u64 = item
                .parse()
                .map_err(|_| err("an xip entry is not a number"))?;
            if xid < xmin || xid >= xmax {
                return Err(err("an xip entry is outside xmin..xmax"));
            }
            list.push(xid);
        }
        list.sort_unstable();
        list.dedup();
        Ok(Snapshot {
            xmin,
            xmax,
            xip: list,
        })
    }
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:", self.xmin, self.xmax)?;
        for (i, xid) in self.xip.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{xid}")?;
        }
        Ok(())
    }
}

/// The result of one advance query: the snapshot it took, the prune state it read and the rows
/// visible in that snapshot but not in the cursor's (ordered by xid, id).
#[derive(Debug)]
pub(crate) struct Advance {
    pub snapshot: Snapshot,
    pub pruned_through_xid: u64,
    pub rows: Vec<Result<Event, Unreadable>>,
}

/// A row whose payload this client cannot parse: settled like any row, reported as a gap.
#[derive(Debug)]
pub(crate) struct Unreadable {
    pub id: Uuid,
    pub xid: u64,
    pub channel: String,
    pub user_id: String,
    pub reason: String,
}

impl Unreadable {
    fn into_gap(self) -> Gap {
        Gap::Unreadable {
            id: self.id,
            channel: self.channel,
            user_id: self.user_id,
            reason: self.reason,
        }
    }
}

fn row_key(row: &Result<Event, Unreadable>) -> (Uuid, u64) {
    match row {
        Ok(event) => (event.id(), event.xid()),
        Err(unreadable) => (unreadable.id, unreadable.xid),
    }
}

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

/// The relay's position in the outbox.
#[derive(Debug)]
pub(crate) struct Cursor {
    snapshot: Snapshot,
    /// Ids delivered whose xid is not visible in `snapshot`, with their xid.
    delivered: HashMap<Uuid, u64>,
    /// Notified rows not yet delivered, in notification (= commit) order. Its head is never
    /// `Ready`: ready events are delivered as soon as nothing is ahead of them.
    queue: VecDeque<Pending>,
    queued: HashSet<Uuid>,
}

impl Cursor {
    /// A cursor at `snapshot`: everything visible in it counts as delivered.
    pub fn new(snapshot: Snapshot) -> Cursor {
        Cursor {
            snapshot,
            delivered: HashMap::new(),
            queue: VecDeque::new(),
            queued: HashSet::new(),
        }
    }

    /// The snapshot `S`.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Whether a reference is waiting to be fetched (an advance resolves it).
    pub fn needs_advance(&self) -> bool {
        !self.queue.is_empty()
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

    fn deliver(&mut self, event: Event, notified: bool, out: &mut Vec<Step>) {
        self.delivered.insert(event.id(), event.xid());
        out.push(Step::Deliver { event, notified });
    }

    /// Settles a row that cannot be delivered, and reports it.
    fn skip(&mut self, unreadable: Unreadable, out: &mut Vec<Step>) {
        self.delivered.insert(unreadable.id, unreadable.xid);
        out.push(Step::Gap(unreadable.into_gap()));
    }

    /// A live notification: deliver it now (inline, nothing ahead of it), queue it, or drop it
    /// as a duplicate.
    pub fn on_notice(&mut self, notice: Notice, out: &mut Vec<Step>) {
        if self.is_seen(notice.id, notice.xid) || self.queued.contains(&notice.id) {
            out.push(Step::Duplicate);
            return;
        }
        if notice.payload.is_none() {
            self.queued.insert(notice.id);
            self.queue.push_back(Pending::Reference(notice));
            return;
        }
        let Some(event) = notice.into_event() else {
            return;
        };
        if self.queue.is_empty() {
            self.deliver(event, true, out);
        } else {
            self.queued.insert(event.id());
            self.queue.push_back(Pending::Ready(event));
        }
    }

    /// An advance's result: delivers the queued rows it settles (in notification order), then
    /// the rows it found that no notification announced (in xid order), then moves `S`.
    pub fn on_advance(&mut self, advance: Advance, out: &mut Vec<Step>) {
        let Advance {
            snapshot: next,
            pruned_through_xid,
            rows,
        } = advance;
        if pruned_through_xid >= self.snapshot.xmin && !self.snapshot.is_visible(pruned_through_xid)
        {
            out.push(Step::Gap(Gap::Pruned {
                pruned_through_xid,
                cursor_xmin: self.snapshot.xmin,
            }));
        }

        let mut found: HashMap<Uuid, Result<Event, Unreadable>> =
            HashMap::with_capacity(rows.len());
        let mut order = Vec::with_capacity(rows.len());
        for row in rows {
            let (id, xid) = row_key(&row);
            if !self.is_seen(id, xid) && !found.contains_key(&id) {
                order.push(id);
                found.insert(id, row);
            }
        }

        let mut later = VecDeque::new();
        for pending in std::mem::take(&mut self.queue) {
            if !next.is_visible(pending.xid()) {
                later.push_back(pending);
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
                (Pending::Reference(notice), None) => {
                    // Committed (visible in the advance's snapshot), yet not there: removed
                    // before the relay could read it.
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

        self.delivered.retain(|_, xid| !next.is_visible(*xid));
        self.snapshot = next;
        self.queue = later;
        self.pump(out);
    }

    /// Delivers the ready events at the head of the queue.
    fn pump(&mut self, out: &mut Vec<Step>) {
        while let Some(Pending::Ready(_)) = self.queue.front() {
            let Some(Pending::Ready(event)) = self.queue.pop_front() else {
                break;
            };
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

    fn advance(snapshot: &str, pruned: u64, rows: &[(u128, u64)]) -> Advance {
        Advance {
            snapshot: snap(snapshot),
            pruned_through_xid: pruned,
            rows: rows.iter().map(|&(n, xid)| Ok(event(n, xid))).collect(),
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
            Advance {
                snapshot: snap("103:103:"),
                pruned_through_xid: 0,
                rows: vec![unreadable(1, 100), unreadable(2, 101), Ok(event(3, 102))],
            },
            &mut out,
        );
        let gaps: Vec<Uuid> = out
            .iter()
            .filter_map(|step| match step {
                Step::Gap(Gap::Unreadable { id, .. }) => Some(*id),
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
    fn parses_and_prints_snapshots() {
        let s = snap("10:20:12,15");
        assert_eq!((s.xmin(), s.xmax()), (10, 20));
        assert_eq!(s.to_string(), "10:20:12,15");
        assert_eq!(snap("5:5:").to_string(), "5:5:");
        assert_eq!(snap("10:20:15,12,12").to_string(), "10:20:12,15");
        for bad in [
            "", "1", "1:2", "a:2:", "3:2:", "1:5:7", "1:5:0", "1:5:x", "-1:5:",
        ] {
            assert!(bad.parse::<Snapshot>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn visibility_follows_pg_visible_in_snapshot() {
        let s = snap("10:20:12,15");
        for (xid, visible) in [
            (0, true),
            (9, true),
            (10, true),
            (11, true),
            (12, false),
            (15, false),
            (19, true),
            (20, false),
            (u64::MAX, false),
        ] {
            assert_eq!(s.is_visible(xid), visible, "xid {xid}");
        }
        // xmin itself is normally in the xip list; when not, it is visible.
        let s = snap("10:20:10");
        assert!(!s.is_visible(10));
        assert!(s.is_visible(11));
    }

    #[test]
    fn inline_notifications_are_delivered_at_once_and_once() {
        let mut cursor = Cursor::new(snap("100:100:"));
        let mut out = Vec::new();
        cursor.on_notice(notice(1, 100, true), &mut out);
        cursor.on_notice(notice(1, 100, true), &mut out);
        cursor.on_notice(notice(2, 99, true), &mut out); // visible in S: old
        assert_eq!(delivered(&out), [1]);
        assert!(!cursor.needs_advance());
        // The sweep finds the same row: not delivered again, and the dedupe set shrinks.
        let mut out = Vec::new();
        cursor.on_advance(advance("101:101:", 0, &[(1, 100)]), &mut out);
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
        cursor.on_advance(out_there, &mut out);
        assert!(delivered(&out).is_empty());
        // 101 is beyond the new snapshot: still remembered, and not delivered again by the next.
        assert_eq!(cursor.delivered_beyond(), 1);
        cursor.on_advance(advance("102:102:", 0, &[(2, 101)]), &mut out);
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
        assert!(cursor.needs_advance());
        cursor.on_advance(
            advance("103:103:", 0, &[(1, 100), (2, 101), (3, 102)]),
            &mut out,
        );
        assert_eq!(delivered(&out), [3, 1, 2]);
        assert!(!cursor.needs_advance());
    }

    #[test]
    fn a_reference_committed_after_the_advance_snapshot_waits_for_the_next() {
        let mut cursor = Cursor::new(snap("100:100:"));
        let mut out = Vec::new();
        cursor.on_notice(notice(1, 100, false), &mut out);
        cursor.on_notice(notice(2, 101, false), &mut out);
        cursor.on_notice(notice(3, 102, true), &mut out);
        // The advance's snapshot sees 100 only; 101 and 102 were still running.
        cursor.on_advance(advance("101:103:101,102", 0, &[(1, 100)]), &mut out);
        assert_eq!(delivered(&out), [1]);
        assert!(cursor.needs_advance());
        cursor.on_advance(advance("103:103:", 0, &[(2, 101), (3, 102)]), &mut out);
        assert_eq!(delivered(&out), [1, 2, 3]);
    }

    #[test]
    fn rows_no_notification_announced_are_caught_up_in_xid_order() {
        let mut cursor = Cursor::new(snap("100:100:"));
        let mut out = Vec::new();
        cursor.on_advance(advance("103:103:", 0, &[(1, 100), (2, 101)]), &mut out);
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
        assert!(!cursor.needs_advance());
    }

    #[test]
    fn a_transaction_open_across_the_cursor_is_delivered_when_it_commits() {
        // S taken while 100 was running: 101 committed.
        let mut cursor = Cursor::new(snap("100:102:100"));
        let mut out = Vec::new();
        cursor.on_notice(notice(2, 101, true), &mut out); // visible in S: old
        assert!(delivered(&out).is_empty());
        // Disconnected; 100 commits meanwhile; the catch-up advance finds it.
        cursor.on_advance(advance("102:102:", 0, &[(1, 100)]), &mut out);
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
                if next() % 3 == 0 || cursor.needs_advance() && next() % 2 == 0 {
                    let s2 = snapshot_after(k);
                    let rows = (0..n)
                        .filter(|&t| {
                            let xid = base + t as u64;
                            s2.is_visible(xid) && !cursor.snapshot().is_visible(xid)
                        })
                        .map(|t| Ok(event(t as u128, base + t as u64)))
                        .collect();
                    cursor.on_advance(
                        Advance {
                            snapshot: s2,
                            pruned_through_xid: 0,
                            rows,
                        },
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
                Advance {
                    snapshot: snapshot_after(n),
                    pruned_through_xid: 0,
                    rows,
                },
                &mut out,
            );
            let mut got = delivered(&out);
            got.sort_unstable();
            assert_eq!(got, (0..n as u128).collect::<Vec<_>>(), "{commit_order:?}");
            assert!(!out.iter().any(|s| matches!(s, Step::Gap(_))));
            assert!(!cursor.needs_advance());
            assert_eq!(cursor.delivered_beyond(), 0);
        }
    }

    #[test]
    fn pruning_past_the_cursor_is_a_gap() {
        let mut cursor = Cursor::new(snap("100:105:100,103"));
        let mut out = Vec::new();
        // Pruned rows all below the horizon: nothing lost.
        cursor.on_advance(advance("100:105:100,103", 99, &[]), &mut out);
        // Pruned through a row committed before S (visible): nothing lost.
        cursor.on_advance(advance("100:105:100,103", 102, &[]), &mut out);
        assert!(out.is_empty());
        // Pruned through a transaction that was running in S: it may be lost.
        cursor.on_advance(advance("106:106:", 103, &[]), &mut out);
        assert!(matches!(
            out.as_slice(),
            [Step::Gap(Gap::Pruned {
                pruned_through_xid: 103,
                cursor_xmin: 100
            })]
        ));
        // Checked against the old S only: once past it, no repeat.
        let mut out = Vec::new();
        cursor.on_advance(advance("107:107:", 103, &[]), &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn a_notified_row_gone_before_the_fetch_is_a_missing_gap() {
        let mut cursor = Cursor::new(snap("100:100:"));
        let mut out = Vec::new();
        cursor.on_notice(notice(1, 100, false), &mut out);
        cursor.on_advance(advance("101:101:", 0, &[]), &mut out);
        assert!(matches!(out.as_slice(), [Step::Gap(Gap::Missing { .. })]));
        assert!(!cursor.needs_advance());
    }
}
