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
//! query serves them all, reading each topic's rows from the least `xmin` of its own requests'
//! positions (through the `(user_id, xid)` index for a user's). A thousand browsers arriving
//! together cost a few queries, not a thousand, and each reads what its own topic missed.

use std::collections::{BTreeMap, VecDeque};

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

/// The statement of the catch-up. Each topic's rows are read from the xid its own requests
/// need them from, through the index that serves it: `$1` the users wanted and `$2` the xid
/// each one's rows begin at (`text[]`s of the same length; the `(user_id, xid)` index), `$3`
/// and `$4` the same for channels, `$5` the xid every event is read from, or NULL when no
/// request wants every event (both through the `xid` index). So a catch-up costs what its
/// topics missed, not what everyone published since the oldest position in the batch. Each
/// topic's scan stops at a page, as the whole does (the limits make each one a scan of its
/// own, in xid order, whatever the plan): the first [`PAGE_ROWS`] rows by xid and the rest of
/// the last transaction, so a page ends on an xid boundary, and a topic that filled a page has
/// every row below where the whole page ends. The snapshot is taken in the same statement as
/// the scans, as in the advance, whose columns it returns. A row of two topics comes once per
/// topic.
pub(crate) fn catch_up_sql(schema: &str) -> String {
    let page = format!("ORDER BY o.xid FETCH FIRST {PAGE_ROWS} ROWS WITH TIES");
    let topic = |column: &str| {
        let rows = advance::visible_rows(
            schema,
            &format!("o.{column} = w.topic AND o.xid >= w.from_xid::xid8"),
        );
        format!("LATERAL ({rows} {page}) r")
    };
    let everything = advance::visible_rows(schema, "o.xid >= $5::text::xid8");
    advance::rows_sql(
        schema,
        "pg_current_snapshot() AS s",
        &format!(
            "SELECT u.* FROM ( \
                 SELECT r.* FROM unnest($1::text[], $2::text[]) AS w(topic, from_xid), {} \
                 UNION ALL \
                 SELECT r.* FROM unnest($3::text[], $4::text[]) AS w(topic, from_xid), {} \
                 UNION ALL ({everything} {page})) u \
             ORDER BY u.xid FETCH FIRST {PAGE_ROWS} ROWS WITH TIES",
            topic("user_id"),
            topic("channel"),
        ),
    )
}

/// The rows a set of requests may need: for each user and channel, and for every event,
/// from the least xid their requests need (the xmin of each position, carried over to the
/// current server run as it will be answered, or where its last page ended); each request then
/// keeps its own.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Wanted {
    users: BTreeMap<String, u64>,
    channels: BTreeMap<String, u64>,
    everything: Option<u64>,
}

impl Wanted {
    pub fn of(requests: &[ResumeRequest], answering: &Answering) -> Wanted {
        let mut wanted = Wanted::default();
        for request in requests {
            // A position that will be reset needs no row.
            let Ok(base) = answering.carry_over(&request.position) else {
                continue;
            };
            let from = base.snapshot().xmin().max(request.read_from);
            let least = match (&request.filter.user_id, &request.filter.channel) {
                (Some(user), _) => wanted.users.entry(user.clone()).or_insert(from),
                (None, Some(channel)) => wanted.channels.entry(channel.clone()).or_insert(from),
                (None, None) => wanted.everything.get_or_insert(from),
            };
            *least = (*least).min(from);
        }
        wanted
    }
}

/// Runs the catch-up query for `wanted`.
pub(crate) async fn query(
    client: &Client,
    wanted: &Wanted,
    schema: &str,
) -> Result<Visible, Error> {
    let topics = |bounds: &BTreeMap<String, u64>| -> (Vec<String>, Vec<String>) {
        bounds
            .iter()
            .map(|(topic, from)| (topic.clone(), from.to_string()))
            .unzip()
    };
    let (users, users_from) = topics(&wanted.users);
    let (channels, channels_from) = topics(&wanted.channels);
    let everything_from = wanted.everything.map(|from| from.to_string());
    let params: [&(dyn ToSql + Sync); 5] = [
        &users,
        &users_from,
        &channels,
        &channels_from,
        &everything_from,
    ];
    let rows = client
        .query(&catch_up_sql(schema), &params)
        .await
        .map_err(|e| Error::from_query(e, schema))?;
    let mut read = advance::parse(&rows)?;
    let full = read.rows.len() >= PAGE_ROWS;
    read.rows.sort_unstable_by_key(RowKey::of);
    read.rows.dedup_by_key(|row| RowKey::of(row));
    if full {
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

    /// Answering on run 1, which the relay started on.
    fn on_run_1(policy: &Policy) -> Answering<'_> {
        Answering {
            epoch: 1,
            generation: 0,
            recorded: &[],
            changes: &[],
            policy,
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
        let answering = on_run_1(&policy);
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
        assert_eq!(
            Wanted::of(&requests, &answering).users,
            BTreeMap::from([("u1".to_owned(), 150)])
        );
        assert_eq!(Wanted::of(&requests[1..], &answering), Wanted::default());
    }

    #[test]
    fn a_page_covers_the_xids_below_its_end_and_the_next_reads_from_there() {
        let policy = Policy::default();
        let answering = on_run_1(&policy);
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
        assert_eq!(Wanted::of(&[next], &answering).users["u1"], 111);
    }

    #[test]
    fn each_topic_is_read_from_what_its_own_requests_need() {
        let policy = Policy::default();
        let answering = on_run_1(&policy);
        let channel = |name: &str, position: Position| ResumeRequest {
            filter: Filter {
                channel: Some(name.into()),
                user_id: None,
            },
            ..request("-", position)
        };
        let everything = |position: Position| ResumeRequest {
            filter: Filter {
                channel: None,
                user_id: None,
            },
            ..request("-", position)
        };
        // An old token for u1 does not make u2 or the channel read from its xmin.
        let requests = [
            request("u1", position(1, "100:100:", &[])),
            request("u1", position(1, "900:900:", &[])),
            request("u2", position(1, "950:960:955", &[])),
            channel("news", position(1, "980:980:", &[])),
            everything(position(1, "990:990:", &[])),
        ];
        let wanted = Wanted::of(&requests, &answering);
        assert_eq!(
            wanted.users,
            BTreeMap::from([("u1".to_owned(), 100), ("u2".to_owned(), 950)])
        );
        assert_eq!(wanted.channels, BTreeMap::from([("news".to_owned(), 980)]));
        assert_eq!(wanted.everything, Some(990));
    }
}
