//! The one task that owns the relay's two connections (one that LISTENs, one for queries):
//! LISTEN, decode, advance, answer resumes, reconnect.
//!
//! Each connection is driven by a small companion task that reads `Connection::poll_message`
//! and forwards notifications (and the connection's end) through one channel; this task is the
//! only reader of that channel and the only user of the clients, so every notification and
//! every advance result is applied to the cursor in one sequence. It consults values rather
//! than spelling rules out: the [`Schedule`] says when to advance, the [`Lineage`] which
//! history of the server it follows, the relay's [`Policy`](crate::policy::Policy) which
//! events it passes on.
//!
//! An advance runs alongside the notifications rather than in front of them: while its query is
//! out, notifications keep being decoded and delivered (the cursor's dedupe set makes the rows
//! the advance then reads again harmless), so a slow query on a busy server holds up nothing.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::{sleep, sleep_until, Instant};
use tokio_postgres::Notification;
use tracing::{debug, debug_span, field, info, warn, Instrument, Span};

use crate::advance;
use crate::backoff::{backoff_delay, entropy};
use crate::config::Settings;
use crate::connection::{describe_close, Conn, ConnEvent};
use crate::cursor::{Cursor, Step};
use crate::error::{within, Error, Kind};
use crate::event::{Event, Gap};
use crate::health::Health;
use crate::history::{self, Floor, ServerRun};
use crate::incoming::{ReadError, CHANNEL};
use crate::keyring::Keyring;
use crate::lineage::Lineage;
use crate::metrics::Metrics;
use crate::position::Watermark;
use crate::resume::{self, ResumeRequest, Wanted};
use crate::rows::{RowKey, Visible};
use crate::schedule::{Demand, Due, Schedule};
use crate::shared::Shared;

/// At most this many buffered notifications are applied before an advance gets its turn.
const MAX_DRAIN: usize = 4096;

/// Sealed notifications that did not open wait, up to this many, for the keys to be read again
/// (they were rotated, or forged); beyond it they are counted as forged at once.
const MAX_UNOPENED: usize = 64;

/// The keys are read again at most this often, however many notifications fail to open: a
/// flood of forgeries costs the server one small query a second per relay.
const KEYS_REREAD_INTERVAL: Duration = Duration::from_secs(1);

/// The listener task's state.
pub(crate) struct Listener {
    cfg: Arc<Settings>,
    shared: Arc<Shared>,
    cursor: Cursor,
    conn: Option<Conn>,
    /// The connection given up, until the next attempt closes it.
    lost: Option<Lost>,
    /// A notification did not decode: rows may stand behind it.
    undecodable: bool,
    /// Whether rows the current advance finds without a notification count as caught up: true
    /// for the catch-up after a reconnect and for sweeps, false for fetches of references (whose
    /// extra rows are mostly just read ahead of their notifications).
    counts_caught_up: bool,
    shutdown: watch::Receiver<bool>,
    steps: Vec<Step>,
    schedule: Schedule,
    /// Events settled by the cursor and waiting to be handed to subscribers in one batch.
    batch: Vec<Event>,
    lineage: Lineage,
    /// Resume requests waiting for the next catch-up query.
    waiting_resumes: Vec<ResumeRequest>,
    /// Sealed notifications that did not open with the keys read at `keys_read_at`, judged
    /// again once the keys are read anew: what still does not open is counted as forged. Their
    /// rows, if any, are swept in the meantime.
    unopened: Vec<String>,
    keys_read_at: Instant,
}

/// A connection given up, and why (the first `Reconnecting` status says it).
struct Lost {
    reason: String,
    conn: Conn,
}

/// The queries under way on the query connection, polled among the listener's other work.
#[derive(Default)]
struct InFlight {
    advance: Option<Query<Advancing>>,
    resume: Option<Query<Vec<ResumeRequest>>>,
    keys: Option<KeysRead>,
}

/// The seal keys being read again.
type KeysRead = Pin<Box<dyn Future<Output = Result<Keyring, Error>> + Send>>;

/// A query on its way, with what its answer is for.
struct Query<T> {
    rows: Pin<Box<dyn Future<Output = Result<Visible, Error>> + Send>>,
    what: T,
}

/// What an advance's answer is for.
struct Advancing {
    /// [`Cursor::heard`] when the query was sent.
    heard_before: u64,
    span: Span,
}

/// The keys being read again; pending for ever when they are not.
async fn keys_read(keys: &mut Option<KeysRead>) -> Result<Keyring, Error> {
    match keys {
        Some(keys) => keys.await,
        None => std::future::pending().await,
    }
}

/// The answer of `query`; pending for ever when none is out.
async fn answer<T>(query: &mut Option<Query<T>>) -> Result<Visible, Error> {
    match query {
        Some(query) => (&mut query.rows).await,
        None => std::future::pending().await,
    }
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
            // Recorded before any position is issued on this run, so any relay can place it.
            let recorded = history::recorded_runs(&conn.queries, &cfg.schema).await?;
            let witnesses = history::start_witnesses(&conn.queries, &snapshot, &cfg.schema).await?;
            Ok((snapshot, server, recorded, witnesses))
        };
        let (snapshot, server, recorded, witnesses) =
            match within(cfg.connect_timeout, "reading the starting snapshot", begin).await {
                Ok(begun) => begun,
                Err(err) => {
                    conn.close().await;
                    return Err(err);
                }
            };
        info!(snapshot = %snapshot, "pg_outbox relay listening");
        let mut cursor = Cursor::new(snapshot);
        cursor.witness(witnesses);
        let mut listener = Listener {
            schedule: Schedule::new(cfg.sweep_interval, cfg.fetch_interval, Instant::now()),
            cfg,
            shared,
            cursor,
            conn: Some(conn),
            lost: None,
            undecodable: false,
            counts_caught_up: true,
            shutdown,
            steps: Vec::new(),
            batch: Vec::new(),
            lineage: Lineage::new(server, recorded),
            waiting_resumes: Vec::new(),
            unopened: Vec::new(),
            keys_read_at: Instant::now(),
        };
        listener.shared.fanout.set_watermark(listener.watermark());
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

    /// The task: until shutdown, apply notifications, advance when the schedule says, answer
    /// resume requests, reconnect when lost.
    pub async fn run(mut self, mut resumes: mpsc::UnboundedReceiver<ResumeRequest>) {
        let mut shutdown = self.shutdown.clone();
        let mut in_flight = InFlight::default();
        while !*shutdown.borrow() {
            let wake_at = self.wake_at();
            let Some(conn) = self.conn.as_mut() else {
                if self.reconnect(&mut shutdown).await.is_err() {
                    break;
                }
                continue;
            };
            let (advancing, resuming) = (in_flight.advance.is_some(), in_flight.resume.is_some());
            let reading_keys = in_flight.keys.is_some();
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                result = answer(&mut in_flight.advance), if advancing => {
                    if let Some(done) = in_flight.advance.take() {
                        if let Err(err) = self.settle(result, &done.what) {
                            self.lose(err.to_string());
                        }
                    }
                }
                result = answer(&mut in_flight.resume), if resuming => {
                    if let Some(done) = in_flight.resume.take() {
                        if let Err(err) = self.answer_resumes(done.what, result) {
                            self.lose(err.to_string());
                        }
                    }
                }
                keyring = keys_read(&mut in_flight.keys), if reading_keys => {
                    in_flight.keys = None;
                    match keyring {
                        Ok(keyring) => self.on_keys(keyring),
                        Err(err) => self.lose(err.to_string()),
                    }
                }
                event = conn.events.recv() => self.on_conn_event(event),
                Some(request) = resumes.recv() => self.waiting_resumes.push(request),
                _ = sleep_until(wake_at), if !advancing => {}
            }
            self.drain();
            self.flush();
            self.send_queries(&mut in_flight, &mut resumes);
        }
        drop(in_flight);
        self.stop().await;
    }

    /// Sends what is due on the query connection; without one, what was under way on the lost
    /// one is moot, and its resume requests wait for the next.
    fn send_queries(
        &mut self,
        in_flight: &mut InFlight,
        resumes: &mut mpsc::UnboundedReceiver<ResumeRequest>,
    ) {
        let Some(conn) = self.conn.as_ref() else {
            in_flight.advance = None;
            in_flight.keys = None;
            if let Some(lost) = in_flight.resume.take() {
                self.waiting_resumes.extend(lost.what);
            }
            return;
        };
        if in_flight.keys.is_none()
            && !self.unopened.is_empty()
            && self.keys_read_at.elapsed() >= KEYS_REREAD_INTERVAL
        {
            let (client, schema) = (Arc::clone(&conn.queries), self.cfg.schema.clone());
            let query_timeout = self.cfg.query_timeout;
            in_flight.keys = Some(Box::pin(async move {
                within(
                    query_timeout,
                    "reading the seal keys",
                    Keyring::load(&client, &schema),
                )
                .await
            }));
            self.keys_read_at = Instant::now();
        }
        if in_flight.resume.is_none() {
            in_flight.resume = self.begin_resume(resumes);
        }
        if in_flight.advance.is_none() {
            let demand = self.demand();
            if let Some(due) = self.schedule.start_due(Instant::now(), demand) {
                self.counts_caught_up = due == Due::Sweep;
                in_flight.advance = self.begin_advance();
            }
        }
    }

    /// When the loop must wake with nothing heard: when the schedule says, or when the keys
    /// may be read again for the notifications that did not open.
    fn wake_at(&self) -> Instant {
        let scheduled = self.schedule.wake_at(self.demand());
        if self.unopened.is_empty() {
            return scheduled;
        }
        scheduled.min(self.keys_read_at + KEYS_REREAD_INTERVAL)
    }

    /// What the cursor holds that an advance would settle.
    fn demand(&self) -> Demand {
        Demand {
            waiting: self.cursor.waiting(),
            delivered_beyond: self.cursor.delivered_beyond(),
            undecodable: self.undecodable,
        }
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
            Some(ConnEvent::Closed(err)) => self.lose(describe_close(err.as_ref())),
            None => self.lose("connection task ended".into()),
        }
    }

    fn on_notification(&mut self, n: &Notification) {
        if n.channel() != CHANNEL {
            return; // a late probe answer
        }
        Metrics::add(&self.shared.metrics.received, 1);
        let Some(conn) = self.conn.as_ref() else {
            return;
        };
        match conn.keyring.open(n.payload()) {
            Ok(opened) => {
                for notice in self.cfg.policy.notices(opened) {
                    self.cursor.on_notice(notice, &mut self.steps);
                }
            }
            Err(err) => self.skip_notification(n.payload(), &err),
        }
    }

    /// A notification that cannot be taken: counted, held for the next keys when it may open
    /// with them, and swept for, since genuine rows may stand behind it (a publisher whose role
    /// sets another `notify_payload`, a key made since the relay read them).
    fn skip_notification(&mut self, text: &str, err: &ReadError) {
        let metrics = &self.shared.metrics;
        if err.may_open_with_new_keys() && self.unopened.len() < MAX_UNOPENED {
            self.unopened.push(text.to_owned());
        } else if err.is_forged() || err.may_open_with_new_keys() {
            Metrics::add(&metrics.forged, 1);
            debug!(error = %err, "skipping a pg_outbox notification");
        } else {
            Metrics::add(&metrics.decode_errors, 1);
            let prefix: String = text.chars().take(200).collect();
            warn!(error = %err, payload = %prefix, "skipping a pg_outbox notification");
        }
        self.undecodable = true;
    }

    /// The keys read again: what opens with them was sealed with a key made since (its rows
    /// were swept), what does not was forged.
    fn on_keys(&mut self, keyring: Keyring) {
        let forged = self
            .unopened
            .drain(..)
            .filter(|text| keyring.open(text).is_err())
            .count();
        Metrics::add(&self.shared.metrics.forged, forged as u64);
        if let Some(conn) = self.conn.as_mut() {
            conn.keyring = keyring;
        }
    }

    /// Runs one advance on the current connection and delivers what it settles.
    async fn advance(&mut self) -> Result<(), Error> {
        let mut advance = self
            .begin_advance()
            .ok_or_else(|| Error::from(Kind::ConnectionLost("no connection".into())))?;
        let result = (&mut advance.rows).await;
        self.settle(result, &advance.what)
    }

    /// Sends the advance query from the cursor's snapshot; `None` without a connection.
    fn begin_advance(&self) -> Option<Query<Advancing>> {
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
        let (schema, query_timeout) = (self.cfg.schema.clone(), self.cfg.query_timeout);
        let rows = async move {
            let rows = advance::advance(&client, &statement, &from, &channels, &schema);
            within(query_timeout, "running the advance query", rows).await
        };
        Some(Query {
            rows: Box::pin(rows.instrument(span.clone())),
            what: Advancing {
                heard_before: self.cursor.heard(),
                span,
            },
        })
    }

    /// Applies an advance's result to the cursor and delivers what it settles.
    fn settle(
        &mut self,
        result: Result<Visible, Error>,
        advancing: &Advancing,
    ) -> Result<(), Error> {
        self.schedule.settled(Instant::now());
        let visible = result?;
        let _entered = advancing.span.enter();
        Metrics::add(&self.shared.metrics.advances, 1);
        if visible.snapshot.xmax() < self.cursor.snapshot().xmax() {
            // Transaction ids went back on what looked like the same server: its history is
            // not the one the cursor read. Reconnect, and check it.
            self.lineage.went_back();
            return Err(Error::from(Kind::ConnectionLost(format!(
                "the server's transaction ids went back, from {} to {}",
                self.cursor.snapshot().xmax(),
                visible.snapshot.xmax()
            ))));
        }
        self.undecodable = false;
        self.cursor
            .on_advance(visible, advancing.heard_before, &mut self.steps);
        advancing.span.record("settled", self.steps.len());
        self.flush_settled();
        Ok(())
    }

    /// The cursor's snapshot as a watermark: everything under it is handed over once the
    /// steps that settled it are.
    fn watermark(&self) -> Arc<Watermark> {
        Arc::new(self.lineage.watermark(self.cursor.snapshot().clone()))
    }

    /// Delivers the steps that settled the cursor's snapshot, then that snapshot as the
    /// watermark. Its last events carry it, so a subscriber that reads them joins it at once:
    /// the position it reports after each has no ids beyond the snapshot, whether or not it
    /// read them before the fan-out's watermark moved (an SSE frame's `id:` is then some 24
    /// characters shorter).
    fn flush_settled(&mut self) {
        let watermark = self.watermark();
        self.flush_then(Some(&watermark));
        self.shared.fanout.set_watermark(watermark);
    }

    /// Sends one catch-up query for every resume request waiting; `None` without a connection
    /// or a request.
    fn begin_resume(
        &mut self,
        resumes: &mut mpsc::UnboundedReceiver<ResumeRequest>,
    ) -> Option<Query<Vec<ResumeRequest>>> {
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
        let wanted = Wanted::of(&requests, &self.lineage.answering(&self.cfg.policy));
        let client = Arc::clone(&conn.queries);
        let (schema, query_timeout) = (self.cfg.schema.clone(), self.cfg.query_timeout);
        let span = debug_span!("pg_outbox_resume", requests = requests.len());
        let rows = async move {
            let rows = resume::query(&client, &wanted, &schema);
            within(query_timeout, "running the resume query", rows).await
        };
        Some(Query {
            rows: Box::pin(rows.instrument(span)),
            what: requests,
        })
    }

    /// Answers each resume request from the catch-up's result; on an error the requests wait
    /// for the next connection.
    fn answer_resumes(
        &mut self,
        requests: Vec<ResumeRequest>,
        result: Result<Visible, Error>,
    ) -> Result<(), Error> {
        let read = match result {
            Ok(read) => read,
            Err(err) => {
                self.waiting_resumes.extend(requests);
                return Err(err);
            }
        };
        let metrics = &self.shared.metrics;
        Metrics::add(&metrics.resume_queries, 1);
        // Rows handed out by a catch-up are history this relay has seen too: witnesses of where
        // it holds, should the server lose part of it (positions are carried over from there).
        self.cursor.witness(read.rows.iter().map(RowKey::of));
        let answering = self.lineage.answering(&self.cfg.policy);
        for request in requests {
            let answer = answering.answer(&request, &read);
            Metrics::add(&metrics.resumes, 1);
            if let Err(reason) = &answer {
                metrics.count_reset(reason);
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
        self.flush_then(None);
    }

    /// [`Listener::flush`], the last batch's runs carrying `watermark` (see
    /// [`Fanout::deliver`]).
    fn flush_then(&mut self, watermark: Option<&Arc<Watermark>>) {
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
                    deliver_batch(&self.shared, &mut self.batch, None);
                    metrics.count_gap(gap.kind());
                    warn!(
                        ?gap,
                        "pg_outbox events were lost before this relay read them"
                    );
                    self.shared.fanout.gap(&gap);
                }
                Step::Unreadable(row) => {
                    deliver_batch(&self.shared, &mut self.batch, None);
                    metrics.count_gap(row.clone().into_gap().kind());
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
        deliver_batch(&self.shared, &mut self.batch, watermark);
    }

    /// Gives the connection up, whatever noticed it was lost (its end, a failed or timed-out
    /// query, a history that went back): the loop closes it and reconnects.
    fn lose(&mut self, reason: String) {
        if let Some(conn) = self.conn.take() {
            warn!(reason = %reason, "pg_outbox relay connection lost");
            self.lost = Some(Lost { reason, conn });
        }
    }

    /// Reconnects with backoff and catches up; `Err` only on shutdown.
    async fn reconnect(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<(), Error> {
        let mut last_error = match self.lost.take() {
            Some(lost) => {
                lost.conn.close().await;
                lost.reason
            }
            None => "connection lost".into(),
        };
        let mut attempt: u32 = 0;
        loop {
            if *shutdown.borrow() {
                return Err(Error::from(Kind::Stopped));
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
                _ = shutdown.changed() => return Err(Error::from(Kind::Stopped)),
                result = async {
                    sleep(delay).await;
                    self.try_reconnect().await
                } => result,
            };
            match result {
                Ok(()) => {
                    Metrics::add(&self.shared.metrics.reconnects, 1);
                    self.shared.health.send_replace(Health::Listening);
                    self.schedule.settled(Instant::now());
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
        let run = within(self.cfg.query_timeout, "reading the server's identity", run).await;
        self.conn = Some(conn);
        let run = run?;
        if self.lineage.needs_check(&run) {
            self.rewind(run).await?;
        }
        self.counts_caught_up = true;
        self.advance().await
    }

    /// The server restarted, failed over or was restored, and may have lost transactions the
    /// cursor saw, handing their ids out again: rewinds the cursor to where the database
    /// recorded that the next run began, or else to the floor its witnesses prove, so the
    /// catch-up reads every xid from there again, and reports a gap where no witness survived.
    async fn rewind(&mut self, run: ServerRun) -> Result<(), Error> {
        let conn = self
            .conn
            .as_ref()
            .ok_or_else(|| Error::from(Kind::ConnectionLost("no connection".into())))?;
        let witnesses = self.cursor.witnesses();
        let check = async {
            let recorded = history::recorded_runs(&conn.queries, &self.cfg.schema).await?;
            self.lineage.recorded(recorded);
            match self.lineage.recorded_floor(&run) {
                Some(floor) => Ok(Floor::Exact(floor)),
                None => history::floor(&conn.queries, &witnesses, &self.cfg.schema).await,
            }
        };
        let floor = within(
            self.cfg.query_timeout,
            "checking the server's history",
            check,
        )
        .await?;
        let from = self.cursor.snapshot().clone();
        let floor_xid = match floor {
            // Positions issued on the old run stay exact below the floor.
            Floor::Exact(xid) => xid,
            // Where the old history ends is not known.
            Floor::Assumed(xid) => {
                self.steps.push(Step::Gap(Gap::Rewound { floor_xid: xid }));
                xid
            }
        };
        self.cursor.rewind(floor_xid);
        warn!(
            previous = ?self.lineage.server(),
            now = ?run,
            cursor = %from,
            rewound_to = %self.cursor.snapshot(),
            witnesses = witnesses.len(),
            exact = matches!(floor, Floor::Exact(_)),
            "pg_outbox relay reached a new run of the server: reading again from the floor of \
             the history it still holds"
        );
        Metrics::add(&self.shared.metrics.rewinds, 1);
        self.lineage.moved_to(run, floor);
        self.flush_settled();
        Ok(())
    }

    async fn stop(mut self) {
        if let Some(conn) = self.conn.take() {
            conn.close().await;
        }
        if let Some(lost) = self.lost.take() {
            lost.conn.close().await;
        }
        self.shared.fanout.close();
        self.shared.health.send_replace(Health::Stopped);
        info!("pg_outbox relay stopped");
    }
}

/// Hands `batch` to the subscribers and empties it.
fn deliver_batch(shared: &Shared, batch: &mut Vec<Event>, then: Option<&Arc<Watermark>>) {
    if batch.is_empty() {
        return;
    }
    let lagged = shared.fanout.deliver(batch, then);
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
