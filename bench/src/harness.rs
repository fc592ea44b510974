//! The parts the comparison binaries share: starting a server pinned to
//! [`SERVER_CORE`] on a fresh loopback port and waiting for its `LISTENING`
//! line, killing it when done, running `flood run` pinned to
//! [`CLIENT_CORE`], reading its JSON, and medians.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The core every server is pinned to.
pub const SERVER_CORE: usize = 0;
/// The core flood is pinned to.
pub const CLIENT_CORE: usize = 1;
/// Longest wait for a server's `LISTENING` line.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// One server under test: a name and how to start it on a port (0 = any).
pub struct Server {
    /// The name printed in tables.
    pub name: &'static str,
    /// The executable.
    pub program: PathBuf,
    /// Extra arguments.
    pub args: Vec<String>,
    /// How its command line is built.
    pub launch: Launch,
}

/// How a [`Server`]'s command line is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launch {
    /// A peer: `--listen 127.0.0.1:0 --pin CORE --max-seconds S`.
    Peer,
    /// `flood serve`: `serve --listen 127.0.0.1:0 --shards 1 --max-seconds S` (its one shard
    /// is pinned to core 0 = [`SERVER_CORE`]).
    FloodServe,
    /// bench/nginx/run.sh: `PORT CORE`, with an explicit free port.
    Nginx,
}

impl Server {
    /// A peer binary from `bin_dir`, with `extra` arguments.
    pub fn peer(bin_dir: &Path, name: &'static str, bin: &str, extra: &[&str]) -> Self {
        Server {
            name,
            program: bin_dir.join(bin),
            args: extra.iter().map(|s| s.to_string()).collect(),
            launch: Launch::Peer,
        }
    }

    /// `flood serve` from `bin_dir` with one shard, with `extra` arguments.
    pub fn flood_serve(bin_dir: &Path, name: &'static str, extra: &[&str]) -> Self {
        Server {
            name,
            program: bin_dir.join("flood"),
            args: extra.iter().map(|s| s.to_string()).collect(),
            launch: Launch::FloodServe,
        }
    }

    /// The command that starts it, to exit by itself after `max_seconds`.
    pub fn command(&self, max_seconds: u64) -> Result<Command, String> {
        let mut cmd = Command::new(&self.program);
        match self.launch {
            Launch::Nginx => {
                let port = free_port()?;
                cmd.arg(port.to_string()).arg(SERVER_CORE.to_string());
            }
            Launch::Peer => {
                cmd.args(["--listen", "127.0.0.1:0", "--pin"])
                    .arg(SERVER_CORE.to_string())
                    .arg("--max-seconds")
                    .arg(max_seconds.to_string())
                    .args(&self.args);
            }
            Launch::FloodServe => {
                cmd.args(["serve", "--listen", "127.0.0.1:0", "--shards", "1"])
                    .args(["--stats-interval", "0", "--max-seconds"])
                    .arg(max_seconds.to_string())
                    .args(&self.args);
            }
        }
        Ok(cmd)
    }
}

/// A free loopback port for nginx (bound then released: a fresh one each run).
pub fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind 127.0.0.1:0: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("getsockname: {e}"))
}

/// Kills (SIGTERM, then SIGKILL after 2 s) and reaps the child when dropped.
pub struct Running {
    /// The server process.
    pub child: Child,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child's pid, which is not reaped yet (we hold the
            // Child), so the pid cannot have been reused.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `server` and waits (bounded) for its `LISTENING addr` line.
pub fn start(server: &Server, max_seconds: u64) -> Result<(Running, SocketAddr), String> {
    let mut cmd = server.command(max_seconds)?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| {
            format!(
                "{}: cannot spawn {}: {e}",
                server.name,
                server.program.display()
            )
        })?;
    let stdout = child.stdout.take();
    let running = Running { child };
    let Some(stdout) = stdout else {
        return Err(format!("{}: no stdout", server.name));
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let r = reader.read_line(&mut line).map(|_| line);
        let _ = tx.send(r);
        // Keep the pipe open until the server exits: what it prints at the end (final stats)
        // must not meet a closed pipe.
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    let line = rx
        .recv_timeout(START_TIMEOUT)
        .map_err(|_| {
            format!(
                "{}: no LISTENING line within {START_TIMEOUT:?}",
                server.name
            )
        })?
        .map_err(|e| format!("{}: reading stdout: {e}", server.name))?;
    let addr = line
        .trim()
        .strip_prefix("LISTENING ")
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .ok_or_else(|| format!("{}: unexpected first line {line:?}", server.name))?;
    Ok((running, addr))
}

/// Runs flood once; returns its JSON report.
pub fn flood(
    bin_dir: &Path,
    addr: SocketAddr,
    pid: u32,
    load: &[&str],
    secs: f64,
) -> Result<Value, String> {
    let out = Command::new(bin_dir.join("flood"))
        .arg("run")
        .arg("--target")
        .arg(addr.to_string())
        .arg("--pin")
        .arg(CLIENT_CORE.to_string())
        .arg("--duration")
        .arg(format!("{secs}s"))
        .arg("--server-pid")
        .arg(pid.to_string())
        .arg("--json")
        .args(load)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run flood: {e}"))?;
    if !out.status.success() {
        return Err(format!("flood exited with {}", out.status));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("flood's JSON: {e}"))
}

/// The number at `path` in `v`; NaN when absent.
pub fn num(v: &Value, path: &[&str]) -> f64 {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_f64().unwrap_or(f64::NAN)
}

/// The median of the finite values of `v`; NaN when there are none.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
