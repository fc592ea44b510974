//! Shared startup of the benchmark peer servers.
//!
//! Every peer binary (`peer_std`, `peer_epoll`, `peer_tokio`, `peer_uring`) does the same job on
//! one thread: accept a TCP connection, write one byte (`x`), close it. They share this module's
//! command line ([`PeerArgs`]) and startup ([`start`]):
//!
//! 1. refuse a `--listen` address outside loopback (127.0.0.0/8, `::1`);
//! 2. pin the thread to `--pin CORE` if given;
//! 3. bind and listen with `--backlog N`;
//! 4. arm a `--max-seconds S` alarm after which the process exits by itself (status 0);
//! 5. print exactly one line `LISTENING <addr>` (the bound address, port resolved) to stdout and
//!    flush it.
//!
//! Any startup failure prints `<peer>: <what failed>` on stderr and exits with status 2.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

/// The byte every peer writes to each accepted connection before closing it.
pub const REPLY: &[u8; 1] = b"x";

/// Exit status of a peer whose startup failed.
pub const EXIT_STARTUP: i32 = 2;

/// Command-line options common to all peer servers (flatten into each binary's parser).
#[derive(clap::Args, Debug, Clone)]
pub struct PeerArgs {
    /// Address to listen on. Loopback only (127.0.0.0/8 or `[::1]`); port 0 picks a free port.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,

    /// Pin the serving thread to this CPU core.
    #[arg(long, value_name = "CORE")]
    pub pin: Option<usize>,

    /// Listen backlog (the kernel caps it at net.core.somaxconn).
    #[arg(long, value_name = "N", default_value_t = 4096,
          value_parser = clap::value_parser!(i32).range(1..))]
    pub backlog: i32,

    /// Exit by itself after this many seconds (at least 1).
    #[arg(long, value_name = "S", default_value_t = 900,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_seconds: u64,
}

/// Prints `<name>: <msg>` on stderr and exits with [`EXIT_STARTUP`].
pub fn fatal(name: &str, msg: impl std::fmt::Display) -> ! {
    eprintln!("{name}: {msg}");
    std::process::exit(EXIT_STARTUP)
}

/// Checks that `addr` is a loopback address; the error message names `--listen`.
pub fn check_loopback(addr: &SocketAddr) -> Result<(), String> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(format!(
            "--listen {addr} refused: only loopback addresses (127.0.0.0/8, [::1]) may be used"
        ))
    }
}

/// Pins the calling thread to `core`.
pub fn pin_current_thread(core: usize) -> Result<(), String> {
    let ids = core_affinity::get_core_ids()
        .ok_or_else(|| "--pin: could not read the list of CPU cores".to_string())?;
    let id = ids
        .into_iter()
        .find(|c| c.id == core)
        .ok_or_else(|| format!("--pin {core}: no such CPU core available to this process"))?;
    if core_affinity::set_for_current(id) {
        Ok(())
    } else {
        Err(format!("--pin {core}: sched_setaffinity failed"))
    }
}

/// Creates a blocking TCP listener on `addr` with `SO_REUSEADDR` and the given backlog.
pub fn bind_listener(addr: SocketAddr, backlog: i32) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

extern "C" fn exit_on_alarm(_signal: libc::c_int) {
    // SAFETY: _exit is async-signal-safe; it ends the process without running destructors,
    // which is what a time limit on a benchmark server wants.
    unsafe { libc::_exit(0) }
}

/// Makes the process exit (status 0) by itself after `seconds`, using `alarm(2)`.
///
/// No extra thread is started, so the peer stays single-threaded.
pub fn exit_after(seconds: u64) -> Result<(), String> {
    let handler = exit_on_alarm as extern "C" fn(libc::c_int);
    // SAFETY: installs a handler that only calls the async-signal-safe _exit; the function
    // pointer is valid for the life of the process.
    let previous = unsafe { libc::signal(libc::SIGALRM, handler as libc::sighandler_t) };
    if previous == libc::SIG_ERR {
        return Err(format!(
            "--max-seconds: cannot install the SIGALRM handler: {}",
            io::Error::last_os_error()
        ));
    }
    let secs = u32::try_from(seconds).unwrap_or(u32::MAX);
    // SAFETY: alarm has no memory-safety preconditions.
    unsafe { libc::alarm(secs) };
    Ok(())
}

/// Runs the common startup for peer `name` and returns its (blocking) listener.
///
/// On any failure prints a message naming the option at fault and exits with
/// [`EXIT_STARTUP`]. On success the line `LISTENING <addr>` has been printed and flushed.
pub fn start(name: &str, args: &PeerArgs) -> TcpListener {
    if let Err(msg) = check_loopback(&args.listen) {
        fatal(name, msg);
    }
    if let Some(core) = args.pin {
        if let Err(msg) = pin_current_thread(core) {
            fatal(name, msg);
        }
    }
    let listener = match bind_listener(args.listen, args.backlog) {
        Ok(l) => l,
        Err(e) => fatal(
            name,
            format_args!("--listen {}: cannot listen: {e}", args.listen),
        ),
    };
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => fatal(
            name,
            format_args!("getsockname on the listener failed: {e}"),
        ),
    };
    if let Err(msg) = exit_after(args.max_seconds) {
        fatal(name, msg);
    }
    announce(name, local);
    listener
}

/// Prints `LISTENING <addr>` on stdout and flushes; exits if stdout is gone.
pub fn announce(name: &str, addr: SocketAddr) {
    let mut out = io::stdout().lock();
    if let Err(e) = writeln!(out, "LISTENING {addr}").and_then(|()| out.flush()) {
        fatal(name, format_args!("cannot write to stdout: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_only() {
        assert!(check_loopback(&"127.0.0.1:0".parse().unwrap()).is_ok());
        assert!(check_loopback(&"127.3.2.1:9".parse().unwrap()).is_ok());
        assert!(check_loopback(&"[::1]:0".parse().unwrap()).is_ok());
        for bad in ["0.0.0.0:0", "10.0.0.1:80", "[::]:0", "[::ffff:127.0.0.1]:0"] {
            let err = check_loopback(&bad.parse().unwrap()).unwrap_err();
            assert!(err.contains("--listen"), "{err}");
        }
    }

    #[test]
    fn bind_resolves_port() {
        let l = bind_listener("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        assert_ne!(l.local_addr().unwrap().port(), 0);
    }
}
