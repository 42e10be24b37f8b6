//! Through a pooler in transaction mode LISTEN does not hold: `start()` says so and names the
//! fix, instead of relaying nothing. Needs the `pgbouncer` binary; skipped (with a note) without.

mod relay_support;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pg_outbox_client::{Error, RelayBuilder};
use pg_outbox_tests::Cluster;

const PGBOUNCER: &str = "/usr/sbin/pgbouncer";

/// A PgBouncer in front of `cluster`, killed on drop.
struct Bouncer {
    child: Child,
    port: u16,
}

impl Bouncer {
    fn start(cluster: &Cluster, pool_mode: &str) -> Bouncer {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let root = cluster.root();
        let ini = root.join(format!("pgbouncer-{pool_mode}.ini"));
        let users = root.join("pgbouncer-users.txt");
        std::fs::write(&users, "\"postgres\" \"\"\n").expect("write the user list");
        std::fs::write(
            &ini,
            format!(
                "[databases]\npostgres = host={root} port={pg} dbname=postgres\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {users}\npool_mode = {pool_mode}\n\
                 default_pool_size = 4\nlogfile = {root}/pgbouncer.log\n",
                root = root.display(),
                pg = cluster.port(),
                users = users.display(),
            ),
        )
        .expect("write pgbouncer.ini");
        // PgBouncer refuses to run as root, like the server.
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        let mut cmd = if is_root {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--", PGBOUNCER]);
            cmd
        } else {
            Command::new(PGBOUNCER)
        };
        let child = cmd
            .arg(&ini)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgbouncer");
        Bouncer { child, port }
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        // SIGTERM, which runuser forwards to PgBouncer (SIGKILL would orphan it).
        let terminated = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        if !terminated {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_mode_pooler_is_refused_naming_the_fix() {
    if !std::path::Path::new(PGBOUNCER).exists() {
        eprintln!("note: {PGBOUNCER} not installed; transaction-pooler detection not tested");
        return;
    }
    let cluster = Cluster::start();
    let bouncer = Bouncer::start(&cluster, "transaction");
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(bouncer.port)
        .user("postgres")
        .dbname("postgres");
    // Wait until PgBouncer accepts connections.
    cluster
        .wait_for("pgbouncer to listen", relay_support::WAIT, || async {
            config.connect(tokio_postgres::NoTls).await.ok().map(|_| ())
        })
        .await;
    let relay = RelayBuilder::new(config)
        .connect_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let err = relay.start().await.unwrap_err();
    assert!(matches!(err, Error::TransactionPooler(_)), "{err}");
    assert!(err.to_string().contains("session-mode pool"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_mode_pooler_works() {
    if !std::path::Path::new(PGBOUNCER).exists() {
        eprintln!("note: {PGBOUNCER} not installed; session-pooler relaying not tested");
        return;
    }
    let cluster = Cluster::start();
    let bouncer = Bouncer::start(&cluster, "session");
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(bouncer.port)
        .user("postgres")
        .dbname("postgres");
    cluster
        .wait_for("pgbouncer to listen", relay_support::WAIT, || async {
            config.connect(tokio_postgres::NoTls).await.ok().map(|_| ())
        })
        .await;
    let relay = RelayBuilder::new(config).build().unwrap();
    let all = relay_support::Collector::spawn(relay.subscribe_all());
    relay.start().await.unwrap();
    let client = cluster.connect("postgres").await;
    let id = relay_support::publish(&client, "chat", "u1", "{}", None).await;
    all.wait_for_all(&cluster, "the event", &[id].into()).await;
    relay.shutdown().await;
}
