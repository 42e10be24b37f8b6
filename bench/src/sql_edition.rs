//! The SQL edition, `pg_outbox_sql`: its publish rate against the hand-written PL/pgSQL
//! function in the same database and against the native edition's transaction mode, and what
//! pruning by the relays (`RelayBuilder::prune_every`) costs publishers.

use std::time::Duration;

use pg_outbox_client::RelayBuilder;
use pg_outbox_tests::Cluster;

use crate::pgbench::Run;
use crate::publish_rate::{one_event_per_transaction, row, tps_in_database, Variant};
use crate::report::Table;
use crate::Options;

/// The database of the SQL edition, beside the native one in `postgres`.
const SQL_EDITION_DATABASE: &str = "sql_edition";

/// The SQL edition against what a user writes by hand in the same database, and against the
/// native edition's transaction mode (its defaults, and the references the SQL edition sends).
const VARIANTS: [Variant; 4] = [
    Variant {
        name: "PL/pgSQL INSERT + pg_notify, in the SQL edition's database",
        script: "plpgsql",
        options: "",
        database: SQL_EDITION_DATABASE,
    },
    Variant {
        name: "outbox_publish, SQL edition (pg_outbox_sql)",
        script: "publish",
        options: "",
        database: SQL_EDITION_DATABASE,
    },
    Variant {
        name: "outbox_publish, native, the defaults (sealed, transaction mode)",
        script: "publish",
        options: "",
        database: "postgres",
    },
    Variant {
        name: "outbox_publish, native, reference, transaction mode",
        script: "publish",
        options: "-c pg_outbox.notify_payload=reference",
        database: "postgres",
    },
];

pub async fn run(cluster: &Cluster, options: &Options) -> Vec<Table> {
    cluster.psql(
        "postgres",
        &format!("CREATE DATABASE {SQL_EDITION_DATABASE}"),
    );
    cluster.psql(SQL_EDITION_DATABASE, "CREATE EXTENSION pg_outbox_sql");
    cluster.psql(SQL_EDITION_DATABASE, include_str!("../sql/setup.sql"));
    let drained = crate::drain::spawn(cluster).await;
    let tables = vec![
        publish_rate(cluster, options),
        relay_pruning(cluster, options).await,
    ];
    drained.stop().await;
    tables
}

/// The SQL edition's publish rate beside the hand-written function and the native edition.
fn publish_rate(cluster: &Cluster, options: &Options) -> Table {
    let mut table = Table::new(
        "Publish rate of the SQL edition, one event per transaction",
        &[
            "clients",
            "variant",
            "tx/s (median)",
            "rounds' range",
            "vs PL/pgSQL, same database",
            "vs native, the defaults",
        ],
    );
    for clients in options.client_counts_among(&[1, 8, 64]) {
        let rates = one_event_per_transaction(cluster, options, &VARIANTS, clients);
        let (plpgsql, native) = (&rates[0].1, &rates[2].1);
        for (name, rounds) in &rates {
            table.row(row(&clients.to_string(), name, rounds, &[plpgsql, native]));
        }
    }
    table.note = "pg_outbox_sql in a database of its own on the same server (the native library is preloaded for the other database; the SQL edition uses none of it). The SQL edition sends references (it cannot seal); its outbox_publish checks its arguments as the native one does, makes a UUIDv7 and writes the notification document in PL/pgSQL. The hand-written function inserts into the same event_outbox and sends a small JSON of its own.".to_owned();
    table
}

/// How the relays' pruning removes expired events, in [`relay_pruning`]'s arms.
#[derive(Clone, Copy, PartialEq)]
enum Pruning {
    Off,
    /// `pg_outbox.segment_interval = 1s`: segments, each emptied with TRUNCATE once expired.
    Segments,
    /// `pg_outbox.segment_interval = 0`: rows deleted one by one.
    Delete,
}

/// The SQL edition's publish rate while relays prune it (`RelayBuilder::prune_every`), by
/// emptying expired segments and by deleting rows, against the same without pruning.
async fn relay_pruning(cluster: &Cluster, options: &Options) -> Table {
    let mut table = Table::new(
        "Publish rate of the SQL edition while two relays prune it every second, 8 clients",
        &["variant", "tx/s (median)", "rounds' range", "vs no pruning"],
    );
    // Every event expires at once: each turn removes what was published since the last. The
    // settings are the server's here (the native library, preloaded for `postgres`, defines
    // them); its pruner runs hourly in this figure and serves the other database.
    cluster.set_setting("pg_outbox.retention", "1s");
    let run = Run {
        script: "publish.sql".to_owned(),
        clients: 8,
        duration: options.run_time(),
        options: String::new(),
        variables: Vec::new(),
    };
    let arms = [Pruning::Off, Pruning::Segments, Pruning::Delete];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); arms.len()];
    for round in 0..options.publish_rounds() {
        // Each round starts with another arm.
        for offset in 0..arms.len() {
            let arm = (round + offset) % arms.len();
            let pruning = arms[arm];
            cluster.set_setting(
                "pg_outbox.segment_interval",
                if pruning == Pruning::Delete {
                    "0"
                } else {
                    "1s"
                },
            );
            cluster.psql(SQL_EDITION_DATABASE, "TRUNCATE event_outbox");
            // The two relays run in every arm, reading each event (the SQL edition sends
            // references), so that the arms differ by the pruning alone.
            let mut relays = Vec::new();
            for n in 0..2 {
                let mut builder =
                    RelayBuilder::new(cluster.config(SQL_EDITION_DATABASE, "postgres"))
                        .application_name(format!("bench_pruning_relay_{n}"));
                if pruning != Pruning::Off {
                    builder = builder.prune_every(Duration::from_secs(1));
                }
                let relay = builder.build().expect("build the relay");
                relay.start().await.expect("start the relay");
                relays.push(relay);
            }
            let rate = tokio::task::block_in_place(|| {
                tps_in_database(cluster, SQL_EDITION_DATABASE, &run)
            });
            let pruned_rows: u64 = relays.iter().map(|r| r.metrics().rows_pruned).sum();
            for relay in relays {
                relay.shutdown().await;
            }
            assert!(
                options.smoke || pruning == Pruning::Off || pruned_rows > 0,
                "the relays pruned nothing"
            );
            rates[arm].push(rate);
        }
    }
    cluster.reset_setting("pg_outbox.retention");
    cluster.reset_setting("pg_outbox.segment_interval");
    let plain = &rates[0];
    for (name, arm) in [
        ("two relays, no pruning", plain),
        (
            "two relays pruning every second: expired segments emptied whole (segment_interval = 1s)",
            &rates[1],
        ),
        (
            "two relays pruning every second: rows deleted one by one (segment_interval = 0)",
            &rates[2],
        ),
    ] {
        table.row(row("", name, arm, &[plain])[1..].to_vec());
    }
    table.note = "pgbench publishing through the SQL edition's outbox_publish, two relays reading every event in every arm; during the pruning runs the two relays (RelayBuilder::prune_every(1 s)) also take turns at outbox_prune(), one at a time, with pg_outbox.retention = 1 s, so each turn removes what expired since the last: with segments, it empties each segment whose last event expired (TRUNCATE) and moves publishers on to the next; without, it deletes the expired rows in batches. Each round starts with another arm.".to_owned();
    table
}
