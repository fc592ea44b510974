//! Per-shard counters, written by the shard thread (and by consumers for
//! `delivered`) with relaxed atomics and read without locks.
//!
//! Conservation: once the listener is quiet (no connection arriving, none
//! being delivered), for every shard and for the total,
//! `accepted == delivered + closed_at_shutdown + pending` (plus
//! `rejected + withdrawn` with admission, and `registered` with event
//! registrations: see [`ShardStats::conserved`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Live counters of one shard.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub accepted: AtomicU64,
    pub delivered: AtomicU64,
    pub closed_at_shutdown: AtomicU64,
    pub ring_full_pauses: AtomicU64,
    pub resumes: AtomicU64,
    pub rearms: AtomicU64,
    pub backoff_emfile: AtomicU64,
    pub backoff_enfile: AtomicU64,
    pub backoff_enobufs: AtomicU64,
    pub backoff_enomem: AtomicU64,
    pub aborted: AtomicU64,
    pub accept_errors: AtomicU64,
    pub last_errno: AtomicU64,
    pub held: AtomicU64,
    pub handler_panics: AtomicU64,
    pub rejected_close: AtomicU64,
    pub rejected_reset: AtomicU64,
    pub withdrawn_gone: AtomicU64,
    pub withdrawn_timeout: AtomicU64,
    pub deferred: AtomicU64,
    pub condition_panics: AtomicU64,
    pub peek_timeouts: AtomicU64,
    pub admitting: AtomicU64,
    pub registered: AtomicU64,
    pub register_events: AtomicU64,
    pub register_rearms: AtomicU64,
    pub limit_pauses: AtomicU64,
    pub rate_pauses: AtomicU64,
    pub budget_stops: AtomicU64,
    pub max_turn_accepts: AtomicU64,
    pub multishot: AtomicBool,
    /// Relays run by inline handlers (`ShardContext::relay`).
    pub relay: std::sync::Arc<RelayCounters>,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self, shard: usize) -> ShardStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ShardStats {
            shard,
            accepted: g(&self.accepted),
            delivered: g(&self.delivered),
            closed_at_shutdown: g(&self.closed_at_shutdown),
            ring_full_pauses: g(&self.ring_full_pauses),
            resumes: g(&self.resumes),
            rearms: g(&self.rearms),
            backoff: Backoffs {
                emfile: g(&self.backoff_emfile),
                enfile: g(&self.backoff_enfile),
                enobufs: g(&self.backoff_enobufs),
                enomem: g(&self.backoff_enomem),
            },
            aborted: g(&self.aborted),
            accept_errors: g(&self.accept_errors),
            last_errno: g(&self.last_errno) as i32,
            handler_panics: g(&self.handler_panics),
            coalesced_pauses: 0,
            rejected: Rejected {
                close: g(&self.rejected_close),
                reset: g(&self.rejected_reset),
            },
            withdrawn: Withdrawn {
                peer_gone: g(&self.withdrawn_gone),
                timeout: g(&self.withdrawn_timeout),
            },
            deferred: g(&self.deferred),
            condition_panics: g(&self.condition_panics),
            peek_timeouts: g(&self.peek_timeouts),
            admitting: g(&self.admitting),
            registered: g(&self.registered),
            register_events: g(&self.register_events),
            register_rearms: g(&self.register_rearms),
            limit_pauses: g(&self.limit_pauses),
            rate_pauses: g(&self.rate_pauses),
            budget_stops: g(&self.budget_stops),
            max_accepted_per_turn: g(&self.max_turn_accepts),
            pending: g(&self.held) + g(&self.admitting),
            ring_depth: 0,
            ring_high_water: 0,
            ring_capacity: 0,
            multishot: self.multishot.load(Ordering::Relaxed),
            kernel: None,
            relays: self.relay.snapshot(),
            moderation: crate::ModerationStats::default(),
        }
    }
}

/// Accept-error backoffs, by errno: each is one time the shard stopped
/// accepting for lack of a resource and resumed after a pause.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Backoffs {
    /// EMFILE: the process is out of file descriptors (RLIMIT_NOFILE).
    pub emfile: u64,
    /// ENFILE: the system is out of file descriptors (fs.file-max).
    pub enfile: u64,
    /// ENOBUFS: out of socket buffer memory.
    pub enobufs: u64,
    /// ENOMEM: out of kernel memory.
    pub enomem: u64,
}

impl Backoffs {
    /// All of them.
    pub fn total(&self) -> u64 {
        self.emfile + self.enfile + self.enobufs + self.enomem
    }
}

/// The kernel's view of a shard's listening socket (`TCP_INFO` on a socket
/// in LISTEN state).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct KernelQueue {
    /// Connections completed by the kernel and waiting in its accept queue
    /// (`tcpi_unacked`).
    pub accept_queue: u32,
    /// The backlog the kernel enforces on it (`tcpi_sacked`).
    pub backlog: u32,
}

/// A snapshot of one shard's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ShardStats {
    /// The shard's index.
    pub shard: usize,
    /// Connections taken from the kernel.
    pub accepted: u64,
    /// Connections handed to the application (accept() or the handler).
    pub delivered: u64,
    /// Connections closed by shutdown before being delivered.
    pub closed_at_shutdown: u64,
    /// Times the ring filled and the shard stopped accepting.
    pub ring_full_pauses: u64,
    /// Times the shard resumed after the ring drained to its low-water mark.
    pub resumes: u64,
    /// Times the accept operation was posted again (a multishot accept that
    /// ended, or every single-shot accept after the first; with limits, the
    /// readiness POLL).
    pub rearms: u64,
    /// Resource-exhaustion backoffs, by errno.
    pub backoff: Backoffs,
    /// Transient accept errors skipped (ECONNABORTED, EPROTO, EPERM …).
    pub aborted: u64,
    /// Other accept errors (surfaced by `accept()`).
    pub accept_errors: u64,
    /// The errno of the last accept error of any kind (0: none).
    pub last_errno: i32,
    /// Pauses taken by wake-up moderation, adaptive or fixed (the same
    /// figure as `moderation.pauses`).
    pub coalesced_pauses: u64,
    /// Inline handler calls that panicked (the connection was dropped, the
    /// shard went on).
    pub handler_panics: u64,
    /// Connections rejected by the condition, by kind.
    pub rejected: Rejected,
    /// Connections withdrawn while pending, by cause.
    pub withdrawn: Withdrawn,
    /// Defer and NeedBytes verdicts (one connection may be deferred several
    /// times).
    pub deferred: u64,
    /// Condition calls that panicked (the connection was reset).
    pub condition_panics: u64,
    /// Connections decided on with fewer first bytes than the listener
    /// asked for, because the peek wait ran out.
    pub peek_timeouts: u64,
    /// Connections waiting in admission (for bytes or after a defer).
    pub admitting: u64,
    /// Connections registered now (see [`crate::ListenerBuilder::register`]);
    /// a separate term of conservation: registered connections are neither
    /// pending nor yet delivered.
    pub registered: u64,
    /// Event notifications given to the registration handler.
    pub register_events: u64,
    /// Times a registered connection's multishot poll was posted again.
    pub register_rearms: u64,
    /// Times this shard stopped accepting because the listener was at its
    /// [`max_connections`](crate::ListenerBuilder::max_connections) (it
    /// resumes when a close brings the count below).
    pub limit_pauses: u64,
    /// Times this shard stopped accepting for lack of a token of the
    /// listener's [`accept_rate`](crate::ListenerBuilder::accept_rate) (it
    /// resumes on a timer when the next token is due).
    pub rate_pauses: u64,
    /// Turns that ended because they took the whole
    /// [`accept_budget`](crate::ListenerBuilder::accept_budget) (the next
    /// turn goes on).
    pub budget_stops: u64,
    /// The most connections this shard took from the kernel in one turn of
    /// its loop (any listener, limits or not).
    pub max_accepted_per_turn: u64,
    /// Connections accepted and not yet delivered or closed: in the ring,
    /// plus any the shard holds while the ring is full, plus (with an
    /// inline handler) those of the current turn on their way to it.
    pub pending: u64,
    /// Connections in the ring now.
    pub ring_depth: usize,
    /// Deepest the ring has been. With an inline handler the ring carries
    /// only what one turn took past its capacity, so this stays 0 until a
    /// burst that large.
    pub ring_high_water: usize,
    /// The ring's capacity (the effective backlog).
    pub ring_capacity: usize,
    /// Whether the shard accepts with multishot ACCEPT (5.19+); false when it
    /// fell back to re-posted single-shot accepts, and on a listener with
    /// limits (its shards take connections with `accept4` after a readiness
    /// POLL: see [`crate::ListenerBuilder::max_connections`]).
    pub multishot: bool,
    /// The kernel's accept queue for this shard's listener; `None` once the
    /// listener is closed.
    pub kernel: Option<KernelQueue>,
    /// Relays started by the inline handler on this shard
    /// ([`crate::ShardContext::relay`]).
    pub relays: RelayStats,
    /// What the shard's wake-up moderation did
    /// ([`crate::ListenerBuilder::moderation`]).
    pub moderation: crate::ModerationStats,
}

impl ShardStats {
    /// Whether `accepted == delivered + rejected + withdrawn +
    /// closed_at_shutdown + pending + registered`. (A registered connection
    /// that the registration handler closes, or releases, counts as
    /// delivered then; one it takes is pending again until `accept()`.)
    pub fn conserved(&self) -> bool {
        self.accepted
            == self.delivered
                + self.rejected.total()
                + self.withdrawn.total()
                + self.closed_at_shutdown
                + self.pending
                + self.registered
    }
}

/// Rejections, by how the connection ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Rejected {
    /// Closed with FIN.
    pub close: u64,
    /// Reset with RST (including condition panics).
    pub reset: u64,
}

impl Rejected {
    /// Both.
    pub fn total(&self) -> u64 {
        self.close + self.reset
    }
}

/// Withdrawals of pending connections, by cause.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Withdrawn {
    /// The peer closed or reset before a decision.
    pub peer_gone: u64,
    /// Pending longer than the listener's pending timeout.
    pub timeout: u64,
}

impl Withdrawn {
    /// Both.
    pub fn total(&self) -> u64 {
        self.peer_gone + self.timeout
    }
}

/// Counters of a whole listener: per shard and summed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ListenerStats {
    /// One entry per shard, by index.
    pub shards: Vec<ShardStats>,
    /// The listener's open connections, when it has a
    /// [`max_connections`](crate::ListenerBuilder::max_connections)
    /// (`None` without: they are not counted then).
    pub open: Option<OpenConnections>,
}

/// Open connections of a listener with a maximum: accepted and not yet
/// closed, wherever they are (admission, the ring, a relay, a
/// registration, a reply being sent, an [`Admitted`](crate::Admitted) the
/// application holds, a [`ConnectionSlot`](crate::ConnectionSlot) it kept).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct OpenConnections {
    /// Open now (for a moment, plus one a shard is accepting).
    pub open: u64,
    /// The most that were open at once.
    pub high_water: u64,
    /// The maximum ([`crate::ListenerBuilder::max_connections`]).
    pub limit: u64,
    /// Shards stopped at the maximum now, waiting for a close.
    pub shards_paused: u64,
}

impl ListenerStats {
    /// The sum over shards (`shard` is the shard count; `last_errno` the
    /// first non-zero; `ring_*` summed; `multishot` true if all are;
    /// `max_accepted_per_turn` the largest).
    pub fn total(&self) -> ShardStats {
        let mut t = ShardStats {
            shard: self.shards.len(),
            multishot: true,
            ..Default::default()
        };
        let mut kernel = KernelQueue::default();
        let mut any_kernel = false;
        for s in &self.shards {
            t.accepted += s.accepted;
            t.delivered += s.delivered;
            t.closed_at_shutdown += s.closed_at_shutdown;
            t.ring_full_pauses += s.ring_full_pauses;
            t.resumes += s.resumes;
            t.rearms += s.rearms;
            t.backoff.emfile += s.backoff.emfile;
            t.backoff.enfile += s.backoff.enfile;
            t.backoff.enobufs += s.backoff.enobufs;
            t.backoff.enomem += s.backoff.enomem;
            t.aborted += s.aborted;
            t.accept_errors += s.accept_errors;
            t.handler_panics += s.handler_panics;
            t.coalesced_pauses += s.coalesced_pauses;
            t.moderation.add(&s.moderation);
            t.rejected.close += s.rejected.close;
            t.rejected.reset += s.rejected.reset;
            t.withdrawn.peer_gone += s.withdrawn.peer_gone;
            t.withdrawn.timeout += s.withdrawn.timeout;
            t.deferred += s.deferred;
            t.condition_panics += s.condition_panics;
            t.peek_timeouts += s.peek_timeouts;
            t.admitting += s.admitting;
            t.registered += s.registered;
            t.register_events += s.register_events;
            t.register_rearms += s.register_rearms;
            t.limit_pauses += s.limit_pauses;
            t.rate_pauses += s.rate_pauses;
            t.budget_stops += s.budget_stops;
            t.max_accepted_per_turn = t.max_accepted_per_turn.max(s.max_accepted_per_turn);
            if t.last_errno == 0 {
                t.last_errno = s.last_errno;
            }
            t.pending += s.pending;
            t.ring_depth += s.ring_depth;
            t.ring_high_water += s.ring_high_water;
            t.ring_capacity += s.ring_capacity;
            t.multishot &= s.multishot;
            t.relays.add(&s.relays);
            if let Some(k) = s.kernel {
                any_kernel = true;
                kernel.accept_queue += k.accept_queue;
                kernel.backlog += k.backlog;
            }
        }
        t.kernel = any_kernel.then_some(kernel);
        t
    }

    /// Whether conservation holds for every shard.
    pub fn conserved(&self) -> bool {
        self.shards.iter().all(ShardStats::conserved)
    }
}

/// Live relay counters of one shard, shared by the shard's relays and its
/// stats snapshot.
#[derive(Debug, Default)]
pub(crate) struct RelayCounters {
    pub started: AtomicU64,
    pub active: AtomicU64,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    pub closed_at_shutdown: AtomicU64,
    pub reset_at_shutdown: AtomicU64,
    pub idle_timeout: AtomicU64,
    pub client_reset: AtomicU64,
    pub upstream_reset: AtomicU64,
    pub upstream_refused: AtomicU64,
    pub upstream_timeout: AtomicU64,
    pub errors: AtomicU64,
    pub refused_cap: AtomicU64,
    pub start_failed: AtomicU64,
    pub callback_panics: AtomicU64,
    pub bytes_to_upstream: AtomicU64,
    pub bytes_to_client: AtomicU64,
}

impl RelayCounters {
    fn snapshot(&self) -> RelayStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RelayStats {
            started: g(&self.started),
            active: g(&self.active),
            completed: g(&self.completed),
            failed: g(&self.failed),
            closed_at_shutdown: g(&self.closed_at_shutdown),
            reset_at_shutdown: g(&self.reset_at_shutdown),
            idle_timeout: g(&self.idle_timeout),
            client_reset: g(&self.client_reset),
            upstream_reset: g(&self.upstream_reset),
            upstream_refused: g(&self.upstream_refused),
            upstream_timeout: g(&self.upstream_timeout),
            errors: g(&self.errors),
            refused_cap: g(&self.refused_cap),
            start_failed: g(&self.start_failed),
            callback_panics: g(&self.callback_panics),
            bytes_to_upstream: g(&self.bytes_to_upstream),
            bytes_to_client: g(&self.bytes_to_client),
        }
    }
}

/// Relays of admitted connections to an upstream
/// ([`crate::ShardContext::relay`]), counted by how they ended (the
/// [`crate::RelayEnd`] of each relay's outcome).
///
/// Once quiet, `started == active + completed + failed + idle_timeout +
/// closed_at_shutdown`, and `failed == client_reset + upstream_reset +
/// upstream_refused + upstream_timeout + errors`. Relays that never started
/// are in `refused_cap` or `start_failed` only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct RelayStats {
    /// Relays started (the upstream dial was posted).
    pub started: u64,
    /// Relays running now (dialling, copying, or closing).
    pub active: u64,
    /// Relays that ended cleanly: both directions reached end of stream and
    /// were shut down, then both sockets closed.
    pub completed: u64,
    /// Relays torn down by an error: the upstream refused or timed out, or
    /// either side reset or failed a send. Both sockets were reset. The
    /// sum of the five kinds below.
    pub failed: u64,
    /// Relays ended because the listener shut down (or a drain's deadline
    /// came): wound down with a half-close each way, or reset (those are
    /// also in `reset_at_shutdown`).
    pub closed_at_shutdown: u64,
    /// Of `closed_at_shutdown`: relays reset because they were still
    /// dialling their upstream, or because a peer did not take the bytes
    /// already received within the shutdown grace (1 s).
    pub reset_at_shutdown: u64,
    /// Relays torn down because no byte moved either way for their idle
    /// timeout (not in `failed`).
    pub idle_timeout: u64,
    /// Failed: the client reset.
    pub client_reset: u64,
    /// Failed: the upstream reset.
    pub upstream_reset: u64,
    /// Failed: the upstream refused the connection.
    pub upstream_refused: u64,
    /// Failed: the upstream connect timed out.
    pub upstream_timeout: u64,
    /// Failed: any other error.
    pub errors: u64,
    /// Relays refused at the shard's cap (relay count or buffer memory);
    /// never started, the client was reset.
    pub refused_cap: u64,
    /// Relays that could not start for another reason (the upstream socket
    /// could not be created, the ring refused the CONNECT, the listener was
    /// shutting down); never started, the client was reset.
    pub start_failed: u64,
    /// Outcome callbacks ([`crate::ShardContext::relay_with`]) that
    /// panicked (caught; the shard went on).
    pub callback_panics: u64,
    /// Bytes copied from clients to upstreams.
    pub bytes_to_upstream: u64,
    /// Bytes copied from upstreams to clients.
    pub bytes_to_client: u64,
}

impl RelayStats {
    fn add(&mut self, o: &RelayStats) {
        self.started += o.started;
        self.active += o.active;
        self.completed += o.completed;
        self.failed += o.failed;
        self.closed_at_shutdown += o.closed_at_shutdown;
        self.reset_at_shutdown += o.reset_at_shutdown;
        self.idle_timeout += o.idle_timeout;
        self.client_reset += o.client_reset;
        self.upstream_reset += o.upstream_reset;
        self.upstream_refused += o.upstream_refused;
        self.upstream_timeout += o.upstream_timeout;
        self.errors += o.errors;
        self.refused_cap += o.refused_cap;
        self.start_failed += o.start_failed;
        self.callback_panics += o.callback_panics;
        self.bytes_to_upstream += o.bytes_to_upstream;
        self.bytes_to_client += o.bytes_to_client;
    }
}
