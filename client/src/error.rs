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
///
/// Opaque, as `tokio_postgres::Error` is: ask it what went wrong with its predicates
/// ([`code`](Error::code), [`is_standby`](Error::is_standby), [`is_pooler`](Error::is_pooler),
/// …); its message names the fix where there is one, and its [`source`](std::error::Error::source)
/// chain holds the server's or the network's error. What it wraps can change without a
/// breaking release.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct Error(Box<Kind>);

#[derive(Debug, thiserror::Error)]
pub(crate) enum Kind {
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
    #[cfg(feature = "tls")]
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

impl From<Kind> for Error {
    fn from(kind: Kind) -> Error {
        Error(Box::new(kind))
    }
}

impl Error {
    /// The SQLSTATE the server reported, if this error came from the server.
    pub fn code(&self) -> Option<&str> {
        match &*self.0 {
            Kind::Connect(e) | Kind::Query(e) | Kind::ExtensionMissing { source: e, .. } => {
                e.code().map(|c| c.code())
            }
            Kind::Standby => Some(READ_ONLY_SQL_TRANSACTION),
            _ => None,
        }
    }

    /// The server is a hot standby, where LISTEN does not work: point the relay at the primary.
    pub fn is_standby(&self) -> bool {
        matches!(*self.0, Kind::Standby)
    }

    /// LISTEN did not survive to the next transaction: a pooler in transaction mode is between
    /// the relay and PostgreSQL.
    pub fn is_pooler(&self) -> bool {
        matches!(*self.0, Kind::TransactionPooler(_))
    }

    /// The extension is not in the schema the relay looks in.
    pub fn is_extension_missing(&self) -> bool {
        matches!(*self.0, Kind::ExtensionMissing { .. })
    }

    /// A step (connecting, a query) did not finish within its timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(*self.0, Kind::Timeout { .. })
    }

    /// Connecting failed: network, authentication, no such database, TLS refused.
    pub fn is_connect(&self) -> bool {
        matches!(*self.0, Kind::Connect(_))
    }

    /// The relay's configuration is unusable: the connection string, a builder setting, the TLS
    /// settings.
    pub fn is_config(&self) -> bool {
        match *self.0 {
            Kind::ConnectionString(_) | Kind::InvalidConfig(_) => true,
            #[cfg(feature = "tls")]
            Kind::Tls(_) => true,
            _ => false,
        }
    }

    /// The connection closed under the relay (which reconnects by itself once started).
    pub fn is_closed(&self) -> bool {
        matches!(*self.0, Kind::ConnectionLost(_))
    }

    /// `start()` was called on a relay already started.
    pub fn is_already_started(&self) -> bool {
        matches!(*self.0, Kind::AlreadyStarted)
    }

    /// The relay was shut down.
    pub fn is_stopped(&self) -> bool {
        matches!(*self.0, Kind::Stopped)
    }

    /// Classifies a server error met while setting the relay's connection up or querying it.
    pub(crate) fn from_query(err: tokio_postgres::Error, schema: &str) -> Error {
        Error::from(match err.code().map(|c| c.code()) {
            Some(READ_ONLY_SQL_TRANSACTION) => Kind::Standby,
            Some(UNDEFINED_TABLE | INVALID_SCHEMA_NAME) => Kind::ExtensionMissing {
                schema: schema.to_owned(),
                source: err,
            },
            Some(INVALID_SQL_STATEMENT_NAME) => {
                Kind::TransactionPooler("a prepared statement disappeared between transactions")
            }
            _ if err.is_closed() => Kind::ConnectionLost(err.to_string()),
            _ => Kind::Query(err),
        })
    }
}

/// Runs `work` for at most `limit`; past it, fails with a timeout ([`Error::is_timeout`]) that
/// says what was being done.
pub(crate) async fn within<T>(
    limit: Duration,
    doing: &'static str,
    work: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(limit, work)
        .await
        .map_err(|_| Kind::Timeout {
            doing,
            after: limit,
        })?
}
