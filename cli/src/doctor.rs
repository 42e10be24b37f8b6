//! `pg-outbox doctor`: checks a database's pg_outbox set-up and explains what is wrong.
//!
//! Every query runs with the simple query protocol, so the checks work (and can explain the
//! problem) through a pooler in transaction mode too.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::anyhow;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};

use crate::db::{quote_literal, simple_row, Db};

/// Options of `pg-outbox doctor`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    db: Db,
    /// How long the LISTEN round trip may take before the connection is judged not to hold
    /// LISTEN (a pooler in transaction mode).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    listen_timeout: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Ok,
    Info,
    Warn,
    Fail,
}

impl Level {
    fn label(self) -> &'static str {
        match self {
            Level::Ok => "ok  ",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        }
    }
}

/// Prints findings as they come and counts them.
#[derive(Default)]
struct Report {
    warnings: usize,
    problems: usize,
}

impl Report {
    /// A check this role could not run: a warning, not a verdict.
    fn could_not(&mut self, what: &str, err: &anyhow::Error) {
        self.say(Level::Warn, format!("could not {what}: {err:#}"), None);
    }

    fn say(&mut self, level: Level, what: impl AsRef<str>, fix: Option<String>) {
        match level {
            Level::Warn => self.warnings += 1,
            Level::Fail => self.problems += 1,
            Level::Ok | Level::Info => {}
        }
        println!("{}  {}", level.label(), what.as_ref());
        if let Some(fix) = fix {
            println!("      {fix}");
        }
    }
}

fn flag(value: &Option<String>) -> bool {
    value.as_deref() == Some("t")
}

/// Runs `pg-outbox doctor`.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let client = args.db.connect("pg-outbox doctor").await?;
    let mut report = Report::default();

    let who = simple_row(
        &client,
        "SELECT current_database(), current_user, current_setting('server_version'), \
                pg_is_in_recovery()",
    )
    .await?;
    let database = who[0].clone().unwrap_or_default();
    let role = who[1].clone().unwrap_or_default();
    report.say(
        Level::Ok,
        format!(
            "connected to database {database:?} as role {role:?} (PostgreSQL {})",
            who[2].as_deref().unwrap_or("?")
        ),
        None,
    );
    let standby = flag(&who[3]);
    if standby {
        report.say(
            Level::Fail,
            "this server is a hot standby: LISTEN and outbox_publish are refused there",
            Some(
                "connect relays and publishers to the primary (add target_session_attrs=read-write \
                 to their connection strings)"
                    .into(),
            ),
        );
    } else {
        report.say(Level::Ok, "the server is a primary (not in recovery)", None);
    }

    check_listen(&args, &mut report).await;
    let installed = check_extension(&client, &args.db, &database, &mut report).await?;
    match &installed {
        Some((schema, Edition::Native)) => {
            let preloaded = check_preload(&client, &mut report).await;
            let pruner = check_pruner(&client, schema, &database, preloaded, standby, &mut report);
            if let Err(err) = pruner.await {
                report.could_not("check the pruner", &err);
            }
            if let Err(err) = check_notifier(&client, &database, standby, &mut report).await {
                report.could_not("check the notifier", &err);
            }
            if let Err(err) = check_seal_keys(&client, schema, &mut report).await {
                report.could_not("check the seal keys", &err);
            }
        }
        Some((schema, Edition::Sql)) => {
            if let Err(err) = check_sql_pruning(&client, schema, standby, &mut report).await {
                report.could_not("check what prunes this database", &err);
            }
        }
        None => {
            check_preload(&client, &mut report).await;
        }
    }
    if let Some((schema, _)) = &installed {
        if let Err(err) = check_privileges(&client, schema, &role, &mut report).await {
            report.could_not("check this role's privileges", &err);
        }
    }
    if let Err(err) = check_notifications(&client, &mut report).await {
        report.could_not("check the notification queue", &err);
    }

    println!(
        "\n{} problem(s), {} warning(s)",
        report.problems, report.warnings
    );
    Ok(if report.problems > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Which edition of pg_outbox a database runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Edition {
    /// The extension `pg_outbox`, with its library.
    Native,
    /// `pg_outbox_sql`, or its script run with `psql -f`: SQL and PL/pgSQL only.
    Sql,
}

/// The native extension: available, created here, in which schema, up to date; else the SQL
/// edition ([`check_sql_edition`]). Returns the schema (quoted) and the edition created in this
/// database.
async fn check_extension(
    client: &Client,
    db: &Db,
    database: &str,
    report: &mut Report,
) -> anyhow::Result<Option<(String, Edition)>> {
    let row = simple_row(
        client,
        "SELECT (SELECT default_version FROM pg_available_extensions WHERE name = 'pg_outbox'), \
                e.extversion, quote_ident(n.nspname) \
         FROM (SELECT 1) one \
         LEFT JOIN pg_extension e ON e.extname = 'pg_outbox' \
         LEFT JOIN pg_namespace n ON n.oid = e.extnamespace",
    )
    .await?;
    let (available, installed, schema) = (row[0].clone(), row[1].clone(), row[2].clone());
    let (Some(installed), Some(schema)) = (installed, schema) else {
        let sql_edition = check_sql_edition(client, report).await?;
        if sql_edition.is_some() {
            return Ok(sql_edition);
        }
        match available {
            Some(version) => report.say(
                Level::Fail,
                format!(
                    "pg_outbox {version} is available on this server but not created in database \
                     {database:?}"
                ),
                Some("run CREATE EXTENSION pg_outbox in this database".into()),
            ),
            None => report.say(
                Level::Fail,
                "pg_outbox is not installed on this server",
                Some(
                    "install it (make install, or your package), then CREATE EXTENSION pg_outbox"
                        .into(),
                ),
            ),
        }
        return Ok(None);
    };
    report.say(
        Level::Ok,
        format!("pg_outbox {installed} is created in schema {schema}"),
        None,
    );
    if let Some(available) = available.filter(|a| *a != installed) {
        report.say(
            Level::Warn,
            format!(
                "pg_outbox {available} is installed on the server, this database runs {installed}"
            ),
            Some("run ALTER EXTENSION pg_outbox UPDATE (see docs/operations.md, Upgrades)".into()),
        );
    }
    if schema != db.schema_ident() && schema != db.schema {
        report.say(
            Level::Info,
            format!(
                "the extension is in schema {schema}, not {:?}",
                db.schema
            ),
            Some(format!(
                "give relays RelayBuilder::schema({schema:?}) and the other commands --schema {schema}"
            )),
        );
    }
    Ok(Some((schema, Edition::Native)))
}

/// The SQL edition, when the native one is not created here: the extension `pg_outbox_sql`, or
/// its script run with `psql -f` (a PL/pgSQL `outbox_publish`). Says nothing when it is not
/// there either.
async fn check_sql_edition(
    client: &Client,
    report: &mut Report,
) -> anyhow::Result<Option<(String, Edition)>> {
    let row = simple_row(
        client,
        "SELECT coalesce( \
                  (SELECT quote_ident(n.nspname) FROM pg_extension e \
                   JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'pg_outbox_sql'), \
                  (SELECT quote_ident(n.nspname) FROM pg_proc p \
                   JOIN pg_namespace n ON n.oid = p.pronamespace \
                   WHERE p.proname = 'outbox_publish' \
                     AND p.prolang = (SELECT oid FROM pg_language WHERE lanname = 'plpgsql') \
                   ORDER BY n.nspname LIMIT 1)), \
                (SELECT extversion FROM pg_extension WHERE extname = 'pg_outbox_sql')",
    )
    .await?;
    let (Some(schema), version) = (row[0].clone(), row[1].clone()) else {
        return Ok(None);
    };
    let how = match version {
        Some(version) => format!("pg_outbox_sql {version}, the SQL edition, is created"),
        None => "the SQL edition of pg_outbox is installed (psql -f)".to_owned(),
    };
    report.say(
        Level::Ok,
        format!("{how} in schema {schema}: no library, no workers; notifications are references"),
        None,
    );
    Ok(Some((schema, Edition::Sql)))
}

/// What prunes a database of the SQL edition, which has no worker: a `pg_cron` job calling
/// `outbox_prune()`, relays (`RelayBuilder::prune_every`), or nothing.
async fn check_sql_pruning(
    client: &Client,
    schema: &str,
    standby: bool,
    report: &mut Report,
) -> anyhow::Result<()> {
    if standby {
        return Ok(());
    }
    // pg_cron's jobs, when it is installed here and this role may read them.
    let readable = simple_row(
        client,
        "SELECT coalesce(has_table_privilege(to_regclass('cron.job'), 'SELECT'), false)",
    )
    .await?;
    let cron = if flag(&readable[0]) {
        simple_row(
            client,
            "SELECT string_agg(format('job %s (%s)', jobid, schedule), ', ') FROM cron.job \
             WHERE command ILIKE '%outbox_prune%' AND active AND database = current_database()",
        )
        .await?
    } else {
        vec![None]
    };
    let state = simple_row(
        client,
        &format!(
            "SELECT CASE WHEN has_table_privilege({}, 'SELECT') THEN \
               (SELECT format('%s by %s', last_pruned_at, coalesce(last_pruned_by, '?')) \
                FROM {schema}.outbox_prune_state \
                WHERE last_pruned_at > now() - interval '1 day') END",
            quote_literal(&format!("{schema}.outbox_prune_state"))
        ),
    )
    .await?;
    match (&cron[0], &state[0]) {
        (Some(jobs), last) => report.say(
            Level::Ok,
            format!(
                "pg_cron prunes this database: {jobs}{}",
                last.as_deref()
                    .map_or(String::new(), |l| format!("; last pruned {l}"))
            ),
            None,
        ),
        (None, Some(last)) => report.say(
            Level::Ok,
            format!("this database was pruned in the last day: {last}"),
            None,
        ),
        (None, None) => report.say(
            Level::Warn,
            "nothing pruned this database in the last day (the SQL edition has no worker): \
             event_outbox only grows",
            Some(format!(
                "schedule SELECT {schema}.outbox_prune() with pg_cron (SELECT cron.schedule('pg_outbox \
                 prune', '* * * * *', 'SELECT {schema}.outbox_prune()')), or let relays prune \
                 (RelayBuilder::prune_every, pg-outbox tail --prune-every)"
            )),
        ),
    }
    Ok(())
}

/// `shared_preload_libraries` names pg_outbox. A role that may not read it (it needs
/// pg_read_all_settings) is told so; a running pruner then proves the preload.
async fn check_preload(client: &Client, report: &mut Report) -> bool {
    let libraries = match simple_row(client, "SHOW shared_preload_libraries").await {
        Ok(row) => row[0].clone().unwrap_or_default(),
        Err(err) => {
            let pruner = simple_row(
                client,
                "SELECT count(*) > 0 FROM pg_stat_activity WHERE backend_type = 'pg_outbox pruner'",
            )
            .await
            .is_ok_and(|row| flag(&row[0]));
            if pruner {
                report.say(
                    Level::Ok,
                    "the library is preloaded (a pruner worker runs)",
                    None,
                );
            } else {
                report.could_not(
                    "read shared_preload_libraries (grant pg_read_all_settings)",
                    &err,
                );
            }
            return pruner;
        }
    };
    let preloaded = libraries
        .split(',')
        .map(|l| l.trim().trim_matches('"'))
        .any(|l| l == "pg_outbox" || l.ends_with("/pg_outbox") || l == "$libdir/pg_outbox");
    if preloaded {
        report.say(
            Level::Ok,
            "the library is preloaded (shared_preload_libraries)",
            None,
        );
    } else {
        report.say(
            Level::Warn,
            format!(
                "pg_outbox is not in shared_preload_libraries ({libraries:?}): no pruner worker"
            ),
            Some(
                "add it (shared_preload_libraries = 'pg_outbox') and restart the server, or call \
                 outbox_prune() from a scheduler"
                    .into(),
            ),
        );
    }
    preloaded
}

/// The pruner runs in this database, or someone prunes it by hand.
async fn check_pruner(
    client: &Client,
    schema: &str,
    database: &str,
    preloaded: bool,
    standby: bool,
    report: &mut Report,
) -> anyhow::Result<()> {
    let row = simple_row(
        client,
        "SELECT current_setting('pg_outbox.database', true), \
                (SELECT pid::text FROM pg_stat_activity WHERE backend_type = 'pg_outbox pruner' LIMIT 1), \
                (SELECT datname FROM pg_stat_activity WHERE backend_type = 'pg_outbox pruner' LIMIT 1), \
                current_setting('pg_outbox.retention', true), \
                current_setting('pg_outbox.prune_interval', true)",
    )
    .await?;
    let configured = row[0].clone().filter(|d| !d.is_empty());
    let (pid, worker_database) = (row[1].clone(), row[2].clone());
    let retention = row[3].clone().unwrap_or_else(|| "1h".into());
    let interval = row[4].clone().unwrap_or_else(|| "5min".into());

    // Evidence of pruning by hand, if this role may read it.
    let pruned = simple_row(
        client,
        &format!(
            "SELECT CASE WHEN has_table_privilege({}, 'SELECT') THEN \
               (SELECT last_pruned_at::text || CASE WHEN last_pruned_at > now() - interval '1 day' \
                THEN ' (recent)' ELSE '' END FROM {schema}.outbox_prune_state LIMIT 1) END",
            quote_literal(&format!("{schema}.outbox_prune_state"))
        ),
    )
    .await?;
    let last_pruned = pruned[0].clone();
    let recent = last_pruned
        .as_deref()
        .is_some_and(|p| p.ends_with("(recent)"));

    if standby {
        report.say(
            Level::Info,
            "the pruner does not run on a standby: the primary's prunes replicate here",
            None,
        );
        return Ok(());
    }
    match (&pid, &worker_database) {
        (Some(pid), Some(db)) if db == database => {
            report.say(
                Level::Ok,
                format!(
                    "the pruner runs in this database (pid {pid}): every {interval}, pruning events \
                     older than {retention}"
                ),
                None,
            );
            return Ok(());
        }
        _ => {}
    }
    let fix_by_hand = "or call outbox_prune() from a scheduler (cron, pg_cron)";
    let (what, fix) = match (&pid, &worker_database) {
        (Some(_), Some(db)) => (
            format!("the pruner serves database {db:?} (pg_outbox.database), not this one"),
            format!(
                "set pg_outbox.database = {} and restart the server, {fix_by_hand}",
                quote_literal(database)
            ),
        ),
        _ if preloaded => (
            format!(
                "the library is preloaded but no pruner is running (pg_outbox.database = {})",
                configured.as_deref().unwrap_or("postgres")
            ),
            "look in the server log: it restarts 5 s after a crash; check pg_outbox.database \
             names this database"
                .to_owned(),
        ),
        _ => (
            "no pruner worker serves this database (the library is not preloaded)".to_owned(),
            format!("preload the library and set pg_outbox.database, {fix_by_hand}"),
        ),
    };
    match last_pruned {
        Some(at) if recent => report.say(
            Level::Warn,
            format!("{what}; it was pruned by hand at {at}"),
            Some("keep the scheduler that calls outbox_prune() running".into()),
        ),
        _ => report.say(
            Level::Fail,
            format!("{what}, and nothing pruned it in the last day: event_outbox only grows"),
            Some(fix),
        ),
    }
    Ok(())
}

/// With `notify_mode = 'worker'`, the notifier must serve this database, or publishers here
/// notify in their own transactions after all.
async fn check_notifier(
    client: &Client,
    database: &str,
    standby: bool,
    report: &mut Report,
) -> anyhow::Result<()> {
    let row = simple_row(
        client,
        "SELECT current_setting('pg_outbox.notify_mode', true), \
                (SELECT datname FROM pg_stat_activity WHERE backend_type = 'pg_outbox notifier' LIMIT 1), \
                (SELECT query FROM pg_stat_activity WHERE backend_type = 'pg_outbox notifier' LIMIT 1)",
    )
    .await?;
    let mode = row[0].clone().unwrap_or_else(|| "transaction".into());
    if mode != "worker" || standby {
        report.say(
            Level::Ok,
            format!("notify_mode = {mode}: publishing transactions send their own notifications"),
            None,
        );
        return Ok(());
    }
    match (row[1].as_deref(), row[2].as_deref()) {
        (Some(db), Some(state)) if db == database && !state.starts_with("waiting") => {
            report.say(
                Level::Ok,
                "notify_mode = worker: the notifier serves this database, publishers only insert",
                None,
            );
        }
        (Some(db), Some(state)) if db == database && state.contains("UPDATE") => report.say(
            Level::Fail,
            format!("notify_mode = worker, but the notifier is {state}"),
            Some("run ALTER EXTENSION pg_outbox UPDATE in this database".into()),
        ),
        (Some(db), Some(_)) if db == database => report.say(
            Level::Info,
            "notify_mode = worker: the notifier has not seen the extension yet; it looks every \
             5 s and at the first publish",
            None,
        ),
        (Some(db), _) => report.say(
            Level::Warn,
            format!(
                "notify_mode = worker, but the notifier serves database {db:?}: publishers here \
                 notify in their own transactions (with the notify lock)"
            ),
            Some(format!(
                "set pg_outbox.database = {} and restart the server",
                quote_literal(database)
            )),
        ),
        _ => report.say(
            Level::Warn,
            "notify_mode = worker, but no notifier runs: publishers notify in their own \
             transactions (with the notify lock)",
            Some("preload the library (shared_preload_libraries = 'pg_outbox') and restart".into()),
        ),
    }
    Ok(())
}

/// What the current role may do with the outbox.
async fn check_privileges(
    client: &Client,
    schema: &str,
    role: &str,
    report: &mut Report,
) -> anyhow::Result<()> {
    let object = |name: &str| quote_literal(&format!("{schema}.{name}"));
    let row = simple_row(
        client,
        &format!(
            "SELECT has_schema_privilege({s}, 'USAGE'), \
                    has_function_privilege({publish}, 'EXECUTE') AND has_table_privilege({outbox}, 'INSERT'), \
                    has_table_privilege({outbox}, 'SELECT') AND has_table_privilege({state}, 'SELECT'), \
                    has_function_privilege({stats}, 'EXECUTE'), \
                    has_function_privilege({prune}, 'EXECUTE') AND has_table_privilege({outbox}, 'DELETE') \
                      AND has_table_privilege({state}, 'UPDATE')",
            s = quote_literal(schema),
            publish = object("outbox_publish(text, text, jsonb, text)"),
            outbox = object("event_outbox"),
            state = object("outbox_prune_state"),
            stats = object("outbox_stats()"),
            prune = object("outbox_prune(interval)"),
        ),
    )
    .await?;
    let usage = flag(&row[0]);
    let grants = [
        (
            "publish",
            flag(&row[1]),
            format!(
                "GRANT EXECUTE ON FUNCTION {schema}.outbox_publish(text, text, jsonb, text) TO {role}; \
                 GRANT INSERT ON {schema}.event_outbox TO {role}"
            ),
        ),
        (
            "relay",
            flag(&row[2]),
            format!("GRANT SELECT ON {schema}.event_outbox, {schema}.outbox_prune_state TO {role}"),
        ),
        (
            "monitor",
            flag(&row[3]),
            format!("GRANT EXECUTE ON FUNCTION {schema}.outbox_stats() TO {role}"),
        ),
        (
            "prune by hand",
            flag(&row[4]),
            format!(
                "GRANT EXECUTE ON FUNCTION {schema}.outbox_prune(interval) TO {role}; GRANT SELECT, \
                 DELETE ON {schema}.event_outbox TO {role}; GRANT UPDATE ON \
                 {schema}.outbox_prune_state TO {role}"
            ),
        ),
    ];
    if !usage {
        report.say(
            Level::Fail,
            format!(
                "role {role:?} has no USAGE on schema {schema}: it can use nothing of pg_outbox"
            ),
            Some(format!("GRANT USAGE ON SCHEMA {schema} TO {role}")),
        );
        return Ok(());
    }
    let can: Vec<&str> = grants.iter().filter(|g| g.1).map(|g| g.0).collect();
    let cannot: Vec<&(&str, bool, String)> = grants.iter().filter(|g| !g.1).collect();
    if can.is_empty() {
        report.say(
            Level::Fail,
            format!("role {role:?} may neither publish, relay, monitor nor prune"),
            Some("grant what the role is for (see the README's Privileges section)".into()),
        );
    } else {
        report.say(
            Level::Ok,
            format!("role {role:?} may {}", can.join(", ")),
            None,
        );
    }
    for (what, _, grant) in cannot {
        report.say(
            Level::Info,
            format!("role {role:?} may not {what}; if it should: {grant}"),
            None,
        );
    }
    Ok(())
}

/// Sealed notifications, the default, need a current key in `outbox_seal_keys`, which relays
/// read through `outbox_relay_keys()`.
async fn check_seal_keys(client: &Client, schema: &str, report: &mut Report) -> anyhow::Result<()> {
    let row = simple_row(
        client,
        &format!(
            "SELECT to_regclass({keys}) IS NOT NULL, \
                    coalesce(current_setting('pg_outbox.notify_payload', true), 'sealed'), \
                    has_table_privilege({outbox}, 'SELECT')",
            keys = quote_literal(&format!("{schema}.outbox_seal_keys")),
            outbox = quote_literal(&format!("{schema}.event_outbox")),
        ),
    )
    .await?;
    if row[1].as_deref() != Some("sealed") {
        return Ok(());
    }
    if !flag(&row[0]) {
        report.say(
            Level::Warn,
            "notify_payload is 'sealed', but the extension's objects predate 0.5.0 and hold no \
             key: publishers send references",
            Some("ALTER EXTENSION pg_outbox UPDATE".into()),
        );
        return Ok(());
    }
    if !flag(&row[2]) {
        report.say(
            Level::Info,
            "notifications are sealed; this role may not read event_outbox, so it is not given \
             the keys (relays' roles are)",
            None,
        );
        return Ok(());
    }
    let keys = simple_row(
        client,
        &format!("SELECT cardinality(keys) FROM {schema}.outbox_relay_keys()"),
    )
    .await?;
    match keys[0].as_deref().and_then(|n| n.parse::<u32>().ok()) {
        Some(0) | None => report.say(
            Level::Fail,
            "notify_payload is 'sealed' and outbox_seal_keys holds no key: every outbox_publish \
             fails with SQLSTATE 55000",
            Some(format!("SELECT {schema}.outbox_rotate_seal_key()")),
        ),
        Some(n) => report.say(
            Level::Ok,
            format!(
                "notifications are sealed with the database's key ({n} key(s) open them); relays \
                 read it when they connect"
            ),
            None,
        ),
    }
    Ok(())
}

/// The queue fraction the server's pruner warns at (`pg_outbox.queue_warning`, 0.1 unless set).
fn warning_at(setting: Option<&str>) -> f64 {
    setting
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|w| *w > 0.0)
        .unwrap_or(0.1)
}

/// How full the notification queue is, and what notifications carry.
async fn check_notifications(client: &Client, report: &mut Report) -> anyhow::Result<()> {
    let row = simple_row(
        client,
        "SELECT pg_notification_queue_usage(), current_setting('pg_outbox.notify_payload', true), \
                current_setting('pg_outbox.queue_warning', true)",
    )
    .await?;
    let usage: f64 = row[0]
        .as_deref()
        .and_then(|u| u.parse().ok())
        .ok_or_else(|| anyhow!("pg_notification_queue_usage() did not return a number"))?;
    let percent = usage * 100.0;
    let fix = "a session that LISTENs is not reading its notifications, or sits in a long \
               transaction: find it in pg_stat_activity (state, xact_start) and end it; at 100 % \
               every NOTIFY, so every outbox_publish, fails";
    if usage >= 0.5 {
        report.say(
            Level::Fail,
            format!("the notification queue is {percent:.1} % full"),
            Some(fix.into()),
        );
    } else if usage >= warning_at(row[2].as_deref()) {
        report.say(
            Level::Warn,
            format!("the notification queue is {percent:.1} % full"),
            Some(fix.into()),
        );
    } else {
        report.say(
            Level::Ok,
            format!("the notification queue is {percent:.4} % full"),
            None,
        );
    }
    if row[1].as_deref() == Some("inline") {
        report.say(
            Level::Warn,
            "pg_outbox.notify_payload = 'inline': every role that can connect can read every \
             payload (LISTEN has no privilege) and forge events with NOTIFY pg_outbox",
            Some(
                "use 'sealed', the default (inline, encrypted and authenticated with the key of \
                 outbox_seal_keys), or 'reference' unless every such role is trusted \
                 (docs/operations.md)"
                    .into(),
            ),
        );
    }
    Ok(())
}

/// LISTEN must hold across transactions: a notification sent from a second session must arrive
/// on the first. Through a pooler in transaction mode it does not.
async fn check_listen(args: &Args, report: &mut Report) {
    match listen_round_trip(args).await {
        Ok(true) => report.say(
            Level::Ok,
            "LISTEN holds on this connection (no transaction-mode pooler in between)",
            None,
        ),
        Ok(false) => report.say(
            Level::Fail,
            format!(
                "a notification sent from another session did not arrive within {}: LISTEN does \
                 not hold, as behind a pooler in transaction mode (PgBouncer pool_mode=transaction)",
                humantime::format_duration(args.listen_timeout)
            ),
            Some(
                "give relays a direct connection to the primary or a session-mode pool; publishers \
                 may stay behind the pooler"
                    .into(),
            ),
        ),
        Err(err) => report.say(
            Level::Warn,
            format!("could not test LISTEN: {err:#}"),
            None,
        ),
    }
}

async fn listen_round_trip(args: &Args) -> anyhow::Result<bool> {
    let config = args.db.config("pg-outbox doctor listen")?;
    let (listener, mut connection) = config.connect(NoTls).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message {
                if tx.send(n.channel().to_owned()).is_err() {
                    break;
                }
            }
        }
    });
    let channel = format!("pg_outbox_doctor_{}", std::process::id());
    listener.simple_query(&format!("LISTEN {channel}")).await?;
    let sender = args.db.connect("pg-outbox doctor notify").await?;
    sender
        .simple_query(&format!("NOTIFY {channel}, 'probe'"))
        .await?;
    let arrived = tokio::time::timeout(args.listen_timeout, async {
        while let Some(got) = rx.recv().await {
            if got == channel {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    // Through a transaction pooler this may run on another server session: harmless.
    let _ = listener.simple_query(&format!("UNLISTEN {channel}")).await;
    Ok(arrived)
}
