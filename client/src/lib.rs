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
#![doc = include_str!("guarantees.md")]
//!
//! # Connection requirements
//!
//! LISTEN is session state: the relay needs a direct connection (or a session-mode pool) to the
//! primary. A hot standby (SQLSTATE 25006) or a pooler in transaction mode makes
//! [`Relay::start`] fail with an [`Error`] whose [`is_standby`](Error::is_standby) or
//! [`is_pooler`](Error::is_pooler) is true, and whose message names the fix. The connection's
//! `application_name` defaults to `pg_outbox_relay`.
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
#[cfg(feature = "metrics")]
pub mod export;
mod fanout;
mod health;
mod history;
mod incoming;
mod keyring;
mod lineage;
mod listener;
mod metrics;
mod policy;
mod position;
mod pruning;
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
            page_end: None,
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

/// The catch-up statement of resumed subscriptions for the extension in `schema` (`$1`, `$2`:
/// users and the xids their rows begin at; `$3`, `$4`: channels; `$5`: every event's), exposed
/// for the end-to-end test that checks its plan. Not a stable API.
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
pub fn __catch_up_sql(schema: &str) -> String {
    resume::catch_up_sql(schema)
}

/// The numbers the documentation quotes are the code's: a constant changed without its prose
/// fails here.
#[cfg(test)]
mod prose {
    use crate::cursor::{MAX_WAITING, WITNESSES};
    use crate::resume::PAGE_ROWS;
    use crate::schedule::{EARLY_FETCH_AT, SWEEP_AFTER_DELIVERED};

    /// `n` as the prose writes it: 2,000 and 65,536, but 256.
    fn quoted(n: usize) -> String {
        let digits = n.to_string();
        let mut out = String::new();
        for (i, digit) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) && digits.len() > 3 {
                out.push(',');
            }
            out.push(digit);
        }
        out
    }

    #[test]
    fn the_docs_quote_the_constants_they_describe() {
        let guarantees = include_str!("guarantees.md");
        let readme = include_str!("../../README.md");
        let settings = include_str!("config.rs");
        let subscription = include_str!("subscription.rs");
        let quotes = [
            (EARLY_FETCH_AT, &[guarantees, readme, settings][..]),
            (SWEEP_AFTER_DELIVERED, &[readme, settings][..]),
            (MAX_WAITING, &[guarantees][..]),
            (WITNESSES, &[guarantees][..]),
            (PAGE_ROWS, &[guarantees, readme, subscription][..]),
        ];
        for (constant, texts) in quotes {
            for text in texts {
                assert!(
                    text.contains(&quoted(constant)),
                    "{} is not quoted where it is described",
                    quoted(constant)
                );
            }
        }
        assert_eq!(quoted(65_536), "65,536");
        assert_eq!(quoted(256), "256");
    }
}

/// The README's examples, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
