//! The connect side: per-core shards that post io_uring CONNECT operations,
//! on the same shard machinery as the listener ([`crate::shard`]).
//!
//! A [`Connector`] runs one shard per core (or as many as asked). Requests
//! reach a shard through its lock-free queue (`crossbeam_queue::SegQueue`)
//! and a wake-up of its eventfd; the shard creates the socket (io_uring
//! SOCKET where the kernel has it, 5.19+, else socket2), binds it if a
//! source address is given (with `IP_BIND_ADDRESS_NO_PORT`, so that many
//! source addresses share the ephemeral port range and the port is picked at
//! connect time), and posts a CONNECT with a linked LINK_TIMEOUT.
//! Completions come back four ways, all from the same shards:
//!
//! - blocking: [`Connector::connect`] / [`Connector::connect_with`];
//! - try/poll: [`Connector::submit`] returns a [`Ticket`], then
//!   [`Connector::try_complete`] / [`Connector::complete_timeout`];
//! - the completion event [`Connector::completion_event`], an eventfd
//!   readable while completions are waiting (the listener's accept-event
//!   pattern, lost-wakeup free);
//! - an inline handler ([`ConnectorBuilder::handler`]) called on the shard.
//!
//! For load generation, [`Connector::run`] executes whole *sequences* on the
//! shards' rings: CONNECT → optional SEND → optional RECV until N bytes (or
//! EOF) → close with FIN or RST, posted as one IO_LINK chain in the shard's
//! batch (one `io_uring_enter` per loop turn), closed loop (keep C in
//! flight) or open loop (a fixed rate, latency measured from the intended
//! start so that coordinated omission is not hidden), each producing a
//! [`SequenceRecord`] with its timings and [`SequenceOutcome`]. Their
//! connect timeout is a deadline the shard scans every 10 ms, not a timer
//! per connection.
//!
//! Where the kernel allows (probed per shard: a direct-descriptor table and
//! SOCKET into it; [`ConnectShardStats::direct_sockets`]), a sequence's
//! socket lives in the ring's direct table, never in the fd table, and the
//! SOCKET heads the same chain. With RST close the chain ends with a CONNECT
//! to `AF_UNSPEC`: the kernel's `tcp_disconnect` sends the RST, frees the
//! port and leaves the socket ready to connect again, so the run's next
//! sequence in that slot reuses it. On loopback the client's core carries
//! the handshake of both ends; not creating and freeing a socket, file,
//! inode and dentry per connection is what makes the tool cheaper than the
//! kernel work it drives (PERF.md). Sequences with socket attributes use
//! plain descriptors, ended and kept the same way (the attributes stay on
//! the kept socket). Sequences with explicit source addresses take a new
//! socket each (sources go round-robin per connection) and close with
//! SO_LINGER 0. Kept sockets are closed at the end of every run.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_queue::SegQueue;
use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};

use crate::admit::attrs::SocketAttrs;
use crate::driver::{op, sys, Cqe, Desc, Driver, RingSetup};
use crate::error::{ConfigError, ConnectErrorKind, Error};
use crate::listen::accept::Delivery;
use crate::shard::{self, user_data, Placement, Service, ShardControl, Tag};

/// The connect timeout used when none is configured.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a sequence may spend after its connect (send, receive) before
/// it is cancelled and counted as [`SequenceOutcome::TimedOut`], by default.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The most sequences one shard keeps in flight (each holds a socket).
pub const MAX_IN_FLIGHT_PER_SHARD: usize = 16_384;

/// The largest single RECV a sequence posts; larger expectations loop.
const RECV_CHUNK: usize = 64 * 1024;

/// How often a shard with sequences in flight checks their deadlines.
const SCAN_INTERVAL: Duration = Duration::from_millis(10);

/// How soon a closed loop that could not start its sequences retries.
const RETRY_AFTER: Duration = Duration::from_millis(1);

/// The shortest timer a shard posts (open-loop pacing batches below it).
const MIN_TIMER: Duration = Duration::from_micros(20);

/// First and longest pause of a load whose sockets cannot be created.
const MIN_BACKOFF: Duration = Duration::from_millis(1);
const MAX_BACKOFF: Duration = Duration::from_millis(100);

/// The application's inline completion handler, called on the shard thread.
pub type ConnectHandler = dyn Fn(Completion) + Send + Sync;

/// What a finished sequence did, for [`SequenceRecord::outcome`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SequenceOutcome {
    /// Connected, sent the payload, received the expected bytes, closed.
    Ok,
    /// The connect failed.
    Connect(ConnectErrorKind),
    /// The peer reset the connection (ECONNRESET, EPIPE) during send or
    /// receive.
    Reset,
    /// The peer closed (EOF) before the expected bytes arrived.
    ShortRead,
    /// The I/O timeout ran out after the connect (nothing, or not enough,
    /// came back in time).
    TimedOut,
    /// Another send or receive error.
    Io,
    /// Cancelled by shutdown.
    Cancelled,
}

impl SequenceOutcome {
    /// Every outcome, in the order of [`SequenceOutcome::index`].
    pub const ALL: [SequenceOutcome; 12] = [
        SequenceOutcome::Ok,
        SequenceOutcome::Connect(ConnectErrorKind::Refused),
        SequenceOutcome::Connect(ConnectErrorKind::TimedOut),
        SequenceOutcome::Connect(ConnectErrorKind::AddrUnavailable),
        SequenceOutcome::Connect(ConnectErrorKind::Unreachable),
        SequenceOutcome::Connect(ConnectErrorKind::Exhausted),
        SequenceOutcome::Connect(ConnectErrorKind::Other),
        SequenceOutcome::Reset,
        SequenceOutcome::ShortRead,
        SequenceOutcome::TimedOut,
        SequenceOutcome::Io,
        SequenceOutcome::Cancelled,
    ];

    /// A dense index in `0..SequenceOutcome::ALL.len()`.
    pub fn index(&self) -> usize {
        match self {
            SequenceOutcome::Ok => 0,
            SequenceOutcome::Connect(ConnectErrorKind::Refused) => 1,
            SequenceOutcome::Connect(ConnectErrorKind::TimedOut) => 2,
            SequenceOutcome::Connect(ConnectErrorKind::AddrUnavailable) => 3,
            SequenceOutcome::Connect(ConnectErrorKind::Unreachable) => 4,
            SequenceOutcome::Connect(ConnectErrorKind::Exhausted) => 5,
            SequenceOutcome::Connect(ConnectErrorKind::Other) => 6,
            SequenceOutcome::Reset => 7,
            SequenceOutcome::ShortRead => 8,
            SequenceOutcome::TimedOut => 9,
            SequenceOutcome::Io => 10,
            SequenceOutcome::Cancelled => 11,
        }
    }

    /// A short name: `ok`, `connect_refused`, `connect_timed_out`,
    /// `connect_addr_unavailable`, `connect_unreachable`, `connect_exhausted`,
    /// `connect_other`,
    /// `reset`, `short_read`, `timed_out`, `io`, `cancelled`.
    pub fn name(&self) -> &'static str {
        match self {
            SequenceOutcome::Ok => "ok",
            SequenceOutcome::Connect(ConnectErrorKind::Refused) => "connect_refused",
            SequenceOutcome::Connect(ConnectErrorKind::TimedOut) => "connect_timed_out",
            SequenceOutcome::Connect(ConnectErrorKind::AddrUnavailable) => {
                "connect_addr_unavailable"
            }
            SequenceOutcome::Connect(ConnectErrorKind::Unreachable) => "connect_unreachable",
            SequenceOutcome::Connect(ConnectErrorKind::Exhausted) => "connect_exhausted",
            SequenceOutcome::Connect(ConnectErrorKind::Other) => "connect_other",
            SequenceOutcome::Reset => "reset",
            SequenceOutcome::ShortRead => "short_read",
            SequenceOutcome::TimedOut => "timed_out",
            SequenceOutcome::Io => "io",
            SequenceOutcome::Cancelled => "cancelled",
        }
    }
}

/// Counts of sequence outcomes, indexed by [`SequenceOutcome::index`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutcomeCounts(pub [u64; 12]);

impl OutcomeCounts {
    /// The count of one outcome.
    pub fn get(&self, o: SequenceOutcome) -> u64 {
        self.0[o.index()]
    }

    /// Every outcome counted.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Everything but [`SequenceOutcome::Ok`].
    pub fn errors(&self) -> u64 {
        self.total() - self.0[0]
    }

    /// `(outcome, count)` for every non-zero count.
    pub fn nonzero(&self) -> impl Iterator<Item = (SequenceOutcome, u64)> + '_ {
        SequenceOutcome::ALL
            .iter()
            .map(|o| (*o, self.get(*o)))
            .filter(|(_, n)| *n > 0)
    }

    fn add(&mut self, other: &OutcomeCounts) {
        for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
            *a += b;
        }
    }
}

/// How a sequence closes its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CloseMode {
    /// A normal close: FIN, and the client's side goes to TIME_WAIT.
    Fin,
    /// An RST, no TIME_WAIT left behind: SO_LINGER 0 then close, or on
    /// direct sockets a disconnect (CONNECT to `AF_UNSPEC`), which sends the
    /// RST and keeps the socket for the next sequence.
    #[default]
    Reset,
}

/// How a run paces its sequences.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// Closed loop: keep `concurrency` sequences in flight (over all
    /// shards), start a new one as each completes.
    Closed {
        /// Sequences in flight over all shards.
        concurrency: usize,
    },
    /// Open loop: start `rate` sequences per second (over all shards) on a
    /// fixed schedule, whatever the server does, with at most
    /// `max_in_flight` at once (over all shards). A start delayed by that
    /// cap still counts its latency from its scheduled time.
    Open {
        /// Sequences per second over all shards.
        rate: f64,
        /// The cap on sequences in flight over all shards.
        max_in_flight: usize,
    },
}

/// A load run: what each sequence does, how they are paced, when to stop.
///
/// ```
/// use std::time::Duration;
/// use floodgate::{CloseMode, SequencePlan};
///
/// let plan = SequencePlan::new("127.0.0.1:9".parse()?)
///     .payload(b"PING\r\n".to_vec())
///     .expect(1)
///     .close(CloseMode::Reset)
///     .concurrency(64)
///     .count(10_000)
///     .duration(Duration::from_secs(10));
/// assert_eq!(plan.target().port(), 9);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct SequencePlan {
    target: SocketAddr,
    payload: Vec<u8>,
    expect: usize,
    close: CloseMode,
    connect_timeout: Option<Duration>,
    io_timeout: Duration,
    load: Load,
    count: Option<u64>,
    duration: Option<Duration>,
}

impl SequencePlan {
    /// A plan against `target`: no payload, expect 1 byte, RST close,
    /// concurrency 1, the default timeouts, no bound yet (one of
    /// [`SequencePlan::count`] or [`SequencePlan::duration`] is required).
    pub fn new(target: SocketAddr) -> Self {
        SequencePlan {
            target,
            payload: Vec::new(),
            expect: 1,
            close: CloseMode::Reset,
            connect_timeout: Some(DEFAULT_CONNECT_TIMEOUT),
            io_timeout: DEFAULT_IO_TIMEOUT,
            load: Load::Closed { concurrency: 1 },
            count: None,
            duration: None,
        }
    }

    /// The target address.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Bytes each sequence sends after connecting (empty: send nothing).
    pub fn payload(mut self, bytes: Vec<u8>) -> Self {
        self.payload = bytes;
        self
    }

    /// Bytes to wait for before closing (0: do not receive). Receiving
    /// stops early at EOF, which is then [`SequenceOutcome::ShortRead`].
    pub fn expect(mut self, bytes: usize) -> Self {
        self.expect = bytes;
        self
    }

    /// How to close (default [`CloseMode::Reset`]).
    pub fn close(mut self, mode: CloseMode) -> Self {
        self.close = mode;
        self
    }

    /// Connect timeout, checked by the shard's deadline scan (every 10 ms;
    /// no timer per connection); `None` leaves it to the kernel's SYN
    /// retries, bounded by the I/O timeout.
    pub fn connect_timeout(mut self, t: Option<Duration>) -> Self {
        self.connect_timeout = t;
        self
    }

    /// Time allowed after the connect for send and receive.
    pub fn io_timeout(mut self, t: Duration) -> Self {
        self.io_timeout = t;
        self
    }

    /// Closed loop with `c` sequences in flight over all shards.
    pub fn concurrency(mut self, c: usize) -> Self {
        self.load = Load::Closed { concurrency: c };
        self
    }

    /// Open loop at `per_second` sequences per second over all shards, at
    /// most `max_in_flight` at once.
    pub fn rate(mut self, per_second: f64, max_in_flight: usize) -> Self {
        self.load = Load::Open {
            rate: per_second,
            max_in_flight,
        };
        self
    }

    /// Stop starting sequences after `n` (over all shards).
    pub fn count(mut self, n: u64) -> Self {
        self.count = Some(n);
        self
    }

    /// Stop starting sequences after `d`.
    pub fn duration(mut self, d: Duration) -> Self {
        self.duration = Some(d);
        self
    }

    /// The pacing.
    pub fn load(&self) -> Load {
        self.load
    }

    fn validate(&self, shards: usize) -> Result<(), ConfigError> {
        if self.count.is_none() && self.duration.is_none() {
            return Err(ConfigError::new(
                "count/duration",
                "none",
                "a run needs a count or a duration",
            ));
        }
        if self.duration == Some(Duration::ZERO) {
            return Err(ConfigError::new("duration", "0s", "must be positive"));
        }
        if self.io_timeout.is_zero() {
            return Err(ConfigError::new("io_timeout", "0s", "must be positive"));
        }
        if self.connect_timeout == Some(Duration::ZERO) {
            return Err(ConfigError::new(
                "connect_timeout",
                "0s",
                "must be positive",
            ));
        }
        if self.expect > 1 << 30 {
            return Err(ConfigError::new("expect", self.expect, "at most 1 GiB"));
        }
        let cap = MAX_IN_FLIGHT_PER_SHARD * shards;
        match self.load {
            Load::Closed { concurrency } if concurrency == 0 || concurrency > cap => Err(
                ConfigError::new("concurrency", concurrency, format!("must be in 1..={cap}")),
            ),
            Load::Open { rate, .. } if !(rate.is_finite() && rate > 0.0) => Err(ConfigError::new(
                "rate",
                rate,
                "must be a positive number per second",
            )),
            Load::Open { max_in_flight, .. } if max_in_flight == 0 || max_in_flight > cap => {
                Err(ConfigError::new(
                    "max_in_flight",
                    max_in_flight,
                    format!("must be in 1..={cap}"),
                ))
            }
            _ => Ok(()),
        }
    }
}

/// One finished sequence. Durations are measured from its *intended*
/// start (in a closed loop the actual start; in an open loop the scheduled
/// time, so that a late start shows in the latency).
#[derive(Debug, Clone, Copy)]
pub struct SequenceRecord {
    /// The shard that ran it.
    pub shard: usize,
    /// What happened.
    pub outcome: SequenceOutcome,
    /// When it was meant to start.
    pub intended: Instant,
    /// How late it actually started (open loop under a slow server).
    pub start_delay: Duration,
    /// Until the connect completed (successfully).
    pub connect: Option<Duration>,
    /// Until the first response byte arrived.
    pub first_byte: Option<Duration>,
    /// Until the close completed.
    pub total: Duration,
    /// Payload bytes sent.
    pub sent: usize,
    /// Response bytes received.
    pub received: usize,
}

/// What [`Connector::run`] did, over all shards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// Sequences started.
    pub started: u64,
    /// Their outcomes (every started sequence has one).
    pub outcomes: OutcomeCounts,
    /// From the run's start to the last completion.
    pub elapsed: Duration,
}

/// A connect to make: the target, and optionally its own source address and
/// timeout (otherwise the connector's).
///
/// ```
/// use std::time::Duration;
/// use floodgate::Dial;
///
/// let dial = Dial::new("127.0.0.1:8080".parse()?)
///     .source("127.0.0.2".parse()?)
///     .timeout(Duration::from_millis(200));
/// assert_eq!(dial.addr().port(), 8080);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dial {
    addr: SocketAddr,
    source: Option<IpAddr>,
    timeout: Option<Option<Duration>>,
    attrs: Option<Arc<SocketAttrs>>,
}

impl Dial {
    /// A connect to `addr` with the connector's source and timeout.
    pub fn new(addr: SocketAddr) -> Self {
        Dial {
            addr,
            source: None,
            timeout: None,
            attrs: None,
        }
    }

    /// These socket attributes instead of the connector's
    /// ([`ConnectorBuilder::attrs`]).
    pub fn attrs(mut self, attrs: SocketAttrs) -> Self {
        self.attrs = Some(Arc::new(attrs));
        self
    }

    /// Binds to `ip` (any free port) instead of the connector's sources.
    pub fn source(mut self, ip: IpAddr) -> Self {
        self.source = Some(ip);
        self
    }

    /// This connect's timeout.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(Some(t));
        self
    }

    /// No timeout for this connect (the kernel's SYN retries decide).
    pub fn no_timeout(mut self) -> Self {
        self.timeout = Some(None);
        self
    }

    /// The target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl From<SocketAddr> for Dial {
    fn from(addr: SocketAddr) -> Self {
        Dial::new(addr)
    }
}

/// Identifies a connect posted with [`Connector::submit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(u64);

impl Ticket {
    /// The number (unique per connector, increasing).
    pub fn id(&self) -> u64 {
        self.0
    }
}

/// The result of a submitted connect.
#[derive(Debug)]
pub struct Completion {
    /// The ticket [`Connector::submit`] returned.
    pub ticket: Ticket,
    /// The shard that ran it.
    pub shard: usize,
    /// The connection, or why there is none ([`Error::Connect`] with its
    /// kind, or [`Error::Closed`] when shutdown cancelled it).
    pub result: Result<Connected, Error>,
}

/// A connection the connector established. It owns its socket (blocking
/// mode, close-on-exec): dropping it closes the connection.
#[derive(Debug)]
pub struct Connected {
    stream: TcpStream,
    peer: SocketAddr,
    shard: usize,
    latency: Duration,
}

impl Connected {
    /// The shard that connected it.
    pub fn shard(&self) -> usize {
        self.shard
    }

    /// From the request reaching the shard to the connect's completion.
    pub fn latency(&self) -> Duration {
        self.latency
    }

    /// The address connected to.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// The local address the kernel bound (`getsockname`).
    ///
    /// # Errors
    /// As `getsockname(2)`.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.stream.local_addr()
    }

    /// Borrows the socket as a [`TcpStream`].
    pub fn as_std(&self) -> &TcpStream {
        &self.stream
    }

    /// Gives the socket to the caller as a [`TcpStream`].
    pub fn into_std(self) -> TcpStream {
        self.stream
    }
}

crate::listen::conn::stream_owner!(Connected);

/// A snapshot of one connect shard's counters.
///
/// Every connect the shard takes on (a submitted one or a sequence's) ends
/// as exactly one of `connected`, one of the error kinds, or `cancelled`;
/// [`ConnectShardStats::conserved`] checks it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectShardStats {
    /// The shard's index.
    pub shard: usize,
    /// Connects asked of the shard (submitted, blocking, or a sequence's).
    pub submitted: u64,
    /// Connects that succeeded.
    pub connected: u64,
    /// ECONNREFUSED.
    pub refused: u64,
    /// The connect timeout ran out (or ETIMEDOUT).
    pub timed_out: u64,
    /// EADDRNOTAVAIL / EADDRINUSE: no local port or address.
    pub addr_unavailable: u64,
    /// ENETUNREACH, EHOSTUNREACH …
    pub unreachable: u64,
    /// Sockets that could not be created: out of descriptors or memory
    /// (EMFILE, ENFILE, ENOBUFS, ENOMEM).
    pub exhausted: u64,
    /// Other connect failures.
    pub other: u64,
    /// Times a running load held back because a socket could not be
    /// created: it then keeps no more sequences in flight than it had
    /// (growing again as they succeed), or, with none, pauses (1 ms,
    /// doubling to 100 ms; reset by a success).
    pub backoffs: u64,
    /// Cancelled by shutdown (queued or in flight), socket closed.
    pub cancelled: u64,
    /// Connects queued for the shard or in flight on it now.
    pub in_flight: u64,
    /// Sockets the shard holds now (0 once it has stopped, and at the end
    /// of every run).
    pub open_sockets: u64,
    /// Sockets the shard has created. One per connect, except for load
    /// sequences with RST close and no source address, which reuse theirs:
    /// a run then creates about as many sockets as it has in flight.
    pub sockets_created: u64,
    /// Sequence outcomes so far.
    pub sequences: OutcomeCounts,
    /// Sequences started.
    pub sequences_started: u64,
    /// Payload bytes sent by sequences.
    pub bytes_sent: u64,
    /// Response bytes received by sequences.
    pub bytes_received: u64,
    /// Inline handler (or run sink) calls that panicked; the shard went on.
    pub handler_panics: u64,
    /// Whether this shard creates its sockets with io_uring SOCKET (5.19+);
    /// false: with socket(2).
    pub uring_socket: bool,
    /// Whether this shard's load sequences keep their sockets in the ring's
    /// direct-descriptor table (SOCKET into a slot, 5.19+): each sequence
    /// is one linked chain, its socket never enters the fd table, and with
    /// RST close it ends with a disconnect (CONNECT to AF_UNSPEC) that
    /// keeps the socket for the run's next sequence. False: plain
    /// descriptors (kept and reused the same way with RST close).
    pub direct_sockets: bool,
}

impl ConnectShardStats {
    /// All connect failures (every kind, not `cancelled`).
    pub fn failed(&self) -> u64 {
        self.refused
            + self.timed_out
            + self.addr_unavailable
            + self.unreachable
            + self.exhausted
            + self.other
    }

    /// Whether `submitted == connected + failed + cancelled + in_flight`.
    pub fn conserved(&self) -> bool {
        self.submitted == self.connected + self.failed() + self.cancelled + self.in_flight
    }
}

/// Counters of a whole connector: per shard and summed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectorStats {
    /// One entry per shard.
    pub shards: Vec<ConnectShardStats>,
}

impl ConnectorStats {
    /// The sum over shards (`shard` is the shard count).
    pub fn total(&self) -> ConnectShardStats {
        let mut t = ConnectShardStats {
            shard: self.shards.len(),
            uring_socket: !self.shards.is_empty(),
            direct_sockets: !self.shards.is_empty(),
            ..Default::default()
        };
        for s in &self.shards {
            t.uring_socket &= s.uring_socket;
            t.direct_sockets &= s.direct_sockets;
            t.submitted += s.submitted;
            t.connected += s.connected;
            t.refused += s.refused;
            t.timed_out += s.timed_out;
            t.addr_unavailable += s.addr_unavailable;
            t.unreachable += s.unreachable;
            t.other += s.other;
            t.exhausted += s.exhausted;
            t.backoffs += s.backoffs;
            t.cancelled += s.cancelled;
            t.in_flight += s.in_flight;
            t.open_sockets += s.open_sockets;
            t.sockets_created += s.sockets_created;
            t.sequences.add(&s.sequences);
            t.sequences_started += s.sequences_started;
            t.bytes_sent += s.bytes_sent;
            t.bytes_received += s.bytes_received;
            t.handler_panics += s.handler_panics;
        }
        t
    }

    /// Whether every shard is conserved.
    pub fn conserved(&self) -> bool {
        self.shards.iter().all(ConnectShardStats::conserved)
    }
}

/// Live counters of one shard (relaxed atomics, read without locks).
#[derive(Debug, Default)]
struct Counters {
    submitted: AtomicU64,
    connected: AtomicU64,
    by_kind: [AtomicU64; 6],
    cancelled: AtomicU64,
    in_flight: AtomicU64,
    open_sockets: AtomicU64,
    sockets_created: AtomicU64,
    backoffs: AtomicU64,
    sequences: [AtomicU64; 12],
    sequences_started: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    handler_panics: AtomicU64,
    uring_socket: std::sync::atomic::AtomicBool,
    direct_sockets: std::sync::atomic::AtomicBool,
}

fn kind_index(k: ConnectErrorKind) -> usize {
    match k {
        ConnectErrorKind::Refused => 0,
        ConnectErrorKind::TimedOut => 1,
        ConnectErrorKind::AddrUnavailable => 2,
        ConnectErrorKind::Unreachable => 3,
        ConnectErrorKind::Other => 4,
        ConnectErrorKind::Exhausted => 5,
    }
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

fn sub(c: &AtomicU64, n: u64) {
    c.fetch_sub(n, Ordering::Relaxed);
}

impl Counters {
    fn snapshot(&self, shard: usize) -> ConnectShardStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut sequences = OutcomeCounts::default();
        for (i, c) in self.sequences.iter().enumerate() {
            sequences.0[i] = g(c);
        }
        // Read the outcomes before `in_flight` and `submitted` last: a
        // connect that finishes meanwhile then shows in both or in neither.
        let connected = g(&self.connected);
        let kinds: Vec<u64> = self.by_kind.iter().map(g).collect();
        let cancelled = g(&self.cancelled);
        let in_flight = g(&self.in_flight);
        let submitted = g(&self.submitted);
        ConnectShardStats {
            shard,
            submitted,
            connected,
            refused: kinds[0],
            timed_out: kinds[1],
            addr_unavailable: kinds[2],
            unreachable: kinds[3],
            other: kinds[4],
            exhausted: kinds[5],
            cancelled,
            in_flight,
            open_sockets: g(&self.open_sockets),
            sockets_created: g(&self.sockets_created),
            backoffs: g(&self.backoffs),
            sequences,
            sequences_started: g(&self.sequences_started),
            bytes_sent: g(&self.bytes_sent),
            bytes_received: g(&self.bytes_received),
            handler_panics: g(&self.handler_panics),
            uring_socket: self.uring_socket.load(Ordering::Relaxed),
            direct_sockets: self.direct_sockets.load(Ordering::Relaxed),
        }
    }

    /// A connect ended: one outcome, out of flight.
    fn connect_done(&self, outcome: Result<(), Option<ConnectErrorKind>>) {
        match outcome {
            Ok(()) => add(&self.connected, 1),
            Err(Some(kind)) => add(&self.by_kind[kind_index(kind)], 1),
            Err(None) => add(&self.cancelled, 1),
        }
        sub(&self.in_flight, 1);
    }
}

/// What a shard shares with the connector handle.
#[derive(Debug)]
struct ShardShared {
    queue: SegQueue<Job>,
    counters: Counters,
    control: Arc<ShardControl>,
}

/// What every shard shares: the completion queue and its event, the
/// handler, the sources.
struct Common {
    completions: SegQueue<Completion>,
    delivery: Delivery,
    handler: Option<Arc<ConnectHandler>>,
    sources: Vec<IpAddr>,
    next_source: AtomicUsize,
    timeout: Option<Duration>,
    attrs: Arc<SocketAttrs>,
}

impl std::fmt::Debug for Common {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Common")
            .field("completions", &self.completions.len())
            .field("handler", &self.handler.is_some())
            .field("sources", &self.sources)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// A request for a shard.
enum Job {
    Connect(ConnectJob),
    Run(Box<RunJob>),
}

struct ConnectJob {
    ticket: u64,
    addr: SocketAddr,
    source: Option<IpAddr>,
    timeout: Option<Duration>,
    attrs: Arc<SocketAttrs>,
    reply: Reply,
}

enum Reply {
    /// A blocking caller waits on this channel.
    Wait(mpsc::SyncSender<Result<Connected, Error>>),
    /// The completion queue (or the inline handler).
    Deliver,
}

type Sink = Box<dyn FnMut(&SequenceRecord) + Send>;

struct RunJob {
    plan: Arc<SequencePlan>,
    started: Instant,
    /// Sequences in flight at most (closed loop: exactly) on this shard.
    concurrency: usize,
    /// Open loop: time between starts on this shard.
    interval: Option<Duration>,
    count: Option<u64>,
    sink: Sink,
    done: mpsc::Sender<(u64, OutcomeCounts, Instant)>,
}

/// A job that will never run: tell its waiter (or queue its completion)
/// and count it as cancelled.
fn refuse(job: Job, shard: usize, counters: &Counters, common: &Common) {
    match job {
        Job::Connect(j) => {
            counters.connect_done(Err(None));
            match j.reply {
                Reply::Wait(tx) => {
                    let _ = tx.send(Err(Error::Closed));
                }
                Reply::Deliver => {
                    common.delivery.will_push();
                    common.completions.push(Completion {
                        ticket: Ticket(j.ticket),
                        shard,
                        result: Err(Error::Closed),
                    });
                    common.delivery.notify();
                }
            }
        }
        Job::Run(r) => {
            let _ = r.done.send((0, OutcomeCounts::default(), Instant::now()));
        }
    }
}

/// Bits of the operations a slot has in flight.
const OP_CONNECT: u8 = 1;
const OP_TIMEOUT: u8 = 2;
const OP_SEND: u8 = 4;
const OP_RECV: u8 = 8;
const OP_CLOSE: u8 = 16;
const OP_SOCKET: u8 = 32;
const OP_DISCONNECT: u8 = 64;

/// What a slot does once its io_uring SOCKET completes.
enum Opening {
    /// A single connect.
    Connect {
        timeout: Option<Duration>,
        source: Option<IpAddr>,
        attrs: Arc<SocketAttrs>,
    },
    /// A load sequence.
    Sequence {
        plan: Arc<SequencePlan>,
        source: Option<IpAddr>,
    },
}

/// Where a sequence's plain descriptor comes from and how it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PlainSocket {
    /// New; closed at the end (FIN, or an RST by SO_LINGER 0).
    NewClosed,
    /// New; disconnected at the end (the RST) and kept for the next one.
    NewKept,
    /// Kept from the slot's last sequence, and kept again.
    Reused,
}

impl PlainSocket {
    fn new(keep: bool) -> Self {
        if keep {
            PlainSocket::NewKept
        } else {
            PlainSocket::NewClosed
        }
    }
}

/// A disconnected socket a slot keeps for the run's next sequence.
enum Parked {
    /// In the ring's direct table, at the slot's own index.
    Direct { v4: bool },
    /// A plain descriptor (sequences with source addresses or attributes).
    Fd { fd: OwnedFd, v4: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cancel {
    No,
    Deadline,
    Shutdown,
}

/// One connect or sequence in flight on a shard.
struct Slot {
    busy: bool,
    fd: Option<OwnedFd>,
    raw: RawFd,
    addr: SocketAddr,
    ops: u8,
    intended: Instant,
    started: Instant,
    deadline: Option<Instant>,
    cancel: Cancel,
    connect_res: Option<i32>,
    timeout_fired: bool,
    /// A single connect's job (None for a sequence).
    job: Option<(u64, Reply)>,
    // Sequence state.
    connect_at: Option<Instant>,
    first_byte_at: Option<Instant>,
    send_res: Option<i32>,
    sent: usize,
    received: usize,
    expect: usize,
    eof: bool,
    recv_err: Option<i32>,
    close_linked: bool,
    /// Set while the slot's socket is being created by an io_uring SOCKET.
    opening: Option<Opening>,
    /// A sequence whose socket lives in this direct slot of the ring.
    direct: Option<u32>,
    /// Whether that direct slot holds the slot's socket (created, not yet
    /// closed).
    direct_open: bool,
    /// When a sequence's connect is overdue (checked by the scan, so that
    /// no per-connect timer is needed).
    connect_deadline: Option<Instant>,
    /// The sequence closes with an RST.
    reset: bool,
    /// A disconnect (CONNECT to AF_UNSPEC) was posted for it.
    disconnect_tried: bool,
    /// Its disconnect succeeded: the socket stays in the direct slot for
    /// the next sequence.
    parkable: bool,
    /// A single connect's attributes (their file flags are set when the
    /// connected socket is handed over).
    attrs: Option<Arc<SocketAttrs>>,
}

impl Slot {
    fn empty(now: Instant) -> Self {
        Slot {
            busy: false,
            fd: None,
            raw: -1,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            ops: 0,
            intended: now,
            started: now,
            deadline: None,
            cancel: Cancel::No,
            connect_res: None,
            timeout_fired: false,
            job: None,
            connect_at: None,
            first_byte_at: None,
            send_res: None,
            sent: 0,
            received: 0,
            expect: 0,
            eof: false,
            recv_err: None,
            close_linked: false,
            opening: None,
            direct: None,
            direct_open: false,
            connect_deadline: None,
            reset: false,
            disconnect_tried: false,
            parkable: false,
            attrs: None,
        }
    }
}

/// A run in progress on one shard.
struct Run {
    job: RunJob,
    in_flight: usize,
    started: u64,
    outcomes: OutcomeCounts,
    next_due: Instant,
    deadline: Option<Instant>,
    last_end: Instant,
    next_source: usize,
}

impl Run {
    fn may_start(&self, now: Instant) -> bool {
        if self.job.count.is_some_and(|c| self.started >= c) {
            return false;
        }
        let at = if self.job.interval.is_some() {
            self.next_due
        } else {
            now
        };
        !self.deadline.is_some_and(|d| at >= d)
    }

    fn finished(&self, now: Instant) -> bool {
        self.in_flight == 0 && !self.may_start(now)
    }
}

/// One shard's connect service.
struct Dialer {
    index: usize,
    shared: Arc<ShardShared>,
    common: Arc<Common>,
    slots: Vec<Slot>,
    free: Vec<usize>,
    busy: usize,
    run: Option<Run>,
    pending_runs: VecDeque<Box<RunJob>>,
    timer_armed: Option<Instant>,
    timer_cancelling: bool,
    next_scan: Instant,
    stopping: bool,
    pushed: bool,
    /// Whether sockets are created with io_uring SOCKET (5.19) rather than
    /// socket(2); probed when the shard starts.
    uring_socket: bool,
    /// Size of the ring's direct-descriptor table that load sequences use
    /// (slot `i` for slot `i`); 0 when the kernel cannot (probed at start).
    direct_slots: u32,
    /// Per slot: a disconnected socket kept by an earlier sequence of the
    /// run, ready to connect again.
    parked: Vec<Option<Parked>>,
    parked_count: usize,
    /// CLOSEs of kept sockets in flight.
    unparking: usize,
    /// No sequence starts before this (sockets could not be created).
    backoff_until: Option<Instant>,
    /// The next back-off's length.
    backoff_step: Duration,
    /// The most sequences in flight while sockets are scarce (see
    /// [`Dialer::exhausted`]); `None`: the run's own concurrency.
    cap: Option<usize>,
    /// Successes since the cap last grew.
    cap_successes: usize,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("index", &self.index)
            .field("busy", &self.busy)
            .field("run", &self.run.is_some())
            .finish_non_exhaustive()
    }
}

/// Creates a connect socket: blocking (io_uring does the waiting),
/// close-on-exec, SO_LINGER 0 for an RST close, bound to `source` with
/// IP_BIND_ADDRESS_NO_PORT (the port is chosen at connect time, per
/// 4-tuple, so many source addresses share the ephemeral range).
fn open_socket(
    addr: SocketAddr,
    source: Option<IpAddr>,
    reset: bool,
    attrs: &SocketAttrs,
) -> io::Result<Socket> {
    let s = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )?;
    configure_socket(&SockRef::from(&s), addr, source, reset, attrs)?;
    Ok(s)
}

/// Refuses attributes the kernel will not take, by setting them on a
/// scratch socket; the error names the field.
fn check_attrs(attrs: &SocketAttrs) -> Result<(), Error> {
    if attrs.is_default() {
        return Ok(());
    }
    if let Some(c) = &attrs.congestion {
        if c.is_empty() || c.len() > 15 {
            return Err(ConfigError::new(
                "attrs.congestion",
                c,
                "a congestion control name of 1 to 15 bytes",
            )
            .into());
        }
    }
    let scratch = Socket::new(Domain::IPV4, Type::STREAM.cloexec(), Some(Protocol::TCP))
        .map_err(|e| Error::setup("socket", e))?;
    attrs.apply(&scratch, false, false).map_err(|e| {
        Error::Config(ConfigError::new(
            "attrs",
            format!("{attrs:?}"),
            format!("the kernel refused it: {e}"),
        ))
    })
}

/// Applies what [`open_socket`] applies to a socket made elsewhere (by an
/// io_uring SOCKET): the attributes' socket options, then SO_LINGER 0 for
/// an RST close (so that it holds whatever the attributes say), then the
/// source address.
fn configure_socket(
    s: &SockRef<'_>,
    addr: SocketAddr,
    source: Option<IpAddr>,
    reset: bool,
    attrs: &SocketAttrs,
) -> io::Result<()> {
    if !attrs.is_default() {
        attrs.apply(&**s, addr.is_ipv6(), false)?;
    }
    if reset {
        s.set_linger(Some(Duration::ZERO))?;
    }
    if let Some(ip) = source {
        if ip.is_ipv4() != addr.is_ipv4() {
            return Err(io::Error::from_raw_os_error(libc::EAFNOSUPPORT));
        }
        sys::setsockopt::<i32>(
            s.as_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            1,
        )?;
        s.bind(&SocketAddr::new(ip, 0).into())?;
    }
    Ok(())
}

/// Sizes of direct-descriptor table tried, largest first: the kernel refuses
/// a table larger than RLIMIT_NOFILE. 4,096 slots (32 KiB of kernel memory
/// per shard) cover flood's largest default (4,096 in flight); sequences
/// in slots beyond the table use plain descriptors.
const DIRECT_TABLE_SIZES: [u32; 3] = [4_096, 1_024, 128];

/// Registers a direct-descriptor table on a fresh ring and checks that
/// sockets can live in it (SOCKET into a slot, disconnect, CLOSE). Returns
/// its size, or 0 when load sequences must use plain descriptors.
fn direct_table(ring: &mut Driver) -> u32 {
    let Some(size) = DIRECT_TABLE_SIZES
        .into_iter()
        .find(|&n| ring.register_direct_table(n).is_ok())
    else {
        return 0;
    };
    match ring.probe_direct_sockets() {
        Ok(()) => size,
        Err(_) => 0,
    }
}

/// Posts the linked body of sequence `p`'s chain on `fd`: CONNECT, SEND
/// (with a payload), RECV (with an expectation) and, when one RECV
/// completes the expectation and `keep` is set, the disconnect that sends
/// the RST and keeps the socket. Each SQE links to the next; the last
/// links on when the chain goes on (a CLOSE the caller posts after it).
/// Sets in `ops` the bit of each operation posted, also when one fails.
/// The caller reserved room for the whole chain.
fn post_chain(
    ring: &mut Driver,
    fd: Desc,
    plan: &SequencePlan,
    p: u64,
    keep: bool,
    ops: &mut u8,
) -> io::Result<()> {
    let send = !plan.payload.is_empty();
    let recv = plan.expect > 0;
    // A single RECV completes the expectation when it is one byte; then the
    // end (disconnect or CLOSE) can ride in the chain too.
    let end_linked = plan.expect <= 1;
    ring.connect_chain(
        fd,
        SockAddr::from(plan.target),
        None,
        send || recv || end_linked,
        user_data(Tag::Connect, p),
    )?;
    *ops |= OP_CONNECT;
    if send {
        let flags = libc::MSG_NOSIGNAL | libc::MSG_WAITALL;
        let bytes: Box<[u8]> = plan.payload.as_slice().into();
        ring.send(
            fd,
            bytes,
            flags,
            recv || end_linked,
            user_data(Tag::ConnectSend, p),
        )?;
        *ops |= OP_SEND;
    }
    if recv {
        let len = plan.expect.min(RECV_CHUNK);
        ring.recv_linked(fd, len, 0, end_linked, user_data(Tag::ConnectRecv, p))?;
        *ops |= OP_RECV;
    }
    if end_linked && keep {
        ring.disconnect(fd, user_data(Tag::ConnectDisconnect, p))?;
        *ops |= OP_DISCONNECT;
    }
    Ok(())
}

fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn connect_error(kind: ConnectErrorKind, addr: SocketAddr, errno: i32) -> Error {
    Error::Connect {
        kind,
        addr,
        source: io::Error::from_raw_os_error(errno),
    }
}

impl Dialer {
    fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    fn alloc(&mut self, now: Instant) -> usize {
        let i = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot::empty(now));
                self.slots.len() - 1
            }
        };
        if self.parked.len() <= i {
            self.parked.resize_with(i + 1, || None);
        }
        self.busy += 1;
        i
    }

    fn pick_source(&mut self) -> Option<IpAddr> {
        let n = self.common.sources.len();
        if n == 0 {
            return None;
        }
        let i = self.common.next_source.fetch_add(1, Ordering::Relaxed) % n;
        Some(self.common.sources[i])
    }

    /// Posts a single connect: its socket first (an io_uring SOCKET where
    /// the kernel has it, else socket(2)), then the CONNECT chain.
    fn start_connect(&mut self, ring: &mut Driver, job: ConnectJob, now: Instant) {
        let source = job.source.or_else(|| self.pick_source());
        let i = self.alloc(now);
        {
            let s = &mut self.slots[i];
            s.busy = true;
            s.addr = job.addr;
            s.intended = now;
            s.started = now;
            s.job = Some((job.ticket, job.reply));
            s.attrs = Some(job.attrs.clone());
        }
        if self.uring_socket {
            self.slots[i].opening = Some(Opening::Connect {
                timeout: job.timeout,
                source,
                attrs: job.attrs,
            });
            self.open_on_ring(ring, i, now);
            return;
        }
        match open_socket(job.addr, source, false, &job.attrs) {
            Ok(socket) => {
                add(&self.counters().sockets_created, 1);
                self.post_connect(ring, i, socket.into(), job.timeout, now)
            }
            Err(e) => {
                self.slots[i].connect_res = Some(-errno_of(&e));
                self.finish_slot(ring, i, now);
            }
        }
    }

    /// Posts the io_uring SOCKET of slot `i`; its completion continues with
    /// [`Dialer::socket_opened`].
    fn open_on_ring(&mut self, ring: &mut Driver, i: usize, now: Instant) {
        let domain = if self.slots[i].addr.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        match ring.socket(domain, user_data(Tag::ConnectSocket, i as u64)) {
            Ok(()) => self.slots[i].ops = OP_SOCKET,
            Err(e) => {
                self.slots[i].opening = None;
                self.slots[i].connect_res = Some(-errno_of(&e));
                self.finish_slot(ring, i, now);
            }
        }
    }

    /// The io_uring SOCKET of slot `i` completed with `res`.
    fn socket_opened(&mut self, ring: &mut Driver, i: usize, res: i32, now: Instant) {
        self.slots[i].ops &= !OP_SOCKET;
        let Some(opening) = self.slots[i].opening.take() else {
            return;
        };
        if res < 0 {
            self.slots[i].connect_res = Some(res);
            return self.finish_slot(ring, i, now);
        }
        // Owned from the moment the completion is read.
        let fd = sys::adopt_fd(res);
        add(&self.counters().sockets_created, 1);
        if self.slots[i].cancel != Cancel::No {
            drop(fd);
            self.slots[i].connect_res = Some(-libc::ECANCELED);
            return self.finish_slot(ring, i, now);
        }
        let addr = self.slots[i].addr;
        let (source, reset, attrs) = match &opening {
            Opening::Connect { source, attrs, .. } => (*source, false, attrs.clone()),
            Opening::Sequence { plan, source } => (
                *source,
                plan.close == CloseMode::Reset,
                self.common.attrs.clone(),
            ),
        };
        if let Err(e) = configure_socket(&SockRef::from(&fd), addr, source, reset, &attrs) {
            drop(fd);
            self.slots[i].connect_res = Some(-errno_of(&e));
            return self.finish_slot(ring, i, now);
        }
        match opening {
            Opening::Connect { timeout, .. } => self.post_connect(ring, i, fd, timeout, now),
            Opening::Sequence { plan, source } => {
                let keep = plan.close == CloseMode::Reset && source.is_none();
                self.post_sequence(ring, i, fd, &plan, now, PlainSocket::new(keep))
            }
        }
    }

    /// Posts the CONNECT (+ LINK_TIMEOUT) of a single connect on `fd`.
    fn post_connect(
        &mut self,
        ring: &mut Driver,
        i: usize,
        fd: OwnedFd,
        timeout: Option<Duration>,
        now: Instant,
    ) {
        add(&self.counters().open_sockets, 1);
        let raw = fd.as_raw_fd();
        let addr = self.slots[i].addr;
        {
            let s = &mut self.slots[i];
            s.raw = raw;
            s.fd = Some(fd);
        }
        let p = i as u64;
        let t = timeout.map(|d| (d, user_data(Tag::ConnectTimeout, p)));
        let posted = ring.reserve(2).and_then(|()| {
            ring.connect_chain(
                raw,
                SockAddr::from(addr),
                t,
                false,
                user_data(Tag::Connect, p),
            )
        });
        match posted {
            Ok(()) => {
                self.slots[i].ops = OP_CONNECT | if t.is_some() { OP_TIMEOUT } else { 0 };
            }
            Err(e) => {
                self.slots[i].connect_res = Some(-errno_of(&e));
                self.finish_slot(ring, i, now);
            }
        }
    }

    /// Starts one sequence of the current run.
    fn start_sequence(&mut self, ring: &mut Driver, intended: Instant, now: Instant) {
        let Some(run) = self.run.as_mut() else {
            return;
        };
        run.started += 1;
        run.in_flight += 1;
        let plan = run.job.plan.clone();
        let source = if self.common.sources.is_empty() {
            None
        } else {
            let n = self.common.sources.len();
            run.next_source = (run.next_source + 1) % n;
            Some(self.common.sources[run.next_source])
        };
        add(&self.counters().sequences_started, 1);
        add(&self.counters().submitted, 1);
        add(&self.counters().in_flight, 1);
        let i = self.alloc(now);
        {
            let s = &mut self.slots[i];
            s.busy = true;
            s.addr = plan.target;
            s.intended = intended;
            s.started = now;
            s.expect = plan.expect;
            s.deadline =
                Some(now + plan.connect_timeout.unwrap_or(Duration::ZERO) + plan.io_timeout);
            s.connect_deadline = plan.connect_timeout.map(|d| now + d);
        }
        if source.is_none()
            && (i as u64) < u64::from(self.direct_slots)
            && self.common.attrs.is_default()
        {
            return self.post_direct_sequence(ring, i, &plan, now);
        }
        // A plain socket kept by this slot (RST close, no source address:
        // sources go round-robin per connection, so a socket bound to one
        // is not kept): it keeps its attributes; the connect picks a port.
        let v4 = plan.target.is_ipv4();
        let keep = plan.close == CloseMode::Reset && source.is_none();
        match self.parked[i].take() {
            Some(Parked::Fd { fd, v4: parked_v4 }) if parked_v4 == v4 && keep => {
                self.parked_count -= 1;
                return self.post_sequence(ring, i, fd, &plan, now, PlainSocket::Reused);
            }
            Some(other) => {
                self.parked_count -= 1;
                self.discard_parked(ring, i, other);
            }
            None => {}
        }
        if self.uring_socket {
            self.slots[i].opening = Some(Opening::Sequence { plan, source });
            self.open_on_ring(ring, i, now);
            return;
        }
        let attrs = self.common.attrs.clone();
        match open_socket(plan.target, source, plan.close == CloseMode::Reset, &attrs) {
            Ok(socket) => {
                add(&self.counters().sockets_created, 1);
                self.post_sequence(ring, i, socket.into(), &plan, now, PlainSocket::new(keep))
            }
            Err(e) => {
                self.slots[i].connect_res = Some(-errno_of(&e));
                self.finish_slot(ring, i, now);
            }
        }
    }

    /// Posts a sequence's chain on plain descriptor `fd`: CONNECT, SEND,
    /// RECV and, when one RECV completes the expectation, the end: a
    /// disconnect that keeps the socket, or a CLOSE (see [`PlainSocket`]).
    fn post_sequence(
        &mut self,
        ring: &mut Driver,
        i: usize,
        fd: OwnedFd,
        plan: &SequencePlan,
        now: Instant,
        socket: PlainSocket,
    ) {
        if socket != PlainSocket::Reused {
            add(&self.counters().open_sockets, 1);
        }
        // Kept: end with a disconnect (the RST); otherwise CLOSE (SO_LINGER
        // 0 was set at creation for an RST).
        let reset = socket != PlainSocket::NewClosed;
        let raw = fd.as_raw_fd();
        let p = i as u64;
        let send = !plan.payload.is_empty();
        let recv = plan.expect > 0;
        // A single RECV completes the expectation when it is one byte; then
        // the CLOSE can ride in the chain too.
        let close_linked = plan.expect <= 1;
        // The connect timeout is the slot's `connect_deadline`, checked by
        // the scan: no LINK_TIMEOUT (an hrtimer armed and cancelled per
        // connection).
        let n = 1 + usize::from(send) + usize::from(recv) + 1;
        let mut ops = 0u8;
        let posted = ring
            .reserve(n)
            .and_then(|()| post_chain(ring, Desc::Fd(raw), plan, p, reset, &mut ops));
        let s = &mut self.slots[i];
        s.raw = raw;
        s.ops = ops;
        s.close_linked = close_linked;
        s.reset = reset;
        match posted {
            Ok(()) if close_linked && !reset => {
                match ring.close(fd, user_data(Tag::ConnectClose, p)) {
                    Ok(()) => s.ops |= OP_CLOSE,
                    Err(_) => {
                        // `close` consumed the descriptor either way.
                        sub(&self.counters().open_sockets, 1);
                    }
                }
            }
            Ok(()) => s.fd = Some(fd),
            Err(e) => {
                s.fd = Some(fd);
                if s.ops & OP_CONNECT == 0 {
                    s.connect_res = Some(-errno_of(&e));
                }
                if s.ops == 0 {
                    self.finish_slot(ring, i, now);
                }
            }
        }
    }

    /// Posts a sequence as one linked chain on direct slot `i`, in one
    /// submission and without a syscall of its own; the socket never enters
    /// the fd table. The chain: SOCKET into the slot (unless the slot keeps
    /// a socket from an earlier sequence of the run), CONNECT, SEND, RECV
    /// and, when one RECV completes the expectation, the end: with RST
    /// close a CONNECT to AF_UNSPEC (the kernel sends the RST and keeps the
    /// socket for the next sequence: no socket, file or inode is created or
    /// freed per connection), with FIN close a CLOSE of the slot.
    fn post_direct_sequence(
        &mut self,
        ring: &mut Driver,
        i: usize,
        plan: &SequencePlan,
        now: Instant,
    ) {
        let slot = i as u32;
        let p = i as u64;
        let v4 = plan.target.is_ipv4();
        let reset = plan.close == CloseMode::Reset;
        let reuse = match self.parked[i].take() {
            Some(Parked::Direct { v4: parked_v4 }) => {
                self.parked_count -= 1;
                if parked_v4 == v4 && reset {
                    true
                } else {
                    // The SOCKET below replaces it; the kernel closes it.
                    sub(&self.counters().open_sockets, 1);
                    false
                }
            }
            Some(Parked::Fd { fd, .. }) => {
                self.parked_count -= 1;
                drop(fd);
                sub(&self.counters().open_sockets, 1);
                false
            }
            None => false,
        };
        let send = !plan.payload.is_empty();
        let recv = plan.expect > 0;
        let close_linked = plan.expect <= 1;
        let n = usize::from(!reuse) + 1 + usize::from(send) + usize::from(recv) + 1;
        let mut ops = 0u8;
        let fixed = Desc::Fixed(slot);
        let posted = (|| -> io::Result<()> {
            ring.reserve(n)?;
            if !reuse {
                let domain = if v4 { libc::AF_INET } else { libc::AF_INET6 };
                ring.socket_direct(domain, slot, true, user_data(Tag::ConnectSocket, p))?;
                ops |= OP_SOCKET;
            }
            post_chain(ring, fixed, plan, p, reset, &mut ops)?;
            if close_linked && !reset {
                ring.close_direct(slot, user_data(Tag::ConnectClose, p))?;
                ops |= OP_CLOSE;
            }
            Ok(())
        })();
        let s = &mut self.slots[i];
        s.direct = Some(slot);
        s.direct_open = reuse;
        s.reset = reset;
        s.ops = ops;
        s.close_linked = close_linked;
        if let Err(e) = posted {
            // Only a failed submission gets here (room was reserved); what
            // was queued completes or is cancelled as a chain.
            if s.ops & OP_CONNECT == 0 {
                s.connect_res = Some(-errno_of(&e));
            }
            if s.ops == 0 {
                self.finish_slot(ring, i, now);
            }
        }
    }

    /// Ends a sequence's socket that its chain did not keep (no end in the
    /// chain, the chain broke before it, or stopping): with RST close a
    /// disconnect first (the RST; the socket is then kept), else or if that
    /// fails a CLOSE. Returns whether an operation was posted.
    fn end_socket(&mut self, ring: &mut Driver, i: usize) -> bool {
        // Stopping too: the RST is what RST close promises the server.
        let s = &mut self.slots[i];
        if s.reset && !s.disconnect_tried && !s.parkable {
            s.disconnect_tried = true;
            let desc = Self::desc_of(s);
            if ring
                .disconnect(desc, user_data(Tag::ConnectDisconnect, i as u64))
                .is_ok()
            {
                s.ops |= OP_DISCONNECT;
                return true;
            }
        }
        if self.slots[i].direct_open {
            self.post_close_direct(ring, i);
        } else {
            self.post_close(ring, i);
        }
        self.slots[i].ops != 0
    }

    /// Lets go of a kept socket that the slot's next sequence cannot use.
    fn discard_parked(&mut self, ring: &mut Driver, i: usize, parked: Parked) {
        match parked {
            Parked::Fd { fd, .. } => {
                drop(fd);
                sub(&self.counters().open_sockets, 1);
            }
            Parked::Direct { .. } => {
                match ring.close_direct(i as u32, user_data(Tag::ConnectUnpark, i as u64)) {
                    Ok(()) => self.unparking += 1,
                    Err(_) => sub(&self.counters().open_sockets, 1),
                }
            }
        }
    }

    /// Closes the sockets kept in direct slots (at the end of a run, or on
    /// stop); each CLOSE completes as [`Tag::ConnectUnpark`].
    fn close_parked(&mut self, ring: &mut Driver) {
        if self.parked_count == 0 {
            return;
        }
        for i in 0..self.parked.len() {
            let Some(parked) = self.parked[i].take() else {
                continue;
            };
            self.parked_count -= 1;
            let ud = user_data(Tag::ConnectUnpark, i as u64);
            let posted = match parked {
                Parked::Direct { .. } => ring.close_direct(i as u32, ud),
                Parked::Fd { fd, .. } => ring.close(fd, ud),
            };
            match posted {
                Ok(()) => self.unparking += 1,
                // Closed anyway (`close` consumed the descriptor; the
                // ring's teardown closes a direct one): count it gone.
                Err(_) => sub(&self.shared.counters.open_sockets, 1),
            }
        }
    }

    /// Posts the CLOSE of a sequence's direct slot whose chain did not
    /// close it (no CLOSE in the chain, or the chain broke before it).
    fn post_close_direct(&mut self, ring: &mut Driver, i: usize) {
        let Some(slot) = self.slots[i].direct else {
            return;
        };
        match ring.close_direct(slot, user_data(Tag::ConnectClose, i as u64)) {
            Ok(()) => self.slots[i].ops |= OP_CLOSE,
            Err(_) => {
                // The next SOCKET into this slot replaces (and closes) it.
                self.slots[i].direct_open = false;
                sub(&self.counters().open_sockets, 1);
            }
        }
    }

    /// The descriptor a slot's operations name.
    fn desc_of(s: &Slot) -> Desc {
        s.direct.map_or(Desc::Fd(s.raw), Desc::Fixed)
    }

    /// A sequence's socket could not be created (out of descriptors or
    /// memory): rather than fail the rest of the load at full speed, the
    /// shard keeps no more sequences in flight than it has now (the
    /// most the system gave it) and, when it has none, starts nothing for
    /// a while (1 ms, doubling to [`MAX_BACKOFF`]).
    fn exhausted(&mut self, now: Instant) {
        let Some(run) = self.run.as_ref() else {
            return;
        };
        // This sequence is still counted in flight.
        let others = run.in_flight.saturating_sub(1);
        self.cap = Some(others.max(1));
        self.cap_successes = 0;
        if others == 0 && !self.backoff_until.is_some_and(|t| now < t) {
            self.backoff_until = Some(now + self.backoff_step);
            self.backoff_step = (self.backoff_step * 2).min(MAX_BACKOFF);
        }
        add(&self.counters().backoffs, 1);
    }

    /// A sequence connected: the pause resets, and a cap set by
    /// [`Dialer::exhausted`] grows by one per cap's worth of successes
    /// (additive increase) until it no longer limits the load.
    fn connected_ok(&mut self) {
        self.backoff_step = MIN_BACKOFF;
        let Some(cap) = self.cap else {
            return;
        };
        self.cap_successes += 1;
        if self.cap_successes >= cap {
            self.cap_successes = 0;
            let limit = self.run.as_ref().map_or(0, |r| r.job.concurrency);
            self.cap = (cap + 1 < limit).then_some(cap + 1);
        }
    }

    /// Posts the CLOSE of a sequence whose chain did not include one.
    fn post_close(&mut self, ring: &mut Driver, i: usize) {
        let Some(fd) = self.slots[i].fd.take() else {
            return;
        };
        match ring.close(fd, user_data(Tag::ConnectClose, i as u64)) {
            Ok(()) => self.slots[i].ops |= OP_CLOSE,
            Err(_) => sub(&self.counters().open_sockets, 1),
        }
    }

    /// Cancels what a slot has in flight (the kernel cancels the rest of a
    /// chain with its head).
    fn cancel_slot(&mut self, ring: &mut Driver, i: usize, why: Cancel) {
        let s = &mut self.slots[i];
        if s.cancel != Cancel::No {
            if why == Cancel::Shutdown {
                s.cancel = why;
            }
            return;
        }
        s.cancel = why;
        let p = i as u64;
        for (bit, tag) in [
            (OP_CONNECT, Tag::Connect),
            (OP_SEND, Tag::ConnectSend),
            (OP_RECV, Tag::ConnectRecv),
        ] {
            if s.ops & bit != 0 {
                let _ = ring.cancel(user_data(tag, p), user_data(Tag::Cancel, p));
            }
        }
    }

    /// The connect's result as counted: Ok, a kind, or None for cancelled.
    fn connect_outcome(s: &Slot) -> Result<(), Option<ConnectErrorKind>> {
        match s.connect_res {
            Some(0) => Ok(()),
            Some(r) if -r == libc::ECANCELED => {
                if s.timeout_fired || s.cancel == Cancel::Deadline {
                    Err(Some(ConnectErrorKind::TimedOut))
                } else if s.cancel == Cancel::Shutdown {
                    Err(None)
                } else {
                    Err(Some(ConnectErrorKind::Other))
                }
            }
            Some(r) => Err(Some(ConnectErrorKind::from_errno(-r))),
            None => Err(None),
        }
    }

    fn io_outcome(s: &Slot, errno: i32) -> SequenceOutcome {
        match errno {
            libc::ECANCELED if s.cancel == Cancel::Deadline => SequenceOutcome::TimedOut,
            libc::ECANCELED if s.cancel == Cancel::Shutdown => SequenceOutcome::Cancelled,
            libc::ECONNRESET | libc::EPIPE => SequenceOutcome::Reset,
            _ => SequenceOutcome::Io,
        }
    }

    fn sequence_outcome(s: &Slot) -> SequenceOutcome {
        match Self::connect_outcome(s) {
            Err(Some(kind)) => return SequenceOutcome::Connect(kind),
            Err(None) => return SequenceOutcome::Cancelled,
            Ok(()) => {}
        }
        if let Some(r) = s.send_res {
            if r < 0 {
                return Self::io_outcome(s, -r);
            }
        }
        if s.expect == 0 || s.received >= s.expect {
            return SequenceOutcome::Ok;
        }
        if let Some(e) = s.recv_err {
            return Self::io_outcome(s, e);
        }
        if s.eof {
            return SequenceOutcome::ShortRead;
        }
        match s.cancel {
            Cancel::Shutdown => SequenceOutcome::Cancelled,
            _ => SequenceOutcome::TimedOut,
        }
    }

    /// Every operation of the slot has completed: account for it, hand its
    /// result over, free it.
    fn finish_slot(&mut self, ring: &mut Driver, i: usize, now: Instant) {
        let holds_socket = self.slots[i].direct_open
            || (self.slots[i].job.is_none() && self.slots[i].fd.is_some());
        if holds_socket {
            // A sequence's socket: keep it when its disconnect worked, else
            // end it on the ring (disconnect for an RST, or close) and come
            // back when that completes.
            let v4 = self.slots[i].addr.is_ipv4();
            if self.slots[i].parkable && !self.stopping {
                let kept = if self.slots[i].direct_open {
                    self.slots[i].direct_open = false;
                    Some(Parked::Direct { v4 })
                } else {
                    self.slots[i].fd.take().map(|fd| Parked::Fd { fd, v4 })
                };
                if kept.is_some() {
                    self.parked[i] = kept;
                    self.parked_count += 1;
                }
            } else if self.end_socket(ring, i) {
                return;
            }
        }
        let mut s = std::mem::replace(&mut self.slots[i], Slot::empty(now));
        self.free.push(i);
        self.busy -= 1;
        let outcome = Self::connect_outcome(&s);
        match s.job.take() {
            Some((ticket, reply)) => {
                self.counters().connect_done(outcome);
                let result = match (outcome, s.fd.take()) {
                    (Ok(()), Some(fd)) => {
                        sub(&self.counters().open_sockets, 1);
                        let flags = s.attrs.as_ref().map_or(Ok(()), |a| a.apply_file_flags(&fd));
                        if let Err(e) = flags {
                            // Counted as connected: the connect itself worked.
                            Err(Error::setup("fcntl (attrs file flags)", e))
                        } else {
                            Ok(Connected {
                                stream: TcpStream::from(fd),
                                peer: s.addr,
                                shard: self.index,
                                latency: now.saturating_duration_since(s.started),
                            })
                        }
                    }
                    (outcome, fd) => {
                        if fd.is_some() {
                            sub(&self.counters().open_sockets, 1);
                        }
                        drop(fd);
                        let errno = s.connect_res.map(|r| -r).unwrap_or(libc::ECANCELED);
                        Err(match outcome {
                            Err(None) => Error::Closed,
                            Err(Some(ConnectErrorKind::TimedOut)) => {
                                connect_error(ConnectErrorKind::TimedOut, s.addr, libc::ETIMEDOUT)
                            }
                            Err(Some(kind)) => connect_error(kind, s.addr, errno),
                            Ok(()) => connect_error(ConnectErrorKind::Other, s.addr, errno),
                        })
                    }
                };
                self.deliver(ticket, reply, result);
            }
            None => {
                // A sequence: its connect is accounted here too.
                self.counters().connect_done(outcome);
                match outcome {
                    Err(Some(ConnectErrorKind::Exhausted)) => self.exhausted(now),
                    Ok(()) => self.connected_ok(),
                    Err(_) => {}
                }
                let seq = Self::sequence_outcome(&s);
                let c = self.counters();
                add(&c.sequences[seq.index()], 1);
                add(&c.bytes_sent, s.sent as u64);
                add(&c.bytes_received, s.received as u64);
                let record = SequenceRecord {
                    shard: self.index,
                    outcome: seq,
                    intended: s.intended,
                    start_delay: s.started.saturating_duration_since(s.intended),
                    connect: s
                        .connect_at
                        .map(|t| t.saturating_duration_since(s.intended)),
                    first_byte: s
                        .first_byte_at
                        .map(|t| t.saturating_duration_since(s.intended)),
                    total: now.saturating_duration_since(s.intended),
                    sent: s.sent,
                    received: s.received,
                };
                if let Some(run) = self.run.as_mut() {
                    run.in_flight = run.in_flight.saturating_sub(1);
                    run.outcomes.0[seq.index()] += 1;
                    run.last_end = now;
                    let sink = &mut run.job.sink;
                    if catch_unwind(AssertUnwindSafe(|| sink(&record))).is_err() {
                        add(&self.shared.counters.handler_panics, 1);
                    }
                }
            }
        }
    }

    /// Hands a single connect's result to its waiter, the inline handler,
    /// or the completion queue.
    fn deliver(&mut self, ticket: u64, reply: Reply, result: Result<Connected, Error>) {
        match reply {
            Reply::Wait(tx) => {
                // A caller that went away drops the connection here.
                let _ = tx.send(result);
            }
            Reply::Deliver => {
                let c = Completion {
                    ticket: Ticket(ticket),
                    shard: self.index,
                    result,
                };
                if let Some(h) = self.common.handler.clone() {
                    if catch_unwind(AssertUnwindSafe(|| h(c))).is_err() {
                        add(&self.counters().handler_panics, 1);
                    }
                } else {
                    self.common.delivery.will_push();
                    self.common.completions.push(c);
                    self.pushed = true;
                }
            }
        }
    }

    fn on_cqe(&mut self, ring: &mut Driver, tag: Tag, i: usize, cqe: Cqe, now: Instant) {
        let res = cqe.result;
        match tag {
            Tag::ConnectSocket if self.slots[i].direct.is_some() => {
                let s = &mut self.slots[i];
                s.ops &= !OP_SOCKET;
                if res < 0 {
                    s.connect_res = Some(res);
                } else {
                    s.direct_open = true;
                    add(&self.counters().open_sockets, 1);
                    add(&self.counters().sockets_created, 1);
                }
            }
            Tag::ConnectSocket => return self.socket_opened(ring, i, res, now),
            Tag::ConnectDisconnect => {
                let s = &mut self.slots[i];
                s.ops &= !OP_DISCONNECT;
                // Otherwise (cancelled with a broken chain, or refused) the
                // socket is still in the slot and finish_slot ends it.
                s.parkable = res == 0;
            }
            Tag::Connect => {
                ring.release(cqe.user_data);
                let s = &mut self.slots[i];
                s.ops &= !OP_CONNECT;
                // A failed SOCKET before it said why first
                // (this CONNECT was then cancelled with its chain).
                if s.connect_res.is_none() {
                    s.connect_res = Some(res);
                }
                if res == 0 {
                    s.connect_at = Some(now);
                }
            }
            Tag::ConnectTimeout => {
                ring.release(cqe.user_data);
                let s = &mut self.slots[i];
                s.ops &= !OP_TIMEOUT;
                if -res == libc::ETIME {
                    s.timeout_fired = true;
                }
            }
            Tag::ConnectSend => {
                ring.release(cqe.user_data);
                let s = &mut self.slots[i];
                s.ops &= !OP_SEND;
                s.send_res = Some(res);
                if res > 0 {
                    s.sent += res as usize;
                }
            }
            Tag::ConnectRecv => {
                ring.release(cqe.user_data);
                let s = &mut self.slots[i];
                s.ops &= !OP_RECV;
                match res {
                    r if r > 0 => {
                        s.received += r as usize;
                        s.first_byte_at.get_or_insert(now);
                    }
                    0 => s.eof = true,
                    r => s.recv_err = Some(-r),
                }
                let more = res > 0
                    && !s.close_linked
                    && s.received < s.expect
                    && s.cancel == Cancel::No
                    && !self.stopping;
                if more {
                    let len = (s.expect - s.received).min(RECV_CHUNK);
                    let (desc, p) = (Self::desc_of(s), i as u64);
                    if ring
                        .recv_linked(desc, len, 0, false, user_data(Tag::ConnectRecv, p))
                        .is_ok()
                    {
                        self.slots[i].ops |= OP_RECV;
                    }
                }
            }
            Tag::ConnectClose if self.slots[i].direct.is_some() => {
                let s = &mut self.slots[i];
                s.ops &= !OP_CLOSE;
                // -ECANCELED: the chain broke before its CLOSE ran; the
                // slot still holds the socket and finish_slot closes it.
                if s.direct_open && res != -libc::ECANCELED {
                    s.direct_open = false;
                    sub(&self.counters().open_sockets, 1);
                }
            }
            Tag::ConnectClose => {
                ring.finish_close(cqe.user_data, res);
                self.slots[i].ops &= !OP_CLOSE;
                sub(&self.counters().open_sockets, 1);
            }
            _ => return,
        }
        if self.slots[i].ops == 0 {
            self.finish_slot(ring, i, now);
        }
    }

    /// Checks the deadlines of the sequences in flight.
    fn scan(&mut self, ring: &mut Driver, now: Instant) {
        for i in 0..self.slots.len() {
            let s = &self.slots[i];
            let overdue = s.deadline.is_some_and(|d| d <= now)
                || (s.ops & OP_CONNECT != 0 && s.connect_deadline.is_some_and(|d| d <= now));
            if s.busy
                && s.cancel == Cancel::No
                && s.ops & (OP_CONNECT | OP_SEND | OP_RECV) != 0
                && overdue
            {
                self.cancel_slot(ring, i, Cancel::Deadline);
            }
        }
    }

    fn take_jobs(&mut self, ring: &mut Driver, now: Instant) {
        while let Some(job) = self.shared.queue.pop() {
            if self.stopping {
                refuse(job, self.index, &self.shared.counters, &self.common);
                continue;
            }
            match job {
                Job::Connect(j) => self.start_connect(ring, j, now),
                Job::Run(r) => self.pending_runs.push_back(r),
            }
        }
        if self.run.is_none() {
            if let Some(job) = self.pending_runs.pop_front() {
                let job = *job;
                let deadline = job.plan.duration.map(|d| job.started + d);
                // A new run starts without the last one's restraint.
                self.cap = None;
                self.cap_successes = 0;
                self.backoff_until = None;
                self.backoff_step = MIN_BACKOFF;
                self.run = Some(Run {
                    next_due: job.started,
                    deadline,
                    last_end: job.started,
                    in_flight: 0,
                    started: 0,
                    outcomes: OutcomeCounts::default(),
                    next_source: self.index,
                    job,
                });
            }
        }
    }

    /// Starts what the run allows now.
    fn drive_run(&mut self, ring: &mut Driver) {
        let Some(run) = self.run.as_ref() else {
            return;
        };
        let now = Instant::now();
        let backing_off = self.backoff_until.is_some_and(|t| now < t);
        if !backing_off {
            self.backoff_until = None;
        }
        let limit = self
            .cap
            .map_or(run.job.concurrency, |c| c.min(run.job.concurrency));
        let mut room = if backing_off {
            0
        } else {
            limit.saturating_sub(run.in_flight)
        };
        while room > 0 {
            let Some(run) = self.run.as_mut() else {
                return;
            };
            if !run.may_start(now) {
                break;
            }
            let intended = match run.job.interval {
                None => now,
                Some(iv) => {
                    if run.next_due > now {
                        break;
                    }
                    let t = run.next_due;
                    run.next_due += iv;
                    t
                }
            };
            self.start_sequence(ring, intended, now);
            room -= 1;
        }
        if self.run.as_ref().is_some_and(|run| run.finished(now)) {
            // The run leaves no socket behind: close the kept ones and end
            // it when they are closed.
            self.close_parked(ring);
            if self.unparking == 0 {
                if let Some(run) = self.run.take() {
                    let _ = run.job.done.send((run.started, run.outcomes, run.last_end));
                }
            }
        }
    }

    /// Keeps one timer posted for the earliest thing the shard must do by
    /// itself: an open-loop start or a deadline scan.
    fn arm_timer(&mut self, ring: &mut Driver, now: Instant) {
        let mut want: Option<Instant> = None;
        if let Some(run) = &self.run {
            if run.in_flight < run.job.concurrency && run.may_start(now) {
                let at = match run.job.interval {
                    Some(_) => run.next_due,
                    // A closed loop that could not fill up (sockets could
                    // not be created): retry shortly rather than wait for
                    // a completion that will not come.
                    None => now + RETRY_AFTER,
                };
                want = Some(self.backoff_until.map_or(at, |b| at.max(b)));
            }
        }
        if self.busy > 0 {
            let scan = self.next_scan;
            want = Some(want.map_or(scan, |w| w.min(scan)));
        }
        let Some(want) = want else {
            return;
        };
        match self.timer_armed {
            None => {
                let after = want.saturating_duration_since(now).max(MIN_TIMER);
                if ring.timeout(after, user_data(Tag::ConnectTimer, 0)).is_ok() {
                    self.timer_armed = Some(now + after);
                }
            }
            Some(until) if !self.timer_cancelling && want + MIN_TIMER < until => {
                if ring
                    .cancel(user_data(Tag::ConnectTimer, 0), user_data(Tag::Cancel, 0))
                    .is_ok()
                {
                    self.timer_cancelling = true;
                }
            }
            Some(_) => {}
        }
    }
}

impl Service for Dialer {
    fn start(&mut self, ring: &mut Driver) -> io::Result<()> {
        if !ring.supports(op::CONNECT) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring CONNECT is not supported by this kernel (needs Linux 5.5+)",
            ));
        }
        // SOCKET needs 5.19; older kernels get socket(2), the same socket.
        self.uring_socket = ring.supports(op::SOCKET);
        self.direct_slots = if self.uring_socket {
            direct_table(ring)
        } else {
            0
        };
        self.parked = (0..self.direct_slots).map(|_| None).collect();
        self.shared
            .counters
            .direct_sockets
            .store(self.direct_slots > 0, Ordering::Relaxed);
        self.shared
            .counters
            .uring_socket
            .store(self.uring_socket, Ordering::Relaxed);
        Ok(())
    }

    fn complete(&mut self, ring: &mut Driver, tag: Tag, payload: u64, cqe: Cqe, now: Instant) {
        if tag == Tag::ConnectTimer {
            ring.release(cqe.user_data);
            self.timer_armed = None;
            self.timer_cancelling = false;
            return;
        }
        if tag == Tag::ConnectUnpark {
            // A plain descriptor's CLOSE holds it until here (nothing for a
            // direct slot's).
            ring.finish_close(cqe.user_data, cqe.result);
            self.unparking -= 1;
            sub(&self.counters().open_sockets, 1);
            return;
        }
        let i = payload as usize;
        if i < self.slots.len() && self.slots[i].busy {
            self.on_cqe(ring, tag, i, cqe, now);
        }
    }

    fn turn(&mut self, ring: &mut Driver, now: Instant) {
        self.take_jobs(ring, now);
        if !self.stopping {
            self.drive_run(ring);
        }
        if self.busy > 0 && now >= self.next_scan {
            self.scan(ring, now);
            self.next_scan = now + SCAN_INTERVAL;
        }
        if std::mem::take(&mut self.pushed) {
            self.common.delivery.notify();
        }
        if !self.stopping {
            self.arm_timer(ring, now);
        }
    }

    fn stop(&mut self, ring: &mut Driver) {
        self.stopping = true;
        while let Some(job) = self.shared.queue.pop() {
            refuse(job, self.index, &self.shared.counters, &self.common);
        }
        for r in self.pending_runs.drain(..) {
            refuse(Job::Run(r), self.index, &self.shared.counters, &self.common);
        }
        for i in 0..self.slots.len() {
            if self.slots[i].busy {
                self.cancel_slot(ring, i, Cancel::Shutdown);
            }
        }
        self.close_parked(ring);
        if self.timer_armed.is_some() && !self.timer_cancelling {
            let _ = ring.cancel(user_data(Tag::ConnectTimer, 0), user_data(Tag::Cancel, 0));
            self.timer_cancelling = true;
        }
        // A run with nothing in flight ends now; one with sequences in
        // flight ends as they complete (cancelled).
        if let Some(run) = &mut self.run {
            run.job.count = Some(run.started);
        }
        self.drive_run_end();
    }

    fn idle(&self) -> bool {
        self.busy == 0 && self.timer_armed.is_none() && self.unparking == 0
    }

    fn finish(&mut self) {
        while let Some(job) = self.shared.queue.pop() {
            refuse(job, self.index, &self.shared.counters, &self.common);
        }
        if let Some(run) = self.run.take() {
            let _ = run.job.done.send((run.started, run.outcomes, run.last_end));
        }
        if std::mem::take(&mut self.pushed) {
            self.common.delivery.notify();
        }
    }
}

impl Dialer {
    fn drive_run_end(&mut self) {
        let now = Instant::now();
        if self.run.as_ref().is_some_and(|r| r.finished(now)) {
            if let Some(run) = self.run.take() {
                let _ = run.job.done.send((run.started, run.outcomes, run.last_end));
            }
        }
    }
}

/// Configures and starts a [`Connector`]. See [`Connector::builder`].
///
/// ```
/// use std::time::Duration;
/// use floodgate::Connector;
///
/// let connector = Connector::builder()
///     .shards(1)
///     .pin(false)
///     .sources(["127.0.0.2".parse()?, "127.0.0.3".parse()?])
///     .timeout(Some(Duration::from_secs(1)))
///     .build()?;
/// assert_eq!(connector.shards(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct ConnectorBuilder {
    shards: Option<usize>,
    pin: bool,
    backend: crate::driver::Backend,
    cores: Option<Vec<usize>>,
    sources: Vec<IpAddr>,
    timeout: Option<Duration>,
    handler: Option<Arc<ConnectHandler>>,
    attrs: SocketAttrs,
}

impl std::fmt::Debug for ConnectorBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectorBuilder")
            .field("shards", &self.shards)
            .field("pin", &self.pin)
            .field("backend", &self.backend)
            .field("cores", &self.cores)
            .field("sources", &self.sources)
            .field("timeout", &self.timeout)
            .field("handler", &self.handler.is_some())
            .field("attrs", &self.attrs)
            .finish()
    }
}

impl ConnectorBuilder {
    fn new() -> Self {
        ConnectorBuilder {
            shards: None,
            pin: true,
            backend: crate::driver::Backend::Auto,
            cores: None,
            sources: Vec::new(),
            timeout: Some(DEFAULT_CONNECT_TIMEOUT),
            handler: None,
            attrs: SocketAttrs::default(),
        }
    }

    /// Socket attributes for every outgoing socket (the type the listener
    /// uses, [`crate::ListenerBuilder::attrs`]): options are set when the
    /// socket is created, before its connect; the file flags
    /// (`nonblocking`, `close_on_exec`) when a connected socket is handed
    /// over. A [`Dial`] may bring its own. Load sequences with attributes
    /// use plain descriptors (kept across sequences with RST close, so
    /// the attributes are set once per socket). Checked at
    /// [`ConnectorBuilder::build`] on a scratch socket.
    pub fn attrs(mut self, attrs: SocketAttrs) -> Self {
        self.attrs = attrs;
        self
    }

    /// Number of shards. Default: one per core this process may run on.
    pub fn shards(mut self, n: usize) -> Self {
        self.shards = Some(n);
        self
    }

    /// Which backend runs the shards (default [`Backend::Auto`](crate::Backend::Auto):
    /// io_uring, or epoll where io_uring is denied).
    pub fn backend(mut self, b: crate::driver::Backend) -> Self {
        self.backend = b;
        self
    }

    /// Pin shard `k` to core `k` (default on), or to the `cores` list.
    pub fn pin(mut self, on: bool) -> Self {
        self.pin = on;
        self
    }

    /// Pin shard `k` to `cores[k % cores.len()]` (implies pinning).
    pub fn cores(mut self, cores: Vec<usize>) -> Self {
        self.cores = Some(cores);
        self.pin = true;
        self
    }

    /// Bind every connect to `ip` (any port): an explicit source address.
    pub fn source(mut self, ip: IpAddr) -> Self {
        self.sources = vec![ip];
        self
    }

    /// Use these source addresses round-robin. Empty: implicit bind.
    pub fn sources(mut self, ips: impl IntoIterator<Item = IpAddr>) -> Self {
        self.sources = ips.into_iter().collect();
        self
    }

    /// The default connect timeout (default [`DEFAULT_CONNECT_TIMEOUT`]);
    /// `None`: the kernel's SYN retries decide.
    pub fn timeout(mut self, t: Option<Duration>) -> Self {
        self.timeout = t;
        self
    }

    /// Delivers every submitted connect's [`Completion`] to `handler`,
    /// inline on the shard thread; `try_complete` is then not available.
    /// It must not block (a blocking [`Connector::connect`] from it would
    /// wait for its own shard). A panic is caught and counted.
    pub fn handler<F>(mut self, handler: F) -> Self
    where
        F: Fn(Completion) + Send + Sync + 'static,
    {
        self.handler = Some(Arc::new(handler));
        self
    }

    /// Validates and starts the shards, each with its own io_uring.
    ///
    /// # Errors
    /// [`Error::Config`] naming the field for a bad value;
    /// [`Error::UringUnavailable`] or [`Error::Setup`] if a shard cannot
    /// start (the ring, or a kernel without io_uring CONNECT). Nothing is
    /// left running on error.
    pub fn build(self) -> Result<Connector, Error> {
        let available = core_affinity::get_core_ids().unwrap_or_default();
        let n = self.shards.unwrap_or(available.len().max(1));
        if n == 0 || n > 1024 {
            return Err(ConfigError::new("shards", n, "must be in 1..=1024").into());
        }
        if self.timeout == Some(Duration::ZERO) {
            return Err(ConfigError::new("timeout", "0s", "must be positive").into());
        }
        for ip in &self.sources {
            if ip.is_unspecified() || ip.is_multicast() {
                return Err(
                    ConfigError::new("sources", ip, "a source must be a unicast address").into(),
                );
            }
        }
        check_attrs(&self.attrs)?;
        let placement = |k: usize| -> Result<Option<core_affinity::CoreId>, ConfigError> {
            if !self.pin {
                return Ok(None);
            }
            match &self.cores {
                Some(list) if !list.is_empty() => {
                    let want = list[k % list.len()];
                    available
                        .iter()
                        .find(|c| c.id == want)
                        .copied()
                        .map(Some)
                        .ok_or_else(|| {
                            ConfigError::new(
                                "cores",
                                want,
                                "no such core available to this process",
                            )
                        })
                }
                Some(_) => Err(ConfigError::new("cores", "[]", "the list is empty")),
                None => Ok(available.get(k).copied()),
            }
        };
        let placements = (0..n)
            .map(placement)
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let common = Arc::new(Common {
            completions: SegQueue::new(),
            delivery: Delivery::new()?,
            handler: self.handler.clone(),
            sources: self.sources.clone(),
            next_source: AtomicUsize::new(0),
            timeout: self.timeout,
            attrs: Arc::new(self.attrs.clone()),
        });
        let mut connector = Connector {
            shards: Vec::with_capacity(n),
            common: common.clone(),
            threads: Mutex::new(Vec::with_capacity(n)),
            next_shard: AtomicUsize::new(0),
            next_ticket: AtomicU64::new(1),
            run_lock: Mutex::new(()),
            setup: RingSetup::default(),
            backend: None,
        };
        for (k, core) in placements.into_iter().enumerate() {
            let control = Arc::new(ShardControl::new()?);
            let shared = Arc::new(ShardShared {
                queue: SegQueue::new(),
                counters: Counters::default(),
                control: control.clone(),
            });
            let dialer = Dialer {
                index: k,
                shared: shared.clone(),
                common: common.clone(),
                slots: Vec::new(),
                free: Vec::new(),
                busy: 0,
                run: None,
                pending_runs: VecDeque::new(),
                timer_armed: None,
                timer_cancelling: false,
                next_scan: Instant::now(),
                stopping: false,
                pushed: false,
                uring_socket: false,
                direct_slots: 0,
                parked: Vec::new(),
                parked_count: 0,
                unparking: 0,
                backoff_until: None,
                backoff_step: MIN_BACKOFF,
                cap: None,
                cap_successes: 0,
            };
            let placement = Placement {
                index: k,
                core,
                backend: self.backend,
            };
            match shard::spawn("floodgate-connect", placement, control, dialer) {
                Ok((handle, started)) => {
                    connector.shards.push(shared);
                    if let Ok(mut t) = connector.threads.lock() {
                        t.push(handle);
                    }
                    if k == 0 {
                        connector.setup = started.setup;
                        connector.backend = Some(started.backend);
                    }
                }
                Err(e) => {
                    connector.shutdown();
                    return Err(e);
                }
            }
        }
        Ok(connector)
    }
}

/// A running connector: one shard per core posting io_uring CONNECTs.
///
/// Built with [`Connector::builder`]. Any number of threads may call its
/// methods. Dropping it shuts it down.
///
/// ```
/// use std::net::TcpListener;
/// use floodgate::{ConnectErrorKind, Connector, Error};
///
/// let server = TcpListener::bind("127.0.0.1:0")?;
/// let connector = Connector::builder().shards(1).pin(false).build()?;
///
/// // Blocking.
/// let conn = connector.connect(server.local_addr()?)?;
/// let (accepted, _) = server.accept()?;
/// assert_eq!(accepted.peer_addr()?, conn.local_addr()?);
///
/// // Submitted, then polled.
/// let ticket = connector.submit(server.local_addr()?)?;
/// let done = loop {
///     if let Some(c) = connector.complete_timeout(std::time::Duration::from_secs(5))? {
///         break c;
///     }
/// };
/// assert_eq!(done.ticket, ticket);
/// assert!(done.result.is_ok());
///
/// // A closed port: a typed error naming the cause and the address.
/// let closed = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
/// match connector.connect(closed) {
///     Err(Error::Connect { kind: ConnectErrorKind::Refused, addr, .. }) => assert_eq!(addr, closed),
///     other => panic!("expected refused, got {other:?}"),
/// }
/// connector.shutdown();
/// assert!(connector.stats().conserved());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Connector {
    shards: Vec<Arc<ShardShared>>,
    common: Arc<Common>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    next_shard: AtomicUsize,
    next_ticket: AtomicU64,
    run_lock: Mutex<()>,
    setup: RingSetup,
    backend: Option<crate::driver::BackendChoice>,
}

impl Connector {
    /// Starts configuring a connector.
    pub fn builder() -> ConnectorBuilder {
        ConnectorBuilder::new()
    }

    /// The number of shards.
    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// How the shards' rings were set up.
    pub fn ring_setup(&self) -> RingSetup {
        self.setup
    }

    /// The backend the shards run on, and why it was chosen.
    pub fn backend(&self) -> crate::driver::BackendChoice {
        self.backend
            .clone()
            .unwrap_or_else(crate::driver::BackendChoice::none_started)
    }

    fn closed(&self) -> bool {
        self.common.delivery.closed.load(Ordering::SeqCst)
    }

    /// Queues `job` for a shard and wakes it; after shutdown, or if
    /// shutdown raced with the push, the job is refused (and counted).
    fn post(&self, shard: usize, job: Job) -> Result<(), Error> {
        if self.closed() {
            return Err(Error::Closed);
        }
        let s = &self.shards[shard];
        if matches!(job, Job::Connect(_)) {
            add(&s.counters.submitted, 1);
            add(&s.counters.in_flight, 1);
        }
        s.queue.push(job);
        s.control.wake();
        if self.closed() {
            // Shutdown may have drained the queue before our push: whoever
            // pops a job refuses it, so it is answered exactly once.
            while let Some(j) = s.queue.pop() {
                refuse(j, shard, &s.counters, &self.common);
            }
        }
        Ok(())
    }

    fn job(&self, dial: Dial, reply: Reply) -> (usize, ConnectJob) {
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        let shard = self.next_shard.fetch_add(1, Ordering::Relaxed) % self.shards.len();
        let job = ConnectJob {
            ticket,
            addr: dial.addr,
            source: dial.source,
            timeout: dial.timeout.unwrap_or(self.common.timeout),
            attrs: dial.attrs.unwrap_or_else(|| self.common.attrs.clone()),
            reply,
        };
        (shard, job)
    }

    /// Connects to `addr` and waits for the result.
    ///
    /// # Errors
    /// [`Error::Connect`] with its [`ConnectErrorKind`] and the address;
    /// [`Error::Closed`] after (or during) shutdown.
    pub fn connect(&self, addr: SocketAddr) -> Result<Connected, Error> {
        self.connect_with(Dial::new(addr))
    }

    /// Connects as `dial` says and waits for the result.
    ///
    /// # Errors
    /// As [`Connector::connect`].
    pub fn connect_with(&self, dial: Dial) -> Result<Connected, Error> {
        let (tx, rx) = mpsc::sync_channel(1);
        let (shard, job) = self.job(dial, Reply::Wait(tx));
        self.post(shard, Job::Connect(job))?;
        rx.recv().unwrap_or(Err(Error::Closed))
    }

    /// Posts a connect without waiting; its [`Completion`] comes from
    /// [`Connector::try_complete`] (or the inline handler).
    ///
    /// # Errors
    /// [`Error::Closed`] after shutdown.
    pub fn submit(&self, dial: impl Into<Dial>) -> Result<Ticket, Error> {
        let (shard, job) = self.job(dial.into(), Reply::Deliver);
        let ticket = Ticket(job.ticket);
        self.post(shard, Job::Connect(job))?;
        Ok(ticket)
    }

    /// Takes the next finished submitted connect, without waiting.
    /// Completions still queued at shutdown are returned first; then
    /// [`Error::Closed`].
    ///
    /// # Errors
    /// [`Error::InlineDelivery`] with an inline handler; [`Error::Closed`].
    pub fn try_complete(&self) -> Result<Option<Completion>, Error> {
        if self.common.handler.is_some() {
            return Err(Error::InlineDelivery);
        }
        let d = &self.common.delivery;
        if let Some(c) = self.common.completions.pop() {
            d.popped();
            if d.pending.load(Ordering::SeqCst) == 0 {
                d.quiesce();
            }
            return Ok(Some(c));
        }
        d.quiesce();
        if self.closed() {
            return Err(Error::Closed);
        }
        Ok(None)
    }

    /// Waits at most `timeout` for the next finished submitted connect.
    ///
    /// # Errors
    /// As [`Connector::try_complete`]; `poll(2)` failures as [`Error::Setup`].
    pub fn complete_timeout(&self, timeout: Duration) -> Result<Option<Completion>, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.try_complete()? {
                return Ok(Some(c));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            sys::poll_readable(self.common.delivery.event.as_fd(), Some(deadline - now)).map_err(
                |e| Error::Setup {
                    op: "poll",
                    source: e,
                },
            )?;
        }
    }

    /// The completion event: readable while completions of submitted
    /// connects are waiting (and after shutdown). Register it in any event
    /// loop, then call [`Connector::try_complete`] until `Ok(None)`, which
    /// also clears it. Do not read from it.
    pub fn completion_event(&self) -> BorrowedFd<'_> {
        self.common.delivery.event.as_fd()
    }

    /// Runs `plan` on the shards and waits until it is done: every shard
    /// starts its share of the sequences (concurrency, rate and count are
    /// split evenly) on its own ring, and calls `sink(shard)`'s closure on
    /// the shard thread with each finished sequence's record. One run at a
    /// time; [`Connector::stats`] shows progress meanwhile.
    ///
    /// # Errors
    /// [`Error::Config`] for a plan without a bound or with a bad value;
    /// [`Error::Closed`] after shutdown (a shutdown during the run ends it
    /// early, with its in-flight sequences counted as cancelled).
    pub fn run<F, S>(&self, plan: &SequencePlan, sink: F) -> Result<RunSummary, Error>
    where
        F: Fn(usize) -> S,
        S: FnMut(&SequenceRecord) + Send + 'static,
    {
        plan.validate(self.shards.len())?;
        let _one = self.run_lock.lock().unwrap_or_else(|p| p.into_inner());
        // Shards that take part: all, or as many as the concurrency allows.
        let n = match plan.load {
            Load::Closed { concurrency } => self.shards.len().min(concurrency),
            Load::Open { .. } => self.shards.len(),
        };
        let share =
            |total: u64, k: usize| total / n as u64 + u64::from((k as u64) < total % n as u64);
        let plan = Arc::new(plan.clone());
        let started = Instant::now();
        let (tx, rx) = mpsc::channel();
        let mut posted = 0;
        for k in 0..n {
            let (concurrency, interval) = match plan.load {
                Load::Closed { concurrency } => (share(concurrency as u64, k) as usize, None),
                Load::Open {
                    rate,
                    max_in_flight,
                } => (
                    (share(max_in_flight as u64, k) as usize).max(1),
                    Some(Duration::from_secs_f64(n as f64 / rate)),
                ),
            };
            let job = RunJob {
                plan: plan.clone(),
                started,
                concurrency,
                interval,
                count: plan.count.map(|c| share(c, k)),
                sink: Box::new(sink(k)),
                done: tx.clone(),
            };
            self.post(k, Job::Run(Box::new(job)))?;
            posted += 1;
        }
        drop(tx);
        let mut summary = RunSummary::default();
        let mut last = started;
        for _ in 0..posted {
            let Ok((n_started, outcomes, end)) = rx.recv() else {
                break;
            };
            summary.started += n_started;
            summary.outcomes.add(&outcomes);
            last = last.max(end);
        }
        summary.elapsed = last.saturating_duration_since(started);
        Ok(summary)
    }

    /// A snapshot of every shard's counters.
    pub fn stats(&self) -> ConnectorStats {
        ConnectorStats {
            shards: self
                .shards
                .iter()
                .enumerate()
                .map(|(i, s)| s.counters.snapshot(i))
                .collect(),
        }
    }

    /// Stops the shards: queued connects fail with [`Error::Closed`],
    /// in-flight ones are cancelled (or complete), every socket is closed
    /// and counted, and the threads are joined. Completions already queued
    /// stay available to [`Connector::try_complete`]. Idempotent; `Drop`
    /// calls it.
    pub fn shutdown(&self) {
        if self.common.delivery.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        for s in &self.shards {
            s.control.stop();
        }
        let threads = match self.threads.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        };
        for t in threads {
            let _ = t.join();
        }
        for (k, s) in self.shards.iter().enumerate() {
            while let Some(j) = s.queue.pop() {
                refuse(j, k, &s.counters, &self.common);
            }
        }
        self.common.delivery.notify();
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        self.shutdown();
    }
}
