//! What the pruner tests share: aged rows, and the pruner worker as `pg_stat_activity` shows it.

use tokio_postgres::Client;

use crate::{Cluster, WAIT};

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
