//! `pg-outbox publish`: events from arguments or standard input, through `outbox_publish`.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use uuid::Uuid;

use crate::db::{explain, Db};

/// Options of `pg-outbox publish`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    db: Db,
    /// The channel (letters, digits, '_', '.', ':' and '-').
    #[arg(long, value_name = "C")]
    channel: String,
    /// The user the events are addressed to.
    #[arg(long, value_name = "U")]
    user: String,
    /// The publishing instance's id: a relay with this instance id skips these events.
    #[arg(long, value_name = "ID")]
    origin: Option<String>,
    /// Publish everything in one transaction: all or nothing. Default: each event commits on
    /// its own.
    #[arg(long)]
    single_transaction: bool,
    /// JSON payloads, one event each; `-` (or none) reads one JSON document per line of
    /// standard input, skipping blank lines.
    #[arg(value_name = "JSON")]
    payloads: Vec<String>,
}

/// Where payloads come from.
enum Source {
    Arguments(Vec<String>),
    Stdin,
}

/// Counts published events on standard error when it is a terminal and the work may be long.
struct Progress {
    enabled: bool,
    last: Instant,
    count: u64,
}

impl Progress {
    fn new(enabled: bool) -> Progress {
        Progress {
            enabled: enabled && std::io::stderr().is_terminal(),
            last: Instant::now(),
            count: 0,
        }
    }

    fn tick(&mut self) {
        self.count += 1;
        if self.enabled && self.last.elapsed() >= Duration::from_millis(200) {
            self.last = Instant::now();
            eprint!("\rpublished {} events", self.count);
        }
    }

    fn finish(&self) {
        if self.enabled {
            eprintln!("\rpublished {} events", self.count);
        }
    }
}

/// Runs `pg-outbox publish`.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let source = if args.payloads.is_empty() || args.payloads == ["-"] {
        Source::Stdin
    } else if args.payloads.iter().any(|p| p == "-") {
        return Err(anyhow!(
            "give JSON payloads as arguments or '-' for standard input, not both"
        ));
    } else {
        Source::Arguments(args.payloads.clone())
    };
    if matches!(source, Source::Stdin) && std::io::stdin().is_terminal() {
        eprintln!("reading one JSON payload per line from standard input (Ctrl-D ends)");
    }

    let client = args.db.connect("pg-outbox publish").await?;
    let schema = args.db.schema.as_str();
    let statement = client
        .prepare(&format!(
            "SELECT {}.outbox_publish($1, $2, $3, $4)",
            args.db.schema_ident()
        ))
        .await
        .map_err(|e| explain(&e, schema))?;
    if args.single_transaction {
        // Ended by COMMIT below; an error drops the connection, which rolls it back.
        client
            .batch_execute("BEGIN")
            .await
            .map_err(|e| explain(&e, schema))?;
    }

    let mut out = std::io::stdout().lock();
    // In one transaction the ids are printed once it commits: before, they may never exist.
    let mut uncommitted: Vec<Uuid> = Vec::new();
    let single = args.single_transaction;
    let mut progress = Progress::new(matches!(source, Source::Stdin));
    let mut publish = async |what: &str, text: &str| -> anyhow::Result<()> {
        let payload: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| anyhow!("{what} is not JSON ({e}); give one JSON document per event"))?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&args.channel, &args.user, &payload, &args.origin];
        let row = client
            .query_one(&statement, &params)
            .await
            .map_err(|e| explain(&e, schema).context(format!("{what} was not published")))?;
        let id: Uuid = row.try_get(0).context("reading the event's id")?;
        if single {
            uncommitted.push(id);
        } else {
            print_id(&mut out, id)?;
        }
        progress.tick();
        Ok(())
    };

    let published: anyhow::Result<()> = async {
        match source {
            Source::Arguments(payloads) => {
                for (n, payload) in payloads.iter().enumerate() {
                    publish(&format!("argument {}", n + 1), payload).await?;
                }
            }
            Source::Stdin => {
                let stdin = std::io::stdin().lock();
                for (n, line) in stdin.lines().enumerate() {
                    let line = line.context("reading standard input")?;
                    if line.trim().is_empty() {
                        continue;
                    }
                    publish(&format!("line {}", n + 1), &line).await?;
                }
            }
        }
        Ok(())
    }
    .await;
    progress.finish();
    published?;
    if args.single_transaction {
        client
            .batch_execute("COMMIT")
            .await
            .map_err(|e| explain(&e, schema))?;
        for id in uncommitted {
            print_id(&mut out, id)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_id(out: &mut impl Write, id: Uuid) -> anyhow::Result<()> {
    writeln!(out, "{id}")
        .and_then(|()| out.flush())
        .context("writing to standard output")
}
