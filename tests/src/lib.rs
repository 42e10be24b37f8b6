//! The one throwaway-cluster harness that every end-to-end test of pg_outbox shares.
//!
//! Each [`Cluster`] is a private PostgreSQL server: its own data directory, a free TCP port on
//! 127.0.0.1, its Unix socket in its own temporary directory, `shared_preload_libraries =
//! 'pg_outbox'`, and `pg_outbox` created in the `postgres` database (the one the pruner serves by
//! default). It is stopped and removed when dropped, even when the test panics.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root the server runs as the
//! `postgres` OS user (through `runuser`), exactly as the README's set-up does.
//!
//! What the tests of one subject share lives in a module of its own: [`relay`] (relays tuned
//! for tests, publishing, collectors), [`browser`] (the SSE example app's replicas behind a proxy,
//! headless Chromium, the page's reports), [`pruner`] (aged rows, and the pruner as
//! `pg_stat_activity` shows it) and [`callers`] (the examples in other languages).

use std::collections::VecDeque;
use std::fmt;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls, Notification};

pub mod browser;
pub mod callers;
pub mod pruner;
pub mod relay;
pub mod soak;

/// How long any single wait of a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(60);

/// The repository's root.
pub fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is in the repository")
        .to_owned()
}

/// Settings every test cluster starts with, before the builder's own.
const BASE_SETTINGS: &[(&str, &str)] = &[
    ("shared_preload_libraries", "'pg_outbox'"),
    ("fsync", "off"),
    ("max_connections", "100"),
    ("log_min_messages", "info"),
];

/// Which edition of pg_outbox a cluster runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Edition {
    /// The extension `pg_outbox`, with its library preloaded (its workers run).
    #[default]
    Native,
    /// The extension `pg_outbox_sql`: SQL and PL/pgSQL only, on a server that never loads the
    /// native library (no `shared_preload_libraries`), as on a managed service.
    Sql,
}

impl Edition {
    /// The extension's name, for `CREATE EXTENSION`.
    pub fn extension(self) -> &'static str {
        match self {
            Edition::Native => "pg_outbox",
            Edition::Sql => "pg_outbox_sql",
        }
    }
}

/// Builds a [`Cluster`] with extra `postgresql.conf` settings.
#[derive(Debug, Default)]
pub struct ClusterBuilder {
    settings: Vec<(String, String)>,
    preload: bool,
    create_extension: bool,
    tls: bool,
    edition: Edition,
}

impl ClusterBuilder {
    /// Appends `name = value` to `postgresql.conf`; `value` is written as given, so quote strings
    /// (`"'1s'"`) the way `postgresql.conf` expects.
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Whether `pg_outbox` is in `shared_preload_libraries` (the default): without it there is
    /// no pruner worker, as on a server whose operator did not preload the library.
    pub fn preload(mut self, preload: bool) -> Self {
        self.preload = preload;
        self
    }

    /// Which edition is created (default: the native one). The SQL edition's cluster preloads
    /// nothing.
    pub fn edition(mut self, edition: Edition) -> Self {
        self.edition = edition;
        if edition == Edition::Sql {
            self.preload = false;
        }
        self
    }

    /// Whether `CREATE EXTENSION` of the edition runs in the `postgres` database at start (the
    /// default).
    pub fn create_extension(mut self, create: bool) -> Self {
        self.create_extension = create;
        self
    }

    /// Whether the server offers TLS (`ssl = on`) with a certificate for `localhost` and
    /// `127.0.0.1` signed by a throwaway CA generated with the `openssl` CLI; clients find the
    /// CA at [`Cluster::ca_certificate`]. Default: no TLS.
    pub fn tls(mut self, tls: bool) -> Self {
        self.tls = tls;
        self
    }

    /// Runs initdb, writes the configuration and starts the server.
    pub fn start(self) -> Cluster {
        Cluster::init(self)
    }
}

/// A private PostgreSQL server for one test, removed on drop.
pub struct Cluster {
    root: PathBuf,
    port: u16,
    bindir: PathBuf,
    as_postgres_user: bool,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("root", &self.root)
            .field("port", &self.port)
            .finish()
    }
}

impl Cluster {
    /// A cluster with the default settings and the extension created in `postgres`.
    pub fn start() -> Cluster {
        Cluster::builder().start()
    }

    /// A builder, for extra settings.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder {
            settings: Vec::new(),
            preload: true,
            create_extension: true,
            tls: false,
            edition: Edition::Native,
        }
    }

    fn init(builder: ClusterBuilder) -> Cluster {
        let cluster = Cluster::empty(is_root());
        cluster.run_pg("initdb", |cmd| {
            cmd.arg("-D")
                .arg(cluster.data_dir())
                .args(["-U", "postgres", "--auth=trust", "-E", "UTF8"])
                .args(["--locale=C.UTF-8", "--no-sync"]);
        });

        let mut conf = cluster.connection_settings();
        for (name, value) in BASE_SETTINGS {
            if *name == "shared_preload_libraries" && !builder.preload {
                continue;
            }
            conf.push_str(&format!("{name} = {value}\n"));
        }
        if builder.tls {
            conf.push_str(&cluster.generate_certificates());
        }
        for (name, value) in &builder.settings {
            conf.push_str(&format!("{name} = {value}\n"));
        }
        append(&cluster.data_dir().join("postgresql.conf"), &conf);

        cluster.pg_ctl_start();
        if builder.create_extension {
            cluster.psql(
                "postgres",
                &format!("CREATE EXTENSION {}", builder.edition.extension()),
            );
        }
        cluster
    }

    /// A cluster's directory, port and binaries, with no data directory yet.
    fn empty(as_postgres_user: bool) -> Cluster {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let root = std::env::temp_dir().join(format!(
            "pg_outbox-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("create the cluster directory");
        // Trust authentication on the socket: keep the directory to its owner (the server's
        // user, or the tests' own when they do not run as root).
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
            .expect("restrict the cluster directory");

        let cluster = Cluster {
            root,
            port: free_port(),
            bindir: pg_bindir(),
            as_postgres_user,
        };
        if as_postgres_user {
            run(Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&cluster.root));
        }
        cluster
    }

    /// Where this server listens, as `postgresql.conf` lines.
    fn connection_settings(&self) -> String {
        format!(
            "\n# pg_outbox test harness\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n",
            self.port,
            self.root.display()
        )
    }

    /// A hot standby of this cluster, streaming from it (`pg_basebackup -R`), removed on drop.
    pub fn standby(&self) -> Cluster {
        let standby = Cluster::empty(self.as_postgres_user);
        standby.run_pg("pg_basebackup", |cmd| {
            cmd.arg("-D")
                .arg(standby.data_dir())
                .arg("-h")
                .arg(&self.root)
                .arg("-p")
                .arg(self.port.to_string())
                .args([
                    "-U",
                    "postgres",
                    "-R",
                    "-X",
                    "stream",
                    "--checkpoint=fast",
                    "--no-sync",
                ]);
        });
        // The copied configuration still names the primary's port and socket: later lines win.
        append(
            &standby.data_dir().join("postgresql.conf"),
            &standby.connection_settings(),
        );
        standby.pg_ctl_start();
        standby
    }

    /// Runs `n` transactions that take an xid and write nothing, so write no WAL of their own
    /// and flush none at commit; returns the last xid.
    pub async fn burn_xids(&self, n: usize) -> u64 {
        let client = self.connect("postgres").await;
        let mut last = String::new();
        for _ in 0..n {
            last = client
                .query_one("SELECT pg_current_xact_id()::text", &[])
                .await
                .expect("take an xid")
                .get(0);
        }
        last.parse().expect("an xid")
    }

    /// Makes this standby stop receiving WAL, and waits until it has: what its primary
    /// commits from now on, it never has.
    pub async fn stop_replaying(&self) {
        self.set_setting("primary_conninfo", "");
        let client = self.connect("postgres").await;
        self.wait_for("the standby's WAL receiver to stop", WAIT, || async {
            let row = client
                .query_one("SELECT count(*) FROM pg_stat_wal_receiver", &[])
                .await
                .ok()?;
            (row.get::<_, i64>(0) == 0).then_some(())
        })
        .await;
    }

    /// The directory that holds the data directory, the log and the socket.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of the server's programs (`pg_config --bindir`): pgbench, psql, ...
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// The server's TCP port on 127.0.0.1 (the socket in [`Cluster::root`] has the same number).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A `postgresql://` URL for `dbname` over TCP on 127.0.0.1, as `postgres`: what programs in
    /// other languages (psycopg, node-postgres, psql) connect with.
    pub fn url(&self, dbname: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{dbname}", self.port)
    }

    /// The PEM file of the CA that signed the server's certificate, for a cluster built with
    /// [`ClusterBuilder::tls`].
    pub fn ca_certificate(&self) -> PathBuf {
        self.root.join("tls").join("ca.crt")
    }

    /// Generates a CA and a server certificate for `localhost` / `127.0.0.1` in `root/tls`;
    /// returns the `postgresql.conf` lines that use them.
    fn generate_certificates(&self) -> String {
        let dir = self.root.join("tls");
        std::fs::create_dir_all(&dir).expect("create the certificate directory");
        // Arguments split on spaces: none of them contains one.
        let openssl = |args: &str| {
            run(Command::new("openssl")
                .current_dir(&dir)
                .args(args.split(' ')));
        };
        let key = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
        openssl(&format!(
            "req -x509 {key} -keyout ca.key -out ca.crt -subj /CN=pg_outbox-test-ca -days 2"
        ));
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName = DNS:localhost, IP:127.0.0.1\nbasicConstraints = CA:FALSE\n\
             keyUsage = digitalSignature\nextendedKeyUsage = serverAuth\n",
        )
        .expect("write the certificate extensions");
        openssl(&format!(
            "req {key} -keyout server.key -out server.csr -subj /CN=localhost"
        ));
        openssl(
            "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
             -extfile server.ext -out server.crt",
        );
        if self.as_postgres_user {
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir));
        }
        std::fs::set_permissions(
            dir.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("restrict the server key");
        format!(
            "ssl = on\nssl_cert_file = '{dir}/server.crt'\nssl_key_file = '{dir}/server.key'\n",
            dir = dir.display()
        )
    }

    /// A libpq-style connection string for `dbname` over the Unix socket, as `postgres`.
    pub fn connection_string(&self, dbname: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname={dbname}",
            self.root.display(),
            self.port
        )
    }

    /// A connection configuration for `dbname` as `user`, over the Unix socket.
    pub fn config(&self, dbname: &str, user: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&self.root)
            .port(self.port)
            .user(user)
            .dbname(dbname)
            .application_name("pg_outbox-tests");
        config
    }

    /// Connects to `dbname` as `postgres`; the connection is driven by a spawned task.
    pub async fn connect(&self, dbname: &str) -> Client {
        self.connect_as(dbname, "postgres").await
    }

    /// Connects to `dbname` as `user`; the connection is driven by a spawned task.
    pub async fn connect_as(&self, dbname: &str, user: &str) -> Client {
        let (client, connection) = self
            .config(dbname, user)
            .connect(NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to {dbname} as {user}: {e}"));
        tokio::spawn(connection);
        client
    }

    /// A session that has run `LISTEN pg_outbox` in `dbname`, with its notifications in a queue.
    pub async fn listener(&self, dbname: &str) -> Listener {
        self.listener_as(dbname, "postgres").await
    }

    /// [`Cluster::listener`], connected as `user` (LISTEN needs no privilege).
    pub async fn listener_as(&self, dbname: &str, user: &str) -> Listener {
        let (client, mut connection) = self
            .config(dbname, user)
            .connect(NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect the listener to {dbname} as {user}: {e}"));
        let (sender, notifications) = mpsc::unbounded_channel();
        // Notifications only surface through `poll_message`: a plain `tokio::spawn(connection)`
        // would drop them.
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let AsyncMessage::Notification(notification) = message {
                    if sender.send(notification).is_err() {
                        break;
                    }
                }
            }
        });
        client
            .batch_execute("LISTEN pg_outbox")
            .await
            .expect("LISTEN pg_outbox");
        Listener {
            client,
            notifications,
            batched: VecDeque::new(),
        }
    }

    /// Starts a PgBouncer (`/usr/sbin/pgbouncer`, installed by `scripts/setup.sh`) in front of
    /// the `postgres` database with `pool_mode` (`session` or `transaction`), and waits until it
    /// accepts connections.
    pub async fn pgbouncer(&self, pool_mode: &str) -> PgBouncer {
        let port = free_port();
        let ini = self.root.join(format!("pgbouncer-{pool_mode}.ini"));
        let users = self.root.join("pgbouncer-users.txt");
        std::fs::write(&users, "\"postgres\" \"\"\n").expect("write the pgbouncer user list");
        std::fs::write(
            &ini,
            format!(
                "[databases]\npostgres = host={root} port={pg} dbname=postgres\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {users}\npool_mode = {pool_mode}\n\
                 default_pool_size = 4\nlogfile = {root}/pgbouncer.log\n",
                root = self.root.display(),
                pg = self.port,
                users = users.display(),
            ),
        )
        .expect("write pgbouncer.ini");
        if self.as_postgres_user {
            run(Command::new("chown")
                .arg("postgres:postgres")
                .arg(&ini)
                .arg(&users));
        }
        // PgBouncer refuses to run as root, like the server.
        let mut cmd = if self.as_postgres_user {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--", "/usr/sbin/pgbouncer"]);
            cmd
        } else {
            Command::new("/usr/sbin/pgbouncer")
        };
        let child = cmd
            .arg(&ini)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgbouncer (scripts/setup.sh installs it)");
        let bouncer = PgBouncer { child, port };
        let config = bouncer.config();
        self.wait_for(
            "pgbouncer to accept connections",
            Duration::from_secs(30),
            || async { config.connect(NoTls).await.ok().map(|_| ()) },
        )
        .await;
        bouncer
    }

    /// Runs `sql` through psql in `dbname`, stopping at the first error; returns what it printed.
    pub fn psql(&self, dbname: &str, sql: &str) -> String {
        let output = self.run_pg("psql", |cmd| {
            cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
                .arg("-h")
                .arg(&self.root)
                .arg("-p")
                .arg(self.port.to_string())
                .args(["-U", "postgres", "-d", dbname, "-c", sql]);
        });
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// Runs `script` through psql in `dbname` as a file read from standard input (`-f -`), so
    /// psql's meta-commands work, stopping at the first error; returns what it printed.
    pub fn psql_script(&self, dbname: &str, script: &str) -> String {
        use std::io::Write;
        let mut child = self
            .pg_command("psql")
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(&self.root)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", "postgres", "-d", dbname, "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start psql");
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .expect("write the script to psql");
        }
        let output = child.wait_with_output().expect("wait for psql");
        if !output.status.success() {
            panic!(
                "psql failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// Sets `name` to `value` (read as a string literal) with ALTER SYSTEM and reloads the
    /// configuration, as an operator does with SIGHUP. A setting that needs a restart takes
    /// effect at the next [`Cluster::restart`].
    pub fn set_setting(&self, name: &str, value: &str) {
        let value = value.replace('\'', "''");
        self.psql("postgres", &format!("ALTER SYSTEM SET {name} = '{value}'"));
        self.psql("postgres", "SELECT pg_reload_conf()");
    }

    /// Takes `name` back to the configuration file's value (ALTER SYSTEM RESET) and reloads.
    pub fn reset_setting(&self, name: &str) {
        self.psql("postgres", &format!("ALTER SYSTEM RESET {name}"));
        self.psql("postgres", "SELECT pg_reload_conf()");
    }

    /// `pg_dump` of `dbname`, as a plain SQL script.
    pub fn pg_dump(&self, dbname: &str) -> String {
        let output = self.run_pg("pg_dump", |cmd| {
            cmd.arg("-h")
                .arg(&self.root)
                .arg("-p")
                .arg(self.port.to_string())
                .args(["-U", "postgres", "-d", dbname]);
        });
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Restarts the server (`pg_ctl restart -m fast`): every connection is dropped.
    pub fn restart(&self) {
        self.run_pg("pg_ctl", |cmd| {
            cmd.arg("-D")
                .arg(self.data_dir())
                .arg("-l")
                .arg(self.log_path())
                .args(["-w", "-t", "60", "-m", "fast", "restart"]);
        });
    }

    /// Stops the server (`pg_ctl stop -m fast`).
    pub fn stop(&self) {
        self.stop_within(Duration::from_secs(60));
    }

    /// Stops the server (`pg_ctl stop -m fast`), panicking if it is not down within `timeout`:
    /// a process that ignores SIGTERM holds a fast shutdown up.
    pub fn stop_within(&self, timeout: Duration) {
        self.run_pg("pg_ctl", |cmd| {
            cmd.arg("-D").arg(self.data_dir()).args([
                "-w",
                "-t",
                &timeout.as_secs().to_string(),
                "-m",
                "fast",
                "stop",
            ]);
        });
    }

    /// Stops the server as a crash would (`pg_ctl stop -m immediate`): no checkpoint, and WAL
    /// not yet written out is lost; the next start runs crash recovery.
    pub fn crash(&self) {
        self.run_pg("pg_ctl", |cmd| {
            cmd.arg("-D")
                .arg(self.data_dir())
                .args(["-w", "-m", "immediate", "stop"]);
        });
    }

    /// Starts a stopped server again.
    pub fn pg_ctl_start(&self) {
        self.run_pg("pg_ctl", |cmd| {
            cmd.arg("-D")
                .arg(self.data_dir())
                .arg("-l")
                .arg(self.log_path())
                .args(["-w", "-t", "60", "start"]);
        });
    }

    /// Everything the server has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The checkpointer's pid. After a crash (a server process killed by a signal, or a PANIC)
    /// the postmaster ends every other process and starts them again, the checkpointer
    /// included: the same pid at two moments means the server did not crash in between.
    pub fn checkpointer_pid(&self) -> i32 {
        let pid = self.psql(
            "postgres",
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'",
        );
        pid.parse()
            .unwrap_or_else(|e| panic!("the checkpointer's pid {pid:?}: {e}"))
    }

    /// The pids of the server's processes whose title names `title` (`postgres: pg_outbox
    /// pruner`, ...), read from `/proc`: a background worker shows there from its start, before
    /// it connects to a database, where `pg_stat_activity` cannot see it.
    pub fn processes(&self, title: &str) -> Vec<i32> {
        let pid_file = std::fs::read_to_string(self.data_dir().join("postmaster.pid"))
            .expect("read postmaster.pid");
        let postmaster = pid_file
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned();
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let (Ok(cmdline), Ok(stat)) = (
                std::fs::read(entry.path().join("cmdline")),
                std::fs::read_to_string(entry.path().join("stat")),
            ) else {
                continue; // Gone meanwhile.
            };
            if !String::from_utf8_lossy(&cmdline).contains(title) {
                continue;
            }
            // After the command name in parentheses: the state, then the parent's pid.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, fields)| fields.split_whitespace().nth(1));
            if ppid == Some(postmaster.as_str()) {
                found.push(pid);
            }
        }
        found
    }

    /// Polls `check` every 50 ms until it returns `Some`, or panics after `timeout` naming `what`.
    pub async fn wait_for<T, F, Fut>(&self, what: &str, timeout: Duration, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = check().await {
                return value;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}\n--- server log ---\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.root.join("server.log")
    }

    fn pg_command(&self, program: &str) -> Command {
        let path = self.bindir.join(program);
        if self.as_postgres_user {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(path);
            cmd
        } else {
            Command::new(path)
        }
    }

    fn run_pg(&self, program: &str, configure: impl FnOnce(&mut Command)) -> Output {
        let mut cmd = self.pg_command(program);
        configure(&mut cmd);
        let output = run(&mut cmd);
        if !output.status.success() && program == "pg_ctl" {
            panic!("--- server log ---\n{}", self.log());
        }
        output
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self
            .pg_command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-w", "-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A PgBouncer in front of a [`Cluster`] (see [`Cluster::pgbouncer`]), stopped on drop.
pub struct PgBouncer {
    child: Child,
    port: u16,
}

impl PgBouncer {
    /// A connection configuration for the `postgres` database through the pooler, as `postgres`.
    pub fn config(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .user("postgres")
            .dbname("postgres");
        config
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // SIGTERM, which runuser forwards to PgBouncer (SIGKILL would orphan it).
        let terminated = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .is_ok_and(|status| status.success());
        if !terminated {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A `LISTEN pg_outbox` session (see [`Cluster::listener`]).
pub struct Listener {
    /// The listening session itself, for queries on the same connection.
    pub client: Client,
    notifications: mpsc::UnboundedReceiver<Notification>,
    /// The events of a batch (version 2) notification not yet returned by [`Listener::next`].
    batched: VecDeque<serde_json::Value>,
}

impl Listener {
    /// The next event's notification document parsed as JSON (opened, when sealed, with the keys
    /// the database gives the listening role), a version 1 document or one event of a version 2
    /// batch (without its `v`); panics if none arrives within 10 s.
    pub async fn next(&mut self) -> serde_json::Value {
        loop {
            if let Some(event) = self.batched.pop_front() {
                return event;
            }
            let raw = self.next_opened().await;
            let mut doc: serde_json::Value = serde_json::from_str(&raw)
                .unwrap_or_else(|e| panic!("notification is not JSON ({e}): {raw}"));
            if doc["v"] != 2 {
                return doc;
            }
            match doc["events"].take() {
                serde_json::Value::Array(events) => self.batched.extend(events),
                _ => panic!("a version 2 notification without events: {raw}"),
            }
        }
    }

    /// The next notification's document: opened when sealed, as it came otherwise.
    pub async fn next_opened(&mut self) -> String {
        let raw = self.next_raw().await;
        if !pg_outbox_wire::seal::is_sealed(&raw) {
            return raw;
        }
        let schema: String = self
            .client
            .query_one(
                "SELECT quote_ident(n.nspname) FROM pg_extension e \
                 JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'pg_outbox'",
                &[],
            )
            .await
            .expect("the extension's schema")
            .get(0);
        let keys: Vec<Vec<u8>> = self
            .client
            .query_one(
                &format!("SELECT keys FROM {schema}.outbox_relay_keys()"),
                &[],
            )
            .await
            .expect("the seal keys (the listening role may read event_outbox)")
            .get(0);
        keys.into_iter()
            .filter_map(|key| <[u8; 32]>::try_from(key).ok())
            .find_map(|key| {
                pg_outbox_wire::seal::open(&pg_outbox_wire::SealKey::from_bytes(key), &raw).ok()
            })
            .unwrap_or_else(|| panic!("a sealed notification that opens with no key: {raw}"))
    }

    /// The raw payload of the next notification; panics if none arrives within 10 s.
    pub async fn next_raw(&mut self) -> String {
        let notification = tokio::time::timeout(Duration::from_secs(10), self.notifications.recv())
            .await
            .expect("a notification within 10 s")
            .expect("the listener connection is open");
        assert_eq!(notification.channel(), "pg_outbox");
        notification.payload().to_owned()
    }
}

/// Runs a command to completion and panics with its output when it fails.
pub(crate) fn run(cmd: &mut Command) -> Output {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not run {cmd:?}: {e} (scripts/setup.sh installs it)"));
    if !output.status.success() {
        panic!(
            "{cmd:?} failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    output
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    file.write_all(text.as_bytes())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// The server binaries' directory, from `$PG_CONFIG` (default `pg_config`) `--bindir`.
fn pg_bindir() -> PathBuf {
    let pg_config = std::env::var("PG_CONFIG").unwrap_or_else(|_| "pg_config".to_owned());
    let output = run(Command::new(&pg_config).arg("--bindir"));
    PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
}

fn is_root() -> bool {
    let output = run(Command::new("id").arg("-u"));
    String::from_utf8_lossy(&output.stdout).trim() == "0"
}

/// A TCP port nobody listens on right now (the kernel's choice of an ephemeral port).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("find a free port")
}

impl Cluster {
    /// Terminates (`pg_terminate_backend`) every backend whose `application_name` is `name`;
    /// returns how many there were.
    pub fn terminate_backends(&self, name: &str) -> usize {
        let quoted = name.replace('\'', "''");
        let out = self.psql(
            "postgres",
            &format!(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE application_name = '{quoted}' AND pid <> pg_backend_pid()"
            ),
        );
        out.parse().unwrap_or(0)
    }
}
