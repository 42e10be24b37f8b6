//! The relay's errors.

use std::future::Future;
use std::time::Duration;

/// SQLSTATE `25006` (`read_only_sql_transaction`): what LISTEN says on a hot standby.
const READ_ONLY_SQL_TRANSACTION: &str = "25006";
/// SQLSTATE `42P01` (`undefined_table`).
const UNDEFINED_TABLE: &str = "42P01";
/// SQLSTATE `3F000` (`invalid_schema_name`).
const INVALID_SCHEMA_NAME: &str = "3F000";
/// SQLSTATE `26000` (`invalid_sql_statement_name`): a prepared statement vanished, as through a
/// pooler in transaction mode.
const INVALID_SQL_STATEMENT_NAME: &str = "26000";

/// Everything that can go wrong starting or running a relay.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The connection string did not parse.
    #[error("invalid connection string: {}", detail(.0))]
    ConnectionString(#[source] tokio_postgres::Error),
    /// A builder setting is out of range.
    #[error("invalid relay configuration: {0}")]
    InvalidConfig(&'static str),
    /// Connecting failed (network, authentication, no such database…).
    #[error("could not connect to PostgreSQL: {}", detail(.0))]
    Connect(#[source] tokio_postgres::Error),
    /// A step did not finish in time.
    #[error("timed out after {after:?} while {doing}")]
    Timeout {
        /// What was being done.
        doing: &'static str,
        /// The limit.
        after: Duration,
    },
    /// The server is a hot standby, where LISTEN is refused (SQLSTATE 25006) and notifications
    /// are not replicated.
    #[error(
        "the relay's server is a hot standby (in recovery): LISTEN/NOTIFY does not work there \
         (SQLSTATE 25006); point the relay's connection string at the primary, e.g. add \
         target_session_attrs=read-write"
    )]
    Standby,
    /// LISTEN did not survive to the next transaction: a pooler in transaction mode is between
    /// the relay and PostgreSQL.
    #[error(
        "LISTEN is not in effect on the relay's connection ({0}): a connection pooler in \
         transaction mode (such as PgBouncer pool_mode=transaction) is in between; give the relay \
         a direct connection or a session-mode pool"
    )]
    TransactionPooler(&'static str),
    /// The outbox tables are not where the relay looks.
    #[error(
        "pg_outbox is not installed in schema {schema:?} of this database ({}); run \
         CREATE EXTENSION pg_outbox there, or set the relay's schema to the extension's",
        detail(source)
    )]
    ExtensionMissing {
        /// The schema the relay looked in.
        schema: String,
        /// The server's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The TLS settings are unusable (feature `tls`): the CA certificates did not parse.
    #[error("invalid TLS configuration: {0}")]
    Tls(String),
    /// A query failed.
    #[error("query failed: {}", detail(.0))]
    Query(#[source] tokio_postgres::Error),
    /// The connection closed.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The server sent something the relay does not understand.
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
    /// `start()` was called on a relay that was already started.
    #[error("the relay was already started")]
    AlreadyStarted,
    /// The relay was shut down.
    #[error("the relay is stopped")]
    Stopped,
}

/// A tokio-postgres error with its causes: its own `Display` says only "db error" or "error
/// connecting to server", keeping the server's message and the I/O error in `source()`.
fn detail(err: &tokio_postgres::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl Error {
    /// The SQLSTATE the server reported, if this error came from the server.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Connect(e) | Error::Query(e) | Error::ExtensionMissing { source: e, .. } => {
                e.code().map(|c| c.code())
            }
            Error::Standby => Some(READ_ONLY_SQL_TRANSACTION),
            _ => None,
        }
    }

    /// Classifies a server error met while setting the relay's connection up or querying it.
    pub(crate) fn from_query(err: tokio_postgres::Error, schema: &str) -> Error {
        match err.code().map(|c| c.code()) {
            Some(READ_ONLY_SQL_TRANSACTION) => Error::Standby,
            Some(UNDEFINED_TABLE | INVALID_SCHEMA_NAME) => Error::ExtensionMissing {
                schema: schema.to_owned(),
                source: err,
            },
            Some(INVALID_SQL_STATEMENT_NAME) => {
                Error::TransactionPooler("a prepared statement disappeared between transactions")
            }
            _ if err.is_closed() => Error::ConnectionLost(err.to_string()),
            _ => Error::Query(err),
        }
    }
}

/// Runs `work` for at most `limit`; past it, fails with [`Error::Timeout`] saying what was being
/// done.
pub(crate) async fn within<T>(
    limit: Duration,
    doing: &'static str,
    work: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(limit, work)
        .await
        .map_err(|_| Error::Timeout {
            doing,
            after: limit,
        })?
}
