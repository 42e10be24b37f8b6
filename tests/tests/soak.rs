//! Soak: `SOAK_EVENTS` events (default 1,000,000, at `SOAK_RATE` per second, default 5,000)
//! published while four relays, each its own process, relay them, and every tenth of the run one
//! relay's connection is killed. Prints a table of each relay's progress and RSS and of the
//! outbox's size over time, then checks: 0 lost, 0 duplicated, and each relay's memory flat
//! within 10% (the peak RSS of the run's second half against its first half's).
//!
//! Not part of `make test` (too long): `make soak` (`SOAK_EVENTS=200000 make soak` for a
//! shorter run). The relay processes are the `soak-relay` binary of this crate
//! ([`pg_outbox_tests::soak`]). Results: docs/soak.md.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use pg_outbox_tests::soak::PREFIX;
use pg_outbox_tests::Cluster;

const RELAYS: usize = 4;
/// Events per publishing transaction.
const BATCH: i64 = 500;

/// Events per second the publishers aim at (`SOAK_RATE`, default 5,000), so that a run lasts:
/// 1M events take about 200 s. Unpaced publishing ends in seconds and proves little about memory.
fn rate() -> f64 {
    std::env::var("SOAK_RATE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5000.0)
}

fn events() -> i64 {
    std::env::var("SOAK_EVENTS")
        .ok()
        .and_then(|s| s.replace('_', "").parse().ok())
        .unwrap_or(1_000_000)
}

/// The resident set of process `pid`, in kB (`VmRSS` in `/proc/<pid>/status`).
fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// One relay process and what it last said.
struct RelayProcess {
    child: Child,
    name: String,
    delivered: u64,
    result: Option<String>,
}

/// What the relay processes say, as (relay index, line).
type Lines = mpsc::Receiver<(usize, String)>;

fn spawn_relays(cluster: &Cluster, n: i64) -> (Vec<RelayProcess>, Lines) {
    let (tx, rx) = mpsc::channel();
    let exe = env!("CARGO_BIN_EXE_soak-relay");
    let relays = (0..RELAYS)
        .map(|i| {
            let name = format!("soak_relay_{i}");
            let mut child = Command::new(exe)
                .arg(cluster.connection_string("postgres"))
                .arg(&name)
                .arg(n.to_string())
                .stdout(Stdio::piped())
                .spawn()
                .expect("start a relay process");
            let stdout = child.stdout.take().unwrap();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Some(rest) = line.strip_prefix(PREFIX) {
                        if tx.send((i, rest.trim().to_owned())).is_err() {
                            return;
                        }
                    }
                }
            });
            RelayProcess {
                child,
                name,
                delivered: 0,
                result: None,
            }
        })
        .collect();
    (relays, rx)
}

/// Applies what the relay processes said since the last call.
fn read_lines(relays: &mut [RelayProcess], lines: &Lines, wait: Duration) -> usize {
    let mut ready = 0;
    let deadline = Instant::now() + wait;
    while let Ok((i, line)) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now()))
    {
        if line == "ready" {
            ready += 1;
        } else if let Some(n) = line.strip_prefix("delivered ") {
            relays[i].delivered = n.parse().unwrap_or(relays[i].delivered);
        } else if let Some(result) = line.strip_prefix("result ") {
            relays[i].result = Some(result.to_owned());
        }
    }
    ready
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run with `make soak`"]
async fn soak() {
    let n = events();
    let cluster = Cluster::builder()
        // Short, so that the table reaches its steady size within the run.
        .setting("pg_outbox.retention", "'20s'")
        .setting("pg_outbox.prune_interval", "'2s'")
        .start();
    let (mut relays, lines) = spawn_relays(&cluster, n);
    let mut ready = 0;
    let started = Instant::now();
    while ready < RELAYS {
        ready += read_lines(&mut relays, &lines, Duration::from_secs(1));
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "relays never got ready"
        );
    }

    // Two publishers, each its own connection, taking batches of the sequence in turn.
    let next = Arc::new(AtomicI64::new(0));
    let publishing_from = tokio::time::Instant::now();
    let rate = rate();
    let done = Arc::new(AtomicI64::new(0));
    let mut publishers = Vec::new();
    for p in 0..2 {
        let client = cluster.connect("postgres").await;
        let next = Arc::clone(&next);
        let done = Arc::clone(&done);
        publishers.push(tokio::spawn(async move {
            let statement = client
                .prepare(
                    "SELECT count(outbox_publish('soak', 'u' || (i % 100),
                         jsonb_build_object('n', i, 'p', $3::int, 'pad', repeat('x', 64))))
                     FROM generate_series($1::bigint, $2::bigint) i",
                )
                .await
                .unwrap();
            loop {
                let start = next.fetch_add(BATCH, Ordering::Relaxed);
                if start >= n {
                    return;
                }
                let end = (start + BATCH).min(n) - 1;
                let due = Duration::from_secs_f64(start as f64 / rate);
                tokio::time::sleep_until(publishing_from + due).await;
                client
                    .query_one(&statement, &[&start, &end, &p])
                    .await
                    .unwrap();
                done.fetch_add(end + 1 - start, Ordering::Relaxed);
            }
        }));
    }

    let stats = cluster.connect("postgres").await;
    let mut samples: Vec<Vec<u64>> = vec![Vec::new(); RELAYS];
    let kill_every = (n / 10).max(1);
    let mut next_kill = kill_every;
    let mut kills = 0;
    let mut next_row = 0;
    println!(
        "{:>6} {:>9} {:>10} {:>9} | {}",
        "secs",
        "published",
        "table MB",
        "rows",
        (0..RELAYS)
            .map(|i| format!("relay{i} delivered  RSS MB"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    loop {
        read_lines(&mut relays, &lines, Duration::from_secs(1));
        let published = done.load(Ordering::Relaxed);
        for (i, relay) in relays.iter().enumerate() {
            if let Some(kb) = rss_kb(relay.child.id()) {
                samples[i].push(kb);
            }
        }
        // Kill one relay's connection every tenth of the run, in turn.
        if published >= next_kill && published < n {
            let name = &relays[kills % RELAYS].name;
            cluster.terminate_backends(name);
            kills += 1;
            next_kill += kill_every;
        }
        let all_done = relays.iter().all(|r| r.result.is_some());
        let elapsed = started.elapsed().as_secs();
        if elapsed >= next_row || all_done {
            next_row = elapsed + 10;
            let row = stats
                .query_one(
                    "SELECT pg_total_relation_size('event_outbox'), count(*) FROM event_outbox",
                    &[],
                )
                .await
                .unwrap();
            let (bytes, rows): (i64, i64) = (row.get(0), row.get(1));
            println!(
                "{elapsed:>6} {published:>9} {:>10.1} {rows:>9} | {}",
                bytes as f64 / 1e6,
                relays
                    .iter()
                    .enumerate()
                    .map(|(i, r)| format!(
                        "{:>16} {:>7.1}",
                        r.delivered,
                        samples[i].last().copied().unwrap_or(0) as f64 / 1024.0
                    ))
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
        }
        if all_done {
            break;
        }
        let exited: Vec<usize> = (0..RELAYS)
            .filter(|&i| {
                let relay = &mut relays[i];
                relay.result.is_none() && relay.child.try_wait().unwrap().is_some()
            })
            .collect();
        if !exited.is_empty() {
            // Their last lines may still be in the pipe.
            read_lines(&mut relays, &lines, Duration::from_secs(1));
            for i in exited {
                assert!(relays[i].result.is_some(), "{} ended early", relays[i].name);
            }
        }
    }
    for publisher in publishers {
        publisher.await.unwrap();
    }
    for relay in &mut relays {
        let status = relay.child.wait().unwrap();
        assert!(status.success(), "{} exited with {status}", relay.name);
    }

    println!("\n{n} events, {RELAYS} relays, {kills} connection kills");
    let mut failures = Vec::new();
    for (i, relay) in relays.iter().enumerate() {
        let result = relay.result.clone().unwrap_or_default();
        let fields: HashMap<&str, u64> = result
            .split(", ")
            .filter_map(|kv| kv.split_once(' '))
            .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
            .collect();
        // A leak keeps growing: the second half's peak against the first half's, which
        // includes warm-up (buffers, allocator arenas, the catch-ups after kills).
        let s = &samples[i];
        let first = s[..s.len() / 2].iter().copied().max().unwrap_or(0);
        let second = s[s.len() / 2..].iter().copied().max().unwrap_or(0);
        let growth = second as f64 / first.max(1) as f64 - 1.0;
        println!(
            "{}: {result}; RSS peak {:.1} MB in the first half, {:.1} MB in the second ({:+.1}%)",
            relay.name,
            first as f64 / 1024.0,
            second as f64 / 1024.0,
            growth * 100.0
        );
        for key in ["lost", "duplicated", "gaps", "lagged"] {
            if fields.get(key) != Some(&0) {
                failures.push(format!("{}: {key} in {result}", relay.name));
            }
        }
        if growth > 0.10 {
            failures.push(format!("{}: RSS grew {:.1}%", relay.name, growth * 100.0));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
