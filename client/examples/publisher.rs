//! Publishing from Rust is plain SQL: call `outbox_publish` inside your own transaction.
//!
//! ```text
//! cargo run -p pg_outbox_client --example publisher -- '<connection string>' <origin> [events]
//! ```
//!
//! Publishes `events` (default 1000) in transactions of ten, rolling every fifth transaction
//! back, and prints how many events were committed.

use serde_json::json;
use tokio_postgres::NoTls;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(conn), Some(origin)) = (args.next(), args.next()) else {
        eprintln!("usage: publisher '<connection string>' <origin> [events]");
        std::process::exit(2);
    };
    let events: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(1000);

    let (mut client, connection) = tokio_postgres::connect(&conn, NoTls).await?;
    tokio::spawn(connection);
    let publish = client
        .prepare("SELECT outbox_publish($1, $2, $3, $4)")
        .await?;

    let (mut committed, mut rolled_back) = (0, 0);
    for (batch, chunk) in (0..events).collect::<Vec<_>>().chunks(10).enumerate() {
        let transaction = client.transaction().await?;
        for n in chunk {
            let user = format!("user-{}", n % 7);
            let payload = json!({ "n": n, "text": format!("message {n} from {origin}") });
            transaction
                .execute(&publish, &[&"chat", &user, &payload, &origin])
                .await?;
        }
        // Your business writes go in the same transaction; a rollback takes the events with it.
        if batch % 5 == 4 {
            transaction.rollback().await?;
            rolled_back += chunk.len();
        } else {
            transaction.commit().await?;
            committed += chunk.len();
        }
    }
    println!("publisher {origin}: committed {committed} events, rolled back {rolled_back}");
    Ok(())
}
