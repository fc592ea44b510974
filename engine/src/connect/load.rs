//! Load runs ([`Connector::run`](super::connector::Connector::run)): the
//! [`SequencePlan`] each sequence follows and its pacing, and what comes
//! back: a [`SequenceRecord`] per sequence, [`OutcomeCounts`], the
//! [`RunSummary`].

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::error::{ConfigError, ConnectErrorKind};

use super::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_IO_TIMEOUT, MAX_IN_FLIGHT_PER_SHARD};

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
///
/// With the `serde` feature it is a map from each outcome's
/// [`SequenceOutcome::name`] to its count (`{"ok": 10, "reset": 0, ...}`),
/// and a [`SequenceOutcome`] is its name.
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

    pub(super) fn add(&mut self, other: &OutcomeCounts) {
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
    pub(super) target: SocketAddr,
    pub(super) payload: Vec<u8>,
    pub(super) expect: usize,
    pub(super) close: CloseMode,
    pub(super) connect_timeout: Option<Duration>,
    pub(super) io_timeout: Duration,
    pub(super) load: Load,
    pub(super) count: Option<u64>,
    pub(super) duration: Option<Duration>,
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

    pub(super) fn validate(&self, shards: usize) -> Result<(), ConfigError> {
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

/// What [`Connector::run`](crate::Connector::run) did, over all shards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct RunSummary {
    /// Sequences started.
    pub started: u64,
    /// Their outcomes (every started sequence has one).
    pub outcomes: OutcomeCounts,
    /// From the run's start to the last completion.
    pub elapsed: Duration,
}

/// With the `serde` feature, an outcome is its [`SequenceOutcome::name`]
/// and [`OutcomeCounts`] a map from those names to counts (every outcome,
/// zeros included; a missing name reads as 0, an unknown one is refused).
#[cfg(feature = "serde")]
mod serde_impls {
    use std::fmt;

    use serde::de::{self, MapAccess, Visitor};
    use serde::ser::SerializeMap;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{OutcomeCounts, SequenceOutcome};

    fn by_name<E: de::Error>(name: &str) -> Result<SequenceOutcome, E> {
        SequenceOutcome::ALL
            .iter()
            .copied()
            .find(|o| o.name() == name)
            .ok_or_else(|| E::custom(format!("unknown sequence outcome `{name}`")))
    }

    impl Serialize for SequenceOutcome {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(self.name())
        }
    }

    impl<'de> Deserialize<'de> for SequenceOutcome {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let name = std::borrow::Cow::<'de, str>::deserialize(d)?;
            by_name(&name)
        }
    }

    impl Serialize for OutcomeCounts {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut map = s.serialize_map(Some(SequenceOutcome::ALL.len()))?;
            for o in SequenceOutcome::ALL {
                map.serialize_entry(o.name(), &self.get(o))?;
            }
            map.end()
        }
    }

    struct CountsVisitor;

    impl<'de> Visitor<'de> for CountsVisitor {
        type Value = OutcomeCounts;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map from sequence outcome names to counts")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OutcomeCounts, A::Error> {
            let mut counts = OutcomeCounts::default();
            while let Some(name) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                let o = by_name(&name)?;
                counts.0[o.index()] = map.next_value()?;
            }
            Ok(counts)
        }
    }

    impl<'de> Deserialize<'de> for OutcomeCounts {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_map(CountsVisitor)
        }
    }
}
