//! Running the built `pg-outbox` binary against a harness cluster.
#![allow(dead_code)] // each test file uses its own subset

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long any one wait may take.
pub const WAIT: Duration = Duration::from_secs(60);

/// The binary under test.
pub fn pg_outbox() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pg-outbox"))
}

/// Runs `pg-outbox args…` to completion with `stdin` as its standard input.
pub fn run(args: &[&str], stdin: &str) -> Output {
    let mut child = pg_outbox()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pg-outbox");
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.as_bytes()).expect("write stdin");
    }
    child.wait_with_output().expect("wait for pg-outbox")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A running `pg-outbox` whose standard output and error are read line by line.
pub struct Running {
    pub child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

fn lines(reader: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

impl Running {
    pub fn spawn(args: &[&str]) -> Running {
        let mut child = pg_outbox()
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start pg-outbox");
        let stdout = lines(child.stdout.take().expect("piped stdout"));
        let stderr = lines(child.stderr.take().expect("piped stderr"));
        Running {
            child,
            stdout,
            stderr,
        }
    }

    /// The next line on standard output, parsed as JSON.
    pub fn next_stdout(&self) -> serde_json::Value {
        let line = self
            .stdout
            .recv_timeout(WAIT)
            .expect("a line on standard output");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    /// Standard error's lines until one is JSON satisfying `pred`; returns that one.
    pub fn stderr_until(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        loop {
            let line = self
                .stderr
                .recv_timeout(WAIT)
                .unwrap_or_else(|e| panic!("waiting for {what} on standard error: {e}"));
            if let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) {
                if pred(&value) {
                    return value;
                }
            }
        }
    }

    /// Whatever standard error says until it closes.
    pub fn rest_of_stderr(&self) -> Vec<String> {
        self.stderr.iter().collect()
    }

    /// Sends `signal` (`TERM`, `INT`) and waits for the exit status.
    pub fn signal_and_wait(mut self, signal: &str) -> (std::process::ExitStatus, Vec<String>) {
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -{signal}");
        let status = self.child.wait().expect("wait for pg-outbox");
        let rest = self.stdout.iter().collect();
        (status, rest)
    }
}
