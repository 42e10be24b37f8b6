//! The errors pg_outbox raises, each with its SQLSTATE decided here, once.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

/// The characters a channel or origin may use, as the error messages tell users.
pub const NAME_CHARACTERS: &str = "letters, digits, '_', '.', ':' and '-'";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OutboxError {
    #[error("{argument} must not be NULL")]
    NullArgument { argument: &'static str },

    #[error("{argument} must not be empty")]
    Empty { argument: &'static str },

    #[error("{argument} is {length} bytes long, longer than the {limit} bytes allowed")]
    TooLong {
        argument: &'static str,
        length: usize,
        limit: usize,
    },

    #[error("{argument} {value:?} contains {character:?}; use only {NAME_CHARACTERS}")]
    BadCharacter {
        argument: &'static str,
        value: String,
        character: char,
    },

    #[error("payload is {size} bytes, over pg_outbox.max_payload_bytes ({limit} bytes)")]
    PayloadTooLarge { size: usize, limit: usize },

    #[error("cannot publish in a read-only transaction")]
    ReadOnlyTransaction,

    #[error("cannot publish on a standby server: it is in recovery and read-only")]
    Standby,

    #[error("older_than must not be negative")]
    NegativeAge,

    #[error("cannot prune in a REPEATABLE READ or SERIALIZABLE transaction")]
    SnapshotIsolation,

    #[error("pg_outbox.notify_payload is 'sealed' but there is no key to seal with: {reason}")]
    SealKey { reason: String },
}

impl OutboxError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            Self::NullArgument { .. } => ERRCODE_NULL_VALUE_NOT_ALLOWED,
            Self::Empty { .. }
            | Self::TooLong { .. }
            | Self::BadCharacter { .. }
            | Self::NegativeAge => ERRCODE_INVALID_PARAMETER_VALUE,
            Self::PayloadTooLarge { .. } => ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            Self::ReadOnlyTransaction | Self::Standby => ERRCODE_READ_ONLY_SQL_TRANSACTION,
            Self::SnapshotIsolation => ERRCODE_INVALID_TRANSACTION_STATE,
            Self::SealKey { .. } => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        }
    }

    fn hint(&self) -> Option<&'static str> {
        match self {
            Self::PayloadTooLarge { .. } => Some(
                "Publish a smaller payload (for example a reference to where the data lives), \
                 or raise pg_outbox.max_payload_bytes.",
            ),
            Self::ReadOnlyTransaction => {
                Some("Publish in a read-write transaction (SET TRANSACTION READ WRITE).")
            }
            Self::Standby => Some("Connect publishers to the primary server."),
            Self::SnapshotIsolation => Some(
                "Call outbox_prune() in a READ COMMITTED transaction of its own: a snapshot \
                 taken at the transaction's start could miss events it drops.",
            ),
            Self::SealKey { .. } => Some(
                "Create a key with SELECT outbox_rotate_seal_key() (as the extension's owner), \
                 or set pg_outbox.notify_payload to 'reference'.",
            ),
            _ => None,
        }
    }

    /// Raises this error in Postgres: the statement and its transaction fail with our SQLSTATE.
    pub fn report(self, function: &'static str) -> ! {
        let mut report = ErrorReport::new(self.sqlstate(), format!("{function}: {self}"), function);
        if let Some(hint) = self.hint() {
            report = report.set_hint(hint);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("an ERROR report does not return")
    }
}
