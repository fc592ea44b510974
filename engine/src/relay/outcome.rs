//! What a relay is configured with and how it ends: [`RelayOptions`], the
//! per-shard limits, and the [`RelayOutcome`] each relay reports, with the
//! counters it is tallied in.

use std::fmt;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use crate::stats::{Counters, RelayCounters};

/// Default size of each direction's buffer: 64 KiB.
pub const DEFAULT_RELAY_BUFFER: usize = 64 * 1024;
/// Largest buffer a relay direction uses (larger requests are clamped).
pub const MAX_RELAY_BUFFER: usize = 16 * 1024 * 1024;
/// Default bound on the upstream CONNECT: 5 s.
pub const DEFAULT_RELAY_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default idle timeout of a relay: 10 minutes without a byte either way
/// (as nginx's stream `proxy_timeout`): long enough for any interactive
/// protocol, short enough that dead peers do not hold relays for hours.
pub const DEFAULT_RELAY_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// The most relays one shard can hold at once (the slot space of the
/// shard's user data); [`crate::ListenerBuilder::max_relays_per_shard`]
/// is at most this, and is this by default.
pub const MAX_RELAYS_PER_SHARD: usize = 1 << 24;

/// How [`crate::ShardContext::relay`] relays a connection.
///
/// ```
/// use std::time::Duration;
/// use floodgate::RelayOptions;
///
/// let opts = RelayOptions::new()
///     .with_buffer_size(16 * 1024)
///     .with_connect_timeout(Duration::from_secs(1))
///     .with_idle_timeout(Duration::from_secs(30));
/// assert_eq!(opts.buffer_size(), 16 * 1024);
/// assert_eq!(opts.idle_timeout(), Some(Duration::from_secs(30)));
/// assert_eq!(RelayOptions::default().buffer_size(), floodgate::DEFAULT_RELAY_BUFFER);
/// assert_eq!(
///     RelayOptions::default().idle_timeout(),
///     Some(floodgate::DEFAULT_RELAY_IDLE_TIMEOUT)
/// );
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayOptions {
    buffer_size: usize,
    connect_timeout: Duration,
    idle_timeout: Duration,
    nodelay: bool,
    strip_proxy_header: bool,
}

impl RelayOptions {
    /// 64 KiB per direction, a 5 s connect timeout, a 10 min idle timeout,
    /// TCP_NODELAY on both sockets.
    pub const fn new() -> Self {
        RelayOptions {
            buffer_size: DEFAULT_RELAY_BUFFER,
            connect_timeout: DEFAULT_RELAY_CONNECT_TIMEOUT,
            idle_timeout: DEFAULT_RELAY_IDLE_TIMEOUT,
            nodelay: true,
            strip_proxy_header: false,
        }
    }

    /// A relay in which no byte moved in either direction for `d` is torn
    /// down (both sockets reset) and ends with [`RelayEnd::IdleTimeout`].
    /// The clock starts once the upstream is connected (the connect has its
    /// own timeout) and restarts with every receive or send that moved
    /// bytes. The teardown comes at most 1/16 of the shortest idle timeout
    /// on the shard late (plus scheduling). Default
    /// [`DEFAULT_RELAY_IDLE_TIMEOUT`]; `Duration::ZERO`: none.
    pub const fn with_idle_timeout(mut self, d: Duration) -> Self {
        self.idle_timeout = d;
        self
    }

    /// The idle timeout (`None`: none).
    pub const fn idle_timeout(&self) -> Option<Duration> {
        if self.idle_timeout.is_zero() {
            None
        } else {
            Some(self.idle_timeout)
        }
    }

    /// Size of each direction's buffer (one per direction per relay), the
    /// most one RECV takes; clamped to `1..=`[`MAX_RELAY_BUFFER`].
    pub const fn with_buffer_size(mut self, bytes: usize) -> Self {
        self.buffer_size = bytes;
        self
    }

    /// Bound on the upstream CONNECT (a LINK_TIMEOUT linked to it);
    /// `Duration::ZERO` leaves it to the kernel's SYN retries.
    pub const fn with_connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Whether both sockets of the relay, the client's and the upstream's,
    /// get TCP_NODELAY (default on: a relay forwards what it received at
    /// once; batching is the endpoints' choice). Off leaves both as they
    /// are (the client's socket as accepted, the upstream's as created).
    pub const fn with_nodelay(mut self, on: bool) -> Self {
        self.nodelay = on;
        self
    }

    /// Whether a PROXY header (v1 or v2) at the start of the client's
    /// stream is consumed instead of relayed (default off: the upstream
    /// gets the stream as the client sent it). Only a header that has fully
    /// arrived when the relay starts is stripped; a listener that peeks
    /// enough bytes for its condition has made sure of that.
    pub const fn with_strip_proxy_header(mut self, on: bool) -> Self {
        self.strip_proxy_header = on;
        self
    }

    /// Whether a complete leading PROXY header is stripped.
    pub const fn strip_proxy_header(&self) -> bool {
        self.strip_proxy_header
    }

    /// The buffer size each direction will use (after clamping).
    pub const fn buffer_size(&self) -> usize {
        if self.buffer_size == 0 {
            1
        } else if self.buffer_size > MAX_RELAY_BUFFER {
            MAX_RELAY_BUFFER
        } else {
            self.buffer_size
        }
    }

    /// The upstream connect timeout (`ZERO`: none).
    pub const fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// Whether both sockets get TCP_NODELAY.
    pub const fn nodelay(&self) -> bool {
        self.nodelay
    }
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions::new()
    }
}

/// One end of a relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum RelaySide {
    /// The admitted client connection.
    Client,
    /// The connection the relay dialled.
    Upstream,
}

/// How a relay ended (see [`RelayOutcome`]). Every end but
/// [`RelayEnd::Completed`] resets the relay's sockets (SO_LINGER 0): both
/// peers, or only the client of a relay that never started, see an RST.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum RelayEnd {
    /// Both directions reached end of stream (FIN) and were passed on; both
    /// sockets were closed with FIN.
    Completed,
    /// The client reset the connection (ECONNRESET or EPIPE on its socket).
    ClientReset,
    /// The upstream reset the connection (ECONNRESET or EPIPE on its socket).
    UpstreamReset,
    /// The upstream refused the connection (ECONNREFUSED).
    UpstreamRefused,
    /// The upstream did not answer within the connect timeout
    /// ([`RelayOptions::with_connect_timeout`]), or the kernel gave up its
    /// SYN retries (ETIMEDOUT).
    UpstreamTimeout,
    /// No byte moved either way for the idle timeout
    /// ([`RelayOptions::with_idle_timeout`]).
    IdleTimeout,
    /// The listener shut down (a relay running then, or one asked for while
    /// it was shutting down).
    Shutdown,
    /// Refused at the shard's cap
    /// ([`crate::ListenerBuilder::max_relays_per_shard`],
    /// [`crate::ListenerBuilder::relay_memory_per_shard`]): nothing was
    /// dialled, the client was reset.
    CapRefused,
    /// Any other error: `errno` of the failed operation (e.g. ETIMEDOUT of
    /// a keepalive, EMFILE creating the upstream socket), or 0 when there
    /// was none (a send that sent nothing).
    Error {
        /// The error number (`libc::E*`), or 0.
        errno: i32,
    },
}

/// What became of one relay, given to the callback of
/// [`crate::ShardContext::relay_with`] once the relay is over: both of its
/// sockets are closed by then.
///
/// ```
/// use floodgate::{RelayEnd, RelayOutcome, RelaySide};
///
/// /// One log line per relay.
/// fn log(o: &RelayOutcome) -> String {
///     let how = match o.end {
///         RelayEnd::Completed => "completed".to_owned(),
///         RelayEnd::Error { errno } => format!("error {errno}"),
///         other => format!("{other:?}"),
///     };
///     let who = match o.first {
///         Some(RelaySide::Client) => "client",
///         Some(RelaySide::Upstream) => "upstream",
///         None => "neither side",
///     };
///     format!(
///         "{how} ({who} first): {} B up, {} B down in {:?}",
///         o.bytes_to_upstream, o.bytes_to_client, o.duration
///     )
/// }
/// # let _ = log;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct RelayOutcome {
    /// How it ended.
    pub end: RelayEnd,
    /// The side whose end of stream (FIN), reset or error the relay saw
    /// first; `None` when neither side had ended when the relay did (idle
    /// timeout, shutdown, cap, a failure to start). For a completed relay,
    /// the side that half-closed first.
    pub first: Option<RelaySide>,
    /// Bytes sent from the client to the upstream.
    pub bytes_to_upstream: u64,
    /// Bytes sent from the upstream to the client.
    pub bytes_to_client: u64,
    /// From the relay call until both sockets were closed.
    pub duration: Duration,
}

/// The callback given to [`crate::ShardContext::relay_with`].
pub(crate) struct OnEnd(pub(crate) Box<dyn FnOnce(RelayOutcome) + Send>);

impl fmt::Debug for OnEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OnEnd")
    }
}

/// A shard's caps on its relays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RelayLimits {
    /// Relays at once (slots held, including those closing).
    pub max_relays: usize,
    /// Bytes of relay buffers at once (two buffers per relay).
    pub memory: usize,
}

impl Default for RelayLimits {
    fn default() -> Self {
        RelayLimits {
            max_relays: MAX_RELAYS_PER_SHARD,
            memory: usize::MAX,
        }
    }
}

/// Side 0 is the client, side 1 the upstream; direction `d` reads from side
/// `d` and writes to side `1 - d`.
pub(super) const CLIENT: usize = 0;
pub(super) const UPSTREAM: usize = 1;

pub(super) fn side_of(side: usize) -> RelaySide {
    if side == CLIENT {
        RelaySide::Client
    } else {
        RelaySide::Upstream
    }
}

/// The end an error of `errno` on `side`'s socket means.
pub(super) fn peer_end(side: usize, errno: i32) -> RelayEnd {
    match errno {
        libc::ECONNRESET | libc::EPIPE if side == CLIENT => RelayEnd::ClientReset,
        libc::ECONNRESET | libc::EPIPE => RelayEnd::UpstreamReset,
        _ => RelayEnd::Error { errno },
    }
}

/// The end a failed upstream CONNECT means. Before the relay is ending,
/// only its linked timeout cancels it (ECANCELED).
pub(super) fn connect_end(errno: i32) -> RelayEnd {
    match errno {
        libc::ECONNREFUSED => RelayEnd::UpstreamRefused,
        libc::ECANCELED | libc::ETIMEDOUT => RelayEnd::UpstreamTimeout,
        _ => peer_end(UPSTREAM, errno),
    }
}

pub(super) fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// Counts one relay's end.
pub(super) fn count_end(c: &RelayCounters, end: RelayEnd) {
    let (total, detail): (&AtomicU64, Option<&AtomicU64>) = match end {
        RelayEnd::Completed => (&c.completed, None),
        RelayEnd::ClientReset => (&c.failed, Some(&c.client_reset)),
        RelayEnd::UpstreamReset => (&c.failed, Some(&c.upstream_reset)),
        RelayEnd::UpstreamRefused => (&c.failed, Some(&c.upstream_refused)),
        RelayEnd::UpstreamTimeout => (&c.failed, Some(&c.upstream_timeout)),
        RelayEnd::Error { .. } => (&c.failed, Some(&c.errors)),
        RelayEnd::IdleTimeout => (&c.idle_timeout, None),
        RelayEnd::Shutdown => (&c.closed_at_shutdown, None),
        RelayEnd::CapRefused => (&c.refused_cap, None),
    };
    Counters::add(total, 1);
    if let Some(d) = detail {
        Counters::add(d, 1);
    }
}

/// Gives `outcome` to the relay's callback, if any; a panic is caught and
/// counted (the shard goes on).
pub(super) fn deliver(c: &RelayCounters, on_end: Option<OnEnd>, outcome: RelayOutcome) {
    if let Some(OnEnd(f)) = on_end {
        if catch_unwind(AssertUnwindSafe(move || f(outcome))).is_err() {
            Counters::add(&c.callback_panics, 1);
            event!(error, "relay outcome callback panicked");
        }
    }
}
