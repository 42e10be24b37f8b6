//! Pruning by the relays themselves ([`RelayBuilder::prune_every`](crate::RelayBuilder::prune_every)),
//! for servers where nothing else prunes: the SQL edition on a managed service without
//! `pg_cron`, or the native one whose library is not preloaded.
//!
//! Every relay that opts in tries at its interval (with jitter, so that replicas started
//! together spread out); one at a time prunes. The election is a session-level advisory lock
//! taken with `pg_try_advisory_lock` on a connection of its own: a relay that loses simply
//! waits for its next turn, and one killed mid-prune loses its session, and with it the lock,
//! at once, so the next relay to try takes over. `outbox_prune()` does the work by the
//! database clock: it empties or drops the segments whose last event expired, and deletes
//! other expired rows in batches of `pg_outbox.prune_batch_size` (the SQL edition records who
//! pruned). It never blocks publishers' inserts. The relay's own connections carry on
//! meanwhile: pruning never holds up delivery.

use std::sync::Arc;
use std::time::Duration;

use pg_outbox_wire::quote_ident;
use tokio::sync::watch;
use tokio::time::sleep;
use tracing::{debug, info, warn};

use crate::backoff::entropy;
use crate::config::Settings;
use crate::connection::connect;
use crate::error::{within, Error, Kind};
use crate::metrics::Metrics;
use crate::shared::Shared;

/// What one turn did.
#[derive(Debug, PartialEq, Eq)]
enum Turn {
    /// This relay was elected and removed this many rows.
    Pruned(i64),
    /// Another relay holds the lock: it prunes now.
    NotElected,
}

/// Prunes every `every` until shutdown.
pub(crate) async fn run(
    cfg: Arc<Settings>,
    shared: Arc<Shared>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut turn: u64 = 0;
    loop {
        turn = turn.wrapping_add(1);
        // Between 3/4 and 5/4 of the interval.
        let spread = every.as_millis() as u64 / 2;
        let jitter = if spread == 0 {
            0
        } else {
            entropy(turn) % spread
        };
        let wait = every - every / 4 + Duration::from_millis(jitter);
        tokio::select! {
            _ = shutdown.wait_for(|stopped| *stopped) => return,
            _ = sleep(wait) => {}
        }
        Metrics::add(&shared.metrics.prune_turns, 1);
        match prune_once(&cfg).await {
            Ok(Turn::Pruned(rows)) => {
                Metrics::add(&shared.metrics.prunes, 1);
                Metrics::add(&shared.metrics.rows_pruned, rows as u64);
                if rows > 0 {
                    info!(rows, "pg_outbox relay pruned expired events");
                }
            }
            Ok(Turn::NotElected) => debug!("another pg_outbox relay prunes now"),
            Err(err) => warn!(error = %err, "pg_outbox relay could not prune"),
        }
    }
}

/// One turn: connect, try the lock, prune if elected. The connection, and the lock with it,
/// ends with the turn.
async fn prune_once(cfg: &Settings) -> Result<Turn, Error> {
    let schema = cfg.schema.as_str();
    let turn = async {
        let (client, driver) = connect(&cfg.pg, &cfg.tls, None)
            .await
            .map_err(|e| Error::from(Kind::Connect(e)))?;
        let result = async {
            let elected: bool = client
                .query_one(
                    "SELECT pg_try_advisory_lock(hashtext('pg_outbox prune'), hashtext($1))",
                    &[&schema],
                )
                .await
                .map_err(|e| Error::from_query(e, schema))?
                .get(0);
            if !elected {
                return Ok(Turn::NotElected);
            }
            let rows: i64 = client
                .query_one(
                    &format!("SELECT {}.outbox_prune()", quote_ident(schema)),
                    &[],
                )
                .await
                .map_err(|e| Error::from_query(e, schema))?
                .get(0);
            Ok(Turn::Pruned(rows))
        }
        .await;
        // Ends the session, and the lock with it.
        drop(client);
        let _ = driver.await;
        result
    };
    // A prune of a large backlog takes as long as it takes; only connecting is bounded.
    within(
        cfg.query_timeout.max(Duration::from_secs(3600)),
        "pruning",
        turn,
    )
    .await
}
