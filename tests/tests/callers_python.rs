//! `examples/python/publish.py` (psycopg 3) publishes in a committed and a rolled-back
//! transaction while a Rust relay receives: only the committed event arrives.

use std::process::Command;

use pg_outbox_tests::callers::committed_event_of;
use pg_outbox_tests::repository;

/// Debian's interpreter, which `apt-get install python3-psycopg` (scripts/setup.sh) serves,
/// rather than whatever `python3` comes first on PATH.
fn python() -> Command {
    let system = std::path::Path::new("/usr/bin/python3");
    Command::new(if system.exists() {
        system.as_os_str()
    } else {
        "python3".as_ref()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_publishes_in_its_transaction() {
    let event = committed_event_of("callers_python", |url| {
        let mut python = python();
        python
            .arg(repository().join("examples/python/publish.py"))
            .arg(url);
        python
    })
    .await;
    assert_eq!(event.channel(), "orders");
    assert_eq!(event.origin(), Some("python"));
    assert_eq!(event.payload()["order"], 42);
}
