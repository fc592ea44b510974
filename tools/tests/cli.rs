//! The `flood` binary end to end: `flood run` against `flood serve` (both
//! child processes), `flood demo`, and refusal of bad input.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::Value;
use support::{flood, flood_code, serial, u, Server, FLOOD};

#[test]
fn run_against_serve_accounts_for_every_connection() {
    let _g = serial();
    let server = Server::start(&[]);
    let (ok, stdout, stderr) = flood(&[
        "run",
        "--target",
        &server.addr,
        "--connections",
        "2000",
        "--concurrency",
        "16",
        "--threads",
        "1",
        "--json",
    ]);
    let stats = server.stop();
    assert!(ok, "flood run failed: {stderr}");
    let report: Value = serde_json::from_str(stdout.trim()).expect("--json parses");
    assert_eq!(u(&report, "started"), 2000, "{report}");
    assert_eq!(u(&report, "ok"), 2000, "{report}");
    assert_eq!(u(&report, "errors"), 0, "{report}");
    assert!(report["conn_per_s"].as_f64().unwrap_or(0.0) > 0.0);
    assert!(report["first_byte_us"]["p99"].as_f64().unwrap_or(0.0) > 0.0);
    assert_eq!(u(&report["connect_us"], "count"), 2000);
    // Both sides count the same connections.
    assert_eq!(u(&stats, "accepted"), 2000, "{stats}");
    assert_eq!(u(&stats, "delivered"), 2000, "{stats}");
    assert_eq!(u(&stats, "served"), u(&report, "ok"), "{stats}");
    assert_eq!(u(&stats, "closed_at_shutdown") + u(&stats, "pending"), 0);
    assert_eq!(stats["conserved"], Value::Bool(true));
}

#[test]
fn rejected_sources_show_as_errors_by_kind_on_both_sides() {
    let _g = serial();
    let server = Server::start(&["--reject-cidr", "127.0.0.3/32"]);
    let (ok, stdout, stderr) = flood(&[
        "run",
        "--target",
        &server.addr,
        "--connections",
        "400",
        "--concurrency",
        "8",
        "--sources",
        "127.0.0.2-127.0.0.5",
    ]);
    let stats = server.stop();
    assert!(ok, "{stderr}");
    assert!(stdout.contains("ok 300"), "{stdout}");
    assert!(stdout.contains("short_read 100"), "{stdout}");
    assert_eq!(u(&stats, "rejected"), 100, "{stats}");
    assert_eq!(u(&stats, "served"), 300, "{stats}");
    assert_eq!(u(&stats, "accepted"), 400, "{stats}");
}

#[test]
fn demo_exits_zero_and_conservation_holds() {
    let _g = serial();
    let (ok, stdout, stderr) = flood(&["demo", "--duration", "1"]);
    assert!(ok, "flood demo failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("pending: ") && stdout.contains("-> holds"),
        "{stdout}"
    );
    assert!(stdout.contains("client ok"), "{stdout}");
}

#[test]
fn bad_input_is_refused_naming_the_flag() {
    let long_sni = "a".repeat(300);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["run", "--target", "nonsense"], "--target"),
        (vec!["run", "--target", "10.1.2.3:80"], "--target"),
        (
            vec!["run", "--target", "127.0.0.1:1", "--duration", "0s"],
            "--duration",
        ),
        (
            vec!["run", "--target", "127.0.0.1:1", "--rate", "0"],
            "--rate",
        ),
        (
            vec!["run", "--target", "127.0.0.1:1", "--concurrency", "0"],
            "--concurrency",
        ),
        (
            vec![
                "run",
                "--target",
                "127.0.0.1:1",
                "--sources",
                "10.0.0.1-10.0.0.5",
            ],
            "--sources",
        ),
        (
            vec!["run", "--target", "127.0.0.1:1", "--tls-hello", &long_sni],
            "--tls-hello",
        ),
        (
            vec![
                "run",
                "--target",
                "127.0.0.1:1",
                "--send",
                "x",
                "--proxy-v1",
            ],
            "--proxy-v1",
        ),
        (
            vec!["run", "--target", "127.0.0.1:1", "--pin", "9999"],
            "--pin",
        ),
        (
            vec![
                "run",
                "--target",
                "127.0.0.1:1",
                "--server-pid",
                "4294967295",
            ],
            "--server-pid",
        ),
        (vec!["run"], "--target"),
        (vec!["serve", "--listen", "192.168.1.1:80"], "--listen"),
        (
            vec![
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics",
                "192.168.1.1:9100",
            ],
            "--metrics",
        ),
        (
            vec!["serve", "--listen", "127.0.0.1:0", "--metrics", "localhost"],
            "--metrics",
        ),
        (
            vec![
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--reject-cidr",
                "1.2.3.4/99",
            ],
            "--reject-cidr",
        ),
        (vec!["demo", "--duration", "0"], "--duration"),
        (
            vec!["run", "--target", "127.0.0.1:1", "--send", ""],
            "--send",
        ),
        (
            vec!["run", "--target", "127.0.0.1:1", "--close", "maybe"],
            "--close",
        ),
    ];
    for (args, flag) in cases {
        let (ok, _, stderr) = flood(&args);
        assert!(!ok, "{args:?} was accepted");
        assert!(
            stderr.contains(flag),
            "{args:?}: message does not name {flag}: {stderr}"
        );
    }
}

#[test]
fn a_reader_that_goes_away_is_not_a_crash() {
    let _g = serial();
    let server = Server::start(&[]);
    let Server { mut child, out, .. } = server;
    // The reader closes the pipe after the LISTENING line (as `| head -1`
    // would); the final stats then meet a closed stdout.
    drop(out);
    drop(child.stdin.take());
    let status = child.wait().expect("wait flood serve");
    // A panic on the broken pipe would exit with 101.
    assert!(status.success(), "flood serve exited with {status}");
}

/// A loopback port that refuses connections: a socket bound to it but not
/// listening (kept for as long as the returned socket lives, so no other
/// process can take the port meanwhile).
fn closed_port() -> (socket2::Socket, String) {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().expect("address");
    s.bind(&any.into()).expect("bind");
    let addr = s
        .local_addr()
        .expect("local_addr")
        .as_socket()
        .expect("an inet address");
    (s, addr.to_string())
}

#[test]
fn compound_durations_are_accepted() {
    let _g = serial();
    let server = Server::spawn(
        &["--stats-interval", "1m30s", "--max-seconds", "120"],
        Stdio::inherit(),
    );
    // The run is bounded by its count; the durations are only parsed.
    let (ok, stdout, stderr) = flood(&[
        "run",
        "--target",
        &server.addr,
        "--connections",
        "50",
        "--concurrency",
        "4",
        "--threads",
        "1",
        "-d",
        "1m30s",
        "--connect-timeout",
        "1s500ms",
        "--io-timeout",
        "2.5s",
        "--warmup",
        "0s",
    ]);
    let stats = server.stop();
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("ok 50"), "{stdout}");
    assert_eq!(u(&stats, "served"), 50, "{stats}");
    for bad in ["1m30x", "1m30", "m", "1.2.3s", "25h", "24h1s", ""] {
        let (ok, _, stderr) = flood(&["run", "--target", "127.0.0.1:1", "-d", bad]);
        assert!(!ok, "-d {bad:?} was accepted");
        assert!(
            stderr.contains("--duration") && stderr.contains(&format!("'{bad}'")),
            "-d {bad:?}: the message names neither the flag nor the value: {stderr}"
        );
    }
}

#[test]
fn a_target_with_port_zero_or_no_address_is_refused_up_front() {
    let _g = serial();
    for target in ["127.0.0.1:0", "[::1]:0", "0.0.0.0:80", "[::]:80"] {
        // Bounded by a count should it be accepted.
        let (ok, stdout, stderr) = flood(&["run", "--target", target, "-n", "5", "-t", "1"]);
        assert!(!ok, "--target {target} was accepted: {stdout}");
        assert!(
            stderr.contains("--target") && stdout.is_empty(),
            "--target {target}: {stderr}"
        );
    }
}

#[test]
fn a_run_in_which_no_connection_succeeded_exits_3() {
    let _g = serial();
    let (_hold, closed) = closed_port();
    let (code, stdout, stderr) = flood_code(&["run", "--target", &closed, "-n", "20", "-t", "1"]);
    assert_eq!(code, Some(3), "{stdout}\n{stderr}");
    assert!(stdout.contains("connect_refused 20"), "{stdout}");
    assert!(stderr.contains("no connection succeeded"), "{stderr}");
    // The server closes every connection before its banner: all short reads.
    let server = Server::start(&["--reject-cidr", "127.0.0.0/8"]);
    let (code, stdout, stderr) =
        flood_code(&["run", "--target", &server.addr, "-n", "20", "-t", "1"]);
    let stats = server.stop();
    assert_eq!(code, Some(3), "{stdout}\n{stderr}");
    assert!(stdout.contains("short_read 20"), "{stdout}");
    assert_eq!(u(&stats, "rejected"), 20, "{stats}");
    let (_, help, _) = flood(&["run", "--help"]);
    assert!(help.contains("Exit status"), "{help}");
}

#[test]
fn without_successes_there_are_no_latency_or_per_connection_cpu_figures() {
    let _g = serial();
    let (_hold, closed) = closed_port();
    let run = ["run", "--target", &closed, "-n", "20", "-t", "1"];
    let (_, table, _) = flood_code(&run);
    let latency_rows: Vec<&str> = table
        .lines()
        .filter(|l| l.starts_with("connect ") || l.starts_with("first byte "))
        .collect();
    assert_eq!(latency_rows.len(), 2, "{table}");
    for row in latency_rows {
        assert!(
            !row.contains('0'),
            "a latency figure without samples: {table}"
        );
    }
    assert!(!table.contains("cpu µs/conn"), "{table}");
    let (_, json, _) = flood_code(&[&run[..], &["--json"]].concat());
    let report: Value = serde_json::from_str(json.trim()).expect("--json parses");
    assert_eq!(u(&report, "ok"), 0, "{report}");
    assert_eq!(report["connect_us"], Value::Null, "{report}");
    assert_eq!(report["first_byte_us"], Value::Null, "{report}");
    assert_eq!(report["cpu"]["flood_us_per_conn"], Value::Null, "{report}");
    // With successes but nothing expected back, only the first byte is absent.
    let server = Server::start(&[]);
    let (ok, json, stderr) = flood(&[
        "run",
        "--target",
        &server.addr,
        "-n",
        "20",
        "-t",
        "1",
        "--expect",
        "0",
        "--json",
    ]);
    server.stop();
    assert!(ok, "{stderr}");
    let report: Value = serde_json::from_str(json.trim()).expect("--json parses");
    assert_eq!(u(&report["connect_us"], "count"), 20, "{report}");
    assert_eq!(report["first_byte_us"], Value::Null, "{report}");
    assert!(report["cpu"]["flood_us_per_conn"].is_f64(), "{report}");
}

#[test]
fn an_early_eof_under_expect_is_a_short_read_as_the_help_says() {
    let _g = serial();
    let (_, help, _) = flood(&["run", "--help"]);
    assert!(!help.contains("(or EOF)"), "{help}");
    let expect_help = help
        .split("--expect")
        .nth(1)
        .unwrap_or_else(|| panic!("no --expect in {help}"));
    assert!(expect_help.contains("short_read"), "{help}");
    // A 1-byte banner and then the close, where 4 bytes are expected.
    let server = Server::start(&["--banner", "x"]);
    let (code, stdout, stderr) = flood_code(&[
        "run",
        "--target",
        &server.addr,
        "-n",
        "10",
        "-t",
        "1",
        "--expect",
        "4",
    ]);
    let stats = server.stop();
    assert!(stdout.contains("short_read 10"), "{stdout}\n{stderr}");
    assert_eq!(code, Some(3), "{stdout}\n{stderr}");
    assert_eq!(u(&stats, "served"), 10, "{stats}");
}

#[test]
fn negative_numbers_are_refused_naming_the_flag() {
    let run = ["run", "--target", "127.0.0.1:1"];
    let serve = ["serve", "--listen", "127.0.0.1:0"];
    let demo = ["demo"];
    let cases: &[(&[&str], &str, &str)] = &[
        (&run, "--concurrency", "-5"),
        (&run, "-c", "-5"),
        (&run, "--rate", "-5"),
        (&run, "--max-in-flight", "-5"),
        (&run, "--duration", "-5s"),
        (&run, "-d", "-5"),
        (&run, "--connections", "-5"),
        (&run, "-n", "-5"),
        (&run, "--warmup", "-1s"),
        (&run, "--expect", "-1"),
        (&run, "--threads", "-2"),
        (&run, "-t", "-2"),
        (&run, "--pin", "-1"),
        (&run, "--server-pid", "-1"),
        (&run, "--connect-timeout", "-1s"),
        (&run, "--io-timeout", "-1s"),
        (&serve, "--shards", "-1"),
        (&serve, "--backlog", "-1"),
        (&serve, "--peek", "-1"),
        (&serve, "--stats-interval", "-1s"),
        (&serve, "--max-seconds", "-1"),
        (&demo, "--duration", "-1"),
        (&demo, "--concurrency", "-5"),
    ];
    for (cmd, flag, value) in cases {
        let args = [*cmd, &[*flag, *value]].concat();
        let (code, _, stderr) = flood_code(&args);
        assert_eq!(code, Some(2), "{args:?} was not refused: {stderr}");
        let long = match *flag {
            "-c" => "--concurrency",
            "-d" => "--duration",
            "-n" => "--connections",
            "-t" => "--threads",
            f => f,
        };
        assert!(
            stderr.contains(long) && stderr.contains(value) && !stderr.contains("unexpected"),
            "{args:?}: the message does not name {long} and {value}: {stderr}"
        );
    }
    let (_, _, stderr) = flood_code(&[&run[..], &["--concurrency", "-5"]].concat());
    assert!(
        stderr.contains("must be a positive integer"),
        "--concurrency -5: {stderr}"
    );
}

#[test]
fn huge_durations_do_not_overflow_the_clock() {
    let _g = serial();
    // u64::MAX seconds cannot be added to the clock: it runs until told.
    let server = Server::spawn(
        &[
            "--max-seconds",
            "18446744073709551615",
            "--stats-interval",
            "24h",
        ],
        Stdio::inherit(),
    );
    let (ok, stdout, stderr) = flood(&[
        "run",
        "--target",
        &server.addr,
        "-n",
        "20",
        "-t",
        "1",
        "-d",
        "24h",
        "--connect-timeout",
        "24h",
        "--io-timeout",
        "24h",
    ]);
    // stop() asserts the exit status: a panic would be 101.
    let stats = server.stop();
    assert!(ok, "{stdout}\n{stderr}");
    assert_eq!(u(&stats, "served"), 20, "{stats}");
    let (code, _, stderr) = flood_code(&["run", "--target", "127.0.0.1:1", "-d", "25h"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--duration"), "{stderr}");
}

/// Reads `flood serve`'s stats lines (stderr) until one satisfies `done`,
/// and returns it; then keeps reading them in a thread until serve exits
/// (so that no stats line meets a closed pipe).
fn wait_for_stats_line(server: &mut Server, done: impl Fn(&str) -> bool) -> String {
    let mut err = BufReader::new(server.child.stderr.take().expect("stderr piped"));
    let mut last = String::new();
    loop {
        let mut line = String::new();
        let n = err.read_line(&mut line).expect("read serve's stderr");
        assert!(n > 0, "serve ended first; its last stats line: {last}");
        if done(&line) {
            std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
            return line;
        }
        last = line;
    }
}

/// Connections that close without sending a byte, to a server that waits
/// for one: each is withdrawn (the peer went away while pending).
fn silent_clients(addr: &str, n: &str) {
    let (ok, stdout, stderr) = flood(&[
        "run", "--target", addr, "-n", n, "-c", "4", "-t", "1", "--expect", "0", "--close", "fin",
    ]);
    assert!(ok, "{stdout}\n{stderr}");
}

#[test]
fn withdrawn_connections_are_reported_apart_from_rejected() {
    let _g = serial();
    let mut server = Server::spawn(
        &[
            "--reject-cidr",
            "127.0.0.3/32",
            "--peek",
            "1",
            "--stats-interval",
            "10ms",
            "--max-seconds",
            "30",
        ],
        Stdio::piped(),
    );
    // Clients that send a byte and wait for the answer: half rejected.
    let (code, stdout, stderr) = flood_code(&[
        "run",
        "--target",
        &server.addr,
        "-n",
        "20",
        "-c",
        "4",
        "-t",
        "1",
        "--send",
        "p",
        "--close",
        "fin",
        "--sources",
        "127.0.0.2-127.0.0.3",
    ]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("ok 10") && stdout.contains("short_read 10"),
        "{stdout}"
    );
    silent_clients(&server.addr, "20");
    let line = wait_for_stats_line(&mut server, |l| {
        l.contains("accepted 40") && l.contains("withdrawn 20")
    });
    assert!(line.contains("rejected 10"), "{line}");
    let stats = server.stop();
    assert_eq!(u(&stats, "accepted"), 40, "{stats}");
    assert_eq!(u(&stats, "delivered"), 10, "{stats}");
    assert_eq!(u(&stats, "rejected"), 10, "{stats}");
    assert_eq!(u(&stats, "withdrawn"), 20, "{stats}");
    assert_eq!(stats["conserved"], Value::Bool(true), "{stats}");
}

#[test]
fn peek_without_reject_cidr_waits_for_the_first_bytes() {
    let _g = serial();
    let mut server = Server::spawn(
        &[
            "--peek",
            "1",
            "--stats-interval",
            "10ms",
            "--max-seconds",
            "30",
        ],
        Stdio::piped(),
    );
    silent_clients(&server.addr, "20");
    // Either they are withdrawn (the server waited for a byte) or they were
    // delivered at once (it did not).
    let line = wait_for_stats_line(&mut server, |l| {
        l.contains("accepted 20") && (l.contains("withdrawn 20") || l.contains("delivered 20"))
    });
    assert!(line.contains("delivered 0"), "{line}");
    let stats = server.stop();
    assert_eq!(u(&stats, "withdrawn"), 20, "{stats}");
    assert_eq!(u(&stats, "served"), 0, "{stats}");
}

#[test]
fn a_closed_stderr_is_not_a_crash() {
    let _g = serial();
    let mut child = Command::new(FLOOD)
        .args(["serve", "--listen", "127.0.0.1:0", "--shards", "1"])
        .args(["--stats-interval", "1ms", "--max-seconds", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn flood serve");
    // The stats lines then meet a pipe nobody reads.
    drop(child.stderr.take());
    let status = child.wait().expect("wait flood serve");
    assert!(status.success(), "flood serve exited with {status}");
}

/// Installs, in a child about to exec, a seccomp filter that makes the
/// three io_uring calls fail with `errno`, as container default profiles do.
fn deny_io_uring_in_child(cmd: &mut Command, errno: u32) {
    use std::os::unix::process::CommandExt;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    let ld = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    let jeq = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    let ret = (libc::BPF_RET | libc::BPF_K) as u16;
    let f = |code: u16, jt: u8, k: u32| libc::sock_filter { code, jt, jf: 0, k };
    let code = [
        f(ld, 0, 0),
        f(jeq, 3, libc::SYS_io_uring_setup as u32),
        f(jeq, 2, libc::SYS_io_uring_enter as u32),
        f(jeq, 1, libc::SYS_io_uring_register as u32),
        f(ret, 0, SECCOMP_RET_ALLOW),
        f(ret, 0, SECCOMP_RET_ERRNO | errno),
    ];
    // SAFETY: the closure runs in the forked child before exec and makes
    // only two prctl syscalls (async-signal-safe) on data it owns.
    unsafe {
        cmd.pre_exec(move || {
            let mut code = code;
            let prog = libc::sock_fprog {
                len: code.len() as u16,
                filter: code.as_mut_ptr(),
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &prog as *const _,
                    0,
                    0,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn demo_completes_on_epoll_under_container_seccomp_profiles() {
    for (errno, cause) in [
        (libc::EPERM as u32, "EPERM"),
        (libc::ENOSYS as u32, "ENOSYS"),
    ] {
        let mut cmd = Command::new(FLOOD);
        cmd.args(["demo", "--duration", "500ms"]);
        deny_io_uring_in_child(&mut cmd, errno);
        let out = cmd.output().expect("run flood demo");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = text
            .lines()
            .find(|l| l.contains("backend:"))
            .unwrap_or_else(|| panic!("no backend line: {text}"));
        assert!(
            line.contains("engine epoll") && line.contains(cause),
            "{line}"
        );
        assert!(text.contains("-> holds"), "conservation: {text}");
    }
}
