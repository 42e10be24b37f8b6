//! Figure: what a replica costs the server. Publishers pace one-event transactions at a fixed
//! rate well below saturation while N relays, each a `pg-outbox tail` process of its own (a real
//! relay: it connects, LISTENs, fetches references and prints every event), follow everything;
//! for N = 1, 4, 16 and 64, in each payload form and both notify modes; and, as what to move to,
//! N `pg_recvlogical` processes reading `pg_outbox.logical_messages` from a slot each. The
//! whole figure runs with `wal_level = logical` (restored afterwards), so every variant writes
//! the same kind of WAL.
//!
//! Measured over a window that opens once every relay has delivered the warm-up's events and
//! closes once every relay has delivered every event published:
//! - the server's CPU: every PostgreSQL process of the cluster, from /proc (see
//!   `server_cpu.rs`: the postmaster, its live children, and the children it reaped within the
//!   window, through its cumulative child times), per 1,000 events published;
//! - the relays' CPU apart, the sum of their processes' /proc times;
//! - this benchmark's own CPU (the publishers' client side, reading the relays' output) and the
//!   whole machine's, so a reader can tell a saturated or shared machine from a clean run.
//!
//! Each relay's printed events are counted: a run in which any relay delivered fewer or more
//! events than were published says so in the table, instead of a figure.

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use pg_outbox_tests::Cluster;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::report::{median, quantile, Table};
use crate::Options;

/// One way of notifying, and what the replicas run to follow the events.
#[derive(Clone, Copy)]
struct Variant {
    notify_mode: &'static str,
    notify_payload: &'static str,
    consumer: Consumer,
    /// `pg_outbox.notify_interval` in ms: the notifier's batches (worker mode).
    notify_interval_ms: u32,
}

#[derive(Clone, Copy, PartialEq)]
enum Consumer {
    /// `pg-outbox tail`: LISTEN, fetches of references, sweeps.
    Tail,
    /// `pg_recvlogical` on a slot of its own, through `pgoutput` with `messages`: the events
    /// as `pg_outbox.logical_messages` writes them, one walsender per replica.
    Recvlogical,
}

impl Variant {
    fn name(&self) -> String {
        match self.consumer {
            Consumer::Tail if self.notify_interval_ms != 4 => format!(
                "{}, {}, notify_interval = {} ms",
                self.notify_mode, self.notify_payload, self.notify_interval_ms
            ),
            Consumer::Tail => format!("{}, {}", self.notify_mode, self.notify_payload),
            Consumer::Recvlogical => format!(
                "{}, logical_messages = on; pg_recvlogical (pgoutput) on a slot each, no LISTEN",
                self.notify_mode
            ),
        }
    }
}

const VARIANTS: [Variant; 9] = [
    Variant {
        notify_mode: "worker",
        notify_payload: "reference",
        consumer: Consumer::Tail,
        notify_interval_ms: 4,
    },
    Variant {
        notify_mode: "worker",
        notify_payload: "inline",
        consumer: Consumer::Tail,
        notify_interval_ms: 4,
    },
    Variant {
        notify_mode: "worker",
        notify_payload: "sealed",
        consumer: Consumer::Tail,
        notify_interval_ms: 4,
    },
    Variant {
        notify_mode: "transaction",
        notify_payload: "reference",
        consumer: Consumer::Tail,
        notify_interval_ms: 4,
    },
    Variant {
        notify_mode: "transaction",
        notify_payload: "inline",
        consumer: Consumer::Tail,
        notify_interval_ms: 4,
    },
    Variant {
        notify_mode: "transaction",
        notify_payload: "sealed",
        consumer: Consumer::Tail,
        notify_interval_ms: 4,
    },
    // The alternative for many replicas: each reads the WAL through a slot of its own.
    Variant {
        notify_mode: "worker",
        notify_payload: "reference",
        consumer: Consumer::Recvlogical,
        notify_interval_ms: 4,
    },
    // The lever: more events per notification, so each listener is woken less often.
    Variant {
        notify_mode: "worker",
        notify_payload: "reference",
        consumer: Consumer::Tail,
        notify_interval_ms: 25,
    },
    Variant {
        notify_mode: "worker",
        notify_payload: "sealed",
        consumer: Consumer::Tail,
        notify_interval_ms: 25,
    },
];

/// The figure's size.
struct Plan {
    variants: Vec<Variant>,
    relays: Vec<usize>,
    rounds: usize,
    /// Events per second, over all publishing connections.
    rate: u32,
    publishers: u32,
    warm_up: Duration,
    window: Duration,
}

impl Plan {
    fn of(options: &Options) -> Plan {
        if options.smoke {
            Plan {
                variants: vec![VARIANTS[0], VARIANTS[5], VARIANTS[6], VARIANTS[8]],
                relays: vec![1, 2],
                rounds: 1,
                rate: 200,
                publishers: 2,
                warm_up: Duration::from_millis(250),
                window: Duration::from_secs(1),
            }
        } else {
            Plan {
                variants: VARIANTS.to_vec(),
                relays: vec![1, 4, 16, 64],
                rounds: 2,
                rate: 500,
                publishers: 4,
                warm_up: Duration::from_secs(1),
                window: Duration::from_secs(10),
            }
        }
    }

    fn events(&self, span: Duration) -> u64 {
        // Whole rounds of the publishers, so each publishes as many.
        let per_publisher = (span.as_secs_f64() * f64::from(self.rate) / f64::from(self.publishers))
            .ceil()
            .max(1.0) as u64;
        per_publisher * u64::from(self.publishers)
    }
}

/// What one run measured, over its window.
#[derive(Clone, Default)]
struct Measured {
    /// Events committed within the window.
    events: u64,
    /// Events committed in the whole run, and the fewest and most any relay printed.
    published: u64,
    fewest_delivered: u64,
    most_delivered: u64,
    /// Lag and gap reports on the relays' standard error, over the run.
    reports: u64,
    wall: Duration,
    server_cpu: Duration,
    relays_cpu: Duration,
    bench_cpu: Duration,
    /// The machine's busy fraction (all cores, whatever runs on them), 0 to 1.
    machine_busy: f64,
    /// The publishers' achieved rate over the whole run, events per second.
    publish_rate: f64,
    /// `pg_notification_queue_usage()` when the last event was published.
    queue_usage: f64,
    /// From each event's `created_at` (before its commit) to the first replica printing it,
    /// over the run, in ms.
    latency_p50: f64,
    latency_p99: f64,
}

impl Measured {
    fn complete(&self) -> bool {
        self.published > 0
            && self.fewest_delivered == self.published
            && self.most_delivered == self.published
    }

    /// The server's CPU per 1,000 events, in ms.
    fn server_per_k(&self) -> f64 {
        per_k(self.server_cpu, self.events)
    }

    fn relays_per_k(&self) -> f64 {
        per_k(self.relays_cpu, self.events)
    }
}

fn per_k(cpu: Duration, events: u64) -> f64 {
    cpu.as_secs_f64() * 1000.0 / events.max(1) as f64 * 1000.0
}

pub async fn run(cluster: &Cluster, options: &Options) -> Vec<Table> {
    let plan = Plan::of(options);
    let binary = crate::memory::tail_binary();
    // Slots for the logical-decoding replicas, one walsender each.
    for (name, value) in [
        ("wal_level", "logical"),
        ("max_wal_senders", "80"),
        ("max_replication_slots", "80"),
    ] {
        cluster.set_setting(name, value);
    }
    cluster.restart();
    cluster.psql(
        "postgres",
        "DROP PUBLICATION IF EXISTS pg_outbox; CREATE PUBLICATION pg_outbox",
    );
    // results[variant][relay count] = one Measured per round.
    let mut results: Vec<Vec<Vec<Measured>>> = plan
        .variants
        .iter()
        .map(|_| plan.relays.iter().map(|_| Vec::new()).collect())
        .collect();
    for round in 0..plan.rounds {
        // Each round starts one variant further along, and every other round runs the relay
        // counts downwards, so a drift of the shared machine does not always favour the same
        // variant or count.
        for offset in 0..plan.variants.len() {
            let v = (round + offset) % plan.variants.len();
            let counts: Vec<usize> = if round % 2 == 0 {
                (0..plan.relays.len()).collect()
            } else {
                (0..plan.relays.len()).rev().collect()
            };
            for r in counts {
                let measured =
                    measure(cluster, &binary, &plan, plan.variants[v], plan.relays[r]).await;
                results[v][r].push(measured);
            }
        }
    }
    cluster.psql("postgres", "DROP PUBLICATION pg_outbox");
    for setting in [
        "pg_outbox.notify_payload",
        "pg_outbox.notify_interval",
        "wal_level",
        "max_wal_senders",
        "max_replication_slots",
    ] {
        cluster.reset_setting(setting);
    }
    cluster.restart();
    vec![table(&plan, &results)]
}

fn table(plan: &Plan, results: &[Vec<Vec<Measured>>]) -> Table {
    let mut table = Table::new(
        "What a relay costs the server: CPU per 1,000 events at a fixed publish rate",
        &[
            "notify_mode, notify_payload",
            "relays",
            "events in the window",
            "every relay got every event",
            "server CPU ms per 1k events",
            "vs 1 relay",
            "per added relay",
            "relays' CPU ms per 1k events (all; per relay)",
            "server CPU, % of one core",
            "machine busy",
            "bench process CPU ms per 1k events",
            "published/s",
            "queue use at the end",
            "first relay: created_at to printed, p50 / p99 ms",
        ],
    );
    table.note = format!(
        "{publishers} connections pace one-event transactions (`outbox_publish`, a 48-byte \
         payload) to {rate} events/s in all; the relays are `pg-outbox tail` processes (each \
         follows every event and prints it; sealed: with the key it reads from the database), started and listening \
         before the first event. The window opens once every relay has printed the {warm} \
         warm-up events and closes once every relay has printed every event published \
         ({window} s of publishing). Server CPU: utime + stime from /proc of the postmaster, \
         its live children (backends, the pg_outbox workers, the auxiliary processes) and the \
         children it reaped in the window (its cutime + cstime), per 1,000 events published in \
         the window. Relays' CPU: their processes' utime + stime, summed. \"vs 1 relay\" and \
         \"per added relay\" pair each round's run with the same round's 1-relay run of the \
         same variant: (cost(N) − cost(1)) / (N − 1), in ms per 1k events and as a share of \
         the 1-relay cost. {rounds} round(s); medians of the rounds. Machine busy: \
         /proc/stat over the window, every core and process (another engineer's compiles \
         included). A CHECKPOINT before each run. The whole figure runs with wal_level = \
         logical (and 80 walsenders and slots): the last variant's replicas are pg_recvlogical \
         processes, each streaming a slot of its own through pgoutput (publication of no \
         tables, messages = true), its events counted by the messages' prefix; its publishers \
         set pg_outbox.logical_messages = on, and nothing LISTENs. Latency: from each \
         event's created_at (clock_timestamp() in outbox_publish, before the commit) to the \
         benchmark reading the first relay's line for it, over the whole run.",
        publishers = plan.publishers,
        rate = plan.rate,
        warm = plan.events(plan.warm_up),
        window = plan.window.as_secs_f64(),
        rounds = plan.rounds,
    );
    for (variant, by_count) in plan.variants.iter().zip(results) {
        let base = by_count.first();
        for (&relays, rounds) in plan.relays.iter().zip(by_count) {
            let of = |figure: &dyn Fn(&Measured) -> f64| {
                median(&rounds.iter().map(figure).collect::<Vec<_>>())
            };
            let complete = rounds.iter().filter(|m| m.complete()).count();
            let verified = if complete == rounds.len() {
                format!("yes ({complete}/{})", rounds.len())
            } else {
                let worst = rounds
                    .iter()
                    .find(|m| !m.complete())
                    .cloned()
                    .unwrap_or_default();
                format!(
                    "**no** ({complete}/{} rounds; worst: {}–{} of {}, {} lag/gap reports)",
                    rounds.len(),
                    worst.fewest_delivered,
                    worst.most_delivered,
                    worst.published,
                    worst.reports
                )
            };
            // Each round against the same round's 1-relay run.
            let paired = |f: &dyn Fn(&Measured, &Measured) -> f64| -> Option<f64> {
                let base = base?;
                let values: Vec<f64> = rounds.iter().zip(base).map(|(m, b)| f(m, b)).collect();
                Some(median(&values))
            };
            let ratio = paired(&|m, b| m.server_per_k() / b.server_per_k());
            let (added, added_share) = if relays > plan.relays[0] {
                let extra = (relays - plan.relays[0]) as f64;
                (
                    paired(&|m, b| (m.server_per_k() - b.server_per_k()) / extra),
                    paired(&|m, b| (m.server_per_k() / b.server_per_k() - 1.0) / extra),
                )
            } else {
                (None, None)
            };
            let relays_per_k = of(&|m| m.relays_per_k());
            table.row(vec![
                variant.name(),
                relays.to_string(),
                format!("{:.0}", of(&|m| m.events as f64)),
                verified,
                format!("{:.1}", of(&|m| m.server_per_k())),
                ratio.map_or("–".into(), |r| format!("{r:.2}×")),
                match (added, added_share) {
                    (Some(ms), Some(share)) => format!("{ms:+.2} ms ({:+.1}%)", share * 100.0),
                    _ => "–".into(),
                },
                format!(
                    "{relays_per_k:.1}; {:.1}",
                    relays_per_k / relays.max(1) as f64
                ),
                format!(
                    "{:.0}%",
                    of(&|m| m.server_cpu.as_secs_f64() / m.wall.as_secs_f64().max(1e-9)) * 100.0
                ),
                format!("{:.0}%", of(&|m| m.machine_busy) * 100.0),
                format!("{:.1}", of(&|m| per_k(m.bench_cpu, m.events))),
                format!("{:.0}", of(&|m| m.publish_rate)),
                format!("{:.4}", of(&|m| m.queue_usage)),
                format!(
                    "{:.1} / {:.1}",
                    of(&|m| m.latency_p50),
                    of(&|m| m.latency_p99)
                ),
            ]);
        }
    }
    table
}

/// One run: `relays` relay processes, the publishers at the plan's rate, the window measured.
async fn measure(
    cluster: &Cluster,
    binary: &Path,
    plan: &Plan,
    variant: Variant,
    relays: usize,
) -> Measured {
    cluster.psql("postgres", "TRUNCATE event_outbox");
    // The notifier sends what the server's settings say; publishers set theirs per session.
    cluster.set_setting("pg_outbox.notify_payload", variant.notify_payload);
    cluster.set_setting(
        "pg_outbox.notify_interval",
        &format!("{}ms", variant.notify_interval_ms),
    );
    cluster.psql("postgres", "CHECKPOINT");

    let slots: Vec<String> = match variant.consumer {
        Consumer::Tail => Vec::new(),
        Consumer::Recvlogical => (0..relays).map(|n| format!("bench_replica_{n}")).collect(),
    };
    for slot in &slots {
        cluster.psql(
            "postgres",
            &format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"),
        );
    }
    let mut replicas: Vec<Replica> = match variant.consumer {
        Consumer::Tail => (0..relays)
            .map(|n| Replica::tail(cluster, binary, n == 0))
            .collect(),
        Consumer::Recvlogical => slots
            .iter()
            .enumerate()
            .map(|(n, slot)| Replica::recvlogical(cluster, slot, n == 0))
            .collect(),
    };
    for tail in &mut replicas {
        tail.wait_listening().await;
    }

    let control = cluster.connect("postgres").await;
    let published = Arc::new(AtomicU64::new(0));
    let total = plan.events(plan.warm_up) + plan.events(plan.window);
    let publisher = publish(cluster, plan, variant, total, Arc::clone(&published)).await;

    // The window opens when every relay has the warm-up's events.
    let warm = plan.events(plan.warm_up);
    for tail in &mut replicas {
        tail.wait_delivered(warm, Duration::from_secs(60)).await;
    }
    let data_dir = crate::server_cpu::data_dir(cluster);
    let start = Sample::take(&data_dir, &replicas, &published);

    let publish_time = publisher.await.unwrap_or_default();
    let queue_usage: f64 = control
        .query_one("SELECT pg_notification_queue_usage()", &[])
        .await
        .map(|row| row.get(0))
        .unwrap_or(f64::NAN);
    let committed = published.load(Ordering::Relaxed);
    // ...and closes when every relay has every event (or gave up: the count says so).
    for tail in &mut replicas {
        tail.wait_delivered(committed, Duration::from_secs(60))
            .await;
    }
    let end = Sample::take(&data_dir, &replicas, &published);

    let counts: Vec<u64> = replicas.iter().map(Replica::delivered).collect();
    let reports = replicas
        .iter()
        .map(|t| t.reports.load(Ordering::Relaxed))
        .sum();
    let latencies = replicas
        .first()
        .and_then(|r| r.latencies.as_ref())
        .and_then(|l| l.lock().ok().map(|l| l.clone()))
        .unwrap_or_default();
    stop(replicas).await;
    drop(control);
    for slot in &slots {
        cluster.psql(
            "postgres",
            &format!("SELECT pg_drop_replication_slot('{slot}')"),
        );
    }

    Measured {
        events: end.published - start.published,
        published: committed,
        fewest_delivered: counts.iter().copied().min().unwrap_or(0),
        most_delivered: counts.iter().copied().max().unwrap_or(0),
        reports,
        wall: end.at - start.at,
        server_cpu: end.server.saturating_sub(start.server),
        relays_cpu: end.relays.saturating_sub(start.relays),
        bench_cpu: end.bench.saturating_sub(start.bench),
        machine_busy: machine_busy(start.machine, end.machine),
        publish_rate: committed as f64 / publish_time.as_secs_f64().max(1e-9),
        queue_usage,
        latency_p50: quantile(&latencies, 0.50),
        latency_p99: quantile(&latencies, 0.99),
    }
}

/// The counters a window is the difference of.
struct Sample {
    at: Instant,
    published: u64,
    server: Duration,
    relays: Duration,
    bench: Duration,
    /// (busy, total) jiffies of the whole machine.
    machine: (u64, u64),
}

impl Sample {
    fn take(data_dir: &Path, replicas: &[Replica], published: &AtomicU64) -> Sample {
        Sample {
            at: Instant::now(),
            published: published.load(Ordering::Relaxed),
            server: crate::server_cpu::used(data_dir).unwrap_or_default(),
            relays: replicas
                .iter()
                .filter_map(|t| crate::server_cpu::process(t.pid))
                .sum(),
            bench: crate::server_cpu::process(std::process::id()).unwrap_or_default(),
            machine: machine_jiffies(),
        }
    }
}

/// The machine's busy and total jiffies so far, from the first line of /proc/stat.
fn machine_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let values: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("cpu "))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    let total: u64 = values.iter().take(8).sum();
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

fn machine_busy(start: (u64, u64), end: (u64, u64)) -> f64 {
    let busy = end.0.saturating_sub(start.0) as f64;
    let total = end.1.saturating_sub(start.1) as f64;
    if total > 0.0 {
        busy / total
    } else {
        f64::NAN
    }
}

/// Paces `total` one-event transactions over the plan's connections, counting each commit in
/// `published`; the task returns the time from the first due call to the last commit.
async fn publish(
    cluster: &Cluster,
    plan: &Plan,
    variant: Variant,
    total: u64,
    published: Arc<AtomicU64>,
) -> JoinHandle<Duration> {
    let publishers = plan.publishers;
    let per_publisher = total / u64::from(publishers);
    let interval = Duration::from_secs_f64(f64::from(publishers) / f64::from(plan.rate));
    let mut clients = Vec::new();
    for _ in 0..publishers {
        let client = cluster.connect("postgres").await;
        client
            .batch_execute(&format!(
                "SET pg_outbox.notify_payload = '{}'; SET pg_outbox.notify_mode = '{}'; \
                 SET pg_outbox.logical_messages = {}",
                variant.notify_payload,
                variant.notify_mode,
                variant.consumer == Consumer::Recvlogical
            ))
            .await
            .expect("set the publisher's modes");
        let statement = client
            .prepare(
                "SELECT outbox_publish('chat', $1, \
                 '{\"text\": \"hello from the benchmark\", \"room\": 42}')",
            )
            .await
            .expect("prepare outbox_publish");
        clients.push((client, statement));
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (p, (client, statement)) in clients.into_iter().enumerate() {
        let published = Arc::clone(&published);
        tasks.push(tokio::spawn(async move {
            let user = format!("user-{p}");
            // Spread the publishers over the interval; catch up when behind.
            let offset = interval.mul_f64(p as f64 / f64::from(publishers));
            for n in 0..per_publisher {
                let due = start + offset + interval.mul_f64(n as f64);
                tokio::time::sleep_until(due.into()).await;
                if client.execute(&statement, &[&user]).await.is_ok() {
                    published.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::spawn(async move {
        for task in tasks {
            let _ = task.await;
        }
        start.elapsed()
    })
}

/// A replica's process (`pg-outbox tail` or `pg_recvlogical`), the events it prints counted
/// as they arrive.
struct Replica {
    child: Child,
    pid: u32,
    /// Events printed on standard output.
    delivered: watch::Receiver<u64>,
    /// Whether the process reported itself ready (`Some(true)`), or ended first.
    listening: watch::Receiver<Option<bool>>,
    /// Lag and gap reports on standard error.
    reports: Arc<AtomicU64>,
    /// The last lines of standard error, for the message when the process fails.
    stderr_tail: Arc<Mutex<Vec<String>>>,
    /// When timed: each event's time from its `created_at` to being read here, in ms.
    latencies: Option<Arc<Mutex<Vec<f64>>>>,
}

/// What marks one event in a `pg_recvlogical` stream of `pgoutput` messages: the prefix of a
/// logical-decoding message, NUL-terminated (a message is `M`, flags, LSN, prefix, length,
/// content; the content is JSON, which holds no NUL).
const MESSAGE_MARKER: &[u8] = b"pg_outbox\0";

impl Replica {
    /// `pg-outbox tail`, following every event; each line on standard output is one event, and
    /// its first status line on standard error comes once `start` has returned: from then on
    /// every committed event reaches it.
    fn tail(cluster: &Cluster, binary: &Path, timed: bool) -> Replica {
        let mut command = Command::new(binary);
        command.args(["tail", "--db", &cluster.connection_string("postgres")]);
        let created_at = timed.then_some(tail_created_at as CreatedAt);
        Replica::spawn(command, b"\n", created_at, |line| {
            let value = serde_json::from_str::<serde_json::Value>(line).ok();
            let ready = value
                .as_ref()
                .and_then(|v| v.get("status"))
                .and_then(|s| s.as_str())
                == Some("listening");
            let report = value
                .as_ref()
                .is_some_and(|v| v.get("lagged").is_some() || v.get("gap").is_some());
            (ready, report)
        })
    }

    /// `pg_recvlogical` streaming `slot` through `pgoutput`, the pg_outbox messages only (a
    /// publication of no tables); ready once it reports the streaming started (`-v`). The slot
    /// exists before the first event, so none can be missed either way.
    fn recvlogical(cluster: &Cluster, slot: &str, timed: bool) -> Replica {
        let mut command = Command::new(cluster.bindir().join("pg_recvlogical"));
        command
            .arg("-h")
            .arg(cluster.root())
            .arg("-p")
            .arg(cluster.port().to_string())
            .args([
                "-U", "postgres", "-d", "postgres", "--slot", slot, "--start",
            ])
            .args(["-o", "proto_version=1", "-o", "publication_names=pg_outbox"])
            .args(["-o", "messages=true", "-f", "-", "-v"]);
        let created_at = timed.then_some(message_created_at as CreatedAt);
        Replica::spawn(command, MESSAGE_MARKER, created_at, |line| {
            (line.contains("streaming initiated"), false)
        })
    }

    /// Runs `command`, counting the occurrences of `marker` on its standard output (and, with
    /// `created_at`, timing each line that holds an event's); `status` reads each line of its
    /// standard error: (ready, a lag or gap report).
    fn spawn(
        mut command: Command,
        marker: &'static [u8],
        created_at: Option<CreatedAt>,
        status: impl Fn(&str) -> (bool, bool) + Send + 'static,
    ) -> Replica {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let program = command
            .as_std()
            .get_program()
            .to_string_lossy()
            .into_owned();
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("run {program} (make bench builds pg-outbox): {e}"));
        let pid = child.id().unwrap_or(0);

        let (delivered_tx, delivered) = watch::channel(0u64);
        let latencies = created_at.map(|_| Arc::new(Mutex::new(Vec::new())));
        if let Some(mut stdout) = child.stdout.take() {
            let latencies = latencies.clone();
            tokio::spawn(async move {
                // The line being read, when timed.
                let mut line = Vec::new();
                let mut buffer = vec![0u8; 64 * 1024];
                // The end of the previous read, too short to hold the marker, so that one
                // split across two reads is counted.
                let mut carry = 0;
                loop {
                    let n = match stdout.read(&mut buffer[carry..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let filled = carry + n;
                    if let (Some(created_at), Some(latencies)) = (created_at, &latencies) {
                        let read_at = SystemTime::now();
                        for &byte in &buffer[carry..filled] {
                            if byte != b'\n' {
                                line.push(byte);
                                continue;
                            }
                            let latency = created_at(&line)
                                .and_then(|at| read_at.duration_since(at).ok())
                                .map(|d| d.as_secs_f64() * 1000.0);
                            if let (Some(ms), Ok(mut all)) = (latency, latencies.lock()) {
                                all.push(ms);
                            }
                            line.clear();
                        }
                    }
                    let found = count(&buffer[..filled], marker);
                    if found > 0 {
                        delivered_tx.send_modify(|count| *count += found);
                    }
                    carry = (marker.len() - 1).min(filled);
                    buffer.copy_within(filled - carry..filled, 0);
                }
            });
        }

        let (listening_tx, listening) = watch::channel(None);
        let reports = Arc::new(AtomicU64::new(0));
        let stderr_tail = Arc::new(Mutex::new(Vec::new()));
        if let Some(stderr) = child.stderr.take() {
            let reports = Arc::clone(&reports);
            let stderr_tail = Arc::clone(&stderr_tail);
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let (ready, report) = status(&line);
                    if ready {
                        listening_tx.send_if_modified(|l| l.replace(true).is_none());
                    }
                    if report {
                        reports.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Ok(mut tail) = stderr_tail.lock() {
                        if tail.len() >= 20 {
                            tail.remove(0);
                        }
                        tail.push(line);
                    }
                }
                // Standard error closed: the process ended, ready or not.
                listening_tx.send_if_modified(|l| l.replace(false).is_none());
            });
        }
        Replica {
            child,
            pid,
            delivered,
            listening,
            reports,
            stderr_tail,
            latencies,
        }
    }

    /// Waits for the process to report itself ready.
    async fn wait_listening(&mut self) {
        let listening = tokio::time::timeout(
            Duration::from_secs(60),
            self.listening.wait_for(Option::is_some),
        )
        .await
        .ok()
        .and_then(|r| r.ok().and_then(|l| *l));
        if listening != Some(true) {
            panic!(
                "replica process {} did not get ready within 60 s; its stderr:\n{}",
                self.pid,
                self.stderr_tail
                    .lock()
                    .map(|t| t.join("\n"))
                    .unwrap_or_default()
            );
        }
    }

    /// Waits until the process has printed `count` events, or `timeout` passes, or it ends.
    async fn wait_delivered(&mut self, count: u64, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.delivered.wait_for(|&n| n >= count)).await;
    }

    fn delivered(&self) -> u64 {
        *self.delivered.borrow()
    }
}

/// Reads an event's `created_at` from a line of a replica's output.
type CreatedAt = fn(&[u8]) -> Option<SystemTime>;

/// `"created_at":"2026-12-05T01:03:45.123456Z"` in a line of `pg-outbox tail`.
fn tail_created_at(line: &[u8]) -> Option<SystemTime> {
    let key = b"\"created_at\":\"";
    let start = find(line, key)? + key.len();
    let end = start + line.get(start..)?.iter().position(|&b| b == b'"')?;
    let text = std::str::from_utf8(line.get(start..end)?).ok()?;
    humantime::parse_rfc3339(text).ok()
}

/// `"created_at_us":1795827481361761` in a logical-decoding message's document.
fn message_created_at(line: &[u8]) -> Option<SystemTime> {
    let key = b"\"created_at_us\":";
    let start = find(line, key)? + key.len();
    let digits = line.get(start..)?;
    let end = digits
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    let micros: u64 = std::str::from_utf8(digits.get(..end)?).ok()?.parse().ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_micros(micros))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Occurrences of `marker` in `bytes`.
fn count(bytes: &[u8], marker: &[u8]) -> u64 {
    if marker.len() == 1 {
        return bytes.iter().filter(|&&b| b == marker[0]).count() as u64;
    }
    bytes.windows(marker.len()).filter(|w| *w == marker).count() as u64
}

/// SIGTERM to every relay at once (each exits 0 after printing what it had), then waits; a
/// relay still running after 30 s is killed.
async fn stop(mut replicas: Vec<Replica>) {
    let pids: Vec<String> = replicas.iter().map(|t| t.pid.to_string()).collect();
    let _ = Command::new("kill").arg("-TERM").args(&pids).status().await;
    for tail in &mut replicas {
        if tokio::time::timeout(Duration::from_secs(30), tail.child.wait())
            .await
            .is_err()
        {
            let _ = tail.child.kill().await;
        }
    }
}
