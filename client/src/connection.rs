//! The relay's connections: opening the pair it uses (one that only LISTENs, one for its
//! queries), with or without TLS, and the task that drives each and forwards what it says.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};
use tokio_postgres::{AsyncMessage, Client, Config, Connection, NoTls, Notification, Statement};
use tracing::{debug, info_span, Instrument};

use crate::advance;
use crate::backoff::entropy;
use crate::config::Settings;
use crate::error::{within, Error, Kind};
use crate::incoming::CHANNEL;
use crate::keyring::Keyring;
use crate::tls::Tls;

/// How the query connection plans: every statement the relay runs there (the advance, a
/// resume's catch-up, the history checks) reads `event_outbox` and its segments by a range of
/// `xid`, which its indexes serve whatever the tables hold. One generic plan per statement,
/// kept, rather than planning again at each fetch; and no sequential scan in it: a generic plan
/// made while the current segment was empty and vacuumed (a quiet night, a manual `VACUUM`)
/// scanned that segment whole and kept scanning it as it filled, until autovacuum analyzed it
/// (1.84× the server CPU per event, latency growing by the second: BENCHMARKS.md). And no JIT:
/// these statements return in a fraction of a millisecond, and compiling one (which the cost of
/// a disabled scan of `outbox_prune_state`, a table of one row, would set off at every
/// execution) took 300 ms.
pub(crate) const QUERY_SESSION_SETTINGS: &str =
    "SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off; SET jit = off";

/// What a connection's driver task reports.
pub(crate) enum ConnEvent {
    Notification(Notification),
    Closed(Option<tokio_postgres::Error>),
}

/// The relay's two connections to the server: one that only LISTENs, and one for its queries.
///
/// A backend sends notifications only between the statements it runs, so on a single
/// connection every advance held up the notifications behind it for as long as it ran: on a
/// busy server, tens of milliseconds. LISTEN holds before the query connection takes its first
/// snapshot, so every snapshot it takes is younger than the LISTEN.
pub(crate) struct Conn {
    listen: Client,
    /// Shared with the advance under way, which runs alongside the listener's other work.
    pub queries: Arc<Client>,
    /// What both connections say (notifications, and either one's end).
    pub events: mpsc::UnboundedReceiver<ConnEvent>,
    pub drivers: [JoinHandle<()>; 2],
    /// The advance statement, prepared on `queries`.
    pub advance: Statement,
    /// What the database said about sealing when the connection was opened, or since.
    pub keyring: Keyring,
}

impl Conn {
    /// Connects, refuses a standby, LISTENs, then connects for queries, reads the seal keys and
    /// prepares the advance statement.
    pub async fn open(cfg: &Settings) -> Result<Conn, Error> {
        let span = info_span!("pg_outbox_connect", tls = cfg.tls.name());
        Conn::open_inner(cfg).instrument(span).await
    }

    async fn open_inner(cfg: &Settings) -> Result<Conn, Error> {
        let (tx, events) = mpsc::unbounded_channel();
        let connect = || {
            let connecting = connect(&cfg.pg, &cfg.tls, Some(tx.clone()));
            within(cfg.connect_timeout, "connecting", async {
                connecting.await.map_err(|e| Error::from(Kind::Connect(e)))
            })
        };
        let (listen, listen_driver) = connect().await?;
        let (queries, queries_driver) = match connect().await {
            Ok(connected) => connected,
            Err(err) => {
                listen_driver.abort();
                return Err(err);
            }
        };
        let drivers = [listen_driver, queries_driver];
        debug!("connected");
        let schema = cfg.schema.as_str();
        let setup = async {
            let row = queries
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .map_err(|e| Error::from_query(e, schema))?;
            let in_recovery: bool = row
                .try_get(0)
                .map_err(|e| Error::from(Kind::Protocol(e.to_string())))?;
            if in_recovery {
                return Err(Error::from(Kind::Standby));
            }
            listen
                .batch_execute(&format!("LISTEN {CHANNEL}"))
                .await
                .map_err(|e| Error::from_query(e, schema))?;
            queries
                .batch_execute(QUERY_SESSION_SETTINGS)
                .await
                .map_err(|e| Error::from_query(e, schema))?;
            // After LISTEN: a key made since is read again when its first notification
            // does not open.
            let keyring = Keyring::load(&queries, schema).await?;
            let advance = queries
                .prepare(&advance::advance_sql(
                    schema,
                    !cfg.policy.channels().is_empty(),
                ))
                .await
                .map_err(|e| Error::from_query(e, schema))?;
            Ok((advance, keyring))
        };
        let failed = |err| {
            drivers.iter().for_each(JoinHandle::abort);
            Err(err)
        };
        let (advance, keyring) = match within(cfg.connect_timeout, "setting up LISTEN", setup).await
        {
            Ok(prepared) => prepared,
            Err(err) => return failed(err),
        };
        Ok(Conn {
            listen,
            queries: Arc::new(queries),
            events,
            drivers,
            advance,
            keyring,
        })
    }

    /// Proves LISTEN holds across transactions: a notification sent from another session on a
    /// private channel must arrive. Through a pooler in transaction mode it does not.
    pub async fn verify_listen(&mut self, cfg: &Settings) -> Result<(), Error> {
        let channel = format!(
            "pg_outbox_probe_{:016x}",
            entropy(u64::from(std::process::id()))
        );
        let schema = cfg.schema.as_str();
        self.listen
            .batch_execute(&format!("LISTEN {channel}"))
            .await
            .map_err(|e| Error::from_query(e, schema))?;
        let mut probe_cfg = cfg.pg.clone();
        let name = format!("{}_probe", cfg.pg.get_application_name().unwrap_or(""));
        probe_cfg.application_name(&name);
        let (probe, probe_driver) = connect(&probe_cfg, &cfg.tls, None)
            .await
            .map_err(|e| Error::from(Kind::Connect(e)))?;
        let sent = probe
            .execute("SELECT pg_notify($1, 'probe')", &[&channel])
            .await
            .map_err(|e| Error::from_query(e, schema));
        drop(probe);
        if let Err(err) = probe_driver.await {
            debug!(error = %err, "probe connection task ended abnormally");
        }
        sent?;
        let deadline = Instant::now() + cfg.connect_timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(ConnEvent::Notification(n))) if n.channel() == channel => break,
                // Committed before the starting snapshot is taken: not to be delivered.
                Ok(Some(ConnEvent::Notification(_))) => continue,
                Ok(Some(ConnEvent::Closed(err))) => {
                    return Err(Error::from(Kind::ConnectionLost(describe_close(
                        err.as_ref(),
                    ))))
                }
                Ok(None) => {
                    return Err(Error::from(Kind::ConnectionLost(
                        "connection task ended".into(),
                    )))
                }
                Err(_) => {
                    return Err(Error::from(Kind::TransactionPooler(
                        "a notification sent to it from another session never arrived",
                    )))
                }
            }
        }
        self.listen
            .batch_execute(&format!("UNLISTEN {channel}"))
            .await
            .map_err(|e| Error::from_query(e, schema))
    }

    /// Closes both connections and waits (briefly) for their tasks.
    pub async fn close(self) {
        drop((self.listen, self.queries));
        for mut driver in self.drivers {
            if timeout(Duration::from_secs(2), &mut driver).await.is_err() {
                driver.abort();
            }
        }
    }
}

/// Drives the connection and forwards what it says; the only place `poll_message` is called.
async fn drive<S, T>(mut connection: Connection<S, T>, tx: mpsc::UnboundedSender<ConnEvent>)
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let message = std::future::poll_fn(|cx| connection.poll_message(cx)).await;
        let event = match message {
            Some(Ok(AsyncMessage::Notification(n))) => ConnEvent::Notification(n),
            Some(Ok(AsyncMessage::Notice(notice))) => {
                debug!(notice = %notice, "server notice on the relay connection");
                continue;
            }
            Some(Ok(_)) => continue,
            Some(Err(err)) => ConnEvent::Closed(Some(err)),
            None => ConnEvent::Closed(None),
        };
        let closed = matches!(event, ConnEvent::Closed(_));
        if tx.send(event).is_err() || closed {
            // The listener is gone (dropping the connection closes it), or the connection is.
            return;
        }
    }
}

pub(crate) fn describe_close(err: Option<&tokio_postgres::Error>) -> String {
    match err {
        Some(err) => err.to_string(),
        None => "the server closed the connection".into(),
    }
}

/// Connects with `tls` and spawns the connection's task: with `events`, the task forwards
/// notifications and the connection's end there; without, it only drives the connection.
pub(crate) async fn connect(
    pg: &Config,
    tls: &Tls,
    events: Option<mpsc::UnboundedSender<ConnEvent>>,
) -> Result<(Client, JoinHandle<()>), tokio_postgres::Error> {
    match tls {
        Tls::Plain => {
            let (client, connection) = pg.connect(NoTls).await?;
            Ok((client, spawn(connection, events)))
        }
        #[cfg(feature = "tls")]
        Tls::Rustls(make) => {
            let (client, connection) = pg.connect(make.clone()).await?;
            Ok((client, spawn(connection, events)))
        }
    }
}

fn spawn<S, T>(
    connection: Connection<S, T>,
    events: Option<mpsc::UnboundedSender<ConnEvent>>,
) -> JoinHandle<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match events {
        Some(tx) => tokio::spawn(drive(connection, tx)),
        None => tokio::spawn(async move {
            if let Err(err) = connection.await {
                debug!(error = %err, "short-lived pg_outbox connection ended with an error");
            }
        }),
    }
}
