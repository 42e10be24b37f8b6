//! `pg-outbox stats`: `outbox_stats()` as a table or JSON.

use std::process::ExitCode;

use anyhow::{anyhow, Context};

use crate::db::{explain, Db};

/// Options of `pg-outbox stats`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    db: Db,
    /// Print one JSON object (outbox_stats()'s columns as keys) instead of a table.
    #[arg(long)]
    json: bool,
}

/// `outbox_stats()`'s columns in order, with what they mean.
const COLUMNS: &[(&str, &str)] = &[
    ("rows_estimate", "rows in event_outbox (table statistics)"),
    ("oldest_created_at", "the oldest event"),
    ("newest_created_at", "the newest event"),
    ("worker_pid", "the pruner's process (empty: not running)"),
    ("worker_database", "the database it serves"),
    ("worker_state", "what it is doing"),
    (
        "last_pruned_at",
        "the last pruning (worker or outbox_prune())",
    ),
    ("rows_pruned", "rows deleted by it"),
    ("pruned_through_xid", "the greatest transaction id pruned"),
    (
        "notification_queue_usage",
        "fraction of the NOTIFY queue in use",
    ),
];

/// Runs `pg-outbox stats`.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let client = args.db.connect("pg-outbox stats").await?;
    let row = client
        .query_one(
            &format!(
                "SELECT row_to_json(s)::text FROM {}.outbox_stats() s",
                args.db.schema_ident()
            ),
            &[],
        )
        .await
        .map_err(|e| explain(&e, &args.db.schema))?;
    let text: String = row.try_get(0).context("reading outbox_stats()")?;
    if args.json {
        // row_to_json keeps the columns' order.
        println!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    let serde_json::Value::Object(stats) = serde_json::from_str(&text)? else {
        return Err(anyhow!("outbox_stats() did not return a row"));
    };
    let width = COLUMNS
        .iter()
        .map(|(name, _)| name.len())
        .max()
        .unwrap_or(0);
    let shown = |value: Option<&serde_json::Value>| match value {
        None | Some(serde_json::Value::Null) => "-".to_owned(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    let mut values: Vec<(String, String, &str)> = COLUMNS
        .iter()
        .map(|(name, meaning)| ((*name).to_owned(), shown(stats.get(*name)), *meaning))
        .collect();
    for (name, value) in &stats {
        if !COLUMNS.iter().any(|(known, _)| known == name) {
            values.push((name.clone(), shown(Some(value)), ""));
        }
    }
    let value_width = values.iter().map(|(_, v, _)| v.len()).max().unwrap_or(0);
    for (name, value, meaning) in values {
        let value = if name == "notification_queue_usage" {
            stats
                .get("notification_queue_usage")
                .and_then(serde_json::Value::as_f64)
                .map(|f| format!("{:.4} %", f * 100.0))
                .unwrap_or(value)
        } else {
            value
        };
        println!("{name:<width$}  {value:<value_width$}  {meaning}");
    }
    Ok(ExitCode::SUCCESS)
}
