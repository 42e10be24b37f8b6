//! The shape of an SSE or websocket server: one relay per process, one subscription per open
//! client connection, each for its own user, each with a small buffer of its own.
//!
//! ```text
//! cargo run -p pg_outbox_client --example fanout -- '<connection string>' [seconds]
//! psql -c "SELECT outbox_publish('chat', 'alice', '{\"text\": \"hi\"}')"
//! ```
//!
//! Opens three pretend client connections (alice twice, bob once), prints what each receives,
//! and stops after `seconds` (default 30), printing the relay's metrics.

use std::time::Duration;

use futures_util::StreamExt;
use pg_outbox_client::{Delivery, RelayBuilder, Topic};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let Some(conn) = args.next() else {
        eprintln!("usage: fanout '<connection string>' [seconds]");
        std::process::exit(2);
    };
    let seconds = args.next().and_then(|s| s.parse().ok()).unwrap_or(30);

    let relay = RelayBuilder::from_connection_string(&conn)?
        .channels(["chat"])
        .build()?;

    // In a real server each of these is made when a browser connects, and dropped when it
    // leaves: a dropped subscription costs the relay nothing.
    let mut connections = Vec::new();
    for (n, user) in ["alice", "alice", "bob"].into_iter().enumerate() {
        let mut subscription = relay.subscribe_to(Topic::channel("chat").user(user).buffer(64));
        connections.push(tokio::spawn(async move {
            while let Some(item) = subscription.next().await {
                match item {
                    // An SSE server writes `data: {payload}\n\n` to its response here.
                    Delivery::Event(event) => {
                        println!("connection {n} ({user}) <- {}", event.payload())
                    }
                    // The browser missed events: tell it to reload its state.
                    Delivery::Lagged { missed } => {
                        println!("connection {n} ({user}) missed {missed}: resync")
                    }
                    Delivery::Gap(gap) => println!("connection {n} ({user}) gap {gap:?}: resync"),
                    _ => {}
                }
            }
        }));
    }
    relay.start().await?;
    println!("relaying channel chat for {seconds} s");

    tokio::time::sleep(Duration::from_secs(seconds)).await;
    relay.shutdown().await; // ends every subscription after what is queued
    for connection in connections {
        connection.await?;
    }
    println!("{:?}", relay.metrics());
    Ok(())
}
