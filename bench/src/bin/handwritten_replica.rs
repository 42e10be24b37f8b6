//! The replica a user writes by hand from pg_outbox's original design, for the connections
//! figure of `make bench`: one `LISTEN` connection; each notification carries a row id of
//! `handwritten_outbox` (bench/sql/setup.sql), which is read at once with a `SELECT` by id and
//! broadcast to the SSE connections of the row's user. It has no catch-up, no positions and no
//! resume: what it does not do is what pg_outbox adds. Its frames carry the same JSON as
//! `pg_outbox_sse`'s, so the bytes a browser receives differ only by what pg_outbox adds.
//!
//! ```text
//! handwritten-sse-replica --db 'host=/run/postgresql dbname=app' --listen 127.0.0.1:0
//! ```
//! Prints `listening on http://ADDR` once it serves, as the SSE example app does.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::response::sse::{Event, Sse};
use axum::routing::get;
use axum::Router;
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

/// Each user's open streams.
type Streams = Arc<Mutex<HashMap<String, Vec<mpsc::Sender<String>>>>>;

/// Frames a stream may hold before it is dropped as too slow (what the original design did).
const STREAM_BUFFER: usize = 256;

#[derive(Deserialize)]
struct Who {
    user: String,
}

#[tokio::main]
async fn main() {
    let mut db = None;
    let mut listen: SocketAddr = ([127, 0, 0, 1], 0).into();
    let mut backlog = 4096;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--db", Some(value)) => db = Some(value),
            ("--listen", Some(value)) => listen = value.parse().expect("--listen ADDR:PORT"),
            ("--backlog", Some(value)) => backlog = value.parse().expect("--backlog N"),
            ("--name", Some(_)) => {}
            _ => {
                panic!("usage: handwritten-sse-replica --db CONNINFO [--listen ADDR] [--backlog N]")
            }
        }
    }
    let db = db.expect("--db CONNINFO");
    let _ = rlimit::increase_nofile_limit(u64::MAX);

    let (client, mut connection) = tokio_postgres::connect(&db, NoTls).await.expect("connect");
    let (ids, mut notified) = mpsc::unbounded_channel::<i64>();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message {
                if let Ok(id) = n.payload().parse() {
                    let _ = ids.send(id);
                }
            }
        }
        eprintln!("handwritten-sse-replica: the database connection ended");
        std::process::exit(1);
    });
    client
        .batch_execute("LISTEN handwritten_outbox")
        .await
        .expect("LISTEN");
    let by_id = client
        .prepare(
            "SELECT id, channel, user_id, payload, \
                    (extract(epoch FROM created_at) * 1e6)::int8 AS created_at_us \
             FROM handwritten_outbox WHERE id = $1",
        )
        .await
        .expect("prepare the SELECT by id");

    let streams: Streams = Arc::default();
    let relay_streams = Arc::clone(&streams);
    tokio::spawn(async move {
        while let Some(id) = notified.recv().await {
            let Ok(row) = client.query_one(&by_id, &[&id]).await else {
                continue;
            };
            let user: String = row.get("user_id");
            let data = serde_json::json!({
                "id": row.get::<_, i64>("id").to_string(),
                "channel": row.get::<_, String>("channel"),
                "user_id": user,
                "payload": row.get::<_, serde_json::Value>("payload"),
                "created_at_us": row.get::<_, i64>("created_at_us"),
            })
            .to_string();
            let mut streams = relay_streams.lock().expect("streams");
            if let Some(senders) = streams.get_mut(&user) {
                senders.retain(|sender| sender.try_send(data.clone()).is_ok());
            }
        }
    });

    let router = Router::new()
        .route("/events", get(events))
        .with_state(streams);
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket.bind(listen).expect("bind");
    let listener = socket.listen(backlog).expect("listen");
    println!(
        "listening on http://{}",
        listener.local_addr().expect("the address")
    );
    axum::serve(listener, router).await.expect("serve");
}

async fn events(
    State(streams): State<Streams>,
    Query(who): Query<Who>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
    streams
        .lock()
        .expect("streams")
        .entry(who.user)
        .or_default()
        .push(sender);
    Sse::new(futures_util::stream::unfold(
        receiver,
        |mut receiver| async move {
            let data = receiver.recv().await?;
            Some((Ok(Event::default().data(data)), receiver))
        },
    ))
}
