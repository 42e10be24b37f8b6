//! Figure 1: publish transactions per second, outbox_publish against what users write by hand
//! (a PL/pgSQL function doing INSERT + pg_notify) and against the bare INSERT (the floor), with
//! one listener draining the notifications; and what sealing (the default) and
//! `pg_outbox.logical_messages` cost, in both notify modes.

use pg_outbox_tests::Cluster;

use crate::pgbench::Run;
use crate::report::{median, quantile, rate, Table};
use crate::Options;

pub(crate) struct Variant {
    pub name: &'static str,
    pub script: &'static str,
    pub options: &'static str,
    /// `postgres` (the native edition) or the SQL edition's database.
    pub database: &'static str,
}

impl Variant {
    /// A variant in `postgres`, the native edition's database.
    const fn native(name: &'static str, script: &'static str, options: &'static str) -> Variant {
        Variant {
            name,
            script,
            options,
            database: "postgres",
        }
    }
}

const BARE: Variant = Variant::native("bare INSERT (no NOTIFY)", "bare", "");
const PLPGSQL: Variant = Variant::native("PL/pgSQL INSERT + pg_notify", "plpgsql", "");
const DEFAULTS: Variant = Variant::native(
    "outbox_publish, the defaults (sealed, transaction mode)",
    "publish",
    "",
);
const REFERENCE: Variant = Variant::native(
    "outbox_publish, reference",
    "publish",
    "-c pg_outbox.notify_payload=reference",
);
const INLINE: Variant = Variant::native(
    "outbox_publish, inline",
    "publish",
    "-c pg_outbox.notify_payload=inline",
);

const WORKER: Variant = Variant::native(
    "outbox_publish, notify_mode = worker",
    "publish",
    "-c pg_outbox.notify_mode=worker",
);

const VARIANTS: [Variant; 6] = [BARE, PLPGSQL, DEFAULTS, REFERENCE, INLINE, WORKER];

/// Each notify mode with reference notifications and with sealed ones, the default: what
/// sealing costs the publisher (in worker mode, the notifier seals).
const SEALING: [Variant; 4] = [
    Variant::native(
        "transaction mode, reference",
        "publish",
        "-c pg_outbox.notify_payload=reference",
    ),
    Variant::native("transaction mode, sealed (the default)", "publish", ""),
    Variant::native(
        "worker mode, reference",
        "publish",
        "-c pg_outbox.notify_mode=worker -c pg_outbox.notify_payload=reference",
    ),
    Variant::native(
        "worker mode, sealed",
        "publish",
        "-c pg_outbox.notify_mode=worker",
    ),
];

/// Each notify mode without and with the logical-decoding message per event.
const LOGICAL_MESSAGES: [Variant; 4] = [
    Variant::native("transaction mode", "publish", ""),
    Variant::native(
        "transaction mode, logical_messages = on",
        "publish",
        "-c pg_outbox.logical_messages=on",
    ),
    Variant::native("worker mode", "publish", "-c pg_outbox.notify_mode=worker"),
    Variant::native(
        "worker mode, logical_messages = on",
        "publish",
        "-c pg_outbox.notify_mode=worker -c pg_outbox.logical_messages=on",
    ),
];

pub async fn run(cluster: &Cluster, options: &Options) -> Vec<Table> {
    let drained = crate::drain::spawn(cluster).await;
    let mut tables = Vec::new();

    let mut per_clients = Table::new(
        "Publish rate: transactions per second, one event per transaction",
        &[
            "clients",
            "variant",
            "tx/s (median)",
            "rounds' range",
            "vs PL/pgSQL",
            "vs bare INSERT",
        ],
    );
    for clients in options.client_counts() {
        let rates = one_event_per_transaction(cluster, options, &VARIANTS, clients);
        add_rows(&mut per_clients, &clients.to_string(), &rates);
    }
    per_clients.note = format!(
        "pgbench -M prepared, {} s runs, {} interleaved rounds (each starting one variant further along); a listener drains notifications throughout. Rates: medians of the rounds; ratios: medians of the rounds' ratios, each round's run against the other variant's run of the same round.",
        options.run_time().as_secs(),
        options.publish_rounds()
    );
    tables.push(per_clients);

    let clients = 8;
    let mut batches = Table::new(
        &format!(
            "Publish rate: events per second, several events per transaction, {clients} clients"
        ),
        &[
            "events per tx",
            "variant",
            "events/s (median)",
            "rounds' range",
            "vs PL/pgSQL",
            "vs bare INSERT",
        ],
    );
    for batch in [10, 100] {
        let rates = interleaved(cluster, options, &VARIANTS, |variant| Run {
            script: format!("{}_batch.sql", variant.script),
            clients,
            duration: options.run_time(),
            options: variant.options.to_owned(),
            variables: vec![("batch".to_owned(), batch.to_string())],
        });
        let events: Vec<(&str, Vec<f64>)> = rates
            .into_iter()
            .map(|(name, tps)| (name, tps.iter().map(|t| t * f64::from(batch)).collect()))
            .collect();
        add_rows(&mut batches, &batch.to_string(), &events);
    }
    tables.push(batches);
    tables.push(user_index_table(cluster, options));
    tables.push(sealing_table(cluster, options));
    let mut logical = paired(
        cluster,
        options,
        "Publish rate with pg_outbox.logical_messages on and off, one event per transaction",
        "vs off, same mode",
        &LOGICAL_MESSAGES,
    );
    logical.note = "Each event is also written into the WAL as a transactional logical-decoding message (its document with the payload); wal_level is the default (replica): with logical, every variant writes a little more WAL alike. No slot reads the messages during the runs.".to_owned();
    tables.push(logical);

    drained.stop().await;
    tables
}

pub(crate) fn tps_in_database(cluster: &Cluster, database: &str, run: &Run) -> f64 {
    crate::pgbench::tps_in(
        cluster.bindir(),
        cluster.root(),
        cluster.port(),
        database,
        run,
    )
}

/// The defaults with and without the `(user_id, xid)` index that resumes read.
const USER_INDEX: [Variant; 2] = [
    Variant::native("without the (user_id, xid) index", "publish", ""),
    Variant::native("with it (the default)", "publish", ""),
];

/// What the `(user_id, xid)` index costs publishers: the defaults with it and without it, in
/// turn in the same database (it is dropped or made again, on the empty outbox, before each
/// run), one event per transaction and 100.
fn user_index_table(cluster: &Cluster, options: &Options) -> Table {
    let mut table = Table::new(
        "What the (user_id, xid) index costs publishers",
        &[
            "clients × events per tx",
            "variant",
            "tx/s (median)",
            "rounds' range",
            "vs without",
        ],
    );
    let prepare = |variant: &Variant| {
        let statement = if variant.name == USER_INDEX[0].name {
            "DROP INDEX %I"
        } else {
            "CREATE INDEX IF NOT EXISTS %I ON %I (user_id, xid)"
        };
        cluster.psql(
            "postgres",
            &format!(
                "DO $$ DECLARE t text; BEGIN \
                   FOR t IN SELECT 'event_outbox' UNION ALL SELECT name FROM outbox_segments LOOP \
                     IF {drop} = (to_regclass(t || '_user_id_xid_idx') IS NOT NULL) THEN \
                       EXECUTE format('{statement}', t || '_user_id_xid_idx', t); \
                     END IF; \
                   END LOOP; END $$",
                drop = variant.name == USER_INDEX[0].name,
            ),
        );
    };
    for (clients, batch) in [(1, 1), (8, 1), (8, 100)] {
        if !options.client_counts().contains(&clients) {
            continue;
        }
        let rates = interleaved_prepared(cluster, options, &USER_INDEX, prepare, |variant| Run {
            script: format!("{}_batch.sql", variant.script),
            clients,
            duration: options.run_time(),
            options: variant.options.to_owned(),
            variables: vec![("batch".to_owned(), batch.to_string())],
        });
        let without = &rates[0].1;
        for (name, rounds) in &rates {
            table.row(row(
                &format!("{clients} × {batch}"),
                name,
                rounds,
                &[without],
            ));
        }
    }
    table.note = "The defaults (sealed, transaction mode) in the same database, the index dropped from event_outbox and its segments, or made again, on the empty outbox before each run; pgbench -M prepared, publish_batch.sql (one statement publishing the batch), interleaved rounds.".to_owned();
    table
}

/// Only what the `(user_id, xid)` index costs publishers (`--only user-index`): the table of
/// [`run`]'s.
pub async fn user_index(cluster: &Cluster, options: &Options) -> Vec<Table> {
    let drained = crate::drain::spawn(cluster).await;
    let table = user_index_table(cluster, options);
    drained.stop().await;
    vec![table]
}

/// Only what sealing, the default, costs publishers (`--only sealing`): the table of
/// [`run`]'s that compares it with references.
pub async fn sealing(cluster: &Cluster, options: &Options) -> Vec<Table> {
    let drained = crate::drain::spawn(cluster).await;
    let table = sealing_table(cluster, options);
    drained.stop().await;
    vec![table]
}

fn sealing_table(cluster: &Cluster, options: &Options) -> Table {
    let mut sealing = paired(
        cluster,
        options,
        "Publish rate with sealed notifications (the default) and reference ones, one event per transaction",
        "vs reference, same mode",
        &SEALING,
    );
    sealing.note = "Sealed: each notification encrypted and authenticated (XChaCha20-Poly1305; nonces from a part drawn once per process from the server's strong random source, and a counter) with the key of outbox_seal_keys, which a backend reads once; the event travels inside when it fits, so more bytes go through the notification queue to every listener. In worker mode the notifier seals, not the publisher.".to_owned();
    sealing
}

/// The publish rate of `variants`, taken in pairs (a base, then what it is compared with), each
/// ratio paired by round as in the main table.
fn paired(
    cluster: &Cluster,
    options: &Options,
    title: &str,
    ratio: &str,
    variants: &[Variant],
) -> Table {
    let mut table = Table::new(
        title,
        &[
            "clients",
            "variant",
            "tx/s (median)",
            "rounds' range",
            ratio,
        ],
    );
    // At the client counts of the targets only: four more variants at every count would double
    // the figure's time.
    for clients in options.client_counts_among(&[8, 64]) {
        let rates = one_event_per_transaction(cluster, options, variants, clients);
        for pair in rates.chunks(2) {
            let [(base_name, base), (name, rounds)] = pair else {
                continue;
            };
            for (name, rounds) in [(base_name, base), (name, rounds)] {
                table.row(row(&clients.to_string(), name, rounds, &[base]));
            }
        }
    }
    table
}

/// [`interleaved`] runs of `variants` at `clients`, each transaction publishing one event.
pub(crate) fn one_event_per_transaction<'v>(
    cluster: &Cluster,
    options: &Options,
    variants: &'v [Variant],
    clients: u32,
) -> Vec<(&'v str, Vec<f64>)> {
    interleaved(cluster, options, variants, |variant| Run {
        script: format!("{}.sql", variant.script),
        clients,
        duration: options.run_time(),
        options: variant.options.to_owned(),
        variables: Vec::new(),
    })
}

/// Runs every variant once per round and returns each one's rates, by round. Each round starts one
/// variant further along, so that no variant always runs right after the same other one or at
/// the same point of a round (a checkpoint or autovacuum that recurs with the rounds' rhythm
/// would otherwise land on the same variant every time).
fn interleaved<'v>(
    cluster: &Cluster,
    options: &Options,
    variants: &'v [Variant],
    run: impl Fn(&Variant) -> Run,
) -> Vec<(&'v str, Vec<f64>)> {
    interleaved_prepared(cluster, options, variants, |_| {}, run)
}

/// [`interleaved`], with `prepare` run before each run, once the outbox is empty.
fn interleaved_prepared<'v>(
    cluster: &Cluster,
    options: &Options,
    variants: &'v [Variant],
    prepare: impl Fn(&Variant),
    run: impl Fn(&Variant) -> Run,
) -> Vec<(&'v str, Vec<f64>)> {
    let mut samples = vec![Vec::new(); variants.len()];
    for round in 0..options.publish_rounds() {
        for offset in 0..variants.len() {
            let at = (round + offset) % variants.len();
            let variant = &variants[at];
            cluster.psql(variant.database, "TRUNCATE event_outbox, bare_outbox");
            prepare(variant);
            samples[at].push(tps_in_database(cluster, variant.database, &run(variant)));
        }
    }
    variants
        .iter()
        .zip(samples)
        .map(|(variant, samples)| (variant.name, samples))
        .collect()
}

/// One row per variant, with its ratios to the PL/pgSQL function and the bare INSERT (see
/// [`row`]).
fn add_rows(table: &mut Table, label: &str, rates: &[(&str, Vec<f64>)]) {
    let find = |name: &str| {
        rates
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(&[][..], |(_, r)| r.as_slice())
    };
    let (plpgsql, bare) = (find(PLPGSQL.name), find(BARE.name));
    for (name, rounds) in rates {
        table.row(row(label, name, rounds, &[plpgsql, bare]));
    }
}

/// A variant's row: its median rate, the range of its rounds, and its ratio to each of
/// `bases`, each the median of the rounds' own ratios: a round's runs are minutes apart at
/// most, so pairing them leaves out the machine's slower drifts.
pub(crate) fn row(label: &str, name: &str, rounds: &[f64], bases: &[&[f64]]) -> Vec<String> {
    let mut row = vec![
        label.to_owned(),
        name.to_owned(),
        rate(median(rounds)),
        format!(
            "{}–{}",
            rate(quantile(rounds, 0.0)),
            rate(quantile(rounds, 1.0))
        ),
    ];
    row.extend(bases.iter().map(|base| {
        let ratios: Vec<f64> = rounds.iter().zip(*base).map(|(v, b)| v / b).collect();
        format!("{:.2}×", median(&ratios))
    }));
    row
}
