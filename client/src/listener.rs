//! The one task that owns the relay's connection: LISTEN, decode, advance, reconnect.
//!
//! Each of its two connections is driven by a small companion task that reads
//! `Connection::poll_message` and forwards notifications (and the connection's end) through one
//! channel; this task is the only reader of that channel and the only user of the clients, so
//! every notification and every advance result is applied to the cursor in one sequence.
//!
//! An advance runs alongside the notifications rather than in front of them: while its query is
//! out, notifications keep being decoded and delivered (the cursor's dedupe set makes the rows
//! the advance then reads again harmless), so a slow query on a busy server holds up nothing.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_postgres::{AsyncMessage, Client, Connection, Notification, Statement};
use tracing::{debug, debug_span, field, info, info_span, warn, Instrument, Span};

use crate::catchup::{self, Floor, ServerRun};
use crate::config::{backoff_delay, entropy, RelayBuilder};
use crate::cursor::{Advance, Cursor, Step};
use crate::error::Error;
use crate::event::{Event, Gap};
use crate::fanout::Fanout;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::notification::{self, CHANNEL};
use crate::tls;

/// At most this many buffered notifications are applied before an advance gets its turn.
const MAX_DRAIN: usize = 4096;

/// A sweep is due once this many events were delivered beyond the cursor's snapshot, however
/// soon: with inline payloads nothing else moves the snapshot, and a sweep every
/// `sweep_interval` would read back every row of those seconds (30,000 at 15,000 events/s) and
/// keep as many ids in the dedupe set meanwhile.
const SWEEP_AFTER_DELIVERED: usize = 2_000;

/// A fetch of references starts before `fetch_interval` is up once this many notified rows
/// wait: a busy relay then fetches once per this many events (under 0.05 queries per event)
/// and the wait for a fetch shrinks as the rate grows, while a relay at a few hundred events a
/// second fetches once per `fetch_interval` at most.
pub(crate) const EARLY_FETCH_AT: usize = 32;

/// What the handle and the task share.
pub(crate) struct Shared {
    pub fanout: Fanout,
    pub metrics: Metrics,
    pub health: watch::Sender<Health>,
}

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
struct Conn {
    listen: Client,
    /// Shared with the advance under way, which runs alongside the listener's other work.
    queries: Arc<Client>,
    /// What both connections say (notifications, and either one's end).
    events: mpsc::UnboundedReceiver<ConnEvent>,
    drivers: [JoinHandle<()>; 2],
    advance: Statement,
}

impl Conn {
    /// Connects, refuses a standby, LISTENs, then connects for queries and prepares the
    /// advance statement.
    async fn open(cfg: &RelayBuilder) -> Result<Conn, Error> {
        let span = info_span!("pg_outbox_connect", tls = cfg.tls.name());
        Conn::open_inner(cfg).instrument(span).await
    }

    async fn open_inner(cfg: &RelayBuilder) -> Result<Conn, Error> {
        let (tx, events) = mpsc::unbounded_channel();
        let connect = || async {
            timeout(
                cfg.connect_timeout,
                tls::connect(&cfg.pg, &cfg.tls, Some(tx.clone())),
            )
            .await
            .map_err(|_| Error::Timeout {
                doing: "connecting",
                after: cfg.connect_timeout,
            })?
            .map_err(Error::Connect)
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
            let in_recovery: bool = row.try_get(0).map_err(|e| Error::Protocol(e.to_string()))?;
            if in_recovery {
                return Err(Error::Standby);
            }
            listen
                .batch_execute(&format!("LISTEN {CHANNEL}"))
                .await
                .map_err(|e| Error::from_query(e, schema))?;
            // One plan for the advance, kept (the xid index suits every snapshot pair), rather
            // than planning it again at each fetch.
            queries
                .batch_execute("SET plan_cache_mode = force_generic_plan")
                .await
                .map_err(|e| Error::from_query(e, schema))?;
            queries
                .prepare(&catchup::advance_sql(schema, !cfg.channels.is_empty()))
                .await
                .map_err(|e| Error::from_query(e, schema))
        };
        let failed = |err| {
            drivers.iter().for_each(JoinHandle::abort);
            Err(err)
        };
        let advance = match timeout(cfg.connect_timeout, setup).await {
            Ok(Ok(statement)) => statement,
            Ok(Err(err)) => return failed(err),
            Err(_) => {
                return failed(Error::Timeout {
                    doing: "setting up LISTEN",
                    after: cfg.connect_timeout,
                })
            }
        };
        Ok(Conn {
            listen,
            queries: Arc::new(queries),
            events,
            drivers,
            advance,
        })
    }

    /// Proves LISTEN holds across transactions: a notification sent from another session on a
    /// private channel must arrive. Through a pooler in transaction mode it does not.
    async fn verify_listen(&mut self, cfg: &RelayBuilder) -> Result<(), Error> {
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
        let (probe, probe_driver) = tls::connect(&probe_cfg, &cfg.tls, None)
            .await
            .map_err(Error::Connect)?;
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
                    return Err(Error::ConnectionLost(describe_close(err.as_ref())))
                }
                Ok(None) => return Err(Error::ConnectionLost("connection task ended".into())),
                Err(_) => {
                    return Err(Error::TransactionPooler(
                        "a notification sent to it from another session never arrived",
                    ))
                }
            }
        }
        self.listen
            .batch_execute(&format!("UNLISTEN {channel}"))
            .await
            .map_err(|e| Error::from_query(e, schema))
    }

    /// Closes both connections and waits (briefly) for their tasks.
    async fn close(self) {
        drop((self.listen, self.queries));
        for mut driver in self.drivers {
            if timeout(Duration::from_secs(2), &mut driver).await.is_err() {
                driver.abort();
            }
        }
    }
}

/// Drives the connection and forwards what it says; the only place `poll_message` is called.
pub(crate) async fn drive<S, T>(
    mut connection: Connection<S, T>,
    tx: mpsc::UnboundedSender<ConnEvent>,
) where
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

fn describe_close(err: Option<&tokio_postgres::Error>) -> String {
    match err {
        Some(err) => err.to_string(),
        None => "the server closed the connection".into(),
    }
}

/// The listener task's state.
pub(crate) struct Listener {
    cfg: Arc<RelayBuilder>,
    shared: Arc<Shared>,
    cursor: Cursor,
    conn: Option<Conn>,
    /// Why the connection was lost, for the first `Reconnecting` status.
    lost: Option<String>,
    /// An advance is wanted soon (a notification did not decode).
    advance_wanted: bool,
    /// Whether rows the current advance finds without a notification count as caught up: true
    /// for the catch-up after a reconnect and for sweeps, false for fetches of references (whose
    /// extra rows are mostly just read ahead of their notifications).
    counts_caught_up: bool,
    shutdown: watch::Receiver<bool>,
    steps: Vec<Step>,
    /// When the last advance started: fetches of references wait `fetch_interval` after it.
    last_advance: Instant,
    /// Events settled by the cursor and waiting to be handed to subscribers in one batch.
    batch: Vec<Event>,
    /// The server run whose history the cursor follows.
    server: ServerRun,
    /// An advance saw the server's transaction ids go back: check the history at the next
    /// connection, even if the server's run looks the same.
    history_went_back: bool,
}

impl Listener {
    /// Connects, LISTENs, verifies LISTEN holds, and takes the starting snapshot. Once this
    /// returns, nothing committed afterwards can be missed.
    pub async fn start(
        cfg: Arc<RelayBuilder>,
        shared: Arc<Shared>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Listener, Error> {
        let mut conn = Conn::open(&cfg).await?;
        if cfg.verify_listen {
            if let Err(err) = conn.verify_listen(&cfg).await {
                conn.close().await;
                return Err(err);
            }
        }
        let begin = async {
            let snapshot = catchup::current(&conn.queries, &cfg.schema).await?;
            let server = catchup::server_run(&conn.queries, &cfg.schema).await?;
            let witnesses = catchup::start_witnesses(&conn.queries, &snapshot, &cfg.schema).await?;
            Ok((snapshot, server, witnesses))
        };
        let (snapshot, server, witnesses) = match timeout(cfg.connect_timeout, begin).await {
            Ok(Ok(begun)) => begun,
            Ok(Err(err)) => {
                conn.close().await;
                return Err(err);
            }
            Err(_) => {
                conn.close().await;
                return Err(Error::Timeout {
                    doing: "reading the starting snapshot",
                    after: cfg.connect_timeout,
                });
            }
        };
        info!(snapshot = %snapshot, "pg_outbox relay listening");
        let mut cursor = Cursor::new(snapshot);
        cursor.witness(witnesses);
        let mut listener = Listener {
            cfg,
            shared,
            cursor,
            conn: Some(conn),
            lost: None,
            advance_wanted: false,
            counts_caught_up: true,
            shutdown,
            steps: Vec::new(),
            last_advance: Instant::now(),
            batch: Vec::new(),
            server,
            history_went_back: false,
        };
        // One advance now proves the relay may read the outbox (privileges are checked when a
        // statement runs, not when it is prepared), and settles what committed meanwhile.
        if let Err(err) = listener.advance().await {
            if let Some(conn) = listener.conn.take() {
                conn.close().await;
            }
            return Err(err);
        }
        Ok(listener)
    }

    /// The task: until shutdown, apply notifications, advance when needed, reconnect when lost.
    pub async fn run(mut self) {
        let mut shutdown = self.shutdown.clone();
        // A deadline rather than an interval: under a steady flood of notifications the select
        // below always has one ready, and the sweep must still happen.
        let mut next_sweep = Instant::now() + self.cfg.sweep_interval;
        let mut advancing: Option<Advancing> = None;
        loop {
            if *shutdown.borrow() {
                break;
            }
            let Some(conn) = self.conn.as_mut() else {
                if self.reconnect(&mut shutdown).await.is_err() {
                    break;
                }
                next_sweep = Instant::now() + self.cfg.sweep_interval;
                continue;
            };
            let fetch_at = self.last_advance + self.cfg.fetch_interval;
            let fetch_waiting = self.cursor.needs_advance();
            let idle = advancing.is_none();
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                result = async {
                    match advancing.as_mut() {
                        Some(advancing) => advancing.result().await,
                        None => std::future::pending().await,
                    }
                }, if !idle => {
                    let span = advancing.take().map(|a| a.span).unwrap_or_else(Span::none);
                    if let Err(err) = self.settle(result, &span) {
                        self.lose(err.to_string()).await;
                    }
                    next_sweep = Instant::now() + self.cfg.sweep_interval;
                }
                event = conn.events.recv() => self.on_conn_event(event),
                _ = sleep_until(fetch_at), if idle && fetch_waiting => {}
                _ = sleep_until(next_sweep), if idle => {}
            }
            self.drain();
            self.flush();
            if self.conn.is_none() {
                // Lost: what was under way on that connection is moot.
                advancing = None;
                continue;
            }
            let now = Instant::now();
            // Fetches and early sweeps both wait fetch_interval after the last advance.
            let spaced = now >= self.last_advance + self.cfg.fetch_interval;
            let sweep_due = now >= next_sweep
                || (spaced && self.cursor.delivered_beyond() >= SWEEP_AFTER_DELIVERED);
            let fetch = self.cursor.needs_advance();
            let fetch_due = fetch && (spaced || self.cursor.waiting() >= EARLY_FETCH_AT);
            if advancing.is_none() && (sweep_due || self.advance_wanted || fetch_due) {
                self.counts_caught_up = !fetch;
                self.last_advance = now;
                advancing = self.begin_advance();
            }
        }
        drop(advancing);
        self.stop().await;
    }

    /// Applies the notifications already buffered, so one advance serves them all.
    fn drain(&mut self) {
        for _ in 0..MAX_DRAIN {
            let Some(conn) = self.conn.as_mut() else {
                return;
            };
            match conn.events.try_recv() {
                Ok(event) => self.on_conn_event(Some(event)),
                Err(mpsc::error::TryRecvError::Empty) => return,
                Err(mpsc::error::TryRecvError::Disconnected) => self.on_conn_event(None),
            }
        }
    }

    fn on_conn_event(&mut self, event: Option<ConnEvent>) {
        match event {
            Some(ConnEvent::Notification(n)) => self.on_notification(&n),
            Some(ConnEvent::Closed(err)) => self.mark_lost(describe_close(err.as_ref())),
            None => self.mark_lost("connection task ended".into()),
        }
    }

    fn on_notification(&mut self, n: &Notification) {
        if n.channel() != CHANNEL {
            return; // a late probe answer
        }
        let metrics = &self.shared.metrics;
        Metrics::add(&metrics.received, 1);
        let notices = match notification::decode(n.payload()) {
            Ok(notices) => notices,
            Err(err) => {
                Metrics::add(&metrics.decode_errors, 1);
                let prefix: String = n.payload().chars().take(200).collect();
                warn!(error = %err, payload = %prefix, "skipping a pg_outbox notification");
                // If rows stand behind it, the next advance finds them.
                self.advance_wanted = true;
                return;
            }
        };
        for notice in notices {
            if self.cfg.channels.is_empty() || self.cfg.channels.contains(&notice.channel) {
                self.cursor.on_notice(notice, &mut self.steps);
            }
        }
    }

    /// Runs one advance on the current connection and delivers what it settles.
    async fn advance(&mut self) -> Result<(), Error> {
        let mut advancing = self
            .begin_advance()
            .ok_or_else(|| Error::ConnectionLost("no connection".into()))?;
        let result = advancing.result().await;
        self.settle(result, &advancing.span)
    }

    /// Sends the advance query from the cursor's snapshot; `None` without a connection.
    fn begin_advance(&self) -> Option<Advancing> {
        let conn = self.conn.as_ref()?;
        // A catch-up (after a reconnect) or a sweep when rows found without a notification count
        // as caught up; a fetch of notified references otherwise.
        let span = debug_span!(
            "pg_outbox_advance",
            kind = if self.counts_caught_up {
                "catch_up"
            } else {
                "fetch"
            },
            settled = field::Empty,
        );
        let (client, statement) = (Arc::clone(&conn.queries), conn.advance.clone());
        let (from, channels) = (self.cursor.snapshot().clone(), self.cfg.channels.clone());
        let heard_before = self.cursor.heard();
        let (schema, query_timeout) = (self.cfg.schema.clone(), self.cfg.query_timeout);
        let query = async move {
            let query =
                catchup::advance(&client, &statement, &from, heard_before, &channels, &schema);
            timeout(query_timeout, query)
                .await
                .map_err(|_| Error::Timeout {
                    doing: "running the advance query",
                    after: query_timeout,
                })?
        };
        Some(Advancing {
            query: Box::pin(query.instrument(span.clone())),
            span,
        })
    }

    /// Applies an advance's result to the cursor and delivers what it settles.
    fn settle(&mut self, result: Result<Advance, Error>, span: &Span) -> Result<(), Error> {
        let advance = result?;
        let _entered = span.enter();
        Metrics::add(&self.shared.metrics.advances, 1);
        if advance.snapshot.xmax() < self.cursor.snapshot().xmax() {
            // Transaction ids went back on what looked like the same server: its history is
            // not the one the cursor read. Reconnect, and check it.
            self.history_went_back = true;
            return Err(Error::ConnectionLost(format!(
                "the server's transaction ids went back, from {} to {}",
                self.cursor.snapshot().xmax(),
                advance.snapshot.xmax()
            )));
        }
        self.advance_wanted = false;
        self.cursor.on_advance(advance, &mut self.steps);
        span.record("settled", self.steps.len());
        self.flush();
        Ok(())
    }

    /// Hands the cursor's steps to the subscribers and the counters. Events go to the fan-out in
    /// one batch (each subscriber is locked and woken once per batch, not once per event); a gap
    /// first flushes the events before it, so every stream keeps the delivery order.
    fn flush(&mut self) {
        if self.steps.is_empty() {
            return;
        }
        let _span = debug_span!("pg_outbox_deliver", steps = self.steps.len()).entered();
        let metrics = &self.shared.metrics;
        for step in self.steps.drain(..) {
            match step {
                Step::Deliver { event, notified } => {
                    let own = self.cfg.instance_id.is_some()
                        && event.origin() == self.cfg.instance_id.as_deref();
                    if own && !self.cfg.deliver_own_origin {
                        Metrics::add(&metrics.skipped_own_origin, 1);
                        continue;
                    }
                    Metrics::add(&metrics.delivered, 1);
                    if !notified && self.counts_caught_up {
                        Metrics::add(&metrics.caught_up, 1);
                    }
                    metrics.record_latency(event.created_at());
                    self.batch.push(event);
                }
                Step::Duplicate => Metrics::add(&metrics.duplicates, 1),
                Step::Forged => Metrics::add(&metrics.forged, 1),
                Step::Overflow => {
                    debug!("a pg_outbox notification was dropped: too many rows wait for a fetch")
                }
                Step::Gap(gap) => {
                    deliver_batch(&self.shared, &mut self.batch);
                    Metrics::add(&metrics.gaps, 1);
                    if matches!(gap, Gap::Unreadable { .. }) {
                        Metrics::add(&metrics.decode_errors, 1);
                    }
                    warn!(
                        ?gap,
                        "pg_outbox events were lost before this relay read them"
                    );
                    self.shared.fanout.gap(&gap);
                }
            }
        }
        deliver_batch(&self.shared, &mut self.batch);
    }

    /// Notes the connection lost; the loop reconnects.
    fn mark_lost(&mut self, reason: String) {
        if let Some(conn) = self.conn.take() {
            warn!(reason = %reason, "pg_outbox relay connection lost");
            conn.drivers.iter().for_each(JoinHandle::abort);
            self.lost = Some(reason);
        }
    }

    async fn lose(&mut self, reason: String) {
        warn!(reason = %reason, "pg_outbox relay connection lost");
        if let Some(conn) = self.conn.take() {
            conn.close().await;
        }
        self.lost = Some(reason);
    }

    /// Reconnects with backoff and catches up; `Err` only on shutdown.
    async fn reconnect(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<(), Error> {
        let mut last_error = self.lost.take().unwrap_or_else(|| "connection lost".into());
        let mut attempt: u32 = 0;
        loop {
            if *shutdown.borrow() {
                return Err(Error::Stopped);
            }
            attempt = attempt.saturating_add(1);
            self.shared.health.send_replace(Health::Reconnecting {
                attempt,
                last_error: last_error.clone(),
            });
            let delay = backoff_delay(
                attempt,
                self.cfg.backoff_min,
                self.cfg.backoff_max,
                entropy(u64::from(attempt)),
            );
            let result = tokio::select! {
                biased;
                _ = shutdown.changed() => return Err(Error::Stopped),
                result = async {
                    sleep(delay).await;
                    self.try_reconnect().await
                } => result,
            };
            match result {
                Ok(()) => {
                    Metrics::add(&self.shared.metrics.reconnects, 1);
                    self.shared.health.send_replace(Health::Listening);
                    info!(attempt, "pg_outbox relay reconnected and caught up");
                    return Ok(());
                }
                Err(err) => {
                    warn!(attempt, error = %err, "pg_outbox relay reconnect failed");
                    if let Some(conn) = self.conn.take() {
                        conn.close().await;
                    }
                    last_error = err.to_string();
                }
            }
        }
    }

    /// LISTEN first, then check the server's history, then catch up from the cursor.
    async fn try_reconnect(&mut self) -> Result<(), Error> {
        let conn = Conn::open(&self.cfg).await?;
        let run = catchup::server_run(&conn.queries, &self.cfg.schema);
        let run = timeout(self.cfg.query_timeout, run)
            .await
            .map_err(|_| Error::Timeout {
                doing: "reading the server's identity",
                after: self.cfg.query_timeout,
            })?;
        self.conn = Some(conn);
        let run = run?;
        if run != self.server || self.history_went_back {
            self.rewind(&run).await?;
        }
        self.counts_caught_up = true;
        self.advance().await
    }

    /// The server restarted, failed over or was restored, and may have lost transactions the
    /// cursor saw, handing their ids out again: rewinds the cursor to the floor its witnesses
    /// prove, so the catch-up reads every xid from there again, and reports a gap where no
    /// witness survived.
    async fn rewind(&mut self, run: &ServerRun) -> Result<(), Error> {
        let conn = self
            .conn
            .as_ref()
            .ok_or_else(|| Error::ConnectionLost("no connection".into()))?;
        let witnesses = self.cursor.witnesses();
        let floor = catchup::floor(&conn.queries, &witnesses, &self.cfg.schema);
        let floor =
            timeout(self.cfg.query_timeout, floor)
                .await
                .map_err(|_| Error::Timeout {
                    doing: "checking the server's history",
                    after: self.cfg.query_timeout,
                })??;
        let from = self.cursor.snapshot().clone();
        let floor_xid = match floor {
            Floor::Exact(xid) => xid,
            Floor::Assumed(xid) => {
                self.steps.push(Step::Gap(Gap::Rewound { floor_xid: xid }));
                xid
            }
        };
        self.cursor.rewind(floor_xid);
        warn!(
            previous = ?self.server,
            now = ?run,
            cursor = %from,
            rewound_to = %self.cursor.snapshot(),
            witnesses = witnesses.len(),
            exact = matches!(floor, Floor::Exact(_)),
            "pg_outbox relay reached a new run of the server: reading again from the floor of \
             the history it still holds"
        );
        Metrics::add(&self.shared.metrics.rewinds, 1);
        self.server = run.clone();
        self.history_went_back = false;
        self.flush();
        Ok(())
    }

    async fn stop(mut self) {
        if let Some(conn) = self.conn.take() {
            conn.close().await;
        }
        self.shared.fanout.close();
        self.shared.health.send_replace(Health::Stopped);
        info!("pg_outbox relay stopped");
    }
}

/// Hands `batch` to the subscribers and empties it.
fn deliver_batch(shared: &Shared, batch: &mut Vec<Event>) {
    if batch.is_empty() {
        return;
    }
    let lagged = shared.fanout.deliver(batch);
    if lagged > 0 {
        Metrics::add(&shared.metrics.lagged, lagged);
        debug!(
            events = batch.len(),
            dropped = lagged,
            "dropped events for lagging subscribers"
        );
    }
    batch.clear();
}

/// An advance query on its way, polled by the listener among its other work.
struct Advancing {
    query: Pin<Box<dyn Future<Output = Result<Advance, Error>> + Send>>,
    span: Span,
}

impl Advancing {
    async fn result(&mut self) -> Result<Advance, Error> {
        (&mut self.query).await
    }
}
