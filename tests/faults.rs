//! Faults: fd exhaustion makes the engine back off and recover; a kernel
//! that refuses io_uring gets an error that names the cause.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};

use floodgate::{Error, Listener, UringUnavailable};
use floodgate_tests::{banner_listener, connect, serial};

const PROBE: &str = env!("CARGO_BIN_EXE_floodgate-probe");

#[test]
fn fd_exhaustion_backs_off_and_recovers_losing_nothing() {
    let _g = serial();
    const CLIENTS: u64 = 10;
    let mut child = Command::new(PROBE)
        .arg("emfile")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn probe");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let port: u16 = line
        .trim()
        .strip_prefix("PORT ")
        .expect("PORT line")
        .parse()
        .unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let clients: Vec<TcpStream> = (0..CLIENTS).map(|_| connect(addr).unwrap()).collect();
    writeln!(child.stdin.as_mut().unwrap(), "GO {CLIENTS}").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "probe failed: {line}");
    assert!(line.starts_with("DONE"), "{line}");
    let field = |k: &str| -> String {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")).map(str::to_string))
            .unwrap_or_default()
    };
    assert_eq!(field("accepted"), CLIENTS.to_string(), "{line}");
    assert_eq!(field("delivered"), CLIENTS.to_string(), "{line}");
    assert!(field("emfile").parse::<u64>().unwrap() >= 1, "{line}");
    let during: u64 = field("accepted_during_exhaustion").parse().unwrap();
    assert!(
        (3..CLIENTS).contains(&during),
        "the shard stopped at the fd limit: {line}"
    );
    assert_eq!(field("conserved"), "true", "{line}");
    drop(clients);
}

/// Runs the seccomp probe with `errno` and returns its output.
fn under_seccomp(errno: i32) -> String {
    // Auto's own choice is under test: no operator override.
    let out = Command::new(PROBE)
        .args(["seccomp", &errno.to_string()])
        .env_remove(floodgate::BACKEND_ENV)
        .output()
        .expect("spawn probe");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn auto_served_on_epoll(text: &str, cause: &str) {
    let auto = text
        .lines()
        .find(|l| l.starts_with("AUTO "))
        .unwrap_or_else(|| panic!("no AUTO line: {text}"));
    assert!(auto.contains("backend=epoll"), "{auto}");
    assert!(auto.contains(cause), "the reason names the cause: {auto}");
    assert!(
        auto.contains("accepted=10000 delivered=10000 conserved=true"),
        "{auto}"
    );
}

#[test]
fn under_dockers_seccomp_profile_strict_io_uring_is_named_and_auto_serves_on_epoll() {
    let _g = serial();
    let text = under_seccomp(libc::EPERM);
    assert!(
        text.contains("STRICT ") && text.contains("seccomp"),
        "{text}"
    );
    auto_served_on_epoll(&text, "EPERM");
}

#[test]
fn under_podmans_seccomp_profile_strict_io_uring_is_named_and_auto_serves_on_epoll() {
    let _g = serial();
    let text = under_seccomp(libc::ENOSYS);
    assert!(
        text.contains("STRICT ") && text.contains("ENOSYS"),
        "{text}"
    );
    auto_served_on_epoll(&text, "ENOSYS");
}

/// Restores `kernel.io_uring_disabled` when dropped.
struct SysctlGuard(String);

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/io_uring_disabled", &self.0);
    }
}

/// Set to 1 to run the test that flips the host-wide
/// `kernel.io_uring_disabled` (root only; `.ci/run` sets it).
const SYSCTL_ENV: &str = "FLOODGATE_TEST_SYSCTL";

#[test]
fn io_uring_disabled_by_sysctl_is_named_and_auto_falls_back() {
    let _g = serial();
    if std::env::var(SYSCTL_ENV).as_deref() != Ok("1") {
        eprintln!("skipped: changes a host-wide sysctl; set {SYSCTL_ENV}=1 to run it");
        return;
    }
    if std::env::var_os(floodgate::BACKEND_ENV).is_some() {
        eprintln!(
            "skipped: {} overrides Auto's choice, which this test checks",
            floodgate::BACKEND_ENV
        );
        return;
    }
    const PATH: &str = "/proc/sys/kernel/io_uring_disabled";
    let Ok(before) = std::fs::read_to_string(PATH) else {
        eprintln!("skipped: {PATH} does not exist (kernel < 6.6)");
        return;
    };
    let guard = SysctlGuard(before);
    if std::fs::write(PATH, "2").is_err() {
        eprintln!("skipped: {PATH} is not writable (not root)");
        return;
    }
    let strict = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .backend(floodgate::Backend::IoUring)
        .build();
    let auto = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .build();
    drop(guard);
    match strict {
        Err(
            e @ Error::UringUnavailable {
                cause: UringUnavailable::DisabledBySysctl,
                ..
            },
        ) => {
            assert!(e.to_string().contains("io_uring_disabled"), "{e}");
        }
        other => panic!("expected io_uring disabled by sysctl, got {other:?}"),
    }
    let auto = auto.expect("Auto falls back to epoll");
    let b = auto.backend();
    assert_eq!(b.backend, floodgate::Backend::Epoll, "{b}");
    assert!(b.reason.contains("io_uring_disabled"), "{b}");
    let mut c = connect(auto.local_addr()).unwrap();
    let mut conn = auto.accept().unwrap();
    conn.write_all(b"x").unwrap();
    let mut b1 = [0u8; 1];
    c.read_exact(&mut b1).unwrap();
    drop(auto);
    // And io_uring works again once re-enabled.
    Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .backend(floodgate::Backend::IoUring)
        .build()
        .expect("io_uring back");
}

#[test]
fn a_load_out_of_descriptors_counts_them_and_backs_off() {
    let _g = serial();
    let listener = banner_listener();
    let port = listener.local_addr().port().to_string();
    let (line, field) = connect_emfile_probe(&port, 2, 300);
    // Every sequence is accounted for; with room for two sockets, some get
    // through and the rest fail as `exhausted`, and the shard held back
    // rather than failing them at full speed.
    assert_eq!(field("total"), 300, "{line}");
    assert!(field("ok") >= 1, "{line}");
    assert!(field("exhausted") >= 1, "{line}");
    assert_eq!(field("ok") + field("exhausted"), 300, "{line}");
    assert!(field("backoffs") >= 1, "{line}");
    assert!(line.contains("conserved=true"), "{line}");
    assert_eq!(field("open"), 0, "{line}");
    listener.shutdown();
}

/// Runs the `connect-emfile` probe; returns its line and a field reader.
fn connect_emfile_probe(port: &str, spare: u64, total: u64) -> (String, impl Fn(&str) -> u64) {
    let out = Command::new(PROBE)
        .args([
            "connect-emfile",
            port,
            &spare.to_string(),
            &total.to_string(),
        ])
        .output()
        .expect("run probe");
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "probe failed: {line} {err}");
    let text = line.clone();
    let field = move |k: &str| -> u64 {
        text.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {text}"))
    };
    (line, field)
}

#[test]
fn a_load_with_no_descriptor_left_pauses_instead_of_spinning() {
    let _g = serial();
    let listener = banner_listener();
    let port = listener.local_addr().port().to_string();
    let (line, field) = connect_emfile_probe(&port, 0, 40);
    assert_eq!((field("total"), field("exhausted")), (40, 40), "{line}");
    assert_eq!(field("backoffs"), 40, "{line}");
    // After the first 20 (all started at once) nothing is in flight, so
    // each failure is followed by a pause: 1, 2, 4 … 64, then 100 ms. Their
    // sum is a lower bound of the run's length, whatever the machine.
    assert!(field("elapsed_ms") >= 1_000, "{line}");
    assert!(line.contains("conserved=true"), "{line}");
    assert_eq!(field("open"), 0, "{line}");
    listener.shutdown();
}
