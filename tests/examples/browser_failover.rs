//! The demo's browser step (`scripts/demo.sh`): the failover scenario of the browser test
//! (`tests/src/browser.rs`) on a database of your own, printing what the page received.
//!
//! ```text
//! cargo run -p pg_outbox_tests --example browser_failover -- '<connection string>'
//! ```
//!
//! Needs Chromium (`/usr/bin/chromium`, or `$CHROMIUM`) and the SSE example app (built on the
//! way, or `$PG_OUTBOX_SSE_EXAMPLE`). Publishes for users u1 and u2 of that database.

use std::time::Duration;

use pg_outbox_tests::browser::{failover, FailoverSize, Fault};

#[tokio::main]
async fn main() {
    let Some(db) = std::env::args().nth(1) else {
        eprintln!("usage: browser_failover '<connection string>'");
        std::process::exit(2);
    };
    let outcome = failover(
        &db,
        FailoverSize {
            transactions: 100,
            kill_after: 20,
            pace: Duration::from_millis(10),
        },
        Fault::ReplicaKilled,
    )
    .await;
    println!(
        "  the page of u1 received {} events ({} before replica A was killed, the rest from \
         replica B after {} reconnect(s))",
        outcome.received,
        outcome.first_connection,
        outcome.connections.saturating_sub(1)
    );
    println!(
        "  received: {}, lost: {}, duplicated: {} (committed for u1: {}; u2's or rolled back \
         received: {}; out of order: {}; resets: {})",
        outcome.received,
        outcome.lost,
        outcome.duplicated,
        outcome.committed,
        outcome.foreign,
        outcome.disorder.len(),
        outcome.resets
    );
    let exact = outcome.lost == 0
        && outcome.duplicated == 0
        && outcome.foreign == 0
        && outcome.resets == 0
        && outcome.disorder.is_empty();
    if !exact {
        eprintln!("  not exactly once: {outcome}");
        std::process::exit(1);
    }
}
