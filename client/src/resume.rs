//! Resuming a subscription from a [`Position`]: one query reads, for every subscription that
//! asked since the last one, the events its position has not seen.
//!
//! The subscription is filed with the fan-out *before* its request is sent, so its queue
//! collects every event the relay hands over from then on. The query then takes a fresh
//! snapshot *Q*: every event the relay handed over before the subscription was filed had
//! committed by then, so *Q* sees it. The subscription hands out the rows the query read
//! (visible in *Q*, not covered by its position), then joins *Q* into its position, and reads
//! its queue, where the live copies of those rows are now covered: every committed event is
//! handed out once, whichever replica issued the position.
//!
//! Resumes are coalesced: while a query is out, the requests that arrive wait, and the next
//! query serves them all, reading from the least `xmin` of their positions with their topics'
//! users and channels. A thousand browsers arriving together cost a few queries, not a thousand.

use std::collections::VecDeque;

use tokio::sync::oneshot;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use crate::advance;
use crate::error::Error;
use crate::event::ResetReason;
use crate::history::{self, RecordedRun};
use crate::policy::Policy;
use crate::position::{Position, RunChange, Watermark};
use crate::rows::{Row, RowKey, Visible};
use crate::topic::Filter;

/// At most this many rows (and the rest of the last transaction) are read for one catch-up
/// query: a subscription that missed more gets them a page at a time, so what a catch-up
/// holds in memory is bounded whatever the backlog.
pub(crate) const PAGE_ROWS: usize = 1_000;

/// A subscription's request to resume from `position`.
pub(crate) struct ResumeRequest {
    pub filter: Filter,
    pub position: Position,
    /// The xid the rows it still needs begin at, when an earlier page of its catch-up read
    /// those below (what committed below it since comes in its queue); 0 otherwise.
    pub read_from: u64,
    pub answer: oneshot::Sender<Result<CatchUp, ResetReason>>,
}

/// What a resumed subscription hands out before its queue: `rows` (those its position had not
/// seen, in `(xid, id)` order: events, and the unreadable ones as gaps), from `base` (its
/// position, carried over to the current server run if it was issued on an earlier one), after
/// which it joins `until` (the query's snapshot).
#[derive(Debug)]
pub(crate) struct CatchUp {
    pub base: Position,
    pub rows: VecDeque<Row>,
    pub until: Watermark,
    /// The xid of the last row handed out from `rows`.
    pub replayed_xid: Option<u64>,
    /// Where the next page begins, when the query stopped at the end of one: `until` covers
    /// only the xids below it, and the subscription asks again from there.
    pub next_page: Option<u64>,
}

/// The statement of the catch-up: `$1` is the least xmin, as text, then the users wanted and
/// the channels wanted (`text[]`), each only if some request filters on it; none when some
/// request wants every event. The snapshot is taken in the same statement as the scan, as in
/// the advance, whose columns it returns. Leaving out the filters no request needs lets the
/// planner read `(user_id, xid)` or `(channel, xid)` indexes, where a deployment has them.
pub(crate) fn catch_up_sql(schema: &str, users: bool, channels: bool, everything: bool) -> String {
    let filter = match (everything, users, channels) {
        (true, _, _) => "",
        (false, true, true) => "AND (user_id = ANY($2::text[]) OR channel = ANY($3::text[]))",
        (false, true, false) => "AND user_id = ANY($2::text[])",
        (false, false, true) => "AND channel = ANY($2::text[])",
        (false, false, false) => "AND false",
    };
    // WITH TIES: a page ends with a whole transaction, so its end is an xid boundary.
    advance::rows_visible_sql_ordered(
        schema,
        "pg_current_snapshot() AS s",
        &format!("xid >= $1::text::xid8 {filter}"),
        &format!("ORDER BY xid FETCH FIRST {PAGE_ROWS} ROWS WITH TIES"),
    )
}

/// The rows a set of requests may need: from the least xmin of their positions (carried over
/// to the current server run, as they will be answered), of their users and channels (each
/// request then keeps its own).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Wanted {
    from: u64,
    users: Vec<String>,
    channels: Vec<String>,
    everything: bool,
}

impl Wanted {
    pub fn of(requests: &[ResumeRequest], answering: &Answering) -> Wanted {
        let mut wanted = Wanted {
            // A position that will be reset needs no row.
            from: requests
                .iter()
                .filter_map(|request| {
                    let base = answering.carry_over(&request.position).ok()?;
                    Some(base.snapshot().xmin().max(request.read_from))
                })
                .min()
                .unwrap_or(u64::MAX),
            ..Wanted::default()
        };
        for request in requests {
            match (&request.filter.user_id, &request.filter.channel) {
                (Some(user), _) => wanted.users.push(user.clone()),
                (None, Some(channel)) => wanted.channels.push(channel.clone()),
                (None, None) => wanted.everything = true,
            }
        }
        wanted.users.sort_unstable();
        wanted.users.dedup();
        wanted.channels.sort_unstable();
        wanted.channels.dedup();
        wanted
    }
}

/// Runs the catch-up query for `wanted`.
pub(crate) async fn query(
    client: &Client,
    wanted: &Wanted,
    schema: &str,
) -> Result<Visible, Error> {
    let (users, channels) = if wanted.everything {
        (false, false)
    } else {
        (!wanted.users.is_empty(), !wanted.channels.is_empty())
    };
    let from = wanted.from.to_string();
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&from];
    if users {
        params.push(&wanted.users);
    }
    if channels {
        params.push(&wanted.channels);
    }
    let sql = catch_up_sql(schema, users, channels, wanted.everything);
    let rows = client
        .query(&sql, &params)
        .await
        .map_err(|e| Error::from_query(e, schema))?;
    let mut read = advance::parse(&rows)?;
    read.rows.sort_unstable_by_key(RowKey::of);
    if read.rows.len() >= PAGE_ROWS {
        read.page_end = read.rows.last().map(|row| RowKey::of(row).xid + 1);
    }
    Ok(read)
}

/// What the relay knows when it answers: the current server run, the runs the database recorded
/// and those the relay went through, and its policy (channels relayed, own origin), the live
/// stream's.
pub(crate) struct Answering<'a> {
    pub epoch: u32,
    /// The relay's rewinds so far (see [`Watermark::generation`]).
    pub generation: u64,
    pub recorded: &'a [RecordedRun],
    pub changes: &'a [RunChange],
    pub policy: &'a Policy,
}

impl Answering<'_> {
    /// Answers one request from the catch-up `read` returned.
    pub fn answer(&self, request: &ResumeRequest, read: &Visible) -> Result<CatchUp, ResetReason> {
        let base = self.carry_over(&request.position)?;
        let server = &read.snapshot;
        let position_xmax = base
            .beyond_xids()
            .map(|xid| xid.saturating_add(1))
            .chain([base.snapshot().xmax()])
            .max()
            .unwrap_or(0);
        if position_xmax > server.xmax() {
            return Err(ResetReason::Ahead {
                position_xmax,
                server_xmax: server.xmax(),
            });
        }
        // Every transaction from the position's xmin on is one it may not have seen.
        let pruned = read.pruned_through_xid;
        if pruned != 0 && pruned >= base.snapshot().xmin() {
            return Err(ResetReason::Expired {
                pruned_through_xid: pruned,
                position_xmin: base.snapshot().xmin(),
            });
        }
        let wanted = |channel: &str, user_id: &str| {
            request.filter.matches(channel, user_id) && self.policy.wants(channel)
        };
        let seen = base.seen_beyond();
        let covered = |key: RowKey| base.snapshot().is_visible(key.xid) || seen.contains(&key);
        let rows = read
            .rows
            .iter()
            .filter(|row| {
                let key = RowKey::of(row);
                let wanted = match row {
                    Ok(event) => {
                        wanted(event.channel(), event.user_id())
                            && !self.policy.is_own(event.origin())
                    }
                    Err(unreadable) => wanted(&unreadable.channel, &unreadable.user_id),
                };
                wanted && !covered(key)
            })
            .cloned()
            .collect();
        // A page covers the xids below its end only: what was running below it then commits
        // later, and comes in the subscription's queue.
        let until = match read.page_end {
            Some(end) => server.below(end),
            None => server.clone(),
        };
        Ok(CatchUp {
            base,
            rows,
            replayed_xid: None,
            until: Watermark {
                generation: self.generation,
                ..Watermark::new(self.epoch, until)
            },
            next_page: read.page_end,
        })
    }

    /// `position` on the current server run: as it is if issued on it; if issued on an earlier
    /// run, below where the next run the database recorded began, or else below the floor of
    /// each change since, if this relay went through that run.
    fn carry_over(&self, position: &Position) -> Result<Position, ResetReason> {
        if position.epoch() == self.epoch {
            return Ok(position.clone());
        }
        if let Some(floor) = history::floor_after(self.recorded, position.epoch(), self.epoch) {
            return Ok(position.carried_over(self.epoch, floor));
        }
        let since = self
            .changes
            .iter()
            .position(|change| change.from == position.epoch())
            .ok_or(ResetReason::OtherServerRun)?;
        let floor = self.changes[since..]
            .iter()
            .map(|change| change.floor)
            .min()
            .unwrap_or(0);
        Ok(position.carried_over(self.epoch, floor))
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use uuid::Uuid;

    use super::*;
    use crate::event::Event;
    use pg_outbox_wire::Snapshot;

    fn snap(text: &str) -> Snapshot {
        text.parse().unwrap()
    }

    fn event(n: u128, xid: u64, user: &str) -> Event {
        Event::new(
            Uuid::from_u128(n),
            "chat".into(),
            user.into(),
            None,
            xid,
            SystemTime::UNIX_EPOCH,
            serde_json::Value::Null,
        )
    }

    fn request(user: &str, position: Position) -> ResumeRequest {
        ResumeRequest {
            filter: Filter {
                channel: None,
                user_id: Some(user.into()),
            },
            position,
            read_from: 0,
            answer: oneshot::channel().0,
        }
    }

    fn position(epoch: u32, text: &str, seen: &[(u64, u128)]) -> Position {
        let mut position = Position::at(&Watermark::new(epoch, snap(text)));
        for (xid, n) in seen {
            position.record(RowKey {
                xid: *xid,
                id: Uuid::from_u128(*n),
            });
        }
        position
    }

    fn read(snapshot: &str, pruned: u64, rows: Vec<Event>) -> Visible {
        Visible {
            snapshot: snap(snapshot),
            pruned_through_xid: pruned,
            rows: rows.into_iter().map(Ok).collect(),
            page_end: None,
        }
    }

    fn ids(catch_up: &CatchUp) -> Vec<u128> {
        catch_up
            .rows
            .iter()
            .filter_map(|row| row.as_ref().ok().map(|e| e.id().as_u128()))
            .collect()
    }

    #[test]
    fn each_subscription_gets_what_its_own_position_had_not_seen() {
        let policy = Policy::default();
        let answering = Answering {
            epoch: 1,
            generation: 0,
            recorded: &[],
            changes: &[],
            policy: &policy,
        };
        // 101 committed late (after 102); u1 saw 102 beyond its snapshot, u2 saw nothing.
        let rows = vec![
            event(1, 100, "u1"),
            event(2, 101, "u1"),
            event(3, 102, "u1"),
            event(4, 102, "u2"),
        ];
        let read = read("103:103:", 0, rows);
        let u1 = request("u1", position(1, "101:102:101", &[(102, 3)]));
        let u2 = request("u2", position(1, "100:100:", &[]));
        assert_eq!(ids(&answering.answer(&u1, &read).unwrap()), [2]);
        assert_eq!(ids(&answering.answer(&u2, &read).unwrap()), [4]);
    }

    #[test]
    fn positions_that_cannot_resume_exactly_are_reset_with_the_reason() {
        let policy = Policy::default();
        let changes = [RunChange {
            from: 1,
            floor: 150,
        }];
        let answering = Answering {
            epoch: 2,
            generation: 1,
            recorded: &[],
            changes: &changes,
            policy: &policy,
        };
        let read = read("200:200:", 120, vec![event(1, 160, "u1")]);
        // Forged, or from a lost history: beyond what the server has assigned.
        assert!(matches!(
            answering.answer(&request("u1", position(2, "300:300:", &[])), &read),
            Err(ResetReason::Ahead {
                position_xmax: 300,
                server_xmax: 200
            })
        ));
        assert!(matches!(
            answering.answer(&request("u1", position(2, "150:150:", &[(250, 9)])), &read),
            Err(ResetReason::Ahead { .. })
        ));
        // Older than what was pruned.
        assert!(matches!(
            answering.answer(&request("u1", position(2, "110:110:", &[])), &read),
            Err(ResetReason::Expired {
                pruned_through_xid: 120,
                position_xmin: 110
            })
        ));
        // A run this relay never saw.
        assert!(matches!(
            answering.answer(&request("u1", position(7, "130:130:", &[])), &read),
            Err(ResetReason::OtherServerRun)
        ));
        // A run it went through: carried over below the floor, so 160 (from the new history)
        // is delivered although the old position had seen an xid 160.
        let carried = answering
            .answer(&request("u1", position(1, "170:170:", &[])), &read)
            .unwrap();
        assert_eq!(carried.base.snapshot().to_string(), "150:150:");
        assert_eq!(ids(&carried), [1]);
        // The query reads from where the carried-over position stands, not the old one.
        let requests = [
            request("u1", position(1, "170:170:", &[])),
            request("u2", position(7, "100:100:", &[])),
        ];
        assert_eq!(Wanted::of(&requests, &answering).from, 150);
        assert_eq!(Wanted::of(&requests[1..], &answering).from, u64::MAX);
    }

    #[test]
    fn a_page_covers_the_xids_below_its_end_and_the_next_reads_from_there() {
        let policy = Policy::default();
        let answering = Answering {
            epoch: 1,
            generation: 0,
            recorded: &[],
            changes: &[],
            policy: &policy,
        };
        let mut page = read(
            "120:130:125",
            0,
            vec![event(1, 100, "u1"), event(2, 110, "u1")],
        );
        page.page_end = Some(111);
        let first = answering
            .answer(&request("u1", position(1, "100:100:", &[])), &page)
            .unwrap();
        assert_eq!(ids(&first), [1, 2]);
        assert_eq!(first.until.snapshot.to_string(), "111:111:");
        assert_eq!(first.next_page, Some(111));
        // The next page reads from its end, not from the position's xmin.
        let mut next = request("u1", position(1, "100:100:", &[]));
        next.read_from = 111;
        assert_eq!(Wanted::of(&[next], &answering).from, 111);
    }
}
