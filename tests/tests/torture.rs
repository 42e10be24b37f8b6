//! Hostile input to `outbox_publish`: random and nasty channel, user and origin strings, deep and
//! huge JSON, and `DROP EXTENSION` while publishers publish. Every call is a success or a clear
//! error with a specific SQLSTATE; the server never crashes; every stored row is what was
//! published and its notification parses and matches it.
//!
//! The random strings come from a seeded generator: set `TORTURE_SEED` to replay a failure (the
//! seed is printed).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pg_outbox_tests::{relay, Cluster, Edition, Listener, WAIT};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

/// xorshift64*: enough randomness for input generation, and replayable.
struct Rng(u64);

impl Rng {
    fn from_env() -> Rng {
        let seed = std::env::var("TORTURE_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        println!("TORTURE_SEED={seed}");
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// A random string: any mix of name characters, ASCII controls, quotes and backslashes,
    /// and unicode (combining marks, bidi overrides, BOM, emoji, the highest code point), of a
    /// length around a limit now and then.
    fn string(&mut self) -> String {
        const NAME: &str = "abcXYZ019_.:-";
        const NASTY: &[char] = &[
            '\'',
            '"',
            '\\',
            '`',
            '$',
            '%',
            ';',
            ' ',
            '\t',
            '\n',
            '\r',
            '\u{1}',
            '\u{1b}',
            '\u{7f}',
            'é',
            '中',
            '🙂',
            '\u{202e}',
            '\u{feff}',
            '\u{301}',
            '\u{200d}',
            '\u{10ffff}',
            '\u{fffd}',
            '{',
            '}',
            '[',
            ']',
            ',',
        ];
        let len = match self.below(10) {
            0 => 60 + self.below(8),    // around the channel limit (63 bytes)
            1 => 250 + self.below(10),  // around the origin limit (255)
            2 => 1020 + self.below(10), // around the user_id limit (1024)
            3 => 20_000,                // very long
            _ => 1 + self.below(24),
        };
        let nasty_share = self.below(4); // 0: only name characters
        (0..len)
            .map(|_| {
                if self.below(4) < nasty_share {
                    NASTY[self.below(NASTY.len())]
                } else {
                    NAME.as_bytes()[self.below(NAME.len())] as char
                }
            })
            .collect()
    }
}

/// The README's rules for channels and origins.
fn valid_name(s: &str, limit: usize) -> bool {
    !s.is_empty()
        && s.len() <= limit
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// The README's rule for user ids.
fn valid_user_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 1024
}

/// Publishes and returns the id, or the error's SQLSTATE.
async fn publish(
    client: &Client,
    channel: &str,
    user_id: &str,
    origin: Option<&str>,
    payload: &str,
) -> Result<String, SqlState> {
    client
        .query_one(
            "SELECT outbox_publish($1, $2, $3::text::jsonb, $4)::text",
            &[&channel, &user_id, &payload, &origin],
        )
        .await
        .map(|row| row.get(0))
        .map_err(|e| {
            e.code()
                .cloned()
                .unwrap_or_else(|| panic!("an error without SQLSTATE (connection lost?): {e}"))
        })
}

/// Panics if the server crashed or stopped answering: a backend killed by a signal makes the
/// postmaster log it and restart every session.
async fn assert_server_healthy(cluster: &Cluster, client: &Client) {
    let log = cluster.log();
    for bad in [
        "terminated by signal",
        "PANIC",
        "was terminated",
        "server process",
    ] {
        assert!(!log.contains(bad), "the server log says {bad:?}:\n{log}");
    }
    let sessions: i64 = client
        .query_one("SELECT count(*) FROM pg_stat_activity", &[])
        .await
        .expect("pg_stat_activity answers")
        .get(0);
    assert!(sessions > 0);
}

/// Receives notifications until the one for `sentinel`, and returns them by id as raw text.
async fn notifications_until(listener: &mut Listener, sentinel: &str) -> HashMap<String, String> {
    let mut by_id = HashMap::new();
    loop {
        let raw = listener.next_opened().await;
        // The id is the document's second key, fixed-width: read it by text, so that inline
        // payloads serde_json cannot read (numbers beyond f64, nesting beyond 128) still count;
        // the server checks the whole document.
        let id = raw
            .strip_prefix("{\"v\":1,\"id\":\"")
            .and_then(|rest| rest.get(..36))
            .unwrap_or_else(|| panic!("not a pg_outbox notification: {raw:.300}"))
            .to_owned();
        if id == sentinel {
            return by_id;
        }
        assert!(
            by_id.insert(id, raw).is_none(),
            "a notification arrived twice"
        );
    }
}

/// Checks, in the server, that each notification is valid JSON whose fields (and inline
/// payload, if any) equal its row's, and that each row is what was published.
async fn assert_rows_match(
    client: &Client,
    published: &HashMap<String, (String, String, Option<String>, String)>,
    notifications: &HashMap<String, String>,
) {
    assert_eq!(
        notifications.len(),
        published.len(),
        "one notification per successful publish, none for refused ones"
    );
    for (id, (channel, user_id, origin, payload)) in published {
        let raw = notifications
            .get(id)
            .unwrap_or_else(|| panic!("no notification for {id}"));
        let row = client
            .query_one(
                "SELECT e.channel = $2 AND e.user_id = $3 AND e.origin IS NOT DISTINCT FROM $4
                        AND e.payload = $5::text::jsonb,
                        n->>'v' = '1' AND n->>'id' = e.id::text AND n->>'channel' = e.channel
                        AND n->>'user_id' = e.user_id
                        AND n->>'origin' IS NOT DISTINCT FROM e.origin
                        AND (n->>'xid')::xid8 = e.xid
                        AND (n->>'created_at_us')::numeric
                            = extract(epoch FROM e.created_at) * 1000000
                        AND (NOT n ? 'payload' OR n->'payload' = e.payload)
                 FROM event_outbox e, (SELECT $6::text::jsonb AS n) doc
                 WHERE e.id = $1::text::uuid",
                &[&id, channel, user_id, origin, payload, raw],
            )
            .await
            .unwrap_or_else(|e| panic!("row {id} (notification {raw:.300}): {e}"));
        assert!(
            row.get::<_, bool>(0),
            "row {id} differs from what was published"
        );
        assert!(
            row.get::<_, bool>(1),
            "notification {raw:.300} differs from row {id}"
        );
    }
}

#[tokio::test]
async fn hostile_channels_users_and_origins_are_refused_or_stored_exactly() {
    hostile_channels_users_and_origins_are_refused_or_stored_exactly_on(Edition::Native).await;
}

#[tokio::test]
async fn hostile_channels_users_and_origins_are_refused_or_stored_exactly_on_the_sql_edition() {
    hostile_channels_users_and_origins_are_refused_or_stored_exactly_on(Edition::Sql).await;
}

async fn hostile_channels_users_and_origins_are_refused_or_stored_exactly_on(edition: Edition) {
    let cluster = Cluster::builder().edition(edition).start();
    let client = cluster.connect("postgres").await;
    let mut listener = cluster.listener("postgres").await;
    let mut rng = Rng::from_env();

    let mut cases: Vec<(String, String, Option<String>)> = vec![
        ("chat".into(), "'; DROP TABLE event_outbox; --".into(), None),
        (
            "chat".into(),
            "\\\"\\\\\"'\u{1}\u{1f}\u{7f}".into(),
            Some("a".into()),
        ),
        ("chat".into(), "x".repeat(1024), Some("o".repeat(255))),
        ("chat".into(), "x".repeat(1025), None),
        ("chat".into(), "é".repeat(512), None), // 1024 bytes
        ("chat".into(), "é".repeat(513), None), // 1026 bytes
        ("c".repeat(63), "u".into(), None),
        ("c".repeat(64), "u".into(), None),
        ("chät".into(), "u".into(), None),
        ("chat room".into(), "u".into(), None),
        ("chat".into(), "u".into(), Some("o".repeat(256))),
        ("chat".into(), "u".into(), Some(String::new())),
        ("chat".into(), String::new(), None),
        (String::new(), "u".into(), None),
        (
            "pg_outbox".into(),
            "\u{202e}\u{feff}🙂\u{10ffff}".into(),
            Some("x:y.z-1_".into()),
        ),
        ("chat".into(), "a".repeat(100_000), None),
    ];
    for _ in 0..300 {
        let channel = if rng.below(2) == 0 {
            "chat".into()
        } else {
            rng.string()
        };
        let user_id = rng.string();
        let origin = match rng.below(3) {
            0 => None,
            1 => Some("replica-a".into()),
            _ => Some(rng.string()),
        };
        cases.push((channel, user_id, origin));
    }

    let payload = r#"{"text": "hi \"there\" \\ é 🙂", "n": [1, 2.5, null]}"#;
    let mut published = HashMap::new();
    let (mut ok, mut refused) = (0, 0);
    for (channel, user_id, origin) in &cases {
        let valid = valid_name(channel, 63)
            && valid_user_id(user_id)
            && origin.as_deref().is_none_or(|o| valid_name(o, 255));
        let result = publish(&client, channel, user_id, origin.as_deref(), payload).await;
        match (valid, result) {
            (true, Ok(id)) => {
                ok += 1;
                let row = (
                    channel.clone(),
                    user_id.clone(),
                    origin.clone(),
                    payload.into(),
                );
                published.insert(id, row);
            }
            (false, Err(SqlState::INVALID_PARAMETER_VALUE)) => refused += 1,
            (valid, result) => panic!(
                "channel {channel:.80?} user_id {user_id:.80?} origin {origin:.80?}: \
                 valid by the README: {valid}, got {result:?}"
            ),
        }
    }
    // NUL cannot even reach the function: text refuses it (22021), the client sends nothing.
    let nul = publish(&client, "chat", "a\u{0}b", None, payload).await;
    assert_eq!(nul, Err(SqlState::CHARACTER_NOT_IN_REPERTOIRE));
    println!("{ok} published, {refused} refused with 22023");
    assert!(
        ok > 20 && refused > 20,
        "the generator covers both outcomes"
    );

    let sentinel = publish(&client, "chat", "sentinel", None, "{}")
        .await
        .unwrap();
    let notifications = notifications_until(&mut listener, &sentinel).await;
    assert_rows_match(&client, &published, &notifications).await;
    assert_server_healthy(&cluster, &client).await;
}

/// `depth` nested arrays around `1`.
fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test]
async fn deep_huge_and_odd_json_is_refused_or_stored_exactly_in_both_modes() {
    let cluster = Cluster::start();
    let client = cluster.connect("postgres").await;
    let mut listener = cluster.listener("postgres").await;

    let big_string = format!("\"{}\"", "x".repeat(1_000_000)); // just under 1 MB as jsonb
    let many_keys = format!(
        "{{{}}}",
        (0..40_000)
            .map(|i| format!("\"k{i}\": {i}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let deep_objects = format!("{}1{}", "{\"a\":".repeat(1000), "}".repeat(1000));
    let ok = |s: &str| (s.to_owned(), None);
    let err = |s: &str, code: SqlState| (s.to_owned(), Some(code));
    let cases: Vec<(String, Option<SqlState>)> = vec![
        ok("null"),
        ok("\"just a string\""),
        ok("42"),
        ok("{}"),
        ok("[]"),
        ok(r#"{"a": 1, "a": 2}"#), // jsonb keeps the last duplicate key
        ok(r#"{"n": 1e400, "m": -1e-400, "p": 123456789012345678901234567890.123456789}"#),
        ok(r#"{"s": "\ud83d\ude00 \" \\ \/ \b\f\n\r\t \u0001 \u001f"}"#),
        ok(&nested(100)),
        ok(&nested(129)), // past serde_json's default recursion limit of 128
        ok(&nested(5000)),
        ok(&deep_objects),
        ok(&big_string),
        ok(&many_keys),
        err(&nested(1_000_000), SqlState::STATEMENT_TOO_COMPLEX), // stack depth: 54001
        err(
            &format!("\"{}\"", "x".repeat(1_100_000)),
            SqlState::PROGRAM_LIMIT_EXCEEDED,
        ),
        err(r#"{"s": "\u0000"}"#, SqlState::UNTRANSLATABLE_CHARACTER),
        err(r#"{"s": "\ud800"}"#, SqlState::INVALID_TEXT_REPRESENTATION),
        err(r#"{"a": 1"#, SqlState::INVALID_TEXT_REPRESENTATION),
        err("NaN", SqlState::INVALID_TEXT_REPRESENTATION),
    ];

    let mut published = HashMap::new();
    for mode in ["reference", "inline"] {
        client
            .batch_execute(&format!("SET pg_outbox.notify_payload = '{mode}'"))
            .await
            .unwrap();
        for (payload, expected) in &cases {
            let result = publish(&client, "chat", "u1", None, payload).await;
            match (result, expected) {
                (Ok(id), None) => {
                    let row = ("chat".into(), "u1".into(), None, payload.clone());
                    published.insert(id, row);
                }
                (Err(code), Some(want)) if code == *want => {}
                (result, expected) => {
                    panic!("{mode} payload {payload:.100}: expected {expected:?}, got {result:?}")
                }
            }
        }
    }
    let sentinel = publish(&client, "chat", "sentinel", None, "{}")
        .await
        .unwrap();
    let notifications = notifications_until(&mut listener, &sentinel).await;
    assert_rows_match(&client, &published, &notifications).await;
    // Inline mode carried the small payloads inline, under the NOTIFY limit.
    let inline = notifications
        .values()
        .filter(|n| n.contains("\"payload\":"))
        .count();
    assert!(inline >= 10, "{inline} inline notifications");
    assert!(notifications.values().all(|n| n.len() < 8000));
    assert_server_healthy(&cluster, &client).await;
}

/// What a publisher may see while the extension is dropped and created again under it.
const DURING_DDL: &[SqlState] = &[
    SqlState::UNDEFINED_FUNCTION, // the function is gone
    SqlState::UNDEFINED_TABLE,    // the table went first, mid-call
    SqlState::UNDEFINED_OBJECT,
    SqlState::T_R_DEADLOCK_DETECTED,
];

#[tokio::test]
async fn drop_extension_while_publishing_is_a_clean_error_then_works_again() {
    let cluster = Cluster::start();
    let admin = cluster.connect("postgres").await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut publishers = Vec::new();
    for p in 0..4 {
        let client = cluster.connect("postgres").await;
        let stop = Arc::clone(&stop);
        publishers.push(tokio::spawn(async move {
            let (mut ok, mut errors) = (Vec::new(), HashMap::<String, usize>::new());
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let payload = format!("{{\"p\": {p}, \"n\": {n}}}");
                // Every other call in an explicit transaction, so DROP also meets open ones.
                let result = if n.is_multiple_of(2) {
                    client.batch_execute("BEGIN").await.unwrap();
                    let r = publish(&client, "chat", &format!("u{p}"), None, &payload).await;
                    client
                        .batch_execute(if r.is_ok() { "COMMIT" } else { "ROLLBACK" })
                        .await
                        .unwrap();
                    r
                } else {
                    publish(&client, "chat", &format!("u{p}"), None, &payload).await
                };
                match result {
                    Ok(id) => ok.push((id, payload)),
                    Err(code) => *errors.entry(code.code().to_owned()).or_default() += 1,
                }
            }
            (ok, errors)
        }));
    }

    let count = |sql: &'static str| {
        let admin = &admin;
        async move { admin.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    // Drop and re-create a few times while they publish.
    for round in 0..5 {
        let wait_for = 200 * (round + 1);
        cluster
            .wait_for("publishers to publish", Duration::from_secs(30), || async {
                (count("SELECT count(*) FROM event_outbox").await >= wait_for).then_some(())
            })
            .await;
        admin
            .batch_execute("DROP EXTENSION pg_outbox")
            .await
            .unwrap();
        admin
            .batch_execute("CREATE EXTENSION pg_outbox")
            .await
            .unwrap();
    }
    cluster
        .wait_for(
            "publishers to publish after",
            Duration::from_secs(30),
            || async { (count("SELECT count(*) FROM event_outbox").await >= 200).then_some(()) },
        )
        .await;
    stop.store(true, Ordering::Relaxed);

    let mut errors_seen = HashMap::new();
    let mut published = Vec::new();
    for publisher in publishers {
        let (ok, errors) = publisher.await.unwrap();
        published.extend(ok);
        for (code, n) in errors {
            *errors_seen.entry(code).or_insert(0) += n;
        }
    }
    println!("errors while dropping: {errors_seen:?}");
    for code in errors_seen.keys() {
        assert!(
            DURING_DDL.iter().any(|c| c.code() == code),
            "unexpected SQLSTATE {code} while the extension was dropped: {errors_seen:?}\n{}",
            cluster.log()
        );
    }
    // Rows of the current extension are exactly what was published (older ones went with
    // their table); none is there that no call returned.
    let rows: HashMap<String, String> = admin
        .query("SELECT id::text, payload::text FROM event_outbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let published: HashMap<String, String> = published.into_iter().collect();
    assert!(!rows.is_empty());
    for (id, payload) in &rows {
        let sent = published
            .get(id)
            .unwrap_or_else(|| panic!("row {id} was never returned by outbox_publish"));
        let same: bool = admin
            .query_one("SELECT $1::text::jsonb = $2::text::jsonb", &[sent, payload])
            .await
            .unwrap()
            .get(0);
        assert!(same, "row {id}: published {sent}, stored {payload}");
    }
    assert_server_healthy(&cluster, &admin).await;
    // And the extension works as new.
    let error = admin
        .batch_execute("SELECT outbox_publish('bad channel', 'u', '{}')")
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(&SqlState::INVALID_PARAMETER_VALUE));
}

/// JSON that jsonb stores but serde_json (the client's parser, also behind tokio-postgres's
/// jsonb) refuses: a number beyond f64, and nesting past its recursion limit of 128.
fn unreadable_by_serde() -> [String; 2] {
    [r#"{"n": 1e400}"#.to_owned(), nested(129)]
}

#[tokio::test]
async fn a_relay_goes_on_past_payloads_serde_json_cannot_read() {
    for inline in [false, true] {
        let mode = if inline { "'inline'" } else { "'reference'" };
        let cluster = Cluster::builder()
            .setting("pg_outbox.notify_payload", mode)
            .start();
        let client = cluster.connect("postgres").await;
        let (relay, all) = relay::started(&cluster, "torture_relay").await;
        let before = relay::publish(&client, "chat", "u", "{}", None).await;
        let mut unreadable = Vec::new();
        for payload in unreadable_by_serde() {
            unreadable.push(relay::publish(&client, "chat", "u", &payload, None).await);
        }
        let after = relay::publish(&client, "chat", "u", "{}", None).await;
        let expected = [before, after].into_iter().collect();
        all.wait_for_all(&cluster, "the events around the unreadable ones", &expected)
            .await;
        assert_eq!(relay.metrics().reconnects, 0, "inline {inline}");
        // Each unreadable row is reported to its subscribers, once, and skipped. Inline, the
        // events around them are delivered from their notifications, possibly before the
        // advance that reads the undecodable ones' rows has reported them: wait for it.
        cluster
            .wait_for("the unreadable rows' gaps", WAIT, || async {
                (all.unreadable_ids().len() >= unreadable.len()).then_some(())
            })
            .await;
        assert_eq!(all.unreadable_ids(), unreadable, "inline {inline}");
        relay.shutdown().await;
    }
}
