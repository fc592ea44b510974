//! Tracing events (feature `tracing`), seen by a subscriber that captures
//! them: in a child process (`floodgate-probe` with
//! `FLOODGATE_PROBE_EVENTS=1`) for faults that must be the process's own,
//! in this one for the others.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use floodgate::Listener;
use floodgate_tests::{
    capture, connect, ended_by_server, reset_on_drop, serial, wait_for, FdTable,
};

const PROBE: &str = env!("CARGO_BIN_EXE_floodgate-probe");

/// `key=value` of a `DONE` or `EVENT` line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn hitting_the_fd_limit_emits_one_backoff_event_per_backoff() {
    let _g = serial();
    const CLIENTS: u64 = 10;
    let mut child = Command::new(PROBE)
        .arg("emfile")
        .env("FLOODGATE_PROBE_EVENTS", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn probe");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("PORT line");
    let port: u16 = line
        .trim()
        .strip_prefix("PORT ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("not a PORT line: {line:?}"));
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let clients: Vec<TcpStream> = (0..CLIENTS).map(|_| connect(addr).unwrap()).collect();
    writeln!(child.stdin.as_mut().expect("stdin"), "GO {CLIENTS}").expect("GO");
    let mut rest = String::new();
    out.read_to_string(&mut rest).expect("the probe's report");
    let status = child.wait().expect("wait probe");
    assert!(status.success(), "probe failed: {rest}");
    drop(clients);

    let done = rest
        .lines()
        .find(|l| l.starts_with("DONE"))
        .unwrap_or_else(|| panic!("no DONE line: {rest}"));
    let emfile: u64 = field(done, "emfile")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(emfile >= 1, "{done}");
    let backoffs: Vec<&str> = rest
        .lines()
        .filter(|l| l.starts_with("EVENT ") && l.contains("backing off"))
        .collect();
    assert_eq!(
        backoffs.len() as u64,
        emfile,
        "one event per counted backoff:\n{rest}"
    );
    let first = backoffs[0];
    assert_eq!(field(first, "level"), Some("WARN"), "{first}");
    assert_eq!(field(first, "target"), Some("floodgate"), "{first}");
    assert_eq!(field(first, "shard"), Some("0"), "{first}");
    assert_eq!(
        field(first, "errno"),
        Some(libc::EMFILE.to_string().as_str()),
        "{first}"
    );
    // The first backoff of a run is the shortest step, 1 ms.
    assert_eq!(field(first, "backoff_ms"), Some("1"), "{first}");
    assert!(first.contains("Too many open files"), "{first}");
    // Nothing per connection: the events are the backoffs (and the
    // backend's, at build, when an operator forces epoll).
    let others: Vec<&str> = rest
        .lines()
        .filter(|l| l.starts_with("EVENT ") && !l.contains("backing off"))
        .filter(|l| !l.contains("run on epoll"))
        .collect();
    assert!(others.is_empty(), "unexpected events: {others:?}");
}

#[test]
fn auto_falling_back_to_epoll_emits_the_reason() {
    let _g = serial();
    // Auto's own choice is under test: no operator override.
    let out = Command::new(PROBE)
        .args(["seccomp", &libc::EPERM.to_string()])
        .env("FLOODGATE_PROBE_EVENTS", "1")
        .env_remove(floodgate::BACKEND_ENV)
        .output()
        .expect("spawn probe");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    let fallbacks: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("EVENT ") && l.contains("run on epoll"))
        .collect();
    // The strict io_uring build fails (no event); Auto's build falls back.
    assert_eq!(fallbacks.len(), 1, "{text}");
    let e = fallbacks[0];
    assert_eq!(field(e, "level"), Some("WARN"), "{e}");
    assert_eq!(field(e, "what"), Some("\"listener\""), "{e}");
    assert!(e.contains("EPERM"), "the reason names the cause: {e}");
}

/// The events of this process: one subscriber for the whole test binary.
fn captured() -> &'static capture::Events {
    static EVENTS: OnceLock<capture::Events> = OnceLock::new();
    EVENTS.get_or_init(capture::install)
}

/// How many captured events (taken so far into `seen`) contain `what`.
fn count(seen: &mut Vec<String>, what: &str) -> u64 {
    seen.extend(capture::take(captured()));
    seen.iter().filter(|l| l.contains(what)).count() as u64
}

#[test]
fn a_full_ring_pause_and_its_resume_emit_one_event_each() {
    let _g = serial();
    let baseline = FdTable::now();
    {
        let _ = capture::take(captured());
        const RING: usize = 4;
        // The ring (4) and the kernel's accept queue (backlog + 1 = 5) hold
        // them all: no SYN is dropped.
        const CLIENTS: usize = 8;
        let listener = Listener::builder("127.0.0.1:0".parse().unwrap())
            .shards(1)
            .pin(false)
            .backlog(RING)
            .build()
            .expect("listener");
        let addr = listener.local_addr();
        let clients: Vec<TcpStream> = (0..CLIENTS).map(|_| connect(addr).unwrap()).collect();
        wait_for("the ring full and accepting paused", || {
            listener.stats().shards[0].ring_full_pauses >= 1
        });
        for _ in 0..CLIENTS {
            drop(listener.accept().expect("accept"));
        }
        wait_for("accepting resumed", || {
            listener.stats().shards[0].resumes >= 1
        });
        let mut seen = Vec::new();
        wait_for("one event per pause and per resume", || {
            let s = &listener.stats().shards[0];
            count(&mut seen, "accepting paused") == s.ring_full_pauses
                && count(&mut seen, "accepting resumed") == s.resumes
        });
        let pause = seen
            .iter()
            .find(|l| l.contains("accepting paused"))
            .expect("a pause event");
        assert_eq!(field(pause, "level"), Some("DEBUG"), "{pause}");
        assert_eq!(field(pause, "shard"), Some("0"), "{pause}");
        for c in &clients {
            reset_on_drop(c);
        }
        drop(clients);
        listener.shutdown();
    }
    baseline.assert_back("descriptors leaked");
}

#[test]
fn a_panicking_handler_emits_an_error_event_per_panic() {
    let _g = serial();
    let baseline = FdTable::now();
    {
        let _ = capture::take(captured());
        let listener = Listener::builder("127.0.0.1:0".parse().unwrap())
            .shards(1)
            .pin(false)
            .handler(|_conn, _ctx| panic!("a handler bug"))
            .build()
            .expect("listener");
        for _ in 0..3 {
            let mut c = connect(listener.local_addr()).expect("connect");
            assert!(ended_by_server(&mut c));
            reset_on_drop(&c);
        }
        wait_for("three panics", || {
            listener.stats().total().handler_panics == 3
        });
        let mut seen = Vec::new();
        wait_for("one event per panic", || {
            count(&mut seen, "inline handler panicked") == 3
        });
        let e = seen
            .iter()
            .find(|l| l.contains("inline handler panicked"))
            .expect("a panic event");
        assert_eq!(field(e, "level"), Some("ERROR"), "{e}");
        assert_eq!(field(e, "target"), Some("floodgate"), "{e}");
        listener.shutdown();
    }
    baseline.assert_back("descriptors leaked");
}
