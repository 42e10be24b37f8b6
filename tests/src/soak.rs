//! One relay process of the soak test (`tests/soak.rs`), run by it as the `soak-relay` binary
//! of this crate, four at a time, so that each relay's memory is its own process's.

use std::time::{Duration, Instant};

use pg_outbox_client::Topic;

/// What a relay process prints, one line each, prefixed so other output is told apart.
pub const PREFIX: &str = "soak:";

/// Relays everything from `conn` as `name`, prints its progress every second, and once every
/// event `0..n` was delivered (or nothing new came for a minute) prints what it got.
pub async fn relay_process(conn: &str, name: &str, n: usize) {
    let relay = pg_outbox_client::RelayBuilder::from_connection_string(conn)
        .unwrap()
        .application_name(name)
        .backoff(Duration::from_millis(100), Duration::from_secs(2))
        .sweep_interval(Duration::from_millis(500))
        .subscriber_buffer(1 << 17)
        .build()
        .unwrap();
    let mut all = relay.subscribe_to(Topic::all());
    relay.start().await.unwrap();
    println!("{PREFIX} ready");

    // How many times each event arrived, UNSEEN for none. Filled with a non-zero byte so that
    // every page is resident from the start: a zeroed allocation would only become resident as
    // events arrive, a growth of one byte per event that is the test's, not the relay's.
    const UNSEEN: u8 = u8::MAX;
    let mut seen = vec![UNSEEN; n];
    let (mut unique, mut duplicated, mut lagged, mut gaps, mut foreign) = (0, 0, 0u64, 0, 0);
    let mut report = tokio::time::interval(Duration::from_secs(1));
    let mut last_new = Instant::now();
    while unique < n && last_new.elapsed() < Duration::from_secs(60) {
        tokio::select! {
            item = all.recv() => match item {
                Some(pg_outbox_client::Delivery::Event(event)) => {
                    match event.payload()["n"].as_u64().map(|i| i as usize) {
                        Some(i) if i < n => {
                            if seen[i] == UNSEEN {
                                unique += 1;
                                last_new = Instant::now();
                                seen[i] = 1;
                            } else {
                                duplicated += 1;
                                seen[i] = seen[i].saturating_add(1).min(UNSEEN - 1);
                            }
                        }
                        _ => foreign += 1,
                    }
                }
                Some(pg_outbox_client::Delivery::Lagged { missed }) => lagged += missed,
                Some(pg_outbox_client::Delivery::Gap(_)) => gaps += 1,
                Some(_) => {}
                None => break,
            },
            _ = report.tick() => println!("{PREFIX} delivered {unique}"),
        }
    }
    let metrics = relay.metrics();
    relay.shutdown().await;
    println!("{PREFIX} delivered {unique}");
    println!(
        "{PREFIX} result received {unique}, lost {}, duplicated {duplicated}, lagged {lagged}, \
         gaps {gaps}, foreign {foreign}, reconnects {}, caught_up {}",
        n - unique,
        metrics.reconnects,
        metrics.caught_up
    );
}
