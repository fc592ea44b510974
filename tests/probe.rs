//! `floodgate-probe`: runs the engine in a child process under a fault the
//! test process must not suffer itself. Used by `tests/faults.rs`.
//!
//! - `emfile`: lowers RLIMIT_NOFILE so the shard runs out of descriptors,
//!   and reports how the engine backed off and recovered.
//! - `seccomp ERRNO`: installs a seccomp filter that makes the three
//!   io_uring calls fail with ERRNO (1, EPERM, as Docker's and containerd's
//!   default profiles do; 38, ENOSYS, as Podman's), checks that a strict
//!   io_uring listener names the error and that `Auto` serves on epoll.
//! - `seccomp-exec ERRNO CMD ARGS..`: runs CMD under that filter.
//! - `serve SHARDS [PORT]`: a listener of SHARDS shards (CPU steering) on
//!   127.0.0.1:PORT (default 0); prints `PORT <port> BACKEND <backend>` and
//!   serves until killed (the crash-restart test SIGKILLs it).
//! - `systemd NAME SHARDS`: started as systemd starts a socket-activated
//!   service (sockets at fd 3.., LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES);
//!   builds a listener with `Listener::from_systemd`, prints `OK addr=..
//!   shards=.. unset=.. cloexec=..` (or `REFUSED <field>`), serves until its
//!   stdin closes.
//! - `connect-emfile PORT SPARE TOTAL`: runs TOTAL sequences against PORT
//!   with RLIMIT_NOFILE lowered so that only SPARE sockets fit, and reports
//!   how the connector classified the failures and backed off.
//!
//! With the `tracing` feature and `FLOODGATE_PROBE_EVENTS=1`, the probe
//! also captures the engine's tracing events and prints each, at the end,
//! as a line `EVENT level=.. target=.. field=value ...` (used by
//! `tests/events.rs`).

use std::io::{BufRead, Write};
use std::time::Duration;

use floodgate::{Error, Listener};

fn main() {
    #[cfg(feature = "tracing")]
    let events = (std::env::var("FLOODGATE_PROBE_EVENTS").as_deref() == Ok("1"))
        .then(floodgate_tests::capture::install);
    let mode = std::env::args().nth(1).unwrap_or_default();
    let code = match mode.as_str() {
        "emfile" => emfile(),
        "seccomp" => seccomp(),
        "seccomp-exec" => seccomp_exec(),
        "connect-emfile" => connect_emfile(),
        "serve" => serve(),
        "systemd" => systemd(),
        _ => {
            eprintln!("usage: floodgate-probe emfile|seccomp|connect-emfile PORT");
            2
        }
    };
    #[cfg(feature = "tracing")]
    for line in events.iter().flat_map(floodgate_tests::capture::take) {
        println!("EVENT {line}");
    }
    std::process::exit(code);
}

/// Number of open descriptors of this process, the listing's own included.
/// A count on purpose, not a leak check (those compare `FdTable`s): it sizes
/// RLIMIT_NOFILE for `emfile` in this fresh process, which holds no other
/// test's descriptors and whose descriptors are numbered 0..count, so the
/// count is how many numbers below the limit are taken.
fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

/// Protocol on stdio: prints `PORT <port>`; reads a line `GO <n>` once the
/// parent has connected n clients; prints `DONE accepted=.. emfile=..`.
fn emfile() -> i32 {
    // io_uring reads RLIMIT_NOFILE when an accept is prepared, and a
    // multishot accept is prepared once: lower the limit before the engine
    // arms it. A one-shard listener opens 4 descriptors (ring, wake-up and
    // accept eventfds, listening socket); leave room for about 3 more.
    let limit = open_fds() + 4 + 3;
    if let Err(e) = set_nofile(limit) {
        eprintln!("setrlimit: {e}");
        return 1;
    }
    let listener = match Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .build()
    {
        Ok(l) => l,
        Err(e) => {
            eprintln!("build: {e}");
            return 1;
        }
    };
    // What is really left (counting opens one descriptor for a moment).
    let room = limit.saturating_sub(open_fds()).max(1);
    println!("PORT {}", listener.local_addr().port());
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line).is_err() {
        return 1;
    }
    let n: u64 = line
        .trim()
        .strip_prefix("GO ")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // Hold what the engine can take: the fd table fills up.
    let mut held = Vec::new();
    while (held.len() as u64) < room {
        match listener.accept_timeout(Duration::from_secs(60)) {
            Ok(Some(c)) => held.push(c),
            other => {
                eprintln!("accept while filling: {other:?}");
                return 1;
            }
        }
    }
    // The shard hits EMFILE and backs off (not spin, not lose).
    let give_up = std::time::Instant::now() + Duration::from_secs(60);
    while listener.stats().total().backoff.emfile == 0 {
        if std::time::Instant::now() > give_up {
            eprintln!("no EMFILE backoff seen: {:?}", listener.stats().total());
            return 1;
        }
        std::thread::park_timeout(Duration::from_millis(1));
    }
    let during = listener.stats().total();
    // Free the descriptors: the shard resumes and delivers the rest.
    let mut got = held.len() as u64;
    drop(held);
    while got < n {
        match listener.accept_timeout(Duration::from_secs(60)) {
            Ok(Some(c)) => {
                drop(c);
                got += 1;
            }
            other => {
                eprintln!("accept after release: {other:?}");
                return 1;
            }
        }
    }
    listener.shutdown();
    let t = listener.stats().total();
    println!(
        "DONE accepted={} delivered={} emfile={} accepted_during_exhaustion={} conserved={}",
        t.accepted,
        t.delivered,
        t.backoff.emfile,
        during.accepted,
        listener.stats().conserved()
    );
    0
}

/// Installs a seccomp filter on this process that makes `io_uring_setup`,
/// `io_uring_enter` and `io_uring_register` fail with `errno`, as Docker's
/// and containerd's default profiles do (EPERM) and Podman's (ENOSYS).
fn deny_io_uring(errno: u32) -> Result<(), String> {
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    let ld = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    let jeq = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    let ret = (libc::BPF_RET | libc::BPF_K) as u16;
    let stmt = |code: u16, k: u32| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let is = |nr: libc::c_long, jt: u8| libc::sock_filter {
        code: jeq,
        jt,
        jf: 0,
        k: nr as u32,
    };
    let mut code = [
        // A = seccomp_data.nr
        stmt(ld, 0),
        is(libc::SYS_io_uring_setup, 3),
        is(libc::SYS_io_uring_enter, 2),
        is(libc::SYS_io_uring_register, 1),
        stmt(ret, SECCOMP_RET_ALLOW),
        stmt(ret, SECCOMP_RET_ERRNO | errno),
    ];
    let prog = libc::sock_fprog {
        len: code.len() as u16,
        filter: code.as_mut_ptr(),
    };
    // SAFETY: prctl with integer arguments; PR_SET_NO_NEW_PRIVS is required
    // for an unprivileged filter and harmless here.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(format!(
            "prctl(NO_NEW_PRIVS): {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `prog` and `code` outlive the call; the kernel copies the
    // filter. It applies to this process (a child of the test) and what it
    // executes.
    if unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &prog as *const _,
            0,
            0,
        )
    } != 0
    {
        return Err(format!(
            "prctl(SECCOMP): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// `seccomp ERRNO`: under the filter, a strict io_uring listener must fail
/// with the named error; `Auto` must build on epoll, say why, and serve
/// 10,000 connections with conservation holding. Prints
/// `STRICT <error>` then `AUTO backend=.. reason=<..> accepted=.. delivered=.. conserved=..`.
fn seccomp() -> i32 {
    let errno: u32 = std::env::args()
        .nth(2)
        .and_then(|e| e.parse().ok())
        .unwrap_or(libc::EPERM as u32);
    if let Err(e) = deny_io_uring(errno) {
        eprintln!("{e}");
        return 1;
    }
    match Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .backend(floodgate::Backend::IoUring)
        .build()
    {
        Err(e @ Error::UringUnavailable { .. }) => println!("STRICT {e}"),
        Err(e) => {
            println!("UNEXPECTED {e}");
            return 1;
        }
        Ok(_) => {
            println!("UNEXPECTED built a strict io_uring listener");
            return 1;
        }
    }
    const N: u64 = 10_000;
    let l = match Listener::builder("127.0.0.1:0".parse().unwrap())
        .pin(false)
        .build()
    {
        Ok(l) => std::sync::Arc::new(l),
        Err(e) => {
            println!("UNEXPECTED auto failed: {e}");
            return 1;
        }
    };
    let addr = l.local_addr();
    let clients: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                for _ in 0..N / 2 {
                    if let Ok(mut s) = std::net::TcpStream::connect(addr) {
                        let mut b = [0u8; 1];
                        let _ = std::io::Read::read(&mut s, &mut b);
                    }
                }
            })
        })
        .collect();
    let mut delivered = 0u64;
    while delivered < N {
        match l.accept() {
            Ok(mut c) => {
                let _ = c.write_all(b"x");
                delivered += 1;
            }
            Err(e) => {
                println!("UNEXPECTED accept: {e}");
                return 1;
            }
        }
    }
    for c in clients {
        let _ = c.join();
    }
    l.shutdown();
    let t = l.stats().total();
    let b = l.backend();
    println!(
        "AUTO backend={} reason=<{}> accepted={} delivered={} conserved={}",
        b.backend,
        b.reason,
        t.accepted,
        t.delivered,
        l.stats().conserved()
    );
    0
}

/// `seccomp-exec ERRNO CMD ARGS..`: runs a command under the filter.
fn seccomp_exec() -> i32 {
    use std::os::unix::process::CommandExt;
    let args: Vec<String> = std::env::args().skip(2).collect();
    let (Some(errno), Some(cmd)) = (args.first().and_then(|e| e.parse().ok()), args.get(1)) else {
        eprintln!("usage: floodgate-probe seccomp-exec ERRNO CMD [ARGS..]");
        return 2;
    };
    if let Err(e) = deny_io_uring(errno) {
        eprintln!("{e}");
        return 1;
    }
    let e = std::process::Command::new(cmd).args(&args[2..]).exec();
    eprintln!("exec {cmd}: {e}");
    1
}

/// Prints `DONE total=.. ok=.. exhausted=.. backoffs=.. conserved=..
/// open=.. elapsed_ms=..` after a count-bounded load run with room for
/// SPARE sockets.
fn connect_emfile() -> i32 {
    use floodgate::{CloseMode, Connector, SequenceOutcome, SequencePlan};
    let arg = |k: usize| std::env::args().nth(k).and_then(|p| p.parse::<u64>().ok());
    let (Some(port), Some(spare), Some(total)) = (arg(2), arg(3), arg(4)) else {
        eprintln!("connect-emfile needs PORT SPARE TOTAL");
        return 2;
    };
    let Ok(port) = u16::try_from(port) else {
        eprintln!("connect-emfile: bad port");
        return 2;
    };
    // A source address makes the shard use plain descriptors (direct ones
    // are not counted against RLIMIT_NOFILE).
    let connector = match Connector::builder()
        .shards(1)
        .pin(false)
        .source([127, 0, 0, 1].into())
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("build: {e}");
            return 1;
        }
    };
    // RLIMIT_NOFILE bounds descriptor numbers, not their count: put it at
    // the number below which exactly SPARE numbers are free.
    let limit = nth_free_fd(spare);
    if let Err(e) = set_nofile(limit) {
        eprintln!("setrlimit: {e}");
        return 1;
    }
    let plan = SequencePlan::new(([127, 0, 0, 1], port).into())
        .expect(1)
        .close(CloseMode::Reset)
        .concurrency(20)
        .count(total)
        .duration(Duration::from_secs(120));
    let summary = match connector.run(&plan, |_| |_: &floodgate::SequenceRecord| {}) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("run: {e}");
            return 1;
        }
    };
    let t = connector.stats().total();
    println!(
        "DONE total={} ok={} exhausted={} backoffs={} conserved={} open={} elapsed_ms={}",
        summary.outcomes.total(),
        summary.outcomes.get(SequenceOutcome::Ok),
        summary.outcomes.get(SequenceOutcome::Connect(
            floodgate::ConnectErrorKind::Exhausted
        )),
        t.backoffs,
        connector.stats().conserved(),
        t.open_sockets,
        summary.elapsed.as_millis(),
    );
    0
}

/// The `n`th (from 0) descriptor number not in use.
fn nth_free_fd(n: u64) -> u64 {
    let mut free = 0;
    for fd in 0..i32::MAX {
        // SAFETY: F_GETFD takes no pointer; on a number not in use it
        // fails with EBADF and changes nothing.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            if free == n {
                return fd as u64;
            }
            free += 1;
        }
    }
    u64::MAX
}

/// Sets RLIMIT_NOFILE (soft and hard) to `limit`.
fn set_nofile(limit: u64) -> std::io::Result<()> {
    let rl = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: setrlimit reads one live rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `serve SHARDS [PORT]`: see the module docs.
fn serve() -> i32 {
    let arg = |i: usize| std::env::args().nth(i).and_then(|v| v.parse::<u64>().ok());
    let shards = arg(2).unwrap_or(1) as usize;
    let port = arg(3).unwrap_or(0) as u16;
    let listener = match Listener::builder(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .shards(shards)
        .handler(|conn, ctx| {
            let _ = ctx.reply_and_close(conn, b"x");
        })
        .build()
    {
        Ok(l) => l,
        Err(e) => {
            eprintln!("build: {e}");
            return 1;
        }
    };
    println!(
        "PORT {} BACKEND {}",
        listener.local_addr().port(),
        listener.backend().backend
    );
    let _ = std::io::stdout().flush();
    // Serve until killed, or until the parent closes our stdin.
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    listener.shutdown();
    0
}

/// Whether fd 3 has FD_CLOEXEC, from `/proc/self/fdinfo/3` (flags, octal).
fn fd3_cloexec() -> bool {
    std::fs::read_to_string("/proc/self/fdinfo/3")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| u64::from_str_radix(f.trim(), 8).ok())
        })
        .is_some_and(|f| f & 0o2000000 != 0)
}

/// `systemd NAME SHARDS`: see the module docs.
fn systemd() -> i32 {
    let name = std::env::args().nth(2).unwrap_or_default();
    let shards = std::env::args()
        .nth(3)
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let built = Listener::from_systemd(Some(&name)).and_then(|b| {
        b.shards(shards)
            .handler(|conn, ctx| {
                let _ = ctx.reply_and_close(conn, b"x");
            })
            .build()
    });
    let listener = match built {
        Ok(l) => l,
        Err(Error::Config(e)) => {
            println!("REFUSED {}", e.field);
            return 0;
        }
        Err(e) => {
            println!("ERROR {e}");
            return 1;
        }
    };
    let unset = ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"]
        .iter()
        .all(|v| std::env::var_os(v).is_none());
    println!(
        "OK addr={} shards={} unset={unset} cloexec={}",
        listener.local_addr(),
        listener.shards(),
        fd3_cloexec()
    );
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    listener.shutdown();
    i32::from(!listener.stats().conserved())
}
