//! Rows of the outbox as the relay reads them: a [`Row`] (an event, or a row this client cannot
//! parse), the [`RowKey`] that places it in cursors, positions and witnesses, and what one read
//! returns ([`Visible`]), whether an advance or a resume's catch-up made it.

use pg_outbox_wire::Snapshot;
use uuid::Uuid;

use crate::event::{Event, Gap};

/// A row read from the outbox: its event, or why its payload cannot be read.
pub(crate) type Row = Result<Event, Unreadable>;

/// Where a row stands: its transaction's xid, then its id. Ordered that way, which is the
/// order the relay's statements read rows in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct RowKey {
    pub xid: u64,
    pub id: Uuid,
}

impl RowKey {
    pub fn of(row: &Row) -> RowKey {
        match row {
            Ok(event) => RowKey::of_event(event),
            Err(unreadable) => unreadable.key(),
        }
    }

    pub fn of_event(event: &Event) -> RowKey {
        RowKey {
            xid: event.xid(),
            id: event.id(),
        }
    }
}

/// A row whose payload this client cannot parse: settled like any row, reported as a gap.
#[derive(Clone, Debug)]
pub(crate) struct Unreadable {
    pub id: Uuid,
    pub xid: u64,
    pub channel: String,
    pub user_id: String,
    pub reason: String,
}

impl Unreadable {
    pub fn key(&self) -> RowKey {
        RowKey {
            xid: self.xid,
            id: self.id,
        }
    }

    pub fn into_gap(self) -> Gap {
        Gap::Unreadable {
            id: self.id,
            channel: self.channel,
            user_id: self.user_id,
            reason: self.reason,
        }
    }
}

/// What one read of the outbox returns: the snapshot it was taken in, the prune state it read,
/// and the rows visible in that snapshot that it asked for, in [`RowKey`] order.
#[derive(Debug)]
pub(crate) struct Visible {
    pub snapshot: Snapshot,
    pub pruned_through_xid: u64,
    pub rows: Vec<Row>,
    /// Set when the read stopped at the end of a page: only the rows with an xid below it
    /// were read (every one of those, whole transactions).
    pub page_end: Option<u64>,
}
