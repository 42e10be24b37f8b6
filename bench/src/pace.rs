//! Publishers that pace one-event transactions to a rate, for the figures that only need to
//! know how many committed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pg_outbox_tests::Cluster;

/// Runs `sql` (one statement with the user as `$1`) from `publishers` connections, paced
/// together to `rate` a second for `duration`, each call for the next user of `users` in a
/// fixed pseudo-random order (the same in every run); returns how many committed.
pub async fn publish(
    cluster: &Cluster,
    sql: &str,
    users: Arc<Vec<String>>,
    publishers: u32,
    rate: u32,
    duration: Duration,
) -> u64 {
    let interval = Duration::from_secs_f64(f64::from(publishers) / f64::from(rate));
    let start = Instant::now() + Duration::from_millis(100);
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let client = cluster.connect("postgres").await;
        let statement = client.prepare(sql).await.expect("prepare the publish");
        let users = Arc::clone(&users);
        tasks.push(tokio::spawn(async move {
            let offset = interval.mul_f64(f64::from(p) / f64::from(publishers));
            // An LCG per publisher.
            let mut pick = u64::from(p) * 7919 + 1;
            let mut committed = 0u64;
            for n in 0u32.. {
                let due = start + offset + interval * n;
                if due.duration_since(start) >= duration {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                pick = pick
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let user = &users[(pick >> 33) as usize % users.len()];
                if client.query_one(&statement, &[user]).await.is_ok() {
                    committed += 1;
                }
            }
            committed
        }));
    }
    let mut committed = 0;
    for task in tasks {
        committed += task.await.unwrap_or(0);
    }
    committed
}
