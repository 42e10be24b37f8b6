//! The README's Privileges section as a matrix: every role × every action, each allowed or
//! refused with SQLSTATE 42501 exactly as documented, and no payload reaching a role that may
//! only LISTEN.
//!
//! The roles:
//!
//! - `postgres`: the superuser.
//! - `ext_owner`: the extension's owner. The control file says `superuser = true` (and not
//!   `trusted`), so only a superuser can run `CREATE EXTENSION pg_outbox`; there is no
//!   `ALTER EXTENSION .. OWNER TO`. The owner (`pg_extension.extowner`, and the owner of every
//!   object the script creates) is whichever role ran `CREATE EXTENSION`. A non-superuser owner
//!   therefore only exists when a role creates it while it is a superuser and loses that
//!   attribute afterwards, as managed services do with an admin role: this test does exactly
//!   that, and the owner keeps every privilege on its objects (and can grant them).
//! - `app_publisher`, `app_relay`, `monitoring`, `app_pruner`: the README's grants, verbatim.
//! - `execute_only`: may execute `outbox_publish` but was not granted `INSERT` on `event_outbox`:
//!   refused by the native edition, allowed by the SQL edition, whose `outbox_publish` runs with
//!   its owner's rights (the README says so).
//! - `ungranted`: may use the extension's schema but was granted nothing on its objects.
//! - `connect_only`: may only connect (PUBLIC's default CONNECT), not even use the schema.
//!
//! The matrix is checked with the extension in schema `outbox` (`CREATE EXTENSION pg_outbox
//! SCHEMA outbox`), where `ungranted` and `connect_only` differ and roles also need `USAGE` on
//! the schema, and in the default schema `public`, where the README's grants alone must be
//! enough; and again for the SQL edition, `pg_outbox_sql`, whose owner is a database owner that
//! never was a superuser (the edition is trusted), with the same grants and the same answers,
//! but for the seal key it does not have: its notifications are references, and there is no
//! `outbox_rotate_seal_key()` to try.

use std::fmt;
use std::time::Duration;

use pg_outbox_tests::{Cluster, Edition, Listener};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use uuid::Uuid;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    /// `outbox_publish(..)`.
    Publish,
    /// A plain `INSERT` into `event_outbox`, which `outbox_publish` needs its caller to hold.
    Insert,
    /// The relay's own advance query (both outbox tables), as `pg_outbox_client` runs it, which
    /// must return an event published meanwhile.
    Read,
    /// `outbox_prune(interval)`.
    Prune,
    /// `outbox_stats()`.
    Stats,
    /// `LISTEN pg_outbox`, and a notification published by another role arrives.
    Listen,
    /// `outbox_relay_keys()`: the seal keys, which open every notification.
    Keys,
    /// `outbox_rotate_seal_key()`.
    Rotate,
}

use Action::*;

const ACTIONS: [Action; 8] = [Publish, Insert, Read, Prune, Stats, Listen, Keys, Rotate];

/// Each role and what the README says it may do; everything else is refused.
const MATRIX: &[(&str, &[Action])] = &[
    (
        "postgres",
        &[Publish, Insert, Read, Prune, Stats, Listen, Keys, Rotate],
    ),
    (
        "ext_owner",
        &[Publish, Insert, Read, Prune, Stats, Listen, Keys, Rotate],
    ),
    ("app_publisher", &[Publish, Insert, Listen]),
    ("app_relay", &[Read, Listen, Keys]),
    ("monitoring", &[Stats, Listen]),
    ("app_pruner", &[Prune, Listen]),
    ("execute_only", &[Listen]),
    ("ungranted", &[Listen]),
    ("connect_only", &[Listen]),
];

/// The README's grants, run by the extension's owner with the extension's schema on its
/// `search_path`.
const README_GRANTS: &str = "
    -- A role that publishes (the app's own role, usually)
    GRANT EXECUTE ON FUNCTION outbox_publish(text, text, jsonb, text) TO app_publisher;
    GRANT INSERT ON event_outbox TO app_publisher;

    -- A role that relays (the LISTEN connection of each replica)
    GRANT SELECT ON event_outbox, outbox_prune_state TO app_relay;

    -- A role that monitors
    GRANT EXECUTE ON FUNCTION outbox_stats() TO monitoring;

    -- A role that prunes by hand (when the worker cannot be preloaded)
    GRANT EXECUTE ON FUNCTION outbox_prune(interval) TO app_pruner;

    -- Not the README's: EXECUTE without INSERT.
    GRANT EXECUTE ON FUNCTION outbox_publish(text, text, jsonb, text) TO execute_only;
";

/// The roles of [`MATRIX`] but the superuser and the extension's owner.
const OTHER_ROLES: &str = "
    CREATE ROLE app_publisher LOGIN;
    CREATE ROLE app_relay LOGIN;
    CREATE ROLE monitoring LOGIN;
    CREATE ROLE app_pruner LOGIN;
    CREATE ROLE execute_only LOGIN;
    CREATE ROLE ungranted LOGIN;
    CREATE ROLE connect_only LOGIN;
";

/// What one attempt did.
#[derive(Debug)]
enum Outcome {
    Allowed,
    /// SQLSTATE 42501, with the server's message.
    Refused(String),
    /// Refused with another SQLSTATE, or allowed but wrong: always a failure.
    Other(String),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Allowed => f.write_str("allowed"),
            Outcome::Refused(message) => write!(f, "refused (42501: {message})"),
            Outcome::Other(what) => f.write_str(what),
        }
    }
}

fn outcome<T>(result: Result<T, tokio_postgres::Error>) -> Outcome {
    match result {
        Ok(_) => Outcome::Allowed,
        Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => Outcome::Refused(
            e.as_db_error()
                .map_or_else(String::new, |d| d.message().to_owned()),
        ),
        Err(e) => Outcome::Other(format!(
            "error {} ({e:?})",
            e.code().map_or("none", |c| c.code())
        )),
    }
}

/// A cluster whose `postgres` database has `edition` in `schema`, created by `ext_owner` (while
/// it was a superuser, for the native edition), and every role of [`MATRIX`] with the README's
/// grants (plus the schema usage a schema other than `public` needs).
async fn cluster_with_roles(schema: &str, edition: Edition) -> (Cluster, Client) {
    let cluster = Cluster::builder()
        .edition(edition)
        .setting("pg_outbox.prune_interval", "'1s'")
        .create_extension(false)
        .start();
    if edition == Edition::Sql {
        return sql_edition_with_roles(cluster, schema).await;
    }
    let admin = cluster.connect("postgres").await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE ext_owner LOGIN SUPERUSER; {OTHER_ROLES}
             CREATE ROLE would_be_owner LOGIN CREATEDB CREATEROLE;
             GRANT CREATE ON DATABASE postgres TO would_be_owner;"
        ))
        .await
        .unwrap();

    // A non-superuser cannot create the extension, even with CREATE on the database.
    let would_be = cluster.connect_as("postgres", "would_be_owner").await;
    let error = would_be
        .batch_execute("CREATE SCHEMA wb; CREATE EXTENSION pg_outbox SCHEMA wb")
        .await
        .unwrap_err();
    assert_eq!(
        error.code(),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "{error:?}"
    );

    let owner = owner_with_schema(&cluster, schema).await;
    owner
        .batch_execute(&format!("CREATE EXTENSION pg_outbox SCHEMA {schema}"))
        .await
        .unwrap();
    drop(owner);
    // An owner that is not a superuser needs pg_read_all_stats for outbox_stats() (which runs
    // with its owner's rights) to see the workers, as the README says.
    admin
        .batch_execute("ALTER ROLE ext_owner NOSUPERUSER; GRANT pg_read_all_stats TO ext_owner")
        .await
        .unwrap();
    let owners = admin
        .query_one(
            "SELECT e.extowner::regrole::text, c.relowner::regrole::text, p.proowner::regrole::text
             FROM pg_extension e, pg_class c, pg_proc p
             WHERE e.extname = 'pg_outbox' AND c.oid = format('%I.event_outbox', $1::text)::regclass
               AND p.oid = format('%I.outbox_publish', $1::text)::regproc",
            &[&schema],
        )
        .await
        .unwrap();
    for column in 0..3 {
        assert_eq!(owners.get::<_, String>(column), "ext_owner");
    }

    // The pruner serves `postgres`: wait until it found the extension there.
    cluster
        .wait_for("the pruner to be idle", Duration::from_secs(30), || async {
            // Asked of pg_stat_activity as the superuser: outbox_stats() runs with the rights of
            // its owner, who is no longer a superuser here.
            let row = admin
                .query_opt(
                    "SELECT query FROM pg_stat_activity WHERE backend_type = 'pg_outbox pruner'",
                    &[],
                )
                .await
                .unwrap();
            let state = row.map(|row| row.get::<_, Option<String>>(0));
            (state.flatten().as_deref() == Some("idle")).then_some(())
        })
        .await;

    // The owner, no longer a superuser, grants what the README says.
    let owner = cluster.connect_as("postgres", "ext_owner").await;
    owner
        .batch_execute(&format!("SET search_path = {schema}; {README_GRANTS}"))
        .await
        .unwrap();
    grant_schema_usage(&owner, schema).await;
    (cluster, admin)
}

/// The SQL edition's side of [`cluster_with_roles`]: `ext_owner` is not a superuser and creates
/// the trusted extension with `CREATE` on the database alone.
async fn sql_edition_with_roles(cluster: Cluster, schema: &str) -> (Cluster, Client) {
    let admin = cluster.connect("postgres").await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE ext_owner LOGIN; {OTHER_ROLES}
             GRANT CREATE ON DATABASE postgres TO ext_owner;"
        ))
        .await
        .unwrap();
    if schema == "public" {
        admin
            .batch_execute("GRANT CREATE ON SCHEMA public TO ext_owner")
            .await
            .unwrap();
    }
    let owner = owner_with_schema(&cluster, schema).await;
    owner
        .batch_execute(&format!(
            "CREATE EXTENSION pg_outbox_sql SCHEMA {schema}; \
             SET search_path = {schema}; {README_GRANTS}"
        ))
        .await
        .unwrap();
    grant_schema_usage(&owner, schema).await;
    (cluster, admin)
}

/// A session of `ext_owner`, which has created `schema` unless it is `public`.
async fn owner_with_schema(cluster: &Cluster, schema: &str) -> Client {
    let owner = cluster.connect_as("postgres", "ext_owner").await;
    if schema != "public" {
        owner
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .unwrap();
    }
    owner
}

/// The schema usage the roles need where the extension is not in `public`.
async fn grant_schema_usage(owner: &Client, schema: &str) {
    if schema != "public" {
        owner
            .batch_execute(&format!(
                "GRANT USAGE ON SCHEMA {schema} \
                 TO app_publisher, app_relay, monitoring, app_pruner, execute_only, ungranted"
            ))
            .await
            .unwrap();
    }
}

/// Tries `action` as `role`, with the extension in `schema`, and says what happened. Allowed
/// results are checked for sense.
async fn attempt(
    cluster: &Cluster,
    admin: &Client,
    (schema, edition): (&str, Edition),
    role: &str,
    action: Action,
) -> Outcome {
    let client = cluster.connect_as("postgres", role).await;
    match action {
        Publish => outcome(
            client
                .query_one(
                    &format!(
                        "SELECT {schema}.outbox_publish('chat', 'u1', '{{\"n\": 1}}', 'matrix')"
                    ),
                    &[],
                )
                .await,
        ),
        Insert => outcome(
            client
                .execute(
                    &format!(
                        "INSERT INTO {schema}.event_outbox (id, channel, user_id, payload) \
                         VALUES (gen_random_uuid(), 'chat', 'u1', '{{}}')"
                    ),
                    &[],
                )
                .await,
        ),
        Read => {
            let snapshot: String = client
                .query_one("SELECT pg_current_snapshot()::text", &[])
                .await
                .unwrap()
                .get(0);
            let id: Uuid = admin
                .query_one(
                    &format!("SELECT {schema}.outbox_publish('chat', 'u1', '{{\"n\": 3}}')"),
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            let result = client
                .query(&pg_outbox_client::__advance_sql(schema), &[&snapshot])
                .await;
            match result {
                Ok(rows)
                    if rows
                        .iter()
                        .any(|row| row.get::<_, Option<Uuid>>("id") == Some(id)) =>
                {
                    Outcome::Allowed
                }
                Ok(rows) => Outcome::Other(format!(
                    "allowed, but {} rows without the event {id} published meanwhile",
                    rows.len()
                )),
                Err(e) => outcome(Err::<(), _>(e)),
            }
        }
        Prune => outcome(
            client
                .query_one(
                    &format!("SELECT {schema}.outbox_prune(interval '1 day')"),
                    &[],
                )
                .await,
        ),
        Stats => {
            let result = client
                .query_one(
                    &format!("SELECT worker_pid, worker_state FROM {schema}.outbox_stats()"),
                    &[],
                )
                .await;
            match result {
                // The native edition's worker runs in this cluster (see `cluster_with_roles`);
                // the SQL edition has none, and says who pruned last: stats that say otherwise
                // are wrong.
                Ok(row) => match (
                    row.get::<_, Option<i32>>(0),
                    row.get::<_, Option<String>>(1),
                ) {
                    (Some(_), Some(state))
                        if edition == Edition::Native
                            && (state == "idle" || state == "pruning") =>
                    {
                        Outcome::Allowed
                    }
                    (None, last_pruned_by)
                        if edition == Edition::Sql
                            && last_pruned_by
                                .as_deref()
                                .is_none_or(|by| by.starts_with("outbox_prune() by ")) =>
                    {
                        Outcome::Allowed
                    }
                    (pid, state) => Outcome::Other(format!(
                        "allowed, but worker_pid {pid:?}, worker_state {state:?}"
                    )),
                },
                Err(e) => outcome(Err::<(), _>(e)),
            }
        }
        Listen => {
            // The default: sealed, so that only roles given the keys could read which event it
            // names; a reference in the SQL edition, which cannot seal.
            let mut listener = cluster.listener_as("postgres", role).await;
            let id: Uuid = admin
                .query_one(
                    &format!("SELECT {schema}.outbox_publish('chat', 'u1', '{{\"n\": 2}}')"),
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            let raw = listener.next_raw().await;
            let expected = match edition {
                Edition::Native => pg_outbox_wire::seal::is_sealed(&raw),
                Edition::Sql => raw.contains(&id.to_string()) && !raw.contains("\"payload\""),
            };
            if expected {
                Outcome::Allowed
            } else {
                Outcome::Other(format!("the {edition:?} edition sent {raw}"))
            }
        }
        Keys => outcome(
            client
                .query_one(
                    &format!("SELECT keys FROM {schema}.outbox_relay_keys()"),
                    &[],
                )
                .await,
        ),
        // A grace of a day: the relays of the other attempts keep opening with the key before.
        Rotate => outcome(
            client
                .query_one(
                    &format!("SELECT {schema}.outbox_rotate_seal_key('1 day')"),
                    &[],
                )
                .await,
        ),
    }
}

#[tokio::test]
async fn every_role_may_do_exactly_what_the_readme_grants() {
    assert_matrix("outbox", Edition::Native).await;
}

#[tokio::test]
async fn every_role_may_do_exactly_what_the_readme_grants_in_the_default_schema() {
    assert_matrix("public", Edition::Native).await;
}

#[tokio::test]
async fn every_role_may_do_exactly_what_the_readme_grants_in_the_sql_edition() {
    assert_matrix("outbox", Edition::Sql).await;
}

#[tokio::test]
async fn every_role_may_do_exactly_what_the_readme_grants_in_the_sql_edition_in_the_default_schema()
{
    assert_matrix("public", Edition::Sql).await;
}

/// Tries every action of [`ACTIONS`] as every role of [`MATRIX`], with `edition` in `schema`,
/// and panics with the whole table unless each was allowed or refused as the README says.
async fn assert_matrix(schema: &str, edition: Edition) {
    let (cluster, admin) = cluster_with_roles(schema, edition).await;
    let mut table = String::new();
    let mut wrong = Vec::new();
    for &(role, allowed) in MATRIX {
        // The SQL edition has no seal key to rotate.
        for action in ACTIONS
            .into_iter()
            .filter(|&action| edition == Edition::Native || action != Rotate)
        {
            let expected = allowed.contains(&action)
                || (edition == Edition::Sql && role == "execute_only" && action == Publish);
            let got = attempt(&cluster, &admin, (schema, edition), role, action).await;
            table.push_str(&format!("{role:>14} {action:<8?} {got}\n"));
            let as_expected = match got {
                Outcome::Allowed => expected,
                Outcome::Refused(_) => !expected,
                Outcome::Other(_) => false,
            };
            if !as_expected {
                let want = if expected {
                    "allowed"
                } else {
                    "refused (42501)"
                };
                wrong.push(format!("{role} {action:?}: expected {want}, got {got}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{}\n--- matrix, {edition:?} edition, schema {schema} ---\n{table}",
        wrong.join("\n")
    );
}

/// Publishes an event whose payload holds `secret`, and returns the raw notification that
/// `listener` received for it.
async fn publish_secret(admin: &Client, listener: &mut Listener, secret: &str) -> String {
    let id: String = admin
        .query_one(
            "SELECT outbox.outbox_publish('chat', 'u1', jsonb_build_object('secret', $1::text))::text",
            &[&secret],
        )
        .await
        .unwrap()
        .get(0);
    let raw = listener.next_raw().await;
    let doc: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(doc["id"], id.as_str(), "{raw}");
    raw
}

#[tokio::test]
async fn reference_mode_leaks_no_payload_to_a_role_that_can_only_listen() {
    assert_references_leak_no_payload(Edition::Native).await;
}

#[tokio::test]
async fn the_sql_editions_references_leak_no_payload_to_a_role_that_can_only_listen() {
    assert_references_leak_no_payload(Edition::Sql).await;
}

async fn assert_references_leak_no_payload(edition: Edition) {
    let (cluster, admin) = cluster_with_roles("outbox", edition).await;
    admin
        .batch_execute("SET pg_outbox.notify_payload = 'reference'")
        .await
        .unwrap();
    let mut listener = cluster.listener_as("postgres", "connect_only").await;

    let secret = "s3cr3t-reference-7f1c";
    let raw = publish_secret(&admin, &mut listener, secret).await;
    let doc: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert!(doc.get("payload").is_none(), "{raw}");
    assert!(!raw.contains(secret), "{raw}");
    // The notification names the row, but the row stays out of reach.
    for sql in [
        "SELECT payload FROM outbox.event_outbox",
        "SELECT payload FROM event_outbox",
    ] {
        let error = listener.client.query(sql, &[]).await.unwrap_err();
        let code = error.code().cloned();
        // Unqualified, the table is not even on the path: 42P01, no payload either.
        assert!(
            code == Some(SqlState::INSUFFICIENT_PRIVILEGE)
                || code == Some(SqlState::UNDEFINED_TABLE),
            "{sql}: {error:?}"
        );
    }
    // So is a role that may use the schema but holds no grant.
    let ungranted = cluster.connect_as("postgres", "ungranted").await;
    let error = ungranted
        .query("SELECT payload FROM outbox.event_outbox", &[])
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));

    // As the README warns, inline mode hands the payload to every listener instead.
    admin
        .batch_execute("SET pg_outbox.notify_payload = 'inline'")
        .await
        .unwrap();
    let secret = "s3cr3t-inline-9b2e";
    let raw = publish_secret(&admin, &mut listener, secret).await;
    assert!(raw.contains(secret), "{raw}");
}
