//! Running pgbench against the benchmark cluster and reading its rate.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pg_outbox_tests::Cluster;

/// One pgbench run: a script from `bench/sql`, a client count, a duration, and server settings
/// for its sessions (through `PGOPTIONS`).
#[derive(Debug, Clone)]
pub struct Run {
    pub script: String,
    pub clients: u32,
    pub duration: Duration,
    pub options: String,
    pub variables: Vec<(String, String)>,
}

/// Transactions per second, excluding connection time.
pub fn tps(cluster: &Cluster, run: &Run) -> f64 {
    tps_at(cluster.bindir(), cluster.root(), cluster.port(), run)
}

/// [`tps`] for a server given by its programs' directory, socket directory and port, for runs
/// on a thread of their own.
pub fn tps_at(bindir: &Path, socket_dir: &Path, port: u16, run: &Run) -> f64 {
    tps_in(bindir, socket_dir, port, "postgres", run)
}

/// [`tps_at`] in `database` instead of `postgres`.
pub fn tps_in(bindir: &Path, socket_dir: &Path, port: u16, database: &str, run: &Run) -> f64 {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("sql")
        .join(&run.script);
    let mut cmd = Command::new(bindir.join("pgbench"));
    cmd.arg("-h")
        .arg(socket_dir)
        .arg("-p")
        .arg(port.to_string())
        .args(["-U", "postgres", "-n", "-M", "prepared"])
        .arg("-c")
        .arg(run.clients.to_string())
        .arg("-j")
        .arg(run.clients.min(4).to_string())
        .arg("-T")
        .arg(run.duration.as_secs().max(1).to_string())
        .arg("-f")
        .arg(&script)
        .env("PGOPTIONS", &run.options);
    for (name, value) in &run.variables {
        cmd.arg("-D").arg(format!("{name}={value}"));
    }
    cmd.arg(database);
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not run pgbench: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        panic!(
            "pgbench {} failed: {}\n{stdout}",
            run.script,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no tps in pgbench's output:\n{stdout}"))
}
