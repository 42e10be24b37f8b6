//! One relay replica for the demo: relays every event, then reports what it got against the
//! outbox table.
//!
//! ```text
//! cargo run -p pg_outbox_client --example relay_demo -- '<connection string>' <instance-id> [idle-seconds]
//! ```
//!
//! Prints `ready` once LISTEN is in effect, stops after `idle-seconds` (default 5) without a new
//! event, then prints received, lost, duplicated, caught up, reconnects and p50/p99
//! commit-to-delivery latency. "Lost" compares with the rows committed since it started whose
//! origin is not its own.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures_util::StreamExt;
use pg_outbox_client::{Delivery, RelayBuilder, Topic};
use tokio_postgres::NoTls;
use uuid::Uuid;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(conn), Some(instance)) = (args.next(), args.next()) else {
        eprintln!("usage: relay_demo '<connection string>' <instance-id> [idle-seconds]");
        std::process::exit(2);
    };
    let idle = Duration::from_secs(args.next().and_then(|s| s.parse().ok()).unwrap_or(5));

    let (client, connection) = tokio_postgres::connect(&conn, NoTls).await?;
    tokio::spawn(connection);
    let started_at: String = client
        .query_one("SELECT clock_timestamp()::text", &[])
        .await?
        .get(0);

    let relay = RelayBuilder::from_connection_string(&conn)?
        .instance_id(&instance)
        .application_name(format!("pg_outbox_relay_{instance}"))
        .backoff(Duration::from_millis(100), Duration::from_secs(2))
        .sweep_interval(Duration::from_millis(500))
        .build()?;
    let mut all = relay.subscribe_to(Topic::all());
    relay.start().await?;
    println!("{instance}: ready");

    let mut received: HashMap<Uuid, u32> = HashMap::new();
    let mut lagged = 0;
    let mut gaps = 0;
    loop {
        let limit = if received.is_empty() {
            Duration::from_secs(300)
        } else {
            idle
        };
        match tokio::time::timeout(limit, all.next()).await {
            Ok(Some(Delivery::Event(event))) => *received.entry(event.id()).or_default() += 1,
            Ok(Some(Delivery::Lagged { missed })) => lagged += missed,
            Ok(Some(Delivery::Gap(gap))) => {
                gaps += 1;
                eprintln!("{instance}: gap {gap:?}");
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    relay.shutdown().await;

    let expected: HashSet<Uuid> = client
        .query(
            "SELECT id FROM event_outbox WHERE created_at >= $1::text::timestamptz \
             AND origin IS DISTINCT FROM $2",
            &[&started_at, &instance],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let lost = expected
        .iter()
        .filter(|id| !received.contains_key(id))
        .count();
    let duplicated: u32 = received.values().map(|n| n - 1).sum();
    let metrics = relay.metrics();
    let ms = |q| {
        metrics
            .latency
            .percentile(q)
            .map(|d| format!("{:.1} ms", d.as_secs_f64() * 1000.0))
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "{instance}: received {}, lost {lost}, duplicated {duplicated}, caught up {}, \
         skipped own {}, reconnects {}, lagged {lagged}, gaps {gaps}, \
         latency p50 <= {}, p99 <= {}",
        received.len(),
        metrics.caught_up,
        metrics.skipped_own_origin,
        metrics.reconnects,
        ms(0.5),
        ms(0.99),
    );
    Ok(())
}
