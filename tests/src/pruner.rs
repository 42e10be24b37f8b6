//! What the pruner tests share: aged rows, and the pruner worker as the server shows it, so
//! that tests wait for what it reports rather than for time to pass or for words in the log.
//!
//! The pruner shows in `pg_stat_activity` with `backend_type = 'pg_outbox pruner'`. Every pass
//! reports what it does in `query` afresh, each report with a new `state_change`: `checking
//! for the extension` as it begins, then `pruning` and `idle` as it ends, or
//! [`WAITING_FOR_EXTENSION`] as it ends when the extension is missing. A restarted pruner is a
//! new process, with a new `pid` and `backend_start`.

use std::cell::RefCell;
use std::time::Duration;

use tokio_postgres::Client;

use crate::{Cluster, WAIT};

/// What a pass reports at its end when `pg_outbox` is not installed in the pruner's database.
pub const WAITING_FOR_EXTENSION: &str = "waiting for CREATE EXTENSION pg_outbox";

/// How long the postmaster waits, after the pruner exits, before it starts it again
/// (`RESTART_AFTER` in `extension/src/worker/pruner.rs`).
pub const RESTART_DELAY: Duration = Duration::from_secs(5);

/// Inserts `count` events created `age` ago (`channel` tells them apart), as if published then.
pub async fn insert_aged(client: &Client, count: i32, age: &str, channel: &str) {
    client
        .execute(
            "INSERT INTO event_outbox (id, channel, user_id, payload, created_at)
             SELECT gen_random_uuid(), $3, 'u', '{}', clock_timestamp() - $2::text::interval
             FROM generate_series(1, $1)",
            &[&count, &age, &channel],
        )
        .await
        .unwrap();
}

/// The pruner's pid, once it is running.
pub async fn pruner_pid(cluster: &Cluster, client: &Client) -> i32 {
    cluster
        .wait_for("the pruner in pg_stat_activity", WAIT, || async {
            client
                .query_opt(
                    "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_outbox pruner'",
                    &[],
                )
                .await
                .unwrap()
                .map(|row| row.get(0))
        })
        .await
}

/// What the pruner shows in `pg_stat_activity.query` (`idle`, `pruning`, `waiting for ...`), or
/// `None` while it is not running.
pub async fn pruner_state(client: &Client) -> Option<String> {
    client
        .query_opt(
            "SELECT query FROM pg_stat_activity WHERE backend_type = 'pg_outbox pruner'",
            &[],
        )
        .await
        .unwrap()
        .map(|row| row.get(0))
}

/// `outbox_prune_state.rows_pruned`: every row pruned so far.
pub async fn rows_pruned(client: &Client) -> i64 {
    client
        .query_one("SELECT rows_pruned FROM outbox_prune_state", &[])
        .await
        .unwrap()
        .get(0)
}

/// The server's clock now, as text to hand back as a `since` below.
pub async fn server_clock(client: &Client) -> String {
    client
        .query_one("SELECT clock_timestamp()::text", &[])
        .await
        .unwrap()
        .get(0)
}

/// When the server started (`pg_postmaster_start_time()`), as text to hand back as a `since`.
pub async fn server_start(client: &Client) -> String {
    client
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .await
        .unwrap()
        .get(0)
}

/// Waits until the pruner has run `passes` whole passes that began after `since` and ended
/// reporting `activity` (`idle`, or [`WAITING_FOR_EXTENSION`]); returns the pid that ran each,
/// in order, so a caller can tell whether it was one process throughout.
///
/// Each pass is seen as a new `state_change` of that activity. The first one seen after
/// `since` may belong to a pass that began before it; every later one began after the one
/// before it ended.
pub async fn wait_for_passes(
    cluster: &Cluster,
    client: &Client,
    activity: &str,
    since: &str,
    passes: usize,
) -> Vec<i32> {
    let seen = RefCell::new(Vec::<(String, i32)>::new());
    cluster
        .wait_for(
            &format!("{passes} pruner passes ending with {activity:?}"),
            WAIT,
            || async {
                let row = client
                    .query_opt(
                        "SELECT state_change::text, pid FROM pg_stat_activity \
                         WHERE backend_type = 'pg_outbox pruner' AND query = $1 \
                           AND state_change > $2::text::timestamptz",
                        &[&activity, &since],
                    )
                    .await
                    .unwrap();
                if let Some(row) = row {
                    let pass: (String, i32) = (row.get(0), row.get(1));
                    let mut seen = seen.borrow_mut();
                    if !seen.contains(&pass) {
                        seen.push(pass);
                    }
                }
                let seen = seen.borrow();
                (seen.len() > passes).then(|| seen.iter().map(|(_, pid)| *pid).collect())
            },
        )
        .await
}

/// At most how many times the pruner has been started again since `since`, a moment when it
/// was running ([`server_clock`]) or the server's start ([`server_start`]), judged by when the
/// pruner running now started: the postmaster starts it again only [`RESTART_DELAY`] after it
/// exits, so one that started less than `n + 1` delays after `since` is at most its `n`-th
/// restart since then (0: no restart). Waits for the pruner to be running.
pub async fn restarts_since(cluster: &Cluster, client: &Client, since: &str) -> i64 {
    cluster
        .wait_for("the pruner in pg_stat_activity", WAIT, || async {
            client
                .query_opt(
                    "SELECT floor(greatest(extract(epoch FROM backend_start - $1::text::timestamptz)::float8, 0) / $2)::int8 \
                     FROM pg_stat_activity WHERE backend_type = 'pg_outbox pruner'",
                    &[&since, &RESTART_DELAY.as_secs_f64()],
                )
                .await
                .unwrap()
                .map(|row| row.get(0))
        })
        .await
}
