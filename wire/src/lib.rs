//! What `pg_outbox` puts on the wire, in one place for the extension that writes it and the
//! client, CLI and tests that read it: the notification documents, `pg_snapshot` values, and
//! identifiers quoted for SQL, and the seal of sealed notifications. Free of pgrx and of any I/O, so that every side runs the same
//! code, and the round-trip tests run the real encoder against the real decoder.

pub mod notification;
pub mod seal;
pub mod snapshot;

pub use notification::{
    decode, BatchDocuments, Notice, Notification, NotificationError, CHANNEL,
    INLINE_CANDIDATE_BYTES, NOTIFY_PAYLOAD_LIMIT,
};
pub use seal::{SealKey, SealKeyError, SEALED_DOCUMENT_LIMIT};
pub use snapshot::{Snapshot, SnapshotParseError};

/// `name` quoted as a SQL identifier, as PostgreSQL's `quote_ident` would always quote it.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    #[test]
    fn identifiers_are_quoted_with_their_quotes_doubled() {
        assert_eq!(super::quote_ident("public"), "\"public\"");
        assert_eq!(super::quote_ident("my \"app\""), "\"my \"\"app\"\"\"");
    }
}
