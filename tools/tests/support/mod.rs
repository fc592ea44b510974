//! What the `flood` binary's end-to-end tests share: the binary, a
//! `flood serve` child, running `flood`, reading its JSON.
#![allow(dead_code)] // each test binary uses its own part

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Mutex, MutexGuard};

use serde_json::Value;

pub const FLOOD: &str = env!("CARGO_BIN_EXE_flood");

/// The load tests share two cores: one at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// A `flood serve` child on a free loopback port, stopped by closing its
/// standard input (bounded by --max-seconds should the test die).
pub struct Server {
    pub child: Child,
    pub out: BufReader<ChildStdout>,
    pub addr: String,
}

impl Server {
    pub fn start(extra: &[&str]) -> Server {
        let mut args = vec!["--stats-interval", "0", "--max-seconds", "120"];
        args.extend_from_slice(extra);
        Server::spawn(&args, Stdio::inherit())
    }

    /// `flood serve --listen 127.0.0.1:0 --shards 1 --exit-on-eof` and
    /// `args`, with `stderr` as its standard error.
    pub fn spawn(args: &[&str], stderr: Stdio) -> Server {
        let mut child = Command::new(FLOOD)
            .args(["serve", "--listen", "127.0.0.1:0", "--shards", "1"])
            .arg("--exit-on-eof")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn flood serve");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("read LISTENING line");
        let addr = line
            .trim()
            .strip_prefix("LISTENING ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Server { child, out, addr }
    }

    /// Closes stdin, waits for exit, returns the final stats JSON.
    pub fn stop(mut self) -> Value {
        drop(self.child.stdin.take());
        let mut rest = String::new();
        self.out
            .read_to_string(&mut rest)
            .expect("read final stats");
        let status = self.child.wait().expect("wait flood serve");
        assert!(status.success(), "flood serve exited with {status}: {rest}");
        let last = rest
            .lines()
            .last()
            .unwrap_or_else(|| panic!("no final stats"));
        serde_json::from_str(last).unwrap_or_else(|e| panic!("final stats {last:?}: {e}"))
    }
}

pub fn flood(args: &[&str]) -> (bool, String, String) {
    let (code, stdout, stderr) = flood_code(args);
    (code == Some(0), stdout, stderr)
}

/// Runs flood; returns its exit code (None if a signal ended it), stdout
/// and stderr.
pub fn flood_code(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(FLOOD)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run flood");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}
