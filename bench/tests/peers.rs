//! Spawns each peer binary, reads its `LISTENING` line, and checks that 200 connections each
//! receive exactly `x` followed by EOF. No sleeps: every wait is on a read.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

/// Safety net against a hung peer: a read that takes this long fails the test.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Kills and reaps the child when dropped, so a failing test leaves no process behind.
struct Peer {
    child: Child,
    addr: SocketAddr,
    _stdout: BufReader<ChildStdout>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(bin: &str, extra: &[&str]) -> Peer {
    let mut cmd = Command::new(bin);
    cmd.args(["--listen", "127.0.0.1:0"]);
    if !extra.contains(&"--max-seconds") {
        cmd.args(["--max-seconds", "120"]);
    }
    let mut child = cmd
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {bin}: {e}"));
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("read LISTENING line");
    let addr = line
        .strip_prefix("LISTENING ")
        .unwrap_or_else(|| panic!("{bin}: unexpected first line {line:?}"))
        .trim()
        .parse::<SocketAddr>()
        .unwrap_or_else(|e| panic!("{bin}: bad address in {line:?}: {e}"));
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
    Peer {
        child,
        addr,
        _stdout: stdout,
    }
}

fn expect_x_then_eof(mut s: TcpStream, bin: &str) {
    s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got)
        .unwrap_or_else(|e| panic!("{bin}: read: {e}"));
    assert_eq!(got, b"x", "{bin}: expected exactly one byte x then EOF");
}

fn check(bin: &str, extra: &[&str]) {
    let mut peer = spawn(bin, extra);
    // 100 one after another.
    for _ in 0..100 {
        let s = TcpStream::connect(peer.addr).unwrap();
        expect_x_then_eof(s, bin);
    }
    // 100 opened at once (a burst the server drains in batches), then read.
    let burst: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(peer.addr).unwrap())
        .collect();
    for s in burst {
        expect_x_then_eof(s, bin);
    }
    assert!(
        peer.child.try_wait().unwrap().is_none(),
        "{bin} exited early"
    );
}

#[test]
fn peer_std_serves_x() {
    check(env!("CARGO_BIN_EXE_peer_std"), &[]);
}

#[test]
fn peer_epoll_serves_x() {
    check(env!("CARGO_BIN_EXE_peer_epoll"), &[]);
}

#[test]
fn peer_tokio_serves_x() {
    check(env!("CARGO_BIN_EXE_peer_tokio"), &[]);
}

#[test]
fn peer_tokio_spawn_serves_x() {
    check(env!("CARGO_BIN_EXE_peer_tokio"), &["--spawn"]);
}

#[test]
fn peer_uring_serves_x() {
    check(env!("CARGO_BIN_EXE_peer_uring"), &[]);
}

#[test]
fn peer_uring_levers_serve_x() {
    check(
        env!("CARGO_BIN_EXE_peer_uring"),
        &["--msg-more", "--adaptive-pause"],
    );
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Clients that reset at once make the server's SEND fail, which cancels the linked CLOSE: the
/// peer must close those fds itself.
fn check_no_fd_leak_on_reset(bin: &str, extra: &[&str]) {
    let peer = spawn(bin, extra);
    let pid = peer.child.id();
    expect_x_then_eof(TcpStream::connect(peer.addr).unwrap(), bin);
    let baseline = open_fds(pid);
    for _ in 0..300 {
        let s = TcpStream::connect(peer.addr).unwrap();
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s); // RST
    }
    // Two sequential connections: by the time the second one sees EOF, the server has drained
    // the completions of every earlier SEND (failed ones included) and closed their fds.
    for _ in 0..2 {
        expect_x_then_eof(TcpStream::connect(peer.addr).unwrap(), bin);
    }
    assert_eq!(open_fds(pid), baseline, "{bin} {extra:?} leaked fds");
}

#[test]
fn peer_uring_closes_fd_when_send_fails() {
    check_no_fd_leak_on_reset(env!("CARGO_BIN_EXE_peer_uring"), &[]);
    check_no_fd_leak_on_reset(
        env!("CARGO_BIN_EXE_peer_uring"),
        &["--msg-more", "--adaptive-pause"],
    );
}

#[test]
fn peer_floodgate_handler_serves_x() {
    check(
        env!("CARGO_BIN_EXE_peer_floodgate"),
        &["--mode", "handler", "--pin", "0"],
    );
}

#[test]
fn peer_floodgate_accept_serves_x() {
    check(
        env!("CARGO_BIN_EXE_peer_floodgate"),
        &["--mode", "accept", "--pin", "0"],
    );
}

#[test]
fn peer_floodgate_trivial_condition_serves_x() {
    check(
        env!("CARGO_BIN_EXE_peer_floodgate"),
        &["--mode", "handler", "--condition", "trivial"],
    );
}

#[test]
fn peers_refuse_non_loopback() {
    for bin in [
        env!("CARGO_BIN_EXE_peer_std"),
        env!("CARGO_BIN_EXE_peer_epoll"),
        env!("CARGO_BIN_EXE_peer_tokio"),
        env!("CARGO_BIN_EXE_peer_uring"),
        env!("CARGO_BIN_EXE_peer_floodgate"),
    ] {
        let out = Command::new(bin)
            .args(["--listen", "0.0.0.0:0"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bin} accepted 0.0.0.0");
        assert!(out.stdout.is_empty(), "{bin} printed to stdout");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--listen"), "{bin}: {err}");
    }
}

#[test]
fn peer_max_seconds_exits() {
    let mut peer = spawn(env!("CARGO_BIN_EXE_peer_uring"), &["--max-seconds", "1"]);
    // Blocks until the peer exits by itself.
    let status = peer.child.wait().unwrap();
    assert!(status.success(), "{status}");
}
