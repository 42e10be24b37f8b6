//! `pg-outbox tail`: a relay that prints what it delivers.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{anyhow, Context};
use futures_util::StreamExt;
use pg_outbox_client::{Delivery, Event, Gap, Health, RelayBuilder, Topic};
use serde::Serialize;
use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};

use crate::db::Db;

/// Options of `pg-outbox tail`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    db: Db,
    /// Relay only this channel (repeat for several). Default: every channel.
    #[arg(long, value_name = "C")]
    channel: Vec<String>,
    /// Print only the events addressed to this user.
    #[arg(long, value_name = "U")]
    user: Option<String>,
    /// This relay's instance id: events published with this origin are skipped.
    #[arg(long, value_name = "ID")]
    instance: Option<String>,
    /// Events that may wait unprinted before the oldest are dropped (reported as "lagged").
    #[arg(long, default_value_t = 65536, value_name = "N")]
    buffer: usize,
    /// Also prune expired events at this interval, taking turns with the other relays that do
    /// (one at a time): for a database where nothing else prunes (the SQL edition without
    /// pg_cron). The role needs EXECUTE on outbox_prune().
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    prune_every: Option<std::time::Duration>,
}

/// One event as printed: these keys, in this order.
#[derive(Serialize)]
struct Line<'a> {
    id: String,
    channel: &'a str,
    user_id: &'a str,
    payload: &'a serde_json::Value,
    created_at: String,
    origin: Option<&'a str>,
}

fn event_line(event: &Event) -> anyhow::Result<String> {
    serde_json::to_string(&Line {
        id: event.id().to_string(),
        channel: event.channel(),
        user_id: event.user_id(),
        payload: event.payload(),
        created_at: humantime::format_rfc3339_micros(event.created_at()).to_string(),
        origin: event.origin(),
    })
    .context("encoding an event as JSON")
}

/// A status, lag or gap line on standard error.
fn report(value: serde_json::Value) {
    let mut stderr = std::io::stderr().lock();
    // Nothing sensible is left to do if standard error is gone.
    let _ = writeln!(stderr, "{value}");
}

fn gap_value(gap: &Gap) -> serde_json::Value {
    match gap {
        Gap::Pruned {
            pruned_through_xid,
            cursor_xmin,
        } => {
            json!({"gap": {"kind": "pruned", "pruned_through_xid": pruned_through_xid, "cursor_xmin": cursor_xmin}})
        }
        Gap::Missing {
            id,
            channel,
            user_id,
        } => {
            json!({"gap": {"kind": "missing", "id": id.to_string(), "channel": channel, "user_id": user_id}})
        }
        Gap::Unreadable {
            id,
            channel,
            user_id,
            reason,
        } => {
            json!({"gap": {"kind": "unreadable", "id": id.to_string(), "channel": channel, "user_id": user_id, "reason": reason}})
        }
        Gap::Rewound { floor_xid } => {
            json!({"gap": {"kind": "rewound", "floor_xid": floor_xid}})
        }
        other => json!({"gap": {"kind": other.kind(), "detail": other.to_string()}}),
    }
}

fn health_value(health: &Health) -> serde_json::Value {
    match health {
        Health::NotStarted => json!({"status": "not_started"}),
        Health::Listening => json!({"status": "listening"}),
        Health::Reconnecting {
            attempt,
            last_error,
        } => json!({"status": "reconnecting", "attempt": attempt, "error": last_error}),
        Health::Stopped => json!({"status": "stopped"}),
        other => json!({"status": other.to_string()}),
    }
}

/// Writes one delivery; `false` once standard output is closed.
fn print(item: &Delivery, out: &mut impl Write) -> anyhow::Result<bool> {
    match item {
        Delivery::Event(event) => {
            let line = event_line(event)?;
            Ok(writeln!(out, "{line}").and_then(|()| out.flush()).is_ok())
        }
        Delivery::Lagged { missed } => {
            report(json!({"lagged": {"missed": missed}}));
            Ok(true)
        }
        Delivery::Gap(gap) => {
            report(gap_value(gap));
            Ok(true)
        }
        _ => Ok(true),
    }
}

/// Runs `pg-outbox tail`.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut builder = RelayBuilder::new(args.db.config("pg-outbox tail")?)
        .schema(args.db.schema.clone())
        .subscriber_buffer(args.buffer.max(1));
    if !args.channel.is_empty() {
        builder = builder.channels(args.channel.clone());
    }
    if let Some(instance) = &args.instance {
        builder = builder.instance_id(instance.clone());
    }
    if let Some(every) = args.prune_every {
        builder = builder.prune_every(every);
    }
    let relay = builder.build().map_err(|e| anyhow!("{e}"))?;
    let topic = match &args.user {
        Some(user) => Topic::all().user(user.clone()),
        None => Topic::all(),
    };
    let mut subscription = relay.subscribe_to(topic);
    let mut interrupt = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("handling SIGTERM")?;

    relay
        .start()
        .await
        .map_err(|e| anyhow!("{}", crate::db::chain(&e)))?;

    let mut health = relay.watch_health();
    report(health_value(&health.borrow_and_update()));
    let mut out = std::io::stdout().lock();
    let mut open = true;
    let mut ended = false;
    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            changed = health.changed() => {
                if changed.is_err() {
                    ended = true;
                    break;
                }
                report(health_value(&health.borrow_and_update()));
            }
            item = subscription.next() => match item {
                Some(item) => {
                    if !print(&item, &mut out)? {
                        open = false;
                        break;
                    }
                }
                None => {
                    ended = true;
                    break;
                }
            },
        }
    }
    relay.shutdown().await;
    // What was already delivered to this process is printed before exiting.
    while open {
        match subscription.next().await {
            Some(item) => open = print(&item, &mut out)?,
            None => break,
        }
    }
    report(json!({"status": "stopped"}));
    if ended {
        return Err(anyhow!("the relay stopped unexpectedly"));
    }
    Ok(ExitCode::SUCCESS)
}
