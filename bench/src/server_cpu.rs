//! CPU time the PostgreSQL server has used, from /proc: what a figure costs the server, apart
//! from the clients (relays, publishers) that run on the same machine.
//!
//! Counted: the postmaster's own time, the time of every live child (backends, the pg_outbox
//! workers, the auxiliary processes), and the children that exited, which the postmaster reaped
//! (their time is in its `cutime` and `cstime`). So a sample's difference is the server's whole
//! CPU over a window, connections opened and closed within it included.

use std::path::Path;
use std::time::Duration;

/// The server's CPU time so far, or `None` where /proc cannot tell (not Linux, or the
/// postmaster gone).
pub fn used(data_dir: &Path) -> Option<Duration> {
    let pid_file = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let postmaster: u32 = pid_file.lines().next()?.trim().parse().ok()?;
    let ticks_per_second = ticks_per_second()?;
    let mut ticks = 0u64;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may exit between the listing and the read: it is then in the
        // postmaster's reaped time, or (just) missed.
        let Some(stat) = Stat::read(pid) else {
            continue;
        };
        if pid == postmaster {
            ticks += stat.utime + stat.stime + stat.cutime + stat.cstime;
        } else if stat.ppid == postmaster {
            ticks += stat.utime + stat.stime;
        }
    }
    Some(Duration::from_secs_f64(
        ticks as f64 / ticks_per_second as f64,
    ))
}

/// The CPU time process `pid` has used so far (all its threads; not its children), or `None`
/// where /proc cannot tell.
pub fn process(pid: u32) -> Option<Duration> {
    let stat = Stat::read(pid)?;
    Some(Duration::from_secs_f64(
        (stat.utime + stat.stime) as f64 / ticks_per_second()? as f64,
    ))
}

/// The data directory of a bench cluster.
pub fn data_dir(cluster: &pg_outbox_tests::Cluster) -> std::path::PathBuf {
    cluster.root().join("data")
}

struct Stat {
    ppid: u32,
    utime: u64,
    stime: u64,
    cutime: u64,
    cstime: u64,
}

impl Stat {
    fn read(pid: u32) -> Option<Stat> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name is in parentheses and may hold spaces: fields count from after it.
        let fields: Vec<&str> = text.get(text.rfind(')')? + 2..)?.split(' ').collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        Some(Stat {
            ppid: u32::try_from(field(4)?).ok()?,
            utime: field(14)?,
            stime: field(15)?,
            cutime: field(16)?,
            cstime: field(17)?,
        })
    }
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`), read once.
fn ticks_per_second() -> Option<u64> {
    static TICKS: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        let output = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()?;
        String::from_utf8_lossy(&output.stdout).trim().parse().ok()
    })
}
