//! Which run of the server's history a connection reached, the runs the database recorded
//! (`outbox_runs`: where each one's transaction ids begin), and, when the run changed, where the
//! history the relay read still holds: from the recorded runs, or else from the witnesses.

use std::time::SystemTime;

use pg_outbox_wire::{quote_ident, Snapshot};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use uuid::Uuid;

use crate::advance::{parse_xid, protocol};
use crate::error::Error;
use crate::rows::RowKey;

/// How many witnesses the relay reads at start: the rows with the greatest xids visible in its
/// starting snapshot.
const START_WITNESSES: i64 = 64;

/// The rows with the greatest xids visible in `snapshot`: the relay's first
/// witnesses (see [`floor`]), so that a relay that has delivered nothing yet still knows which
/// history it started from.
pub(crate) async fn start_witnesses(
    client: &Client,
    snapshot: &Snapshot,
    schema: &str,
) -> Result<Vec<RowKey>, Error> {
    let sql = format!(
        "SELECT xid::text, id FROM {}.event_outbox \
         WHERE pg_visible_in_snapshot(xid, $1::text::pg_snapshot) ORDER BY xid DESC LIMIT $2",
        quote_ident(schema)
    );
    let rows = client
        .query(&sql, &[&snapshot.to_string(), &START_WITNESSES])
        .await
        .map_err(|e| Error::from_query(e, schema))?;
    rows.iter()
        .map(|row| {
            let xid: &str = row.try_get(0).map_err(protocol)?;
            Ok(RowKey {
                xid: parse_xid(xid)?,
                id: row.try_get(1).map_err(protocol)?,
            })
        })
        .collect()
}

/// Which server, and which run of its history, a connection reached: a new system identifier,
/// timeline or start time means transaction ids the relay saw may have been handed out again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServerRun {
    pub system_identifier: String,
    pub timeline: String,
    pub started_at: SystemTime,
}

impl ServerRun {
    /// A short tag of this run, carried in positions: FNV-1a over the three. Two runs colliding
    /// (one in four billion) would let a position of one resume on the other, as if no crash
    /// or failover had happened between them.
    pub fn epoch(&self) -> u32 {
        let started = self
            .started_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos());
        let mut hash: u32 = 0x811c_9dc5;
        let parts = [
            self.system_identifier.as_bytes(),
            b":",
            self.timeline.as_bytes(),
            b":",
            &started.to_le_bytes(),
        ];
        for byte in parts.into_iter().flatten() {
            hash = (hash ^ u32::from(*byte)).wrapping_mul(0x0100_0193);
        }
        hash
    }
}

/// Reads the server's identity and run (all functions any role may call).
pub(crate) async fn server_run(client: &Client, schema: &str) -> Result<ServerRun, Error> {
    let row = client
        .query_one(
            "SELECT (SELECT system_identifier::text FROM pg_control_system()), \
                    substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8), \
                    pg_postmaster_start_time()",
            &[],
        )
        .await
        .map_err(|e| Error::from_query(e, schema))?;
    Ok(ServerRun {
        system_identifier: row.try_get(0).map_err(protocol)?,
        timeline: row.try_get(1).map_err(protocol)?,
        started_at: row.try_get(2).map_err(protocol)?,
    })
}

/// A run of the server as the database recorded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RecordedRun {
    pub epoch: u32,
    /// Where its transaction ids begin: every event committed in it is at or above this xid,
    /// every event of an earlier run that the history holds, below. `None` for the run an
    /// update to 0.6.0 recorded, which may have published before.
    pub floor: Option<u64>,
}

/// Where the first run after `from` began, by `recorded`, when `from` came before `current`
/// there: a position issued on `from` saw nothing at or above it, and below it the history of
/// `current` is the one the position saw (see [`RecordedRun::floor`]). `None` when the record
/// cannot tell: `from` is not in it (a run before the update to 0.6.0, or one the server lost
/// in a failover or restore), or not before `current`.
pub(crate) fn floor_after(recorded: &[RecordedRun], from: u32, current: u32) -> Option<u64> {
    let from_at = recorded.iter().position(|run| run.epoch == from)?;
    let current_at = recorded.iter().position(|run| run.epoch == current)?;
    if from_at >= current_at {
        return None;
    }
    recorded[from_at + 1].floor
}

/// Records the run the connection is in, unless it is, and reads every run the database
/// recorded, oldest first: none from a database whose extension predates 0.6.0.
pub(crate) async fn recorded_runs(
    client: &Client,
    schema: &str,
) -> Result<Vec<RecordedRun>, Error> {
    let sql = format!(
        "SELECT system_identifier, timeline, started_at, floor_xid::text \
         FROM {}.outbox_server_runs()",
        quote_ident(schema)
    );
    let rows = match client.query(&sql, &[]).await {
        Ok(rows) => rows,
        Err(err) if err.code() == Some(&SqlState::UNDEFINED_FUNCTION) => return Ok(Vec::new()),
        Err(err) => return Err(Error::from_query(err, schema)),
    };
    rows.iter()
        .map(|row| {
            let run = ServerRun {
                system_identifier: row.try_get(0).map_err(protocol)?,
                timeline: row.try_get(1).map_err(protocol)?,
                started_at: row.try_get(2).map_err(protocol)?,
            };
            let floor: Option<&str> = row.try_get(3).map_err(protocol)?;
            Ok(RecordedRun {
                epoch: run.epoch(),
                floor: floor.map(parse_xid).transpose()?,
            })
        })
        .collect()
}

/// Where the history the relay read still holds, after the server may have lost part of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Floor {
    /// Every xid below this is the one the relay saw; from it on, none of the rows the relay
    /// covered exists any more.
    Exact(u64),
    /// None of the witnesses exists any more: the history below the least of them is assumed.
    Assumed(u64),
}

/// Finds the floor from the witnesses: one past the greatest xid among those whose
/// row still exists, or was pruned (the prune state is durable, and so is the history it
/// pruned through). A row that survived proves its transaction is in the history the server
/// recovered, and after recovery the server assigns xids only from past the greatest one that
/// history holds: neither that xid nor any below it is handed out again.
pub(crate) async fn floor(
    client: &Client,
    witnesses: &[RowKey],
    schema: &str,
) -> Result<Floor, Error> {
    let schema_q = quote_ident(schema);
    let sql = format!(
        "SELECT (SELECT max(c.xid::xid8)::text FROM unnest($1::uuid[], $2::text[]) AS c(id, xid) \
                  WHERE c.xid::xid8 <= p.pruned \
                     OR EXISTS (SELECT 1 FROM {schema_q}.event_outbox e WHERE e.id = c.id)), \
                p.pruned::text, pg_snapshot_xmax(pg_current_snapshot())::text \
         FROM (SELECT COALESCE((SELECT pruned_through_xid FROM {schema_q}.outbox_prune_state \
                                 LIMIT 1), '0') AS pruned) p"
    );
    let ids: Vec<Uuid> = witnesses.iter().map(|row| row.id).collect();
    let xids: Vec<String> = witnesses.iter().map(|row| row.xid.to_string()).collect();
    let row = client
        .query_one(&sql, &[&ids, &xids])
        .await
        .map_err(|e| Error::from_query(e, schema))?;
    let surviving: Option<&str> = row.try_get(0).map_err(protocol)?;
    let pruned = parse_xid(row.try_get(1).map_err(protocol)?)?;
    // Never above what the server has assigned: from a floor there, the next snapshot's xmax
    // would look as if it went back.
    let assigned = parse_xid(row.try_get(2).map_err(protocol)?)?;
    let pruned_floor = if pruned == 0 { 0 } else { pruned + 1 };
    let least = witnesses.iter().map(|row| row.xid).min();
    Ok(match (surviving, least) {
        (Some(xid), _) => Floor::Exact((parse_xid(xid)? + 1).max(pruned_floor).min(assigned)),
        (None, None) => Floor::Exact(pruned_floor.min(assigned)),
        (None, Some(least)) => Floor::Assumed(least.max(pruned_floor).min(assigned)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(epoch: u32, floor: Option<u64>) -> RecordedRun {
        RecordedRun { epoch, floor }
    }

    #[test]
    fn a_position_is_exact_below_where_the_next_recorded_run_began() {
        // 7 was recorded by the update (no floor), then two restarts.
        let recorded = [run(7, None), run(8, Some(500)), run(9, Some(900))];
        assert_eq!(floor_after(&recorded, 7, 9), Some(500));
        assert_eq!(floor_after(&recorded, 8, 9), Some(900));
        assert_eq!(floor_after(&recorded, 7, 8), Some(500));
        // Not before the current run, or unknown to the record.
        assert_eq!(floor_after(&recorded, 9, 9), None);
        assert_eq!(floor_after(&recorded, 9, 8), None);
        assert_eq!(floor_after(&recorded, 6, 9), None);
        assert_eq!(floor_after(&recorded, 7, 10), None);
        // A run after one recorded without a floor is unknown below it.
        assert_eq!(floor_after(&[run(7, None), run(8, None)], 7, 8), None);
    }
}
