//! Relay [pg_outbox] events to every replica of an app.
//!
//! Publishing is SQL, in the caller's transaction: `SELECT outbox_publish(channel, user_id,
//! payload [, origin])`. This crate is the other side: one [`Relay`] per process keeps one
//! dedicated `LISTEN pg_outbox` connection (and a second one for its queries) and hands each
//! committed event to local subscribers,
//! exactly once, in the order described under [Delivery guarantees](#delivery-guarantees),
//! across disconnects, restarts and failovers.
//!
//! ```no_run
//! use futures_util::StreamExt;
//! use pg_outbox_client::{Delivery, Relay, RelayBuilder, Topic};
//!
//! #[derive(serde::Deserialize)]
//! struct ChatMessage {
//!     text: String,
//! }
//!
//! # async fn run() -> Result<(), pg_outbox_client::Error> {
//! let relay = RelayBuilder::from_connection_string("host=/run/postgresql dbname=app")?
//!     .instance_id("replica-a") // skip the events this replica published itself
//!     .build()?;
//! // or Topic::channel("chat").user("u1"), Topic::all(), Topic::all().user("u1")
//! let mut chat = relay.subscribe_to(Topic::channel("chat"));
//! relay.start().await?; // LISTEN is in effect: nothing committed from now on is missed
//!
//! while let Some(item) = chat.next().await {
//!     match item {
//!         Delivery::Event(event) => match event.decode::<ChatMessage>() {
//!             Ok(message) => println!("{} -> {}: {}", event.channel(), event.user_id(), message.text),
//!             Err(err) => eprintln!("skipping: {err}"),
//!         },
//!         Delivery::Lagged { missed } => eprintln!("this subscriber fell {missed} events behind"),
//!         Delivery::Gap(gap) => eprintln!("events were lost before the relay read them: {gap:?}"),
//!         _ => {}
//!     }
//! }
//! relay.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! # Delivery guarantees
//!
//! - **Gap-free.** The relay keeps a cursor made of a `pg_snapshot` *S* (every row whose `xid` is
//!   visible in *S* was delivered) and the ids delivered beyond it. A live notification is
//!   delivered unless its row is already covered. After any disconnect the relay reconnects
//!   (exponential backoff with jitter), LISTENs first, then reads from `event_outbox` every row
//!   visible in a fresh snapshot and not in *S*, in the same statement that takes the snapshot.
//!   Every committed row lands exactly once, whatever order transactions commit in: a
//!   transaction open across a reconnect is delivered when it commits. Rolled-back publishes
//!   are never delivered.
//! - **Order.** Live events are delivered in the order their notifications were sent; rows read
//!   from the table without their notification having been seen (after a reconnect, in a sweep,
//!   past a full queue) follow, in `xid` order. The events of one transaction arrive together, in
//!   publish order. Between transactions: commit order with `pg_outbox.notify_mode =
//!   'transaction'`; with `'worker'`, commit order between the notifier's batches (at least 4 ms
//!   apart; 10,000 rows each while it catches up a backlog) and `xid` order within one; with both
//!   modes in use, a worker-mode transaction is delivered after the transaction-mode ones that
//!   commit before its batch does. Do not infer causality between transactions from it.
//! - **Both notification forms.** Inline notifications (`pg_outbox.notify_payload = 'inline'`)
//!   are delivered without a query; references are resolved in batches: one query fetches
//!   everything pending, never one query per event: at most one per `fetch_interval`, sooner
//!   once 32 events wait ([`RelayBuilder::fetch_interval`]).
//! - **Idle sweep.** Every `sweep_interval` of idleness the relay runs the same query: it moves
//!   the cursor forward (bounding the dedupe set), delivers rows whose notification was lost or
//!   undecodable, and proves the connection alive.
//! - **Gaps are reported, never hidden.** Rows the relay never read may have been pruned when
//!   `outbox_prune_state.pruned_through_xid` is at or above *S*'s `xmax`, or at or above a
//!   transaction that was running in *S* and has ended since (rows are pruned by age, so a
//!   transaction that commits late can lose its rows at once): every subscriber then gets a
//!   [`Delivery::Gap`] ([`Gap::Pruned`]) and [`MetricsSnapshot::gaps`] counts it. The check is
//!   conservative: a long transaction that published nothing can raise it too. A row announced
//!   by a notification but gone when fetched is reported as [`Gap::Missing`].
//! - **Forged notifications** (any role that can connect can `NOTIFY pg_outbox`): PostgreSQL
//!   delivers a notification only once its transaction is visible to new snapshots, so a
//!   reference that a query sent after it arrived still cannot see names a transaction that
//!   never committed. It is settled as [`Gap::Missing`] and counted in
//!   [`MetricsSnapshot::forged`]; it never holds the relay up. At most 65,536 notified rows wait
//!   for a fetch: past that a notification is dropped and its row, if any, is read by the next
//!   advance. (A forged *inline* event cannot be told from a real one: see the README.)
//! - **Crashes, failovers and restores.** A server that crashes before commits that wrote no
//!   WAL of their own were flushed, a standby promoted while it was behind, or a restored
//!   backup hands out again transaction ids the relay already saw as committed. At every
//!   connection the relay compares the server's system identifier, timeline and start time
//!   with the previous ones (and watches for a snapshot whose `xmax` goes back); on a change it
//!   checks which of the rows it covered last (its witnesses: the 256 with the greatest xids,
//!   and those delivered beyond *S*) still exist, rewinds *S* to one past the greatest that
//!   does, and reads everything from there again: the new transactions are delivered, nothing
//!   delivered before is repeated ([`MetricsSnapshot::rewinds`] counts these). Events the relay
//!   delivered from transactions the server then lost cannot be taken back. If no witness
//!   survived, every subscriber gets [`Gap::Rewound`].
//! - **Positions, for browsers.** [`Subscription::position`] is where a subscription stands:
//!   the relay's watermark snapshot joined with the ids it handed out beyond it, as a URL-safe
//!   token (for SSE, the `id:` line). [`Relay::subscribe_from`] on any replica resumes from it:
//!   one query (shared by the resumes that arrive together) reads the events of the topic that
//!   the position had not seen, visible in a fresh snapshot, then the live stream follows with
//!   the copies of those skipped. Exact under out-of-order commits; a position that cannot be
//!   resumed exactly (malformed, older than the retention, forged, or from a server run this
//!   relay did not go through) yields [`Delivery::Reset`] first. See the README's
//!   "Positions" section for the size of a token.
//! - **Own origin.** A relay with an [`instance_id`](RelayBuilder::instance_id) skips the events
//!   published with that origin unless [`deliver_own_origin`](RelayBuilder::deliver_own_origin).
//! - **Slow subscribers** never block the relay or each other: each has a bounded buffer; when
//!   it is full, events are dropped for that subscriber only and a [`Delivery::Lagged`] marker
//!   with the count takes their place.
//! - **Nothing read from the network panics**: a malformed notification is logged, counted in
//!   [`MetricsSnapshot::decode_errors`] and skipped (its row, if any, is caught up by the next
//!   sweep); a payload that does not fit your type is an error of [`Event::decode`] only.
//!
//! # Connection requirements
//!
//! LISTEN is session state: the relay needs a direct connection (or a session-mode pool) to the
//! primary. A hot standby (SQLSTATE 25006) or a pooler in transaction mode makes
//! [`Relay::start`] fail with an [`Error`] whose [`is_standby`](Error::is_standby) or
//! [`is_pooler`](Error::is_pooler) is true, and whose message names the fix. The connection's `application_name` defaults to `pg_outbox_relay`.
//!
//! # TLS
//!
//! By default connections are made without TLS (`NoTls`): use a Unix socket or a trusted
//! network. With the crate feature `tls`, `RelayBuilder::tls` (any `rustls::ClientConfig`)
//! or `RelayBuilder::tls_root_certificates_pem` (a private CA) encrypt the relay's
//! connections and verify the server's certificate and host name; the connection string's
//! `sslmode=require` refuses a server that does not offer TLS.
//!
//! # Tracing
//!
//! The relay logs through [`tracing`]: span `pg_outbox_connect` (info) around each connection
//! and its LISTEN set-up, `pg_outbox_advance` (debug; `kind` is `catch_up` or `fetch`, `settled`
//! how many steps it produced) around each advance query, and `pg_outbox_deliver` (debug)
//! around each hand-over to subscribers. Lost connections, gaps and undecodable notifications
//! are warnings.
//!
//! # Features
//!
//! | feature | default | what |
//! |---|---|---|
//! | `tls` | off | TLS through rustls (`ring` provider): `RelayBuilder::tls`, `rustls` re-exported |
//!
//! A catch-up reads all the rows it settles in one result: after a very long disconnect under
//! heavy traffic it holds that backlog in memory once.
//!
//! [pg_outbox]: https://github.com/pg-outbox/pg_outbox

#![warn(missing_docs)]

mod advance;
mod backoff;
mod config;
mod connection;
mod cursor;
mod error;
mod event;
mod fanout;
mod health;
mod history;
mod incoming;
mod lineage;
mod listener;
mod metrics;
mod policy;
mod position;
mod relay;
mod resume;
mod rows;
mod schedule;
mod shared;
mod subscription;
mod tls;
mod topic;

pub use config::{RelayBuilder, DEFAULT_APPLICATION_NAME};
pub use error::Error;
pub use event::{DecodeError, Delivery, Event, Gap, ResetReason};
pub use health::Health;
pub use metrics::{Latency, MetricsSnapshot};
pub use pg_outbox_wire::{SealKey, SealKeyError};
pub use position::{Position, PositionError};
pub use relay::Relay;
pub use subscription::Subscription;
pub use topic::Topic;

/// The rustls version the `tls` feature uses, for building a [`rustls::ClientConfig`].
#[cfg(feature = "tls")]
pub use rustls;

/// Decodes one notification payload as the relay does: the events it carries, each with whether
/// its payload came inline (a reference's event carries a `null` payload). For the fuzz target
/// and the round-trip tests. Not a stable API.
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
pub fn __decode_notification(
    payload: &str,
) -> Result<Vec<(Event, bool)>, pg_outbox_wire::NotificationError> {
    let notices = incoming::decode(payload)?;
    Ok(notices
        .into_iter()
        .map(|mut notice| {
            let inline = notice.payload.is_some();
            let payload = notice.payload.take().unwrap_or(serde_json::Value::Null);
            (incoming::event_with(notice, payload), inline)
        })
        .collect())
}

/// Runs what a relay does with what it reads from the network, without a network: a cursor at
/// `snapshot` (text, as the server sends it) is fed every notification payload that decodes,
/// then one advance to `next` that returns the inline ones as rows. Returns how many steps the
/// cursor produced. For the fuzz target: it must never panic. Not a stable API.
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
pub fn __fuzz_relay_input(snapshot: &str, payloads: &[&str], next: &str) -> usize {
    let (Ok(start), Ok(next)) = (
        snapshot.parse::<pg_outbox_wire::Snapshot>(),
        next.parse::<pg_outbox_wire::Snapshot>(),
    ) else {
        return 0;
    };
    let mut cursor = cursor::Cursor::new(start);
    let mut steps = Vec::new();
    let mut rows = Vec::new();
    for payload in payloads {
        for notice in incoming::decode(payload).unwrap_or_default() {
            if let Some(event) = incoming::into_event(notice.clone()) {
                rows.push(Ok(event));
            }
            cursor.on_notice(notice, &mut steps);
        }
    }
    let heard_before = cursor.heard();
    cursor.on_advance(
        rows::Visible {
            snapshot: next,
            pruned_through_xid: 0,
            rows,
        },
        heard_before,
        &mut steps,
    );
    steps.len()
}

/// The advance statement for the extension in `schema` (`$1`: the cursor's snapshot as text),
/// exposed for the end-to-end test that checks its plan. Not a stable API.
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
pub fn __advance_sql(schema: &str) -> String {
    advance::advance_sql(schema, false)
}

/// The settings of the relay's query connection, for the end-to-end test that checks the plans
/// its statements get there. Not a stable API.
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
pub const __QUERY_SESSION_SETTINGS: &str = connection::QUERY_SESSION_SETTINGS;

/// The catch-up statement of resumed subscriptions for the extension in `schema`, with the
/// users filter (`$2`) and no channels filter, exposed for the end-to-end test that checks its
/// plan. Not a stable API.
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
pub fn __catch_up_sql(schema: &str) -> String {
    resume::catch_up_sql(schema, true, false, false)
}

/// The README's examples, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
