//! `monitoring/postgres_exporter.yaml` through the real exporter (Debian's
//! `prometheus-postgres-exporter`): every query runs, every metric it declares is scraped and
//! parses, and the values are the outbox's.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};

use pg_outbox_tests::{free_port, repository, Cluster, WAIT};
use prometheus_parse::{Scrape, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The exporter, killed when dropped.
struct Exporter(Child);

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The body of `GET /metrics` from `port`, if it answers. HTTP/1.0: the body comes whole, not
/// in chunks.
async fn scrape(port: u16) -> Option<String> {
    let mut connection = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    connection
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: a\r\n\r\n")
        .await
        .ok()?;
    let mut response = String::new();
    connection.read_to_string(&mut response).await.ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.0 200").then(|| body.to_owned())
}

/// A counter's or a gauge's value (the exporter's own runtime metrics include summaries).
fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Counter(n) | Value::Gauge(n) | Value::Untyped(n) => Some(*n),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exporter_queries_parse_and_report_the_outbox() {
    let cluster = Cluster::start();
    cluster.psql(
        "postgres",
        "CREATE ROLE exporter LOGIN; GRANT pg_monitor TO exporter; \
         GRANT EXECUTE ON FUNCTION outbox_stats() TO exporter",
    );
    cluster.psql(
        "postgres",
        "SELECT count(outbox_publish('chat', 'u' || n, '{}')) FROM generate_series(1, 25) n",
    );
    let queries = repository().join("monitoring/postgres_exporter.yaml");
    let port = free_port();
    let _exporter = Exporter(
        Command::new("prometheus-postgres-exporter")
            .arg(format!("--extend.query-path={}", queries.display()))
            .args(["--disable-default-metrics", "--disable-settings-metrics"])
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .env(
                "DATA_SOURCE_NAME",
                format!(
                    "postgresql://exporter@127.0.0.1:{}/postgres?sslmode=disable",
                    cluster.port()
                ),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run prometheus-postgres-exporter (scripts/setup.sh installs it)"),
    );

    // The statistics' row estimate reaches the exporter once the publishing session's counts
    // are flushed: wait for it.
    let metrics: HashMap<String, f64> = cluster
        .wait_for("a scrape with the outbox's rows", WAIT, || async {
            let text = scrape(port).await?;
            let scrape = Scrape::parse(text.lines().map(|line| Ok(line.to_owned())))
                .unwrap_or_else(|err| panic!("the scrape does not parse ({err}):\n{text}"));
            let metrics: HashMap<String, f64> = scrape
                .samples
                .iter()
                .filter(|sample| {
                    !sample.metric.starts_with("pg_outbox_")
                        || sample.labels.get("datname") == Some("postgres")
                })
                .filter_map(|sample| Some((sample.metric.clone(), number(&sample.value)?)))
                .collect();
            (metrics.get("pg_outbox_rows") == Some(&25.0)).then_some(metrics)
        })
        .await;

    // Every metric the file declares, and no error loading or running it.
    let declared = std::fs::read_to_string(&queries).unwrap();
    for name in [
        "rows",
        "oldest_event_age_seconds",
        "newest_event_timestamp_seconds",
        "pruner_up",
        "last_pruned_timestamp_seconds",
        "pruned_rows_total",
        "notification_queue_usage_ratio",
    ] {
        assert!(
            declared.contains(&format!("    - {name}:")),
            "{name} is declared"
        );
        assert!(
            metrics.contains_key(&format!("pg_outbox_{name}")),
            "pg_outbox_{name} is not scraped: {metrics:?}"
        );
    }
    assert_eq!(metrics.get("pg_exporter_last_scrape_error"), Some(&0.0));
    assert_eq!(
        metrics.get("pg_exporter_user_queries_load_error"),
        Some(&0.0)
    );
    assert_eq!(metrics["pg_outbox_pruner_up"], 1.0);
    assert_eq!(metrics["pg_outbox_pruned_rows_total"], 0.0);
    let age = metrics["pg_outbox_oldest_event_age_seconds"];
    assert!((0.0..600.0).contains(&age), "oldest event age {age}");
    assert!(metrics["pg_outbox_newest_event_timestamp_seconds"] > 1.7e9);
    let usage = metrics["pg_outbox_notification_queue_usage_ratio"];
    assert!((0.0..=1.0).contains(&usage), "queue usage {usage}");
}
