//! One replica of a web app that forwards each user's pg_outbox events to browsers over SSE,
//! with `pg_outbox_sse`. Run several behind a load balancer: a browser whose replica goes away
//! reconnects to another and gets exactly the events it missed.
//!
//! ```text
//! pg-outbox-sse-example --db 'host=/run/postgresql dbname=app' --listen 127.0.0.1:3000
//! ```
//!
//! - `GET /?user=u1`: a page whose `EventSource` shows u1's events (`&report=URL` also POSTs
//!   each thing it receives to `URL`, in order, for tests and benchmarks);
//! - `GET /events?user=u1`: the SSE stream itself;
//! - `POST /publish` with `{"channel", "user_id", "payload"}`: publishes an event
//!   (`outbox_publish`), answers `{"id"}`;
//! - `GET /metrics`: the relay's metrics in the Prometheus text format (the client's `metrics`
//!   feature, exported by `metrics-exporter-prometheus`).
//!
//! In a real app the user comes from authentication (a session cookie, a token), never from the
//! query string: anyone can type `?user=someone-else`.
//!
//! Prints `listening on http://ADDR` on stdout once it serves; stops on SIGINT or SIGTERM (its
//! streams end, and browsers reconnect elsewhere).

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::sse::Sse;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use pg_outbox_client::export::LAG_SECONDS_BUCKETS;
use pg_outbox_client::{Relay, RelayBuilder, Topic};
use pg_outbox_sse::{EventStream, LastEventId, SseConfig};
use serde::Deserialize;
use tracing::{info, warn};

/// One replica of a web app forwarding pg_outbox events to browsers over SSE.
#[derive(Debug, Parser)]
#[command(name = "pg-outbox-sse-example")]
struct Args {
    /// The database, as a libpq connection string or URL.
    #[arg(long, env = "PG_OUTBOX_DB")]
    db: String,
    /// Where to serve HTTP (port 0: any free port; the address is printed).
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// This replica's name, in logs and in the relay's application_name.
    #[arg(long, default_value = "replica")]
    name: String,
    /// The reconnect delay browsers are asked to wait (`retry:`), in milliseconds.
    #[arg(long, default_value_t = 1000)]
    retry_ms: u64,
    /// Silence after which a stream sends a keep-alive, in milliseconds.
    #[arg(long, default_value_t = 15_000)]
    keep_alive_ms: u64,
    /// How many connections may wait to be accepted. A deploy sends every browser of a
    /// replica to the others at once; the kernel caps this at `net.core.somaxconn`.
    #[arg(long, default_value_t = 4096)]
    backlog: u32,
    /// Publishing connections at most (`POST /publish`).
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// Events queued per browser before a browser that reads slowly reads from the outbox
    /// instead (the relay's `subscriber_buffer`).
    #[arg(long, default_value_t = 1024)]
    buffer: usize,
}

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error("relay: {0}")]
    Relay(#[from] pg_outbox_client::Error),
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("serve: {0}")]
    Serve(#[from] std::io::Error),
    #[error("metrics: {0}")]
    Metrics(#[from] metrics_exporter_prometheus::BuildError),
    #[error("publishing pool: {0}")]
    Pool(#[from] deadpool_postgres::BuildError),
}

#[derive(Clone)]
struct App {
    metrics: PrometheusHandle,
    relay: Relay,
    /// Publishing connections, opened again when the database restarts.
    publishers: Pool,
    sse: SseConfig,
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    if let Err(err) = run(Args::parse()).await {
        eprintln!("pg-outbox-sse-example: {err}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), AppError> {
    // Before the relay is built: its metrics go to the recorder installed when it starts.
    let metrics = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("pg_outbox_relay_lag_seconds".into()),
            &LAG_SECONDS_BUCKETS,
        )
        .and_then(PrometheusBuilder::install_recorder)?;
    let open_files = raise_open_files_limit();
    // A browser's connection is one descriptor; the relay, the database and the runtime take a
    // few dozen more.
    info!(
        open_files,
        "open files limit: about {} browser connections",
        open_files.saturating_sub(64)
    );
    let relay = RelayBuilder::from_connection_string(&args.db)?
        .application_name(format!("pg_outbox_sse_{}", args.name))
        .subscriber_buffer(args.buffer.max(1))
        .build()?;
    relay.start().await?;
    let publishers = Pool::builder(Manager::from_config(
        args.db.parse()?,
        tokio_postgres::NoTls,
        ManagerConfig {
            // A connection the server closed (a restart, a failover) is not handed out again.
            recycling_method: RecyclingMethod::Fast,
        },
    ))
    .max_size(args.publishers)
    .build()?;
    let app = App {
        metrics,
        relay: relay.clone(),
        publishers,
        sse: SseConfig::default()
            .retry(Duration::from_millis(args.retry_ms))
            .keep_alive(Duration::from_millis(args.keep_alive_ms)),
    };
    let router = Router::new()
        .route("/", get(page))
        .route("/events", get(events))
        .route("/publish", post(publish))
        .route("/metrics", get(metrics_text))
        .with_state(app);

    let listener = listen(args.listen, args.backlog).map_err(|source| AppError::Listen {
        address: args.listen,
        source,
    })?;
    let address = listener.local_addr()?;
    info!(name = %args.name, %address, backlog = args.backlog, "serving");
    // The line tests and scripts wait for.
    println!("listening on http://{address}");
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            stopped().await;
            // Ends every stream: the server can then finish, and browsers reconnect elsewhere.
            relay.shutdown().await;
        })
        .await?;
    Ok(())
}

/// A listening socket with room for a reconnect storm: `TcpListener::bind` asks for a backlog
/// of 128, and 256 browsers arriving at once then wait a second each for their SYN to be sent
/// again.
fn listen(address: SocketAddr, backlog: u32) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok());
    if let Some(somaxconn) = somaxconn.filter(|&cap| cap < backlog) {
        warn!(
            backlog,
            somaxconn, "net.core.somaxconn caps the listen backlog: raise it for reconnect storms"
        );
    }
    socket.listen(backlog)
}

/// Raises this process's soft limit on open files to its hard limit, as Go programs do: each
/// SSE connection holds a descriptor, and at the limit the server stops accepting (axum logs
/// each refused accept). Returns the limit in force.
fn raise_open_files_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(err) => {
            warn!(%err, "could not raise the open files limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(0, |(soft, _)| soft)
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn stopped() {
    let interrupt = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = interrupt => {}
                _ = terminate.recv() => {}
            }
        }
        Err(_) => {
            let _ = interrupt.await;
        }
    }
}

async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

#[derive(Deserialize)]
struct Who {
    /// Stands in for authentication: see the crate documentation.
    user: String,
}

/// The user's events, resumed from `Last-Event-ID` when the browser reconnects.
async fn events(
    State(app): State<App>,
    Query(who): Query<Who>,
    last_event_id: LastEventId,
) -> Sse<EventStream> {
    pg_outbox_sse::stream_with(
        &app.relay,
        Topic::all().user(who.user),
        last_event_id.as_deref(),
        &app.sse,
    )
}

#[derive(Deserialize)]
struct Publish {
    channel: String,
    user_id: String,
    payload: serde_json::Value,
}

/// The relay's metrics for a Prometheus scrape.
async fn metrics_text(State(app): State<App>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
}

/// Publishes one event in a transaction of its own: in a real app, in the transaction that
/// changes what the event is about.
async fn publish(State(app): State<App>, Json(event): Json<Publish>) -> Response {
    let publisher = match app.publishers.get().await {
        Ok(publisher) => publisher,
        Err(err) => {
            warn!(%err, "no publishing connection");
            return (StatusCode::SERVICE_UNAVAILABLE, err.to_string()).into_response();
        }
    };
    let published = publisher
        .query_one(
            "SELECT outbox_publish($1, $2, $3)",
            &[&event.channel, &event.user_id, &event.payload],
        )
        .await
        .and_then(|row| row.try_get::<_, uuid::Uuid>(0));
    match published {
        Ok(id) => Json(serde_json::json!({ "id": id })).into_response(),
        Err(err) => {
            warn!(%err, "publish failed");
            let status = if err.code().is_some() {
                // The database refused it: a bad channel, a payload too large, ...
                StatusCode::BAD_REQUEST
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (status, err.to_string()).into_response()
        }
    }
}
