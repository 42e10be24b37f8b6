//! The advance query: one statement that takes a new snapshot and reads every row it makes
//! visible that the cursor's snapshot did not, along with the prune state.
//!
//! It serves the catch-up after a reconnect, the batched fetch of referenced rows and the idle
//! sweep. The snapshot is taken in the same statement as the row scan (a materialized CTE), so
//! every row visible in it is visible to the scan. The range predicate on `xid` lets the planner
//! use the `event_outbox (xid)` index.

use std::time::SystemTime;

use pg_outbox_wire::{quote_ident, Snapshot};
use tokio_postgres::{Client, Row, Statement};
use uuid::Uuid;

use crate::error::{Error, Kind};
use crate::event::Event;
use crate::rows::{Unreadable, Visible};

/// The advance statement for the extension in `schema`; with `filter_channels`, `$2` is the
/// `text[]` of channels to read. Both snapshots come from the CTE, parsed or taken once, and
/// the new one printed there once: under a generic plan, a cast of `$1` in the WHERE clause
/// would parse it again for every row checked, and a cast of the new snapshot in the select
/// list printed it again for every row returned (a sixth of the query's time at 64 writers).
pub(crate) fn advance_sql(schema: &str, filter_channels: bool) -> String {
    let channel_filter = if filter_channels {
        "AND o.channel = ANY($2::text[])"
    } else {
        ""
    };
    let rows = visible_rows(
        schema,
        &format!(
            "o.xid >= pg_snapshot_xmin(snap.f) \
             AND NOT pg_visible_in_snapshot(o.xid, snap.f) {channel_filter}"
        ),
    );
    rows_sql(
        schema,
        "pg_current_snapshot() AS s, $1::text::pg_snapshot AS f",
        &format!("{rows} ORDER BY o.xid, o.id"),
    )
}

/// A `SELECT` of the rows of `event_outbox` (as `o`) visible in the snapshot `snap.s` of
/// [`rows_sql`] that `conditions` keep, with the columns [`parse`] reads.
pub(crate) fn visible_rows(schema: &str, conditions: &str) -> String {
    format!(
        "SELECT o.id, o.channel, o.user_id, o.payload, o.origin, o.created_at, o.xid \
         FROM {}.event_outbox o \
         WHERE o.xid < pg_snapshot_xmax(snap.s) \
           AND pg_visible_in_snapshot(o.xid, snap.s) \
           AND {conditions}",
        quote_ident(schema)
    )
}

/// The shape of every statement that reads rows for the relay (the advance, a resume's
/// catch-up): `taken` selects, once, in a materialized CTE `snap`, a new snapshot `s` (printed
/// there once too) and whatever else the rows need; then `rows` (built on [`visible_rows`],
/// which may read `snap`), with the prune state. Its columns are what [`parse`] reads; with no
/// row, one row of NULLs carries the snapshot.
pub(crate) fn rows_sql(schema: &str, taken: &str, rows: &str) -> String {
    let schema = quote_ident(schema);
    format!(
        "WITH snap AS MATERIALIZED ( \
             SELECT taken.*, taken.s::text AS s_text FROM (SELECT {taken}) taken) \
         SELECT snap.s_text AS snapshot, \
                COALESCE((SELECT pruned_through_xid::text FROM {schema}.outbox_prune_state LIMIT 1), '0') AS pruned, \
                e.id, e.channel, e.user_id, e.payload::text AS payload, e.origin, e.created_at, \
                e.xid::text AS xid \
         FROM snap LEFT JOIN LATERAL ({rows}) e ON true"
    )
}

/// The statement that reads the starting snapshot (and proves the extension is there).
pub(crate) fn start_sql(schema: &str) -> String {
    let schema = quote_ident(schema);
    format!(
        "SELECT pg_current_snapshot()::text, \
                COALESCE((SELECT pruned_through_xid::text FROM {schema}.outbox_prune_state LIMIT 1), '0')"
    )
}

/// Reads the current snapshot: the relay's starting point.
pub(crate) async fn current(client: &Client, schema: &str) -> Result<Snapshot, Error> {
    let row = client
        .query_one(&start_sql(schema), &[])
        .await
        .map_err(|e| Error::from_query(e, schema))?;
    let text: String = row.try_get(0).map_err(protocol)?;
    text.parse().map_err(protocol)
}

/// Runs one advance from `from`.
pub(crate) async fn advance(
    client: &Client,
    statement: &Statement,
    from: &Snapshot,
    channels: &[String],
    schema: &str,
) -> Result<Visible, Error> {
    let from = from.to_string();
    let rows = if channels.is_empty() {
        client.query(statement, &[&from]).await
    } else {
        client.query(statement, &[&from, &channels]).await
    }
    .map_err(|e| Error::from_query(e, schema))?;
    parse(&rows)
}

pub(crate) fn parse(rows: &[Row]) -> Result<Visible, Error> {
    let first = rows
        .first()
        .ok_or_else(|| Error::from(Kind::Protocol("the advance query returned no row".into())))?;
    let snapshot: String = first.try_get("snapshot").map_err(protocol)?;
    let snapshot: Snapshot = snapshot.parse().map_err(protocol)?;
    let pruned: String = first.try_get("pruned").map_err(protocol)?;
    let pruned_through_xid = parse_xid(&pruned)?;
    let mut events = Vec::with_capacity(rows.len());
    for row in rows {
        let id: Option<Uuid> = row.try_get("id").map_err(protocol)?;
        let Some(id) = id else {
            continue; // the LEFT JOIN's empty side: no rows
        };
        let xid: String = row.try_get("xid").map_err(protocol)?;
        let xid = parse_xid(&xid)?;
        let channel: String = row.try_get("channel").map_err(protocol)?;
        let user_id: String = row.try_get("user_id").map_err(protocol)?;
        // Read as text and parsed here, row by row: a payload serde_json cannot read must cost
        // that row only, not the whole advance.
        let payload: &str = row.try_get("payload").map_err(protocol)?;
        events.push(match serde_json::from_str(payload) {
            Ok(payload) => Ok(Event::new(
                id,
                channel,
                user_id,
                row.try_get("origin").map_err(protocol)?,
                xid,
                row.try_get::<_, SystemTime>("created_at")
                    .map_err(protocol)?,
                payload,
            )),
            Err(err) => Err(Unreadable {
                id,
                xid,
                channel,
                user_id,
                reason: err.to_string(),
            }),
        });
    }
    Ok(Visible {
        snapshot,
        pruned_through_xid,
        rows: events,
        page_end: None,
    })
}

pub(crate) fn parse_xid(text: &str) -> Result<u64, Error> {
    text.parse()
        .map_err(|_| Error::from(Kind::Protocol(format!("not an xid8: {text:?}"))))
}

pub(crate) fn protocol(err: impl std::fmt::Display) -> Error {
    Error::from(Kind::Protocol(err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_is_quoted_and_the_channel_filter_optional() {
        let sql = advance_sql("my \"app\"", true);
        assert!(sql.contains("\"my \"\"app\"\"\".event_outbox"));
        assert!(sql.contains("ANY($2::text[])"));
        assert!(!advance_sql("public", false).contains("$2"));
        assert!(start_sql("x").contains("\"x\".outbox_prune_state"));
    }
}
