//! `make bench`: pg_outbox measured side by side with what users would otherwise write, on a
//! throwaway cluster this program starts (and prints the configuration of).
//!
//! ```text
//! pg-outbox-bench [--smoke]
//!     [--only publish|latency|browser|fanout|prune|memory|resume|relays|plan|connections|sql-edition|sealing|user-index]
//! ```
//! `--smoke` runs every figure tiny, so CI keeps the harness from rotting; its numbers mean
//! nothing. Results go to stdout as Markdown tables, for BENCHMARKS.md.

mod backlog;
mod browser;
mod connections;
mod drain;
mod fanout;
mod latency;
mod memory;
mod pace;
mod pgbench;
mod plan;
mod prune;
mod publish_rate;
mod relay_cost;
mod report;
mod resume;
mod retention;
mod server_cpu;
mod sql_edition;
mod sse_client;

use std::time::Duration;

use pg_outbox_tests::Cluster;

/// The cluster's settings beyond initdb's defaults, as `postgresql.conf` lines. `fsync` and
/// `synchronous_commit` stay on: the cost of a commit's WAL flush is what the notify lock
/// serialises.
fn settings() -> Vec<(&'static str, String)> {
    [
        ("fsync", "on"),
        ("synchronous_commit", "on"),
        ("max_connections", "200"),
        ("shared_buffers", "'512MB'"),
        ("max_wal_size", "'4GB'"),
        ("pg_outbox.prune_interval", "'1h'"),
    ]
    .into_iter()
    .map(|(name, value)| (name, value.to_owned()))
    .collect()
}

pub struct Options {
    smoke: bool,
    only: Option<String>,
}

impl Options {
    fn client_counts(&self) -> Vec<u32> {
        if self.smoke {
            vec![1, 8]
        } else {
            vec![1, 8, 32, 64]
        }
    }

    /// The counts of [`Options::client_counts`] among `wanted` (all of them when smoke testing):
    /// for figures measured at their targets' client counts only.
    fn client_counts_among(&self, wanted: &[u32]) -> Vec<u32> {
        self.client_counts()
            .into_iter()
            .filter(|clients| self.smoke || wanted.contains(clients))
            .collect()
    }

    fn rounds(&self) -> usize {
        if self.smoke {
            1
        } else {
            3
        }
    }

    /// Rounds of the publish-rate figure: its ratios against the bare INSERT are targets, and
    /// single 6-second runs of one variant spread over ±15% here.
    fn publish_rounds(&self) -> usize {
        if self.smoke {
            1
        } else {
            5
        }
    }

    fn run_time(&self) -> Duration {
        Duration::from_secs(if self.smoke { 1 } else { 6 })
    }

    fn latency_time(&self) -> Duration {
        Duration::from_secs(if self.smoke { 1 } else { 5 })
    }

    fn wants(&self, figure: &str) -> bool {
        self.only.as_deref().is_none_or(|only| only == figure)
    }
}

#[tokio::main]
async fn main() {
    let mut options = Options {
        smoke: false,
        only: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--smoke" => options.smoke = true,
            "--only" => options.only = args.next(),
            other => {
                eprintln!(
                    "unknown argument {other}; usage: pg-outbox-bench [--smoke] [--only FIGURE]"
                );
                std::process::exit(2);
            }
        }
    }

    let settings = settings();
    let mut builder = Cluster::builder();
    for (name, value) in &settings {
        builder = builder.setting(name, value);
    }
    let cluster = builder.start();
    cluster.psql("postgres", include_str!("../sql/setup.sql"));
    println!("## Setup\n");
    println!("{}", machine());
    println!(
        "PostgreSQL: {}\n",
        cluster.psql("postgres", "SHOW server_version")
    );
    println!("Cluster settings beyond initdb's defaults:\n");
    for (name, value) in &settings {
        println!("- `{name} = {value}`");
    }
    println!("- `shared_preload_libraries = 'pg_outbox'`\n");

    let mut tables = Vec::new();
    if options.wants("publish") {
        tables.extend(publish_rate::run(&cluster, &options).await);
    }
    if options.wants("latency") {
        tables.extend(latency::run(&cluster, &options).await);
    }
    if options.wants("browser") {
        tables.extend(browser::run(&cluster, &options).await);
    }
    if options.wants("fanout") {
        tables.extend(fanout::run(&cluster, &options).await);
    }
    if options.wants("prune") {
        tables.extend(prune::run(&cluster, &options).await);
    }
    if options.wants("memory") {
        tables.extend(memory::run(&cluster, &options).await);
    }
    if options.wants("resume") {
        tables.extend(resume::run(&cluster, &options).await);
    }
    if options.wants("relays") {
        tables.extend(relay_cost::run(&cluster, &options).await);
    }
    if options.wants("plan") {
        tables.extend(plan::run(&cluster, &options).await);
    }
    if options.wants("connections") {
        tables.extend(connections::run(&cluster, &options).await);
    }
    // Part of `publish`; alone only when asked for by name.
    if options.only.as_deref() == Some("sealing") {
        tables.extend(publish_rate::sealing(&cluster, &options).await);
    }
    if options.only.as_deref() == Some("user-index") {
        tables.extend(publish_rate::user_index(&cluster, &options).await);
    }
    if options.wants("sql-edition") {
        tables.extend(sql_edition::run(&cluster, &options).await);
    }
    println!("## Results\n");
    for table in tables {
        println!("{table}");
    }
}

/// CPU model and count, memory, kernel.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .map(|l| l.trim().to_owned())
        .unwrap_or_default();
    format!("Machine: {cpus} × {model}, {memory} memory")
}
