//! The SQL edition, `pg_outbox_sql`: its publish rate against the hand-written PL/pgSQL
//! function in the same database and against the native edition's transaction mode, and what
//! pruning by the relays (`RelayBuilder::prune_every`) costs publishers.

use std::time::Duration;

use pg_outbox_client::RelayBuilder;
use pg_outbox_tests::Cluster;

use crate::pgbench::Run;
use crate::publish_rate::{interleaved, row, tps_in_database, Variant};
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
    let counts = options
        .client_counts()
        .into_iter()
        .filter(|clients| options.smoke || [1, 8, 64].contains(clients));
    for clients in counts {
        let rates = interleaved(cluster, options, &VARIANTS, |variant| Run {
            script: format!("{}.sql", variant.script),
            clients,
            duration: options.run_time(),
            options: variant.options.to_owned(),
            variables: Vec::new(),
        });
        let (plpgsql, native) = (&rates[0].1, &rates[2].1);
        for (name, rounds) in &rates {
            table.row(row(&clients.to_string(), name, rounds, &[plpgsql, native]));
        }
    }
    table.note = "pg_outbox_sql in a database of its own on the same server (the native library is preloaded for the other database; the SQL edition uses none of it). The SQL edition sends references (it cannot seal); its outbox_publish checks its arguments as the native one does, makes a UUIDv7 and writes the notification document in PL/pgSQL. The hand-written function inserts into the same event_outbox and sends a small JSON of its own.".to_owned();
    table
}

/// The SQL edition's publish rate while relays prune it (`RelayBuilder::prune_every`), against
/// the same without pruning.
async fn relay_pruning(cluster: &Cluster, options: &Options) -> Table {
    let mut table = Table::new(
        "Publish rate of the SQL edition while two relays prune it every second, 8 clients",
        &["variant", "tx/s (median)", "rounds' range", "vs no pruning"],
    );
    // Every event expires at once: each turn deletes what was published since the last. The
    // setting is the server's here (the native library, preloaded for `postgres`, defines
    // it); its pruner runs hourly in this figure and serves the other database.
    cluster.set_setting("pg_outbox.retention", "1s");
    let run = Run {
        script: "publish.sql".to_owned(),
        clients: 8,
        duration: options.run_time(),
        options: String::new(),
        variables: Vec::new(),
    };
    let (mut plain, mut pruned) = (Vec::new(), Vec::new());
    for round in 0..options.publish_rounds() {
        for pruning in [round % 2 == 1, round % 2 == 0] {
            cluster.psql(SQL_EDITION_DATABASE, "TRUNCATE event_outbox");
            let mut relays = Vec::new();
            if pruning {
                for n in 0..2 {
                    let relay = RelayBuilder::new(cluster.config(SQL_EDITION_DATABASE, "postgres"))
                        .application_name(format!("bench_pruning_relay_{n}"))
                        .prune_every(Duration::from_secs(1))
                        .build()
                        .expect("build the relay");
                    relay.start().await.expect("start the relay");
                    relays.push(relay);
                }
            }
            let rate = tokio::task::block_in_place(|| {
                tps_in_database(cluster, SQL_EDITION_DATABASE, &run)
            });
            let pruned_rows: u64 = relays.iter().map(|r| r.metrics().rows_pruned).sum();
            for relay in relays {
                relay.shutdown().await;
            }
            if pruning {
                assert!(
                    options.smoke || pruned_rows > 0,
                    "the relays pruned nothing"
                );
                pruned.push(rate);
            } else {
                plain.push(rate);
            }
        }
    }
    cluster.reset_setting("pg_outbox.retention");
    table.row(row("", "no pruning", &plain, &[&plain])[1..].to_vec());
    table.row(
        row(
            "",
            "two relays pruning every second (retention 1 s)",
            &pruned,
            &[&plain],
        )[1..]
            .to_vec(),
    );
    table.note = "pgbench publishing through the SQL edition's outbox_publish; during the pruning runs two relays (RelayBuilder::prune_every(1 s)) take turns at outbox_prune(), one at a time, each turn deleting what expired since the last (pg_outbox.retention = 1 s). Rounds alternate which runs first.".to_owned();
    table
}
