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

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_postgres::Notification;
use tracing::{debug, debug_span, field, info, warn, Instrument, Span};

use crate::advance;
use crate::backoff::{backoff_delay, entropy};
use crate::config::Settings;
use crate::connection::{describe_close, Conn, ConnEvent};
use crate::cursor::{Cursor, Step};
use crate::error::Error;
use crate::event::{Event, Gap};
use crate::fanout::Fanout;
use crate::health::Health;
use crate::history::{self, Floor, ServerRun};
use crate::incoming::CHANNEL;
use crate::metrics::Metrics;
use crate::position::{RunChange, Watermark};
use crate::resume::{self, Answering, ResumeRequest, Wanted};
use crate::rows::{RowKey, Visible};

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

/// At most this many changes of server run are remembered for carrying positions over.
const RUN_CHANGES_KEPT: usize = 16;

/// What the handle and the task share.
pub(crate) struct Shared {
    pub fanout: Fanout,
    pub metrics: Metrics,
    pub health: watch::Sender<Health>,
    /// Subscriptions asking to resume from a position.
    pub resumes: mpsc::UnboundedSender<ResumeRequest>,
}

/// The listener task's state.
pub(crate) struct Listener {
    cfg: Arc<Settings>,
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
    /// The server runs the relay went through before this one, oldest first.
    run_changes: Vec<RunChange>,
    /// The change into the current run, when the relay proved where the old history holds:
    /// its subscriptions' positions are carried over.
    carried_from: Option<RunChange>,
    /// How many times the relay rewound (see [`Watermark::generation`]).
    generation: u64,
    /// Resume requests waiting for the next catch-up query.
    waiting_resumes: Vec<ResumeRequest>,
}

impl Listener {
    /// Connects, LISTENs, verifies LISTEN holds, and takes the starting snapshot. Once this
    /// returns, nothing committed afterwards can be missed.
    pub async fn start(
        cfg: Arc<Settings>,
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
            let snapshot = advance::current(&conn.queries, &cfg.schema).await?;
            let server = history::server_run(&conn.queries, &cfg.schema).await?;
            let witnesses = history::start_witnesses(&conn.queries, &snapshot, &cfg.schema).await?;
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
            run_changes: Vec::new(),
            carried_from: None,
            generation: 0,
            waiting_resumes: Vec::new(),
        };
        listener.publish_watermark();
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

    /// The task: until shutdown, apply notifications, advance when needed, answer resume
    /// requests, reconnect when lost.
    pub async fn run(mut self, mut resumes: mpsc::UnboundedReceiver<ResumeRequest>) {
        let mut shutdown = self.shutdown.clone();
        // A deadline rather than an interval: under a steady flood of notifications the select
        // below always has one ready, and the sweep must still happen.
        let mut next_sweep = Instant::now() + self.cfg.sweep_interval;
        let mut advancing: Option<Advancing> = None;
        let mut resuming: Option<Resuming> = None;
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
            let catching_up = resuming.is_some();
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                result = async {
                    match advancing.as_mut() {
                        Some(advancing) => advancing.result().await,
                        None => std::future::pending().await,
                    }
                }, if !idle => {
                    if let Some(done) = advancing.take() {
                        if let Err(err) = self.settle(result, &done) {
                            self.lose(err.to_string()).await;
                        }
                    }
                    next_sweep = Instant::now() + self.cfg.sweep_interval;
                }
                result = async {
                    match resuming.as_mut() {
                        Some(resuming) => (&mut resuming.query).await,
                        None => std::future::pending().await,
                    }
                }, if catching_up => {
                    if let Some(done) = resuming.take() {
                        if let Err(err) = self.answer_resumes(done, result) {
                            self.lose(err.to_string()).await;
                        }
                    }
                }
                event = conn.events.recv() => self.on_conn_event(event),
                Some(request) = resumes.recv() => self.waiting_resumes.push(request),
                _ = sleep_until(fetch_at), if idle && fetch_waiting => {}
                _ = sleep_until(next_sweep), if idle => {}
            }
            self.drain();
            self.flush();
            if self.conn.is_none() {
                // Lost: what was under way on that connection is moot; resumes wait for the
                // next one.
                advancing = None;
                if let Some(lost) = resuming.take() {
                    self.waiting_resumes.extend(lost.requests);
                }
                continue;
            }
            if resuming.is_none() {
                resuming = self.begin_resume(&mut resumes);
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
        let notices = match self.cfg.policy.notices(n.payload()) {
            Ok(notices) => notices,
            Err(err) => {
                Metrics::add(&metrics.decode_errors, 1);
                if err.is_forged() {
                    Metrics::add(&metrics.forged, 1);
                }
                let prefix: String = n.payload().chars().take(200).collect();
                warn!(error = %err, payload = %prefix, "skipping a pg_outbox notification");
                // If rows stand behind it, the next advance finds them.
                self.advance_wanted = true;
                return;
            }
        };
        for notice in notices {
            self.cursor.on_notice(notice, &mut self.steps);
        }
    }

    /// Runs one advance on the current connection and delivers what it settles.
    async fn advance(&mut self) -> Result<(), Error> {
        let mut advancing = self
            .begin_advance()
            .ok_or_else(|| Error::ConnectionLost("no connection".into()))?;
        let result = advancing.result().await;
        self.settle(result, &advancing)
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
        let from = self.cursor.snapshot().clone();
        let channels = self.cfg.policy.channels().to_vec();
        let heard_before = self.cursor.heard();
        let (schema, query_timeout) = (self.cfg.schema.clone(), self.cfg.query_timeout);
        let query = async move {
            let query = advance::advance(&client, &statement, &from, &channels, &schema);
            timeout(query_timeout, query)
                .await
                .map_err(|_| Error::Timeout {
                    doing: "running the advance query",
                    after: query_timeout,
                })?
        };
        Some(Advancing {
            query: Box::pin(query.instrument(span.clone())),
            heard_before,
            span,
        })
    }

    /// Applies an advance's result to the cursor and delivers what it settles.
    fn settle(
        &mut self,
        result: Result<Visible, Error>,
        advancing: &Advancing,
    ) -> Result<(), Error> {
        let visible = result?;
        let span = &advancing.span;
        let _entered = span.enter();
        Metrics::add(&self.shared.metrics.advances, 1);
        if visible.snapshot.xmax() < self.cursor.snapshot().xmax() {
            // Transaction ids went back on what looked like the same server: its history is
            // not the one the cursor read. Reconnect, and check it.
            self.history_went_back = true;
            return Err(Error::ConnectionLost(format!(
                "the server's transaction ids went back, from {} to {}",
                self.cursor.snapshot().xmax(),
                visible.snapshot.xmax()
            )));
        }
        self.advance_wanted = false;
        self.cursor
            .on_advance(visible, advancing.heard_before, &mut self.steps);
        span.record("settled", self.steps.len());
        self.flush();
        self.publish_watermark();
        Ok(())
    }

    /// Tells the fan-out that everything under the cursor's snapshot was handed over: call
    /// only once the steps that settled it are flushed.
    fn publish_watermark(&self) {
        self.shared.fanout.set_watermark(Arc::new(Watermark {
            change: self.carried_from,
            generation: self.generation,
            ..Watermark::new(self.server.epoch(), self.cursor.snapshot().clone())
        }));
    }

    /// Sends one catch-up query for every resume request waiting; `None` without a connection
    /// or a request.
    fn begin_resume(
        &mut self,
        resumes: &mut mpsc::UnboundedReceiver<ResumeRequest>,
    ) -> Option<Resuming> {
        while let Ok(request) = resumes.try_recv() {
            self.waiting_resumes.push(request);
        }
        // Subscriptions dropped while they waited need nothing.
        self.waiting_resumes
            .retain(|request| !request.answer.is_closed());
        let conn = self.conn.as_ref()?;
        if self.waiting_resumes.is_empty() {
            return None;
        }
        let requests = std::mem::take(&mut self.waiting_resumes);
        let answering = Answering {
            epoch: self.server.epoch(),
            generation: self.generation,
            changes: &self.run_changes,
            policy: &self.cfg.policy,
        };
        let wanted = Wanted::of(&requests, &answering);
        let client = Arc::clone(&conn.queries);
        let (schema, query_timeout) = (self.cfg.schema.clone(), self.cfg.query_timeout);
        let span = debug_span!("pg_outbox_resume", requests = requests.len());
        let query = async move {
            timeout(query_timeout, resume::query(&client, &wanted, &schema))
                .await
                .map_err(|_| Error::Timeout {
                    doing: "running the resume query",
                    after: query_timeout,
                })?
        };
        Some(Resuming {
            requests,
            query: Box::pin(query.instrument(span)),
        })
    }

    /// Answers each resume request from the catch-up's result; on an error the requests wait
    /// for the next connection.
    fn answer_resumes(
        &mut self,
        done: Resuming,
        result: Result<Visible, Error>,
    ) -> Result<(), Error> {
        let read = match result {
            Ok(read) => read,
            Err(err) => {
                self.waiting_resumes.extend(done.requests);
                return Err(err);
            }
        };
        let metrics = &self.shared.metrics;
        Metrics::add(&metrics.resume_queries, 1);
        // Rows handed out by a catch-up are history this relay has seen too: witnesses of where
        // it holds, should the server lose part of it (positions are carried over from there).
        self.cursor.witness(read.rows.iter().map(RowKey::of));
        let answering = Answering {
            epoch: self.server.epoch(),
            generation: self.generation,
            changes: &self.run_changes,
            policy: &self.cfg.policy,
        };
        for request in done.requests {
            let answer = answering.answer(&request, &read);
            Metrics::add(&metrics.resumes, 1);
            if let Err(reason) = &answer {
                Metrics::add(&metrics.resets, 1);
                debug!(?reason, "a pg_outbox subscription could not resume exactly");
            }
            // A subscription dropped meanwhile needs no answer.
            let _ = request.answer.send(answer);
        }
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
                    if self.cfg.policy.is_own(event.origin()) {
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
                    warn!(
                        ?gap,
                        "pg_outbox events were lost before this relay read them"
                    );
                    self.shared.fanout.gap(&gap);
                }
                Step::Unreadable(row) => {
                    deliver_batch(&self.shared, &mut self.batch);
                    Metrics::add(&metrics.gaps, 1);
                    Metrics::add(&metrics.decode_errors, 1);
                    warn!(
                        id = %row.id,
                        channel = %row.channel,
                        reason = %row.reason,
                        "a pg_outbox event's payload cannot be read by this client: reported as a gap"
                    );
                    self.shared.fanout.unreadable(&row);
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
        let run = history::server_run(&conn.queries, &self.cfg.schema);
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
        let floor = history::floor(&conn.queries, &witnesses, &self.cfg.schema);
        let floor =
            timeout(self.cfg.query_timeout, floor)
                .await
                .map_err(|_| Error::Timeout {
                    doing: "checking the server's history",
                    after: self.cfg.query_timeout,
                })??;
        let from = self.cursor.snapshot().clone();
        let floor_xid = match floor {
            Floor::Exact(xid) => {
                // Positions issued on the old run stay exact below the floor.
                let change = RunChange {
                    from: self.server.epoch(),
                    floor: xid,
                };
                self.carried_from = Some(change);
                self.run_changes.push(change);
                if self.run_changes.len() > RUN_CHANGES_KEPT {
                    self.run_changes.remove(0);
                }
                xid
            }
            Floor::Assumed(xid) => {
                // Where the old history ends is not known: no position of an earlier run can
                // be carried over from here on.
                self.carried_from = None;
                self.run_changes.clear();
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
        self.generation += 1;
        self.server = run.clone();
        self.history_went_back = false;
        self.flush();
        self.publish_watermark();
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

/// A catch-up query for resumed subscriptions on its way, with the requests it serves.
struct Resuming {
    requests: Vec<ResumeRequest>,
    query: Pin<Box<dyn Future<Output = Result<Visible, Error>> + Send>>,
}

/// An advance query on its way, polled by the listener among its other work.
struct Advancing {
    query: Pin<Box<dyn Future<Output = Result<Visible, Error>> + Send>>,
    /// [`Cursor::heard`] when the query was sent.
    heard_before: u64,
    span: Span,
}

impl Advancing {
    async fn result(&mut self) -> Result<Visible, Error> {
        (&mut self.query).await
    }
}
