//! `pg-outbox`: tail, publish, inspect and check pg_outbox from the command line.
//!
//! Every command takes `--db URL` (or `PG_OUTBOX_DB`): a `postgresql://` URL or a libpq-style
//! `host=… dbname=…` string. Errors are one line on standard error saying what to do; the exit
//! status is 1 for a failure, 2 for a usage error.

mod db;
mod doctor;
mod publish;
mod stats;
mod tail;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Relay, publish and inspect pg_outbox events from the command line.
#[derive(Debug, Parser)]
#[command(name = "pg-outbox", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log more to standard error (-v: info, -vv: debug, including the relay's tracing spans).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a relay and print every delivered event as one JSON line on standard output.
    ///
    /// It is a pg_outbox relay: it survives disconnects and server restarts, catching up exactly
    /// once. Lag and gap markers and status changes go to standard error as JSON lines. Exits 0
    /// on SIGINT or SIGTERM, after printing what was already received.
    Tail(tail::Args),
    /// Publish events through outbox_publish: one per JSON argument, or one per line of
    /// standard input (`-` or no argument); prints each event's id.
    Publish(publish::Args),
    /// Show outbox_stats(): outbox size, the pruner's state and history, notification queue use.
    Stats(stats::Args),
    /// Check a database's pg_outbox set-up and explain what is wrong; exits 1 on problems.
    Doctor(doctor::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => tracing::Level::WARN,
        1 => tracing::Level::INFO,
        _ => tracing::Level::DEBUG,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .init();

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("pg-outbox: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Tail(args) => tail::run(args).await,
            Command::Publish(args) => publish::run(args).await,
            Command::Stats(args) => stats::run(args).await,
            Command::Doctor(args) => doctor::run(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("pg-outbox: {err:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
