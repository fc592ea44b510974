//! Fair accept latency: every server measured the way a server runs.
//!
//! A server's acceptor waits on a thread of its own. So here every peer's acceptor runs on its
//! own thread pinned to [`SERVER_CORE`] and is asleep in its wait (`accept(2)`, `epoll_wait`,
//! `io_uring_enter`, or for Floodgate the shard's wait, and for [`Listener::accept`] also the
//! application thread's) when the client, on the measuring thread pinned to [`CLIENT_CORE`],
//! connects. One measurement ([`measure_one`]):
//!
//! 1. wait until every other thread of this process is asleep (`S` in
//!    `/proc/self/task/*/stat`): the acceptor is blocked in its wait, nothing of the previous
//!    connection is still running;
//! 2. create the client socket (`SO_LINGER` 0, so its close is an RST and leaves no TIME_WAIT);
//! 3. `t0 = Instant::now()`, then `connect(2)`;
//! 4. the acceptor, the moment the application code holds the accepted socket, takes
//!    `t1 = Instant::now()`, closes the socket, and pushes `t1` into the [`Probe`]'s lock-free
//!    queue (`crossbeam_queue::ArrayQueue`);
//! 5. the client spins (bounded) until it pops `t1`, closes its socket, and the sample is
//!    `t1 - t0`.
//!
//! Both stamps read the same clock (`CLOCK_MONOTONIC`, one for the whole machine), so `t1 - t0`
//! is the latency from just before `connect()` to the application holding the socket on the
//! other core, wake-up of the acceptor included. The way back (close, queue push, the client's
//! pop) happens after `t1` and is not in the sample; it is the same code for every peer. The
//! closes of both ends also happen before the next measurement starts (step 1 waits for them).
//!
//! The peers are in [`peers`]: one function each, listed in [`peers::PEERS`]; a new peer is one
//! more function and one more line there.
//!
//! [`Listener::accept`]: floodgate::Listener::accept

pub mod peers;

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use socket2::{Domain, Socket, Type};

pub use crate::harness::{CLIENT_CORE, SERVER_CORE};

/// Longest wait of any one step of a measurement (the acceptor falling asleep, the stamp
/// arriving) before the measurement fails.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// Stamps in flight at most (one measurement has one; the rest is slack).
const STAMP_SLOTS: usize = 64;

/// Where an acceptor reports the moment the application holds an accepted socket.
#[derive(Debug)]
pub struct Probe {
    stamps: ArrayQueue<Instant>,
}

impl Default for Probe {
    fn default() -> Self {
        Probe {
            stamps: ArrayQueue::new(STAMP_SLOTS),
        }
    }
}

impl Probe {
    /// Called by the acceptor with the accepted socket the moment the application holds it:
    /// stamps the time, closes the socket (drops `held`), then hands the stamp to the client.
    pub fn held<T>(&self, held: T) {
        let at = Instant::now();
        drop(held);
        // Full only if nobody measures (a client gave up): the oldest stamps then do not matter.
        let _ = self.stamps.force_push(at);
    }

    /// Discards stamps nobody waited for (for instance of a connection that woke an acceptor to
    /// stop it); returns how many there were.
    pub fn discard(&self) -> usize {
        let mut n = 0;
        while self.stamps.pop().is_some() {
            n += 1;
        }
        n
    }

    /// Waits (spinning, at most `timeout`) for the next stamp.
    pub fn next_stamp(&self, timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        let mut spins = 0u32;
        loop {
            if let Some(at) = self.stamps.pop() {
                return Some(at);
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins % 1024 == 0 && Instant::now() >= deadline {
                return None;
            }
        }
    }
}

/// This thread's kernel thread id (from `/proc/thread-self`, which links to `PID/task/TID`).
pub fn own_tid() -> io::Result<u32> {
    let link = std::fs::read_link("/proc/thread-self")?;
    link.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| io::Error::other(format!("/proc/thread-self -> {}", link.display())))
}

/// The state letter (`R`, `S`, `D`, ...) from the text of a `/proc/.../stat` file: the first
/// field after the last `)` (the command name before it may hold spaces and parentheses).
pub fn parse_state(stat: &str) -> Option<char> {
    let close = stat.rfind(')')?;
    stat[close + 1..].trim_start().chars().next()
}

/// A thread of this process that is not asleep: its id, name and state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Awake {
    /// Kernel thread id.
    pub tid: u32,
    /// Its name (`comm`).
    pub name: String,
    /// Its state letter.
    pub state: char,
}

/// The threads of this process other than `except` that are neither asleep (`S`) nor gone
/// (`Z`, `X`, or vanished while listed).
pub fn awake_threads(except: u32) -> io::Result<Vec<Awake>> {
    let mut awake = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task")? {
        let entry = entry?;
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if tid == except {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue; // exited meanwhile
        };
        let state = parse_state(&stat).unwrap_or('?');
        if matches!(state, 'S' | 'Z' | 'X') {
            continue;
        }
        let name = std::fs::read_to_string(entry.path().join("comm"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        awake.push(Awake { tid, name, state });
    }
    Ok(awake)
}

/// Waits (at most `timeout`, yielding between looks) until every thread of this process but
/// the caller is asleep; the error names the threads still awake.
pub fn wait_quiet(timeout: Duration) -> Result<(), String> {
    let me = own_tid().map_err(|e| format!("own thread id: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        let awake = awake_threads(me).map_err(|e| format!("/proc/self/task: {e}"))?;
        if awake.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("threads still awake after {timeout:?}: {awake:?}"));
        }
        std::thread::yield_now();
    }
}

/// The ids of this process's threads.
pub fn thread_ids() -> io::Result<Vec<u32>> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task")? {
        if let Some(tid) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) {
            ids.push(tid);
        }
    }
    Ok(ids)
}

/// The CPUs thread `tid` of this process may run on, as the kernel lists them
/// (`Cpus_allowed_list` in its `status`: `0`, `0-1`, ...); `None` if it is gone.
pub fn allowed_cpus(tid: u32) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_string())
}

/// Pins the calling thread to `core`; the error says why not. (Not through the list of cores
/// the caller may use: a thread spawned by one pinned to the client core inherits that single
/// core and must still move to the server core.)
pub fn pin_here(core: usize) -> Result<(), String> {
    if core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
        Ok(())
    } else {
        Err(format!(
            "cannot pin to core {core} (sched_setaffinity refused)"
        ))
    }
}

/// One measurement against a server at `addr` whose acceptor reports to `probe`: the time from
/// just before the client's `connect()` to the application holding the accepted socket (see
/// the module's documentation for the method).
pub fn measure_one(probe: &Probe, addr: SocketAddr) -> Result<Duration, String> {
    wait_quiet(STEP_TIMEOUT)?;
    let stray = probe.discard();
    if stray > 0 {
        return Err(format!("{stray} stamp(s) without a measured connection"));
    }
    let client = Socket::new(Domain::for_address(addr), Type::STREAM, None)
        .map_err(|e| format!("socket: {e}"))?;
    client
        .set_linger(Some(Duration::ZERO))
        .map_err(|e| format!("SO_LINGER: {e}"))?;
    let t0 = Instant::now();
    client
        .connect(&addr.into())
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let t1 = probe
        .next_stamp(STEP_TIMEOUT)
        .ok_or_else(|| format!("no accept reported within {STEP_TIMEOUT:?}"))?;
    drop(client);
    Ok(t1.saturating_duration_since(t0))
}

#[cfg(test)]
mod tests;
