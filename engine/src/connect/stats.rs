//! The connector's counters: the live per-shard atomics the shards bump
//! and the snapshots the application reads ([`ConnectShardStats`],
//! [`ConnectorStats`]).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::ConnectErrorKind;

use super::load::OutcomeCounts;

/// A snapshot of one connect shard's counters.
///
/// Every connect the shard takes on (a submitted one or a sequence's) ends
/// as exactly one of `connected`, one of the error kinds, or `cancelled`;
/// [`ConnectShardStats::conserved`] checks it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
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
    /// What the shard's wake-up moderation did
    /// ([`crate::ConnectorBuilder::moderation`]).
    pub moderation: crate::ModerationStats,
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
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
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
            t.moderation.add(&s.moderation);
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
pub(super) struct Counters {
    pub(super) submitted: AtomicU64,
    connected: AtomicU64,
    by_kind: [AtomicU64; 6],
    cancelled: AtomicU64,
    pub(super) in_flight: AtomicU64,
    pub(super) open_sockets: AtomicU64,
    pub(super) sockets_created: AtomicU64,
    pub(super) backoffs: AtomicU64,
    pub(super) sequences: [AtomicU64; 12],
    pub(super) sequences_started: AtomicU64,
    pub(super) bytes_sent: AtomicU64,
    pub(super) bytes_received: AtomicU64,
    pub(super) handler_panics: AtomicU64,
    pub(super) uring_socket: std::sync::atomic::AtomicBool,
    pub(super) direct_sockets: std::sync::atomic::AtomicBool,
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

pub(super) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

pub(super) fn sub(c: &AtomicU64, n: u64) {
    c.fetch_sub(n, Ordering::Relaxed);
}

impl Counters {
    pub(super) fn snapshot(&self, shard: usize) -> ConnectShardStats {
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
            moderation: crate::ModerationStats::default(),
        }
    }

    /// A connect ended: one outcome, out of flight.
    pub(super) fn connect_done(&self, outcome: Result<(), Option<ConnectErrorKind>>) {
        match outcome {
            Ok(()) => add(&self.connected, 1),
            Err(Some(kind)) => add(&self.by_kind[kind_index(kind)], 1),
            Err(None) => add(&self.cancelled, 1),
        }
        sub(&self.in_flight, 1);
    }
}
