//! Figures: connections per replica, and a reconnect storm over HTTP.
//!
//! The first is the figure users compare first: one replica holding 1,000 to 20,000 SSE
//! connections (one user each) while events arrive for random users, side by side with the
//! replica a user writes by hand from the original design (`handwritten-sse-replica`: LISTEN,
//! SELECT by id, per-user broadcast). The second sends 5,000 browsers of a dead replica to
//! another within one second, each with its `Last-Event-ID`, and times the TCP and HTTP side
//! with the catch-up: every browser served, and when the last one holds what it missed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::stream::{self, StreamExt};
use pg_outbox_tests::browser::Replica;
use pg_outbox_tests::Cluster;
use tokio::task::JoinHandle;

use crate::memory::rss_kib;
use crate::pace;
use crate::report::{quantile, Table};
use crate::server_cpu;
use crate::sse_client::SseStream;
use crate::Options;

/// Connection attempts in flight at once while a figure opens its streams.
const OPENING_AT_ONCE: usize = 256;
/// Publishing connections.
const PUBLISHERS: u32 = 4;

/// How long one stream may take to open before it counts as refused.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Descriptors kept for everything but the streams: the runtime, the database connections,
/// the replica's own files.
const SPARE_DESCRIPTORS: usize = 256;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// `examples/sse` with the defaults: pg_outbox_client and pg_outbox_sse.
    PgOutbox,
    /// `handwritten-sse-replica`.
    ByHand,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::PgOutbox => "pg_outbox (examples/sse)",
            Kind::ByHand => "by hand",
        }
    }

    async fn start(self, cluster: &Cluster, name: &str, args: &[&str]) -> Replica {
        let db = cluster.connection_string("postgres");
        match self {
            Kind::PgOutbox => Replica::start(&db, name, args).await,
            Kind::ByHand => Replica::start_program(&handwritten_binary(), &db, name, args).await,
        }
    }

    /// One event for `$1` (the user), with no payload beyond a marker: the frames' size is the
    /// replicas' own.
    fn publish_sql(self) -> &'static str {
        match self {
            Kind::PgOutbox => "SELECT outbox_publish('chat', $1, '{\"n\": 1}')",
            Kind::ByHand => "SELECT handwritten_publish('chat', $1, '{\"n\": 1}')",
        }
    }
}

/// `target/release/handwritten-sse-replica`, next to this benchmark's own binary.
fn handwritten_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("handwritten-sse-replica")))
        .unwrap_or_else(|| PathBuf::from("handwritten-sse-replica"))
}

/// What the readers of one run saw.
#[derive(Default)]
struct Received {
    events: AtomicU64,
    /// Body bytes of the frames that carried events.
    event_bytes: AtomicU64,
    /// Of those, the bytes of their `id:` lines.
    id_bytes: AtomicU64,
    /// Commit-to-client milliseconds, from each event's `created_at_us`.
    latencies: Mutex<Vec<f64>>,
}

/// Open streams, each read by a task of its own into a shared [`Received`].
struct Readers {
    tasks: Vec<JoinHandle<()>>,
    received: Arc<Received>,
}

impl Drop for Readers {
    fn drop(&mut self) {
        self.tasks.iter().for_each(JoinHandle::abort);
    }
}

/// Opens one stream per user, [`OPENING_AT_ONCE`] at a time; the streams that could not open
/// are counted, not fatal (at a descriptor limit, that is the figure).
async fn open_all(address: SocketAddr, users: &[String]) -> (Vec<SseStream>, usize) {
    let opened: Vec<_> = stream::iter(users.iter().map(|user| async move {
        // A connection the replica cannot accept (at its descriptor limit) waits in the accept
        // queue for ever: count it as refused.
        let path = format!("/events?user={user}");
        tokio::time::timeout(OPEN_TIMEOUT, SseStream::open(address, &path, None))
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    }))
    .buffer_unordered(OPENING_AT_ONCE)
    .collect()
    .await;
    let failed = opened.iter().filter(|s| s.is_err()).count();
    (opened.into_iter().flatten().collect(), failed)
}

fn read_all(streams: Vec<SseStream>) -> Readers {
    let received = Arc::new(Received::default());
    let tasks = streams
        .into_iter()
        .map(|mut stream| {
            let received = Arc::clone(&received);
            tokio::spawn(async move {
                while let Ok(Some(frame)) = stream.next().await {
                    let Some(created_at_us) = created_at_us(&frame.data) else {
                        continue;
                    };
                    let ms = (now_us() - created_at_us) as f64 / 1000.0;
                    received.latencies.lock().expect("latencies").push(ms);
                    received
                        .event_bytes
                        .fetch_add(frame.bytes as u64, Ordering::Relaxed);
                    // "id: ", the token, the line's end.
                    let id_line = frame.id.as_ref().map_or(0, |id| id.len() + 5);
                    received
                        .id_bytes
                        .fetch_add(id_line as u64, Ordering::Relaxed);
                    received.events.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    Readers { tasks, received }
}

/// The `created_at_us` of an event frame's JSON (both replicas send it).
fn created_at_us(data: &str) -> Option<i64> {
    let value: serde_json::Value = serde_json::from_str(data).ok()?;
    value.get("created_at_us")?.as_i64()
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

struct Measured {
    connections: usize,
    refused: usize,
    open_time: Duration,
    bytes_per_connection: f64,
    events: u64,
    delivered: u64,
    replica_cpu_us_per_event: f64,
    server_cpu_us_per_event: f64,
    latencies: Vec<f64>,
    bytes_per_event: f64,
    id_bytes_per_event: f64,
}

async fn measure(
    cluster: &Cluster,
    kind: Kind,
    connections: usize,
    rate: u32,
    duration: Duration,
) -> Measured {
    let replica = kind.start(cluster, "bench_connections", &[]).await;
    let pid = replica.pid().expect("the replica runs");
    let users: Arc<Vec<String>> = Arc::new((0..connections).map(|n| format!("c{n}")).collect());
    let rss_before = rss_kib(pid);
    let opening = Instant::now();
    let (streams, refused) = open_all(replica.address(), &users).await;
    let open_time = opening.elapsed();
    let opened = streams.len();
    let readers = read_all(streams);
    // Each stream's first frames (the greeting) are written by now or within moments.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = rss_kib(pid);

    let data_dir = server_cpu::data_dir(cluster);
    let replica_before = server_cpu::process(pid).unwrap_or_default();
    let server_before = server_cpu::used(&data_dir).unwrap_or_default();
    let events = pace::publish(
        cluster,
        kind.publish_sql(),
        Arc::clone(&users),
        PUBLISHERS,
        rate,
        duration,
    )
    .await;
    let received = &readers.received;
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.events.load(Ordering::Relaxed) < events && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let replica_cpu = server_cpu::process(pid).unwrap_or_default() - replica_before;
    let server_cpu = server_cpu::used(&data_dir).unwrap_or_default() - server_before;
    let delivered = received.events.load(Ordering::Relaxed);
    let per_event = |cpu: Duration| cpu.as_secs_f64() * 1e6 / delivered.max(1) as f64;
    let measured = Measured {
        connections: opened,
        refused,
        open_time,
        bytes_per_connection: (rss_after.saturating_sub(rss_before) * 1024) as f64
            / opened.max(1) as f64,
        events,
        delivered,
        replica_cpu_us_per_event: per_event(replica_cpu),
        server_cpu_us_per_event: per_event(server_cpu),
        latencies: received.latencies.lock().expect("latencies").clone(),
        bytes_per_event: received.event_bytes.load(Ordering::Relaxed) as f64
            / delivered.max(1) as f64,
        id_bytes_per_event: received.id_bytes.load(Ordering::Relaxed) as f64
            / delivered.max(1) as f64,
    };
    drop(readers);
    drop(replica);
    measured
}

pub async fn run(cluster: &Cluster, options: &Options) -> Vec<Table> {
    // Each stream holds a descriptor here and one in the replica, whose limit is the same.
    let limit = raise_open_files_limit().saturating_sub(SPARE_DESCRIPTORS);
    // (connections, events/s)
    let runs: Vec<(usize, u32)> = if options.smoke {
        vec![(50, 100)]
    } else {
        vec![
            (1_000, 100),
            (1_000, 1_000),
            (10_000, 1_000),
            (20_000.min(limit), 1_000),
            (1_000, 5_000),
        ]
    };
    let duration = options.latency_time() * 2;
    let mut table = Table::new(
        "Connections per replica: examples/sse beside a hand-written replica",
        &[
            "replica",
            "connections",
            "events/s",
            "opened in s",
            "KiB per connection",
            "events delivered",
            "replica CPU µs per event",
            "server CPU µs per event",
            "p50 ms",
            "p99 ms",
            "bytes per event",
            "of which the id: line",
        ],
    );
    table.note = format!(
        "One replica holds one SSE connection per user, opened {OPENING_AT_ONCE} at a time by \
         the benchmark (plain sockets, chunked bodies decoded, frames cut as a browser does). \
         {PUBLISHERS} publishers then pace one-event transactions to random users at the rate \
         given for {} s. Memory: the replica's RSS growth over the opening, per connection. \
         CPU: the replica's process, and every PostgreSQL process, over the publishing until \
         every event arrived, per event delivered. Latency: from the row's created_at to the \
         frame's arrival. Bytes per event: the SSE body bytes of an event's frame: the same JSON \
         in both but for the event's id (a UUID here, a bigserial by hand), and pg_outbox's \
         `id:` line, the position a browser resumes from. By hand: \
         `handwritten-sse-replica` (bench/src/bin), the original design: LISTEN, NOTIFY of the \
         row id, a SELECT by id per notification, broadcast to the user's streams; no catch-up, \
         no resume. Both with the defaults a new user has. The largest count stops short of \
         the open files limit ({} here, for the benchmark and each replica alike); a stream \
         not open within {} s counts as refused.",
        duration.as_secs(),
        limit + SPARE_DESCRIPTORS,
        OPEN_TIMEOUT.as_secs()
    );
    for &(size, rate) in &runs {
        for kind in [Kind::PgOutbox, Kind::ByHand] {
            let m = measure(cluster, kind, size, rate, duration).await;
            let connections = if m.refused > 0 {
                format!("{} ({} refused)", m.connections, m.refused)
            } else {
                m.connections.to_string()
            };
            table.row(vec![
                kind.name().to_owned(),
                connections,
                rate.to_string(),
                format!("{:.2}", m.open_time.as_secs_f64()),
                format!("{:.1}", m.bytes_per_connection / 1024.0),
                format!("{} of {}", m.delivered, m.events),
                format!("{:.0}", m.replica_cpu_us_per_event),
                format!("{:.0}", m.server_cpu_us_per_event),
                format!("{:.2}", quantile(&m.latencies, 0.50)),
                format!("{:.2}", quantile(&m.latencies, 0.99)),
                format!("{:.0}", m.bytes_per_event),
                format!("{:.1}", m.id_bytes_per_event),
            ]);
        }
    }
    vec![table, storm(cluster, options).await]
}

/// Lets this process, and the replicas it starts, hold the figure's connections: a descriptor
/// per stream on each side. Returns the limit in force.
fn raise_open_files_limit() -> usize {
    const WANTED: u64 = 65_536;
    let limit = if rlimit::setrlimit(rlimit::Resource::NOFILE, WANTED, WANTED).is_ok() {
        WANTED
    } else {
        rlimit::increase_nofile_limit(WANTED).unwrap_or(1024)
    };
    usize::try_from(limit).unwrap_or(usize::MAX)
}

/// 5,000 browsers of replica A reconnect to replica B within one second, or all at once, with
/// the `Last-Event-ID` of the last event they got from A; each missed one event meanwhile.
async fn storm(cluster: &Cluster, options: &Options) -> Table {
    let browsers = if options.smoke { 50 } else { 5_000 };
    let mut table = Table::new(
        "A reconnect storm over HTTP: a replica's browsers arrive at another within one second",
        &[
            "listen backlog",
            "arriving",
            "browsers",
            "served",
            "refused or failed",
            "last first frame ms",
            "last missed event ms",
            "missed events delivered",
        ],
    );
    table.note = format!(
        "{browsers} browsers (one user each) follow replica A of examples/sse and get one event \
         each; A is killed (SIGKILL) and one more event per user is published, which they miss. \
         All {browsers} then open `GET /events` on replica B, evenly spread over one second or \
         all at once (what `EventSource`'s fixed `retry` does after a deploy), each with the \
         `Last-Event-ID` A gave it. Times run from the first reconnect to the \
         last browser's first frame (served), and to the last browser holding its missed \
         event. The backlog is the example app's `--backlog` (default 4096); 128 is what \
         `TcpListener::bind` asks for."
    );
    let one_second = Duration::from_secs(1);
    let runs: &[(&str, Duration)] = if options.smoke {
        &[("4096", Duration::ZERO)]
    } else {
        &[
            ("4096", one_second),
            ("128", one_second),
            ("4096", Duration::ZERO),
            ("128", Duration::ZERO),
        ]
    };
    for &(backlog, spread) in runs {
        let m = storm_once(cluster, browsers, backlog, spread).await;
        table.row(vec![
            backlog.to_owned(),
            if spread.is_zero() {
                "at once".to_owned()
            } else {
                format!("over {} s", spread.as_secs())
            },
            browsers.to_string(),
            m.served.to_string(),
            m.failed.to_string(),
            format!("{:.0}", m.last_served.as_secs_f64() * 1e3),
            format!("{:.0}", m.last_missed.as_secs_f64() * 1e3),
            m.missed.to_string(),
        ]);
    }
    table
}

struct Storm {
    served: usize,
    failed: usize,
    last_served: Duration,
    last_missed: Duration,
    missed: usize,
}

async fn storm_once(cluster: &Cluster, browsers: usize, backlog: &str, spread: Duration) -> Storm {
    let users: Vec<String> = (0..browsers).map(|n| format!("storm{n}")).collect();
    let publisher = cluster.connect("postgres").await;
    let publish_one_each = || async {
        publisher
            .batch_execute(&format!(
                "SELECT outbox_publish('chat', 'storm' || n, '{{}}') FROM generate_series(0, {}) n",
                browsers - 1
            ))
            .await
            .expect("publish one event per user");
    };
    let args = ["--backlog", backlog];
    let mut a = Kind::PgOutbox.start(cluster, "bench_storm_a", &args).await;
    let b = Kind::PgOutbox.start(cluster, "bench_storm_b", &args).await;
    let (mut streams, failed) = open_all(a.address(), &users).await;
    assert_eq!(failed, 0, "every browser follows replica A");
    publish_one_each().await;
    // Each browser's Last-Event-ID: the id of the frame that carried its event.
    let tokens: Vec<String> = stream::iter(streams.iter_mut().map(|stream| async move {
        loop {
            match stream.next().await {
                Ok(Some(frame)) if frame.is_event() => {
                    return frame.id.expect("an event's frame carries its position")
                }
                Ok(Some(_)) => continue,
                other => panic!("a browser lost replica A early: {other:?}"),
            }
        }
    }))
    .buffer_unordered(OPENING_AT_ONCE)
    .collect()
    .await;
    a.kill().await;
    drop(streams);
    publish_one_each().await;

    let served = Arc::new(AtomicUsize::new(0));
    let first = Instant::now();
    let address = b.address();
    let tasks: Vec<JoinHandle<Option<(Duration, Duration)>>> = users
        .iter()
        .zip(tokens)
        .enumerate()
        .map(|(n, (user, token))| {
            let due = first + spread.mul_f64(n as f64 / browsers as f64);
            let path = format!("/events?user={user}");
            let served = Arc::clone(&served);
            tokio::spawn(async move {
                tokio::time::sleep_until(due.into()).await;
                let mut stream = SseStream::open(address, &path, Some(&token)).await.ok()?;
                let mut served_at = None;
                loop {
                    let frame = stream.next().await.ok()??;
                    if served_at.is_none() {
                        served_at = Some(first.elapsed());
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    if frame.is_event() {
                        return Some((served_at?, first.elapsed()));
                    }
                }
            })
        })
        .collect();
    let mut last_served = Duration::ZERO;
    let mut last_missed = Duration::ZERO;
    let mut missed = 0;
    for task in tasks {
        match tokio::time::timeout(Duration::from_secs(60), task).await {
            Ok(Ok(Some((served_at, missed_at)))) => {
                last_served = last_served.max(served_at);
                last_missed = last_missed.max(missed_at);
                missed += 1;
            }
            _ => continue,
        }
    }
    let served = served.load(Ordering::Relaxed);
    drop(b);
    Storm {
        served,
        failed: browsers - served,
        last_served,
        last_missed,
        missed,
    }
}
