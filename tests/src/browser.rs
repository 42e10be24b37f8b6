//! What the browser test, the demo and the benchmark share: replicas of the SSE example app
//! (`examples/sse`), a proxy in front of them, headless Chromium run as a plain subprocess, and
//! a collector of what the page reports; and the failover scenario itself, which the test
//! asserts on and the demo prints.
//!
//! The page (`examples/sse/src/page.html`) opened with `&report=URL` POSTs, in order, one JSON
//! array at a time, everything its `EventSource` dispatches: `{"type": "open" | "error" |
//! "event" | "reset", "seq": n, ...}`, events with their `id`, `channel`, `user_id`, `payload`,
//! `created_at_us` and `at_ms` (the browser's clock when it dispatched them).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;

use crate::relay::{publish, try_publish};
use crate::{repository, run, Cluster, WAIT};

/// The SSE example app's binary: `$PG_OUTBOX_SSE_EXAMPLE` when set, else built now with cargo
/// (in the profile of the caller) and taken from the target directory.
pub fn example_app() -> PathBuf {
    if let Some(path) = std::env::var_os("PG_OUTBOX_SSE_EXAMPLE") {
        return path.into();
    }
    let release = !cfg!(debug_assertions);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut build = Command::new(cargo);
    build
        .current_dir(repository())
        .args(["build", "--quiet", "-p", "pg_outbox_sse_example"]);
    if release {
        build.arg("--release");
    }
    run(&mut build);
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repository().join("target"));
    target
        .join(if release { "release" } else { "debug" })
        .join("pg-outbox-sse-example")
}

/// A directory of its own under the system's temporary directory.
fn scratch(what: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "pg_outbox-{what}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a scratch directory");
    dir
}

/// One replica of the SSE example app, a process of its own; SIGKILLed on drop, when its log
/// is removed too unless the thread is panicking (a failed test keeps it).
pub struct Replica {
    child: tokio::process::Child,
    address: SocketAddr,
    log: PathBuf,
}

impl Replica {
    /// Starts a replica named `name` on `db` (a connection string), with `args` besides, on a
    /// free port; returns once it prints that it serves.
    pub async fn start(db: &str, name: &str, args: &[&str]) -> Replica {
        Replica::start_program(&example_app(), db, name, args).await
    }

    /// [`Replica::start`] of another program that takes the same arguments and prints the same
    /// line once it serves (the benchmark's hand-written replica).
    pub async fn start_program(program: &Path, db: &str, name: &str, args: &[&str]) -> Replica {
        Replica::start_program_at(program, db, name, args, "127.0.0.1:0").await
    }

    /// [`Replica::start`] on `listen` (an address the caller reserved).
    pub async fn start_at(db: &str, name: &str, args: &[&str], listen: SocketAddr) -> Replica {
        Replica::start_program_at(&example_app(), db, name, args, &listen.to_string()).await
    }

    async fn start_program_at(
        program: &Path,
        db: &str,
        name: &str,
        args: &[&str],
        listen: &str,
    ) -> Replica {
        let log = scratch(&format!("sse-{name}")).join("replica.log");
        let stderr = std::fs::File::create(&log).expect("create the replica's log");
        let mut child = tokio::process::Command::new(program)
            .args(["--db", db, "--listen", listen, "--name", name])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("start the SSE example app");
        let stdout = child.stdout.take().expect("the replica's stdout");
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(WAIT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(address) = line.strip_prefix("listening on http://") {
                    return address.parse::<SocketAddr>().ok();
                }
            }
            None
        })
        .await;
        let Ok(Some(address)) = ready else {
            panic!(
                "replica {name} did not start\n--- its log ---\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        Replica {
            child,
            address,
            log,
        }
    }

    /// Where it serves.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Kills it with SIGKILL, as a crash would, and reaps it.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Stops (SIGSTOP) or continues (SIGCONT) it: a replica that is stopped reads nothing, so
    /// once continued its relay is behind the server.
    pub fn pause(&self, paused: bool) {
        if let Some(pid) = self.child.id() {
            let signal = if paused { "-STOP" } else { "-CONT" };
            let _ = Command::new("kill")
                .args([signal, &pid.to_string()])
                .status();
        }
    }

    /// Stops it with SIGTERM, as a deploy would, and waits for it to exit.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("the replica exits after SIGTERM")
            .expect("wait for the replica")
    }

    /// `name`'s value in its `/metrics`, summed over its labels.
    pub async fn metric(&self, name: &str) -> f64 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut connection = TcpStream::connect(self.address)
            .await
            .expect("connect to the replica");
        connection
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await
            .expect("ask for /metrics");
        let mut response = String::new();
        tokio::time::timeout(WAIT, connection.read_to_string(&mut response))
            .await
            .expect("a response")
            .expect("read /metrics");
        let lines = response
            .split_once("\r\n\r\n")
            .map_or("", |(_, body)| body)
            .lines()
            .map(|line| Ok(line.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("the Prometheus text format");
        scrape
            .samples
            .iter()
            .filter(|sample| sample.metric == name)
            .map(|sample| match sample.value {
                prometheus_parse::Value::Counter(n) | prometheus_parse::Value::Gauge(n) => n,
                _ => 0.0,
            })
            .sum()
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if !std::thread::panicking() {
            if let Some(dir) = self.log.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

/// A TCP proxy, the test's load balancer: each connection goes to the first backend that
/// accepts it, so to the first replica until it dies, then to the next. Stops on drop.
pub struct Proxy {
    address: SocketAddr,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 in front of `backends`, in order of preference.
    pub async fn start(backends: Vec<SocketAddr>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let address = listener.local_addr().expect("the proxy's address");
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let backends = backends.clone();
                tokio::spawn(async move {
                    for backend in &backends {
                        if let Ok(mut server) = TcpStream::connect(backend).await {
                            // Ends when either side closes: a killed replica closes its side.
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                            return;
                        }
                    }
                });
            }
        });
        Proxy { address, task }
    }

    /// `http://` and its address.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An HTTP endpoint the page POSTs its reports to, keeping them in order; and the one it
/// blocks on (`block`: answered once [`Reports::unblock`] is called).
pub struct Reports {
    address: SocketAddr,
    items: watch::Receiver<Vec<Value>>,
    /// How many block requests arrived.
    blocked: watch::Receiver<usize>,
    unblock: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// What the collector's routes share.
#[derive(Clone)]
struct Collected {
    items: watch::Sender<Vec<Value>>,
    blocked: watch::Sender<usize>,
    unblocked: watch::Receiver<bool>,
}

impl Reports {
    /// Listens on a free port of 127.0.0.1.
    pub async fn start() -> Reports {
        use axum::extract::State;
        use axum::routing::post;

        let (sender, items) = watch::channel(Vec::new());
        let (blocked_sender, blocked) = watch::channel(0);
        let (unblock, unblocked) = watch::channel(false);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the report collector");
        let address = listener.local_addr().expect("the collector's address");
        let router = axum::Router::new()
            .route(
                "/report",
                post(
                    |State(collected): State<Collected>, body: String| async move {
                        match serde_json::from_str::<Vec<Value>>(&body) {
                            Ok(batch) => collected.items.send_modify(|items| items.extend(batch)),
                            Err(err) => {
                                eprintln!("a report that is not a JSON array ({err}): {body}")
                            }
                        }
                    },
                ),
            )
            .route(
                "/block",
                post(|State(collected): State<Collected>| async move {
                    collected.blocked.send_modify(|blocked| *blocked += 1);
                    let mut unblocked = collected.unblocked.clone();
                    let _ = unblocked.wait_for(|unblocked| *unblocked).await;
                }),
            )
            .with_state(Collected {
                items: sender,
                blocked: blocked_sender,
                unblocked,
            })
            // A page that read many large events at once reports them in one body, past
            // axum's default limit of 2 MB (which would answer 413, and lose the report).
            .layer(axum::extract::DefaultBodyLimit::disable());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Reports {
            address,
            items,
            blocked,
            unblock,
            task,
        }
    }

    /// The URL the page blocks on.
    pub fn block_url(&self) -> String {
        format!("http://{}/block", self.address)
    }

    /// Waits until the page is blocked on [`Reports::block_url`].
    pub async fn wait_blocked(&self) {
        let mut blocked = self.blocked.clone();
        tokio::time::timeout(WAIT, blocked.wait_for(|blocked| *blocked > 0))
            .await
            .expect("the page blocks")
            .expect("the collector runs");
    }

    /// Answers the page's block request: its event loop runs again.
    pub fn unblock(&self) {
        let _ = self.unblock.send(true);
    }

    /// The URL the page reports to.
    pub fn url(&self) -> String {
        format!("http://{}/report", self.address)
    }

    /// Everything reported so far, in order.
    pub fn items(&self) -> Vec<Value> {
        self.items.borrow().clone()
    }

    /// Waits until what was reported satisfies `done`; panics after `timeout` naming `what`.
    pub async fn wait(&self, what: &str, timeout: Duration, done: impl FnMut(&Vec<Value>) -> bool) {
        let mut items = self.items.clone();
        if tokio::time::timeout(timeout, items.wait_for(done))
            .await
            .is_err()
        {
            panic!(
                "timed out after {timeout:?} waiting for the page to report {what}; it reported:\n{}",
                serde_json::to_string_pretty(&self.items()).unwrap_or_default()
            );
        }
    }

    /// Waits until the page reported `n` events in all.
    pub async fn wait_for_events(&self, what: &str, n: usize) {
        self.wait(what, WAIT, |items| events(items).count() >= n)
            .await;
    }

    /// Waits until the page reported the event `id`.
    pub async fn wait_for_event(&self, what: &str, id: Uuid) {
        let id = id.to_string();
        self.wait(what, WAIT, |items| {
            events(items).any(|e| e["id"] == id.as_str())
        })
        .await;
    }
}

impl Drop for Reports {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The reported events, in the order the page received them.
pub fn events(items: &[Value]) -> impl Iterator<Item = &Value> {
    items.iter().filter(|item| item["type"] == "event")
}

/// Headless Chromium showing one page, as a plain subprocess (in a process group of its own,
/// ended on drop).
pub struct Chromium {
    child: Child,
    profile: PathBuf,
}

impl Chromium {
    /// `$CHROMIUM`, else Debian's `/usr/bin/chromium` (which `scripts/setup.sh` installs), if it
    /// exists.
    pub fn path() -> Option<PathBuf> {
        let path = std::env::var_os("CHROMIUM")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
        path.exists().then_some(path)
    }

    /// Opens `url` in a new headless Chromium with a throwaway profile.
    pub fn open(url: &str) -> Chromium {
        let path = Chromium::path().expect("chromium (scripts/setup.sh installs it)");
        let profile = scratch("chromium");
        let mut cmd = Command::new(path);
        cmd.arg("--headless=new")
            .arg(format!("--user-data-dir={}", profile.display()))
            .args([
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-sync",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-background-timer-throttling",
                "--disable-renderer-backgrounding",
                "--mute-audio",
            ]);
        if crate::is_root() {
            // Chromium's sandbox refuses to run as root.
            cmd.arg("--no-sandbox");
        }
        let log = std::fs::File::create(profile.join("chromium.log")).ok();
        let child = cmd
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.map_or_else(Stdio::null, Stdio::from))
            .process_group(0)
            .spawn()
            .expect("start chromium");
        Chromium { child, profile }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // SIGTERM to its process group (the browser and the helpers it started); SIGKILL to
        // what is left after 10 s.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Connects to `db` (a connection string); the connection is driven by a spawned task.
pub async fn connect(db: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(db, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {db}: {e}"));
    tokio::spawn(connection);
    client
}

/// What the page of user u1 received in [`failover`], against what was committed for u1.
#[derive(Debug)]
pub struct Failover {
    /// The events of u1 committed, from `event_outbox`.
    pub committed: usize,
    /// The events the page received, duplicates included.
    pub received: usize,
    /// Committed events of u1 the page never received.
    pub lost: usize,
    /// Events the page received more than once (counted once each).
    pub duplicated: usize,
    /// Events the page received that are not u1's committed ones (u2's, rolled back).
    pub foreign: usize,
    /// Events of u1 whose commit was acknowledged but that the server then lost (a crash of
    /// asynchronous commits, a failover to a standby that was behind): received or not, they
    /// count neither as lost nor as foreign.
    pub server_lost: usize,
    /// `event: reset` frames the page received.
    pub resets: usize,
    /// How often the page's `EventSource` connected (the first time included).
    pub connections: usize,
    /// Events the page received before its first connection broke.
    pub first_connection: usize,
    /// Departures from the order the client crate documents, described.
    pub disorder: Vec<String>,
}

impl std::fmt::Display for Failover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "committed {}, received {} ({} on the first connection), lost {}, duplicated {}, \
             foreign {}, lost by the server {}, resets {}, connections {}, out of order {}",
            self.committed,
            self.received,
            self.first_connection,
            self.lost,
            self.duplicated,
            self.foreign,
            self.server_lost,
            self.resets,
            self.connections,
            self.disorder.len()
        )
    }
}

/// How big a [`failover`] run is.
#[derive(Clone, Copy, Debug)]
pub struct FailoverSize {
    /// Transactions each of the three publishers commits or rolls back.
    pub transactions: usize,
    /// Events the page has received when replica A is killed.
    pub kill_after: usize,
    /// Time between two transactions of one publisher.
    pub pace: Duration,
}

/// What goes wrong while the page streams, besides the death of its replica, A, which ends
/// every scenario: the page then follows its own `EventSource` reconnect to replica B.
#[derive(Clone, Copy)]
pub enum Fault<'a> {
    /// Nothing else (issue 17's scenario).
    ReplicaKilled,
    /// The server restarts (`pg_ctl restart -m fast`) while B is stopped (SIGSTOP); A goes on
    /// past the restart, then dies as B is continued, its relay still on the run before. In
    /// the other faults A dies as soon as the server is back, so the page's position is of
    /// the run before.
    RestartThenReplicaKilled(&'a Cluster),
    /// The server restarts, B starts after it (a deploy after database maintenance), then A
    /// dies.
    RestartThenNewReplica(&'a Cluster),
    /// The server crashes (`-m immediate`) once the page's position covers transactions whose
    /// commits were not flushed (the cluster runs with a long `wal_writer_delay`): the
    /// restarted server hands their xids out again. B starts after it, then A dies.
    CrashReusingXids(&'a Cluster),
    /// The standby (`db` names both, `target_session_attrs=read-write`) stops replaying; the
    /// primary goes on, then crashes; the standby is promoted and hands out again xids the
    /// page saw. B starts after it, then A dies.
    StandbyPromoted {
        primary: &'a Cluster,
        standby: &'a Cluster,
    },
}

impl Fault<'_> {
    /// Whether the server goes away: transactions cannot stay open across it.
    fn loses_connections(&self) -> bool {
        !matches!(self, Fault::ReplicaKilled)
    }

    /// Whether B starts only after the fault, so that its relay never saw the run before: it
    /// places the page's position from what the database recorded alone.
    fn starts_b_after(&self) -> bool {
        matches!(
            self,
            Fault::RestartThenNewReplica(_)
                | Fault::CrashReusingXids(_)
                | Fault::StandbyPromoted { .. }
        )
    }
}

/// The publishers' side of a [`failover`]: the ids whose commit the server acknowledged, and
/// when the second half of their transactions may go.
#[derive(Clone)]
struct Publishing {
    acknowledged: std::sync::Arc<std::sync::Mutex<Vec<Uuid>>>,
    /// How many publishers wait at their half.
    waiting: watch::Sender<usize>,
    /// Set once the fault has happened: the second halves go.
    go: watch::Receiver<bool>,
}

/// One publisher of [`failover`]: `transactions`, one every `pace`, the second half once the
/// fault has happened; it reconnects after a connection is lost. Publisher 1 publishes for u1
/// one event per transaction; 2, events of u1 and u2 held open over a query, so they commit
/// out of xid order; 3, u2's alone. Each rolls some back.
async fn publisher(db: String, p: usize, size: FailoverSize, publishing: Publishing) {
    let mut client = connect(&db).await;
    let mut pace = tokio::time::interval(size.pace);
    let mut go = publishing.go.clone();
    for n in 0..size.transactions {
        if n == size.transactions / 2 {
            publishing.waiting.send_modify(|waiting| *waiting += 1);
            let _ = go.wait_for(|go| *go).await;
        }
        if client.is_closed() {
            match tokio_postgres::connect(&db, NoTls).await {
                Ok((fresh, connection)) => {
                    tokio::spawn(connection);
                    client = fresh;
                }
                Err(_) => continue,
            }
        }
        pace.tick().await;
        let Ok(tx) = client.transaction().await else {
            continue;
        };
        let mut ids = Vec::new();
        let roll_back = match p {
            1 => {
                let payload = format!(r#"{{"p": 1, "n": {n}}}"#);
                ids.extend(try_publish(&tx, "chat", "u1", &payload, None).await.ok());
                n % 5 == 4
            }
            2 => {
                for (channel, user, k) in [("chat", "u1", 0), ("news", "u2", 0), ("news", "u1", 1)]
                {
                    let payload = format!(r#"{{"p": 2, "n": {n}, "k": {k}}}"#);
                    let id = try_publish(&tx, channel, user, &payload, None).await.ok();
                    ids.extend(id.filter(|_| user == "u1"));
                }
                // Held open over a query: others commit meanwhile.
                let _ = tx.query_one("SELECT count(*) FROM event_outbox", &[]).await;
                n % 4 == 3
            }
            _ => {
                let payload = format!(r#"{{"p": 3, "n": {n}}}"#);
                try_publish(&tx, "chat", "u2", &payload, None).await.ok();
                n % 3 == 2
            }
        };
        if roll_back {
            let _ = tx.rollback().await;
        } else if tx.commit().await.is_ok() {
            publishing.acknowledged.lock().unwrap().extend(ids);
        }
    }
}

/// The scenario of issue 17, under `fault`: two replicas of the SSE example app on `db`
/// behind a [`Proxy`] (A until it dies, then B); headless Chromium shows user u1's page
/// through the proxy; three publishers commit concurrently (see [`publisher`]), and two
/// transactions for u1 stay open across the death of A (opened after the fault when it takes
/// the server away) and commit one after it, one last. Once the page has received
/// `kill_after` events, the fault happens, then A is SIGKILLed; the page follows its own
/// `EventSource` reconnect. A last event for u1 is published once everything else committed;
/// when the page reports it, what it received is compared with what was committed.
pub async fn failover(db: &str, size: FailoverSize, fault: Fault<'_>) -> Failover {
    let args = ["--retry-ms", "200", "--keep-alive-ms", "1000"];
    let mut a = Replica::start(db, "a", &args).await;
    // Replica B's address, reserved: it may start only after the fault.
    let b_address = SocketAddr::from(([127, 0, 0, 1], crate::free_port()));
    let mut b = if fault.starts_b_after() {
        None
    } else {
        Some(Replica::start_at(db, "b", &args, b_address).await)
    };
    let proxy = Proxy::start(vec![a.address(), b_address]).await;
    let reports = Reports::start().await;
    let chromium = Chromium::open(&format!(
        "{}/?user=u1&report={}",
        proxy.url(),
        reports.url()
    ));
    reports
        .wait("that its EventSource is open", WAIT, |items| {
            items.iter().any(|item| item["type"] == "open")
        })
        .await;

    let (waiting, waiting_seen) = watch::channel(0);
    let (go, go_seen) = watch::channel(false);
    let publishing = Publishing {
        acknowledged: Default::default(),
        waiting,
        go: go_seen,
    };
    let (mut early, mut late) = (None, None);
    if !fault.loses_connections() {
        early = Some(Open::begin(db, r#"{"late": 1}"#).await);
        late = Some(Open::begin(db, r#"{"late": 2}"#).await);
    }
    let publishers: Vec<_> = (1..=3)
        .map(|p| tokio::spawn(publisher(db.to_owned(), p, size, publishing.clone())))
        .collect();

    reports
        .wait_for_events("events before the fault", size.kill_after)
        .await;
    match fault {
        Fault::ReplicaKilled => {}
        Fault::RestartThenReplicaKilled(cluster) => {
            b.as_ref().expect("replica B").pause(true);
            cluster.restart();
        }
        Fault::RestartThenNewReplica(cluster) => cluster.restart(),
        Fault::CrashReusingXids(cluster) => {
            // Nothing flushes the WAL from now on: the publishers wait at their half.
            let mut waiting = waiting_seen.clone();
            tokio::time::timeout(WAIT, waiting.wait_for(|n| *n == 3))
                .await
                .expect("the publishers wait at their half")
                .expect("the publishers' count");
            let last = cluster.burn_xids(30).await;
            let unflushed = connect(db).await;
            // An event above them, committed without a flush: once the page has it, its
            // position covers every one of those xids.
            unflushed
                .batch_execute("SET synchronous_commit = off")
                .await
                .expect("asynchronous commit");
            let seen = publish(&unflushed, "chat", "u1", r#"{"unflushed": true}"#, None).await;
            publishing.acknowledged.lock().unwrap().push(seen);
            reports
                .wait_for_event("the event above the xids", seen)
                .await;
            cluster.crash();
            cluster.pg_ctl_start();
            let reused = cluster.burn_xids(1).await;
            assert!(
                reused <= last,
                "the restarted server hands out xid {reused} again (the page saw up to {last})"
            );
        }
        Fault::StandbyPromoted { primary, standby } => {
            standby.stop_replaying().await;
            // The page gets an event the standby never has (and whatever else the publishers
            // commit meanwhile).
            let primary_client = primary.connect("postgres").await;
            let lacking = publish(&primary_client, "chat", "u1", r#"{"lost": true}"#, None).await;
            publishing.acknowledged.lock().unwrap().push(lacking);
            reports
                .wait_for_event("an event the standby lacks", lacking)
                .await;
            primary.crash();
            standby.psql("postgres", "SELECT pg_promote()");
        }
    }
    if fault.starts_b_after() {
        b = Some(Replica::start_at(db, "b", &args, b_address).await);
    }
    if fault.loses_connections() {
        early = Some(Open::begin(db, r#"{"late": 1}"#).await);
        late = Some(Open::begin(db, r#"{"late": 2}"#).await);
    }
    if matches!(fault, Fault::RestartThenReplicaKilled(_)) {
        // A's relay reaches the new run, and the page gets events from it first: its
        // position is of the new run when it moves to B, whose relay is still on the old one.
        let _ = go.send(true);
        let before = events(&reports.items()).count();
        reports
            .wait_for_events("events after the fault, from replica A", before + 3)
            .await;
        b.as_ref().expect("replica B").pause(false);
    }
    // Otherwise A dies with the server back but nothing published since: the page's position
    // is of the run before the fault when B resumes it.
    a.kill().await;
    if let Some(early) = early.take() {
        let id = early.commit().await;
        publishing.acknowledged.lock().unwrap().push(id);
    }
    let _ = go.send(true);
    for publisher in publishers {
        publisher.await.expect("a publisher");
    }
    if let Some(late) = late.take() {
        let id = late.commit().await;
        publishing.acknowledged.lock().unwrap().push(id);
    }
    let client = connect(db).await;
    let end = publish(&client, "chat", "u1", r#"{"end": true}"#, None).await;
    reports.wait_for_event("the last event", end).await;
    drop(chromium);
    drop(b);

    let committed: Vec<Uuid> = client
        .query("SELECT id FROM event_outbox WHERE user_id = 'u1'", &[])
        .await
        .expect("read event_outbox")
        .iter()
        .map(|row| row.get(0))
        .collect();
    let acknowledged = publishing.acknowledged.lock().unwrap().clone();
    tally(&reports.items(), &committed, &acknowledged, end)
}

/// A transaction that published one event for u1 and stays open until [`Open::commit`].
struct Open {
    client: Client,
    id: Uuid,
}

impl Open {
    async fn begin(db: &str, payload: &str) -> Open {
        let client = connect(db).await;
        client.batch_execute("BEGIN").await.expect("begin");
        let id = publish(&client, "chat", "u1", payload, None).await;
        Open { client, id }
    }

    /// Commits; returns the event's id.
    async fn commit(self) -> Uuid {
        self.client
            .batch_execute("COMMIT")
            .await
            .expect("commit a transaction held open");
        self.id
    }
}

/// Compares what the page reported with the `committed` events of u1, `end` the last.
/// `acknowledged`: the ids of u1 whose commit the server acknowledged, some of which it may
/// have lost since.
fn tally(items: &[Value], committed: &[Uuid], acknowledged: &[Uuid], end: Uuid) -> Failover {
    let received: Vec<&Value> = events(items).collect();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for event in &received {
        *counts
            .entry(event["id"].as_str().unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    let committed_ids: Vec<String> = committed.iter().map(Uuid::to_string).collect();
    let server_lost: Vec<String> = acknowledged
        .iter()
        .map(Uuid::to_string)
        .filter(|id| !committed_ids.contains(id))
        .collect();
    let mut disorder = Vec::new();
    for (seq, item) in items.iter().enumerate() {
        if item["seq"] != seq {
            disorder.push(format!("report {seq} has seq {}", item["seq"]));
            break;
        }
    }
    // One publisher's transactions, in its commit order (xid order too: one session).
    let mut last: HashMap<(u64, u64), u64> = HashMap::new();
    for event in &received {
        let payload = &event["payload"];
        let (Some(p), Some(n)) = (payload["p"].as_u64(), payload["n"].as_u64()) else {
            continue;
        };
        let key = (p, payload["k"].as_u64().unwrap_or(0));
        if let Some(before) = last.insert(key, n) {
            if before >= n {
                disorder.push(format!("publisher {key:?}: {n} after {before}"));
            }
        }
    }
    // The events of one transaction together, in publish order.
    for pair in received.windows(2) {
        let (first, second) = (&pair[0]["payload"], &pair[1]["payload"]);
        if first["p"] == 2 && first["k"] == 0 && (second["p"] != 2 || second["n"] != first["n"]) {
            disorder.push(format!(
                "{first} not followed by its transaction's next event"
            ));
        }
    }
    if received.last().map(|e| &e["id"]) != Some(&Value::from(end.to_string())) {
        disorder.push("the last event published is not the last received".into());
    }
    Failover {
        committed: committed.len(),
        received: received.len(),
        lost: committed_ids
            .iter()
            .filter(|id| !counts.contains_key(*id))
            .count(),
        duplicated: counts.values().filter(|&&n| n > 1).count(),
        foreign: counts
            .keys()
            .filter(|id| !committed_ids.contains(id) && !server_lost.contains(*id))
            .count(),
        server_lost: server_lost.len(),
        resets: items.iter().filter(|item| item["type"] == "reset").count(),
        connections: items.iter().filter(|item| item["type"] == "open").count(),
        first_connection: items
            .iter()
            .take_while(|item| item["type"] != "error")
            .filter(|item| item["type"] == "event")
            .count(),
        disorder,
    }
}
