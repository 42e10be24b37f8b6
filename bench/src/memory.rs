//! Figure 6: a relay's resident memory as it delivers a million events, measured on the
//! `pg-outbox tail` command (a relay that prints what it delivers) in a process of its own.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pg_outbox_tests::Cluster;

use crate::report::Table;
use crate::Options;

pub async fn run(cluster: &Cluster, options: &Options) -> Vec<Table> {
    let total: u64 = if options.smoke { 20_000 } else { 1_000_000 };
    let per_tx: u64 = 10_000;
    cluster.psql("postgres", "TRUNCATE event_outbox");
    let binary = tail_binary();
    let mut child = Command::new(&binary)
        .args(["tail", "--db", &cluster.connection_string("postgres")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {} (make bench builds it): {e}", binary.display()));
    let pid = child.id();
    // The first status line on stderr comes once the relay listens.
    let mut status = BufReader::new(child.stderr.take().expect("stderr is piped"));
    let mut line = String::new();
    let _ = status.read_line(&mut line);
    let lines = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&lines);
    let stdout = child.stdout.take().expect("stdout is piped");
    let reader = std::thread::spawn(move || {
        for _ in BufReader::new(stdout).lines() {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });

    let publisher = cluster.connect("postgres").await;
    publisher
        .batch_execute("SET pg_outbox.notify_mode = 'worker'")
        .await
        .expect("set the publisher's mode");
    let mut samples = vec![(0, rss_kib(pid))];
    let mut published = 0;
    while published < total {
        publisher
            .execute(
                "SELECT count(outbox_publish('chat', 'user-' || (n % 100), \
                 jsonb_build_object('text', 'an event for the memory figure', 'n', n))) \
                 FROM generate_series(1, $1::int8) n",
                &[&(per_tx as i64)],
            )
            .await
            .expect("publish");
        published += per_tx;
        if published % (total / 4).max(per_tx) == 0 || published == total {
            let deadline = Instant::now() + Duration::from_secs(120);
            while lines.load(Ordering::Relaxed) < published && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            samples.push((published, rss_kib(pid)));
        }
    }
    let _ = Command::new("kill").arg(pid.to_string()).status();
    let _ = child.wait();
    let _ = reader.join();

    let mut table = Table::new(
        "Relay memory while delivering events",
        &["events delivered", "resident memory (RSS)"],
    );
    table.note = format!(
        "`pg-outbox tail` relaying {total} events published {per_tx} per transaction \
         (notify_mode = worker, reference), its output read and counted by the benchmark."
    );
    for (events, kib) in samples {
        table.row(vec![
            events.to_string(),
            format!("{:.1} MiB", kib as f64 / 1024.0),
        ]);
    }
    vec![table]
}

/// `target/release/pg-outbox`, next to this benchmark's own binary.
pub fn tail_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("pg-outbox")))
        .unwrap_or_else(|| PathBuf::from("pg-outbox"))
}

/// The resident memory of process `pid`, in KiB (0 when it cannot be read).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap_or(0)
}
