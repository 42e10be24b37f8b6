//! The connection options every command shares, connecting, and server errors explained.

use std::time::Duration;

use anyhow::anyhow;
use pg_outbox_wire::quote_ident;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, NoTls};

/// Where to connect.
#[derive(Debug, clap::Args)]
pub struct Db {
    /// The database: a postgresql:// URL or a libpq-style "host=… dbname=…" string.
    #[arg(long, env = "PG_OUTBOX_DB", value_name = "URL")]
    pub db: String,
    /// The schema pg_outbox was created in (CREATE EXTENSION pg_outbox SCHEMA …).
    #[arg(long, default_value = "public", value_name = "NAME")]
    pub schema: String,
}

impl Db {
    /// The parsed connection settings, with `application_name` defaulting to `name`.
    pub fn config(&self, name: &str) -> anyhow::Result<Config> {
        let mut config: Config = self.db.parse().map_err(|e| {
            anyhow!(
                "--db is not a valid connection string ({e}); use postgresql://user@host:port/dbname \
                 or 'host=… port=… user=… dbname=…'"
            )
        })?;
        if config.get_application_name().is_none() {
            config.application_name(name);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        Ok(config)
    }

    /// Connects; the connection is driven by a spawned task.
    pub async fn connect(&self, name: &str) -> anyhow::Result<Client> {
        let config = self.config(name)?;
        let (client, connection) = config.connect(NoTls).await.map_err(|e| {
            anyhow!(
                "could not connect to PostgreSQL: {}; check --db (host, port, user, dbname) and \
                 that the server is running",
                chain(&e)
            )
        })?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "connection ended");
            }
        });
        Ok(client)
    }

    /// The schema quoted as an SQL identifier.
    pub fn schema_ident(&self) -> String {
        quote_ident(&self.schema)
    }
}

/// An error and its sources, joined with ": " (tokio-postgres keeps the cause of a failed
/// connection in `source()`).
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

/// Quotes `text` as an SQL string literal.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A server error as one line, with what to do for the usual causes.
pub fn explain(err: &tokio_postgres::Error, schema: &str) -> anyhow::Error {
    let Some(db) = err.as_db_error() else {
        return anyhow!("{err}");
    };
    let message = db.message();
    let fix = match db.code() {
        c if *c == SqlState::UNDEFINED_FUNCTION
            || *c == SqlState::UNDEFINED_TABLE
            || *c == SqlState::INVALID_SCHEMA_NAME =>
        {
            format!(
                "; pg_outbox is not installed in schema {schema:?} of this database: run CREATE \
                 EXTENSION pg_outbox there, or pass --schema with the extension's schema"
            )
        }
        c if *c == SqlState::INSUFFICIENT_PRIVILEGE => {
            "; grant this role what it needs (see the README's Privileges section, or run \
             pg-outbox doctor)"
                .to_owned()
        }
        c if *c == SqlState::READ_ONLY_SQL_TRANSACTION => {
            "; connect to the primary (add target_session_attrs=read-write)".to_owned()
        }
        _ => db
            .hint()
            .map(|hint| format!("; {hint}"))
            .unwrap_or_default(),
    };
    anyhow!("{message} (SQLSTATE {}){fix}", db.code().code())
}

/// Runs `sql` with the simple query protocol (which works through any pooler) and returns the
/// first row's columns as text.
pub async fn simple_row(client: &Client, sql: &str) -> anyhow::Result<Vec<Option<String>>> {
    let messages = client
        .simple_query(sql)
        .await
        .map_err(|e| match e.as_db_error() {
            Some(db) => anyhow!("{} (SQLSTATE {})", db.message(), db.code().code()),
            None => anyhow!("{}", chain(&e)),
        })?;
    for message in messages {
        if let tokio_postgres::SimpleQueryMessage::Row(row) = message {
            return Ok((0..row.len())
                .map(|i| row.get(i).map(str::to_owned))
                .collect());
        }
    }
    Err(anyhow!("{sql:?} returned no row"))
}
