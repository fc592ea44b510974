//! Relays: an admitted connection spliced to an upstream, entirely on the
//! shard's own io_uring (the used-by case of an L4 proxy).
//!
//! [`crate::ShardContext::relay`] creates the upstream socket (socket2) and
//! posts its CONNECT with a linked timeout on the ring of the shard that
//! accepted the client. Once connected, two directions run independently,
//! client → upstream and upstream → client, each as a loop over one owned
//! buffer: RECV into it, SEND exactly the bytes received (resumed from the
//! same buffer after a short send), RECV again. The buffer moves into the
//! ring with each operation and comes back with its completion
//! ([`Driver::release`]): no copy, no reallocation.
//!
//! Ends (each reported as a [`RelayEnd`] in the relay's [`RelayOutcome`]):
//! - end of stream on one side (FIN) shuts the other side's write half
//!   (SHUTDOWN, 5.11) after every byte before it was sent; once both
//!   directions have ended, both sockets are closed (FIN): *completed*;
//! - an error on either side (RST, a failed send, the upstream refusing or
//!   timing out) cancels what is in flight and closes both sockets with
//!   SO_LINGER 0, so both peers see a reset: *failed*;
//! - no byte moved either way for the idle timeout: torn down the same way;
//! - listener shutdown (or a drain's deadline) winds every relay down with
//!   a half-close each way, not a reset: each direction stops reading,
//!   sends what it already received, then shuts its sink's write half
//!   (SHUTDOWN); once both directions are shut, both sockets are closed
//!   with FIN. A relay whose peer does not take those bytes within
//!   [`STOP_GRACE`] (exported as `RELAY_STOP_GRACE`) is reset then, so no peer can hold up shutdown
//!   (counted in [`crate::RelayStats::reset_at_shutdown`]).
//!
//! Idle timeouts cost no timer per relay and nothing per byte but a store:
//! each completion that moved bytes stamps the relay with the turn's time,
//! and one shard-wide TIMEOUT at a time (re-armed for the earliest
//! deadline, at least 1/16 of the shortest idle timeout later) scans the
//! relays and tears down those idle for longer than their timeout.
//!
//! Caps (per shard, [`crate::ListenerBuilder::max_relays_per_shard`] and
//! [`crate::ListenerBuilder::relay_memory_per_shard`]): a relay that would
//! exceed either is refused before anything is created; its client is
//! reset. A relay's memory is its two buffers, held from its start until
//! its slot is freed.
//!
//! Each relay lives in a slab slot; every operation's user data carries the
//! slot, the slot's generation and the side, so a completion can never be
//! taken for another relay's. A slot is freed only when no operation of its
//! relay is in flight and both sockets are closed (each exactly once: by a
//! CLOSE operation, or by dropping its `OwnedFd` when the CLOSE could not be
//! posted).

pub(crate) mod context;
mod outcome;

pub use outcome::*;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};

use crate::driver::{sys, Cqe, Driver, Released};
use crate::shard::{op_kinds, user_data, ShardOp};
use crate::stats::{Counters, RelayCounters};

op_kinds! {
    /// The operations of relays.
    pub(crate) enum RelayOp {
        /// The CONNECT of a relay's upstream socket.
        Connect = 40,
        /// The LINK_TIMEOUT linked to a relay's CONNECT.
        ConnectTimeout = 41,
        /// A RECV of one direction of a relay.
        Recv = 42,
        /// A SEND of one direction of a relay.
        Send = 43,
        /// A SHUTDOWN(SHUT_WR) ending one direction of a relay.
        Shutdown = 44,
        /// The CLOSE of one of a relay's sockets.
        Close = 45,
        /// The shard's idle-scan timer.
        Timer = 46,
    }
}

/// How long a relay being wound down at shutdown may take to send the
/// bytes it already received and shut both write halves; then it is reset.
pub const STOP_GRACE: Duration = Duration::from_secs(1);

/// The user-data payload of the shutdown grace timer (idle-scan timers use
/// ids below 2^48).
const STOP_TIMER: u64 = 1 << 50;

/// Slots addressable in 24 bits of user data.
const SLOT_BITS: u32 = 24;
const SLOT_MASK: u64 = (1 << SLOT_BITS) - 1;
const GEN_MASK: u64 = (1 << 31) - 1;

fn pack(slot: usize, gen: u32, side: usize) -> u64 {
    (slot as u64 & SLOT_MASK) | ((side as u64 & 1) << SLOT_BITS) | ((gen as u64 & GEN_MASK) << 25)
}

fn decode(payload: u64) -> (usize, u32, usize) {
    (
        (payload & SLOT_MASK) as usize,
        ((payload >> 25) & GEN_MASK) as u32,
        ((payload >> SLOT_BITS) & 1) as usize,
    )
}

/// What one direction has in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Nothing (not started, or torn down).
    Idle,
    /// A RECV from its source.
    Recv,
    /// A SEND of `buf[start..end]` to its sink.
    Send { start: usize, end: usize },
    /// The SHUTDOWN(SHUT_WR) of its sink after end of stream.
    Shutdown,
    /// Finished cleanly.
    Done,
}

impl Step {
    fn in_flight(self) -> Option<RelayOp> {
        match self {
            Step::Recv => Some(RelayOp::Recv),
            Step::Send { .. } => Some(RelayOp::Send),
            Step::Shutdown => Some(RelayOp::Shutdown),
            Step::Idle | Step::Done => None,
        }
    }
}

#[derive(Debug)]
struct Relay {
    /// The client's and the upstream's sockets, until their CLOSE is posted.
    fds: [Option<OwnedFd>; 2],
    /// Raw numbers of the same sockets (valid while the relay has them).
    raw: [i32; 2],
    steps: [Step; 2],
    /// Each direction's buffer while no operation holds it.
    bufs: [Option<Box<[u8]>>; 2],
    buffer_size: usize,
    /// The CONNECT is in flight.
    connecting: bool,
    /// Completions still to come (CONNECT, its timeout, RECV, SEND, SHUTDOWN).
    ops: u32,
    /// CLOSE completions still to come.
    closes: u32,
    /// Set once the relay is ending; nothing new is posted after.
    end: Option<RelayEnd>,
    /// Being wound down at shutdown: no new RECV; each direction shuts its
    /// sink once what it received is sent.
    winding: bool,
    /// Ended with a half-close each way (both SHUTDOWNs done): the sockets
    /// close with FIN, not a reset.
    graceful: bool,
    /// The side whose FIN, reset or error was seen first.
    first: Option<usize>,
    /// Bytes sent by each direction (0: to the upstream, 1: to the client).
    bytes: [u64; 2],
    started_at: Instant,
    /// When bytes last moved (or the upstream connected).
    last_active: Instant,
    idle_timeout: Option<Duration>,
    /// Buffer bytes counted against the shard's budget.
    reserved: usize,
    on_end: Option<OnEnd>,
    /// The client's count of the listener's maximum of open connections,
    /// released when the relay's slot is freed (both sockets closed).
    _open: crate::admit::slot::ConnectionSlot,
}

#[derive(Debug, Default)]
struct Slot {
    gen: u32,
    relay: Option<Relay>,
}

/// Why a relay did not start.
struct Refusal {
    end: RelayEnd,
    first: Option<usize>,
    error: io::Error,
}

impl Refusal {
    fn new(end: RelayEnd, first: Option<usize>, error: io::Error) -> Self {
        Refusal { end, first, error }
    }
}

/// The relays of one shard.
pub(crate) struct Relays {
    slots: Vec<Slot>,
    free: Vec<usize>,
    live: usize,
    /// Buffer bytes reserved by live relays.
    memory: usize,
    limits: RelayLimits,
    stopping: bool,
    /// Idle-scan timers in flight: id (user-data payload) and when each
    /// fires.
    timers: Vec<(u64, Instant)>,
    next_timer: u64,
    /// The shutdown grace timer is in flight.
    stop_timer: bool,
    counters: Arc<RelayCounters>,
}

impl fmt::Debug for Relays {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relays")
            .field("live", &self.live)
            .field("slots", &self.slots.len())
            .field("memory", &self.memory)
            .field("limits", &self.limits)
            .field("timers", &self.timers.len())
            .field("stopping", &self.stopping)
            .finish()
    }
}

impl Relays {
    pub(crate) fn new(counters: Arc<RelayCounters>) -> Self {
        Relays {
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            memory: 0,
            limits: RelayLimits::default(),
            stopping: false,
            timers: Vec::new(),
            next_timer: 0,
            stop_timer: false,
            counters,
        }
    }

    /// Sets the shard's caps (before the shard starts).
    pub(crate) fn set_limits(&mut self, limits: RelayLimits) {
        self.limits = limits;
    }

    /// Starts relaying `client` to `upstream`: creates the upstream socket
    /// and posts its CONNECT (with a linked timeout). On error nothing is in
    /// flight, `client` is reset, and `on_end` has been called.
    pub(crate) fn start(
        &mut self,
        ring: &mut Driver,
        client: OwnedFd,
        open: crate::admit::slot::ConnectionSlot,
        upstream: SocketAddr,
        opts: RelayOptions,
        on_end: Option<OnEnd>,
    ) -> io::Result<()> {
        let started_at = Instant::now();
        match self.open(ring, &client, upstream, opts) {
            Ok((idx, up, ops)) => {
                let raw = [client.as_raw_fd(), up.as_raw_fd()];
                let reserved = 2 * opts.buffer_size();
                self.slots[idx].relay = Some(Relay {
                    fds: [Some(client), Some(up)],
                    raw,
                    steps: [Step::Idle, Step::Idle],
                    bufs: [None, None],
                    buffer_size: opts.buffer_size(),
                    connecting: true,
                    ops,
                    closes: 0,
                    end: None,
                    winding: false,
                    graceful: false,
                    first: None,
                    bytes: [0, 0],
                    started_at,
                    last_active: started_at,
                    idle_timeout: opts.idle_timeout(),
                    reserved,
                    on_end,
                    _open: open,
                });
                self.live += 1;
                self.memory += reserved;
                Counters::add(&self.counters.started, 1);
                Counters::add(&self.counters.active, 1);
                Ok(())
            }
            Err(refusal) => {
                // An abortive close: the client learns at once that it is
                // not being relayed.
                let _ = SockRef::from(&client).set_linger(Some(Duration::ZERO));
                drop(client);
                if refusal.end == RelayEnd::CapRefused {
                    Counters::add(&self.counters.refused_cap, 1);
                    event!(
                        warn,
                        live = self.live,
                        memory = self.memory,
                        max_relays = self.limits.max_relays,
                        max_memory = self.limits.memory,
                        "relay refused at the shard's limit: client reset"
                    );
                } else {
                    Counters::add(&self.counters.start_failed, 1);
                    event!(warn, error = %refusal.error, "relay could not start: client reset");
                }
                let outcome = RelayOutcome {
                    end: refusal.end,
                    first: refusal.first.map(side_of),
                    bytes_to_upstream: 0,
                    bytes_to_client: 0,
                    duration: started_at.elapsed(),
                };
                deliver(&self.counters, on_end, outcome);
                Err(refusal.error)
            }
        }
    }

    /// Checks the caps, creates the upstream socket, takes a slot and posts
    /// the CONNECT; returns the slot, the upstream socket and the number of
    /// completions to come. On error nothing was posted and no slot taken.
    fn open(
        &mut self,
        ring: &mut Driver,
        client: &OwnedFd,
        upstream: SocketAddr,
        opts: RelayOptions,
    ) -> Result<(usize, OwnedFd, u32), Refusal> {
        if self.stopping {
            return Err(Refusal::new(
                RelayEnd::Shutdown,
                None,
                io::Error::other("the shard is shutting down"),
            ));
        }
        if self.live >= self.limits.max_relays {
            return Err(Refusal::new(
                RelayEnd::CapRefused,
                None,
                io::Error::other(format!(
                    "relay cap: {} relays on this shard (max_relays_per_shard)",
                    self.live
                )),
            ));
        }
        let wanted = 2 * opts.buffer_size();
        if self
            .memory
            .checked_add(wanted)
            .map_or(true, |m| m > self.limits.memory)
        {
            return Err(Refusal::new(
                RelayEnd::CapRefused,
                None,
                io::Error::other(format!(
                    "relay cap: {} buffer bytes in use on this shard and {wanted} more wanted \
                     (relay_memory_per_shard {})",
                    self.memory, self.limits.memory
                )),
            ));
        }
        let client_err =
            |e: io::Error| Refusal::new(peer_end(CLIENT, errno_of(&e)), Some(CLIENT), e);
        let engine_err = |e: io::Error| {
            Refusal::new(
                RelayEnd::Error {
                    errno: errno_of(&e),
                },
                None,
                e,
            )
        };
        if opts.strip_proxy_header() {
            strip_proxy_header(client).map_err(client_err)?;
        }
        if opts.nodelay() {
            // Both sockets: a relay forwards each piece as it arrives, and
            // Nagle on the client side would hold a response's second
            // segment until the client's delayed ACK (tens of ms).
            SockRef::from(client)
                .set_nodelay(true)
                .map_err(client_err)?;
        }
        let socket = Socket::new(
            Domain::for_address(upstream),
            Type::STREAM,
            Some(Protocol::TCP),
        )
        .map_err(engine_err)?;
        if opts.nodelay() {
            socket.set_nodelay(true).map_err(engine_err)?;
        }
        let up: OwnedFd = socket.into();
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                if self.slots.len() as u64 > SLOT_MASK {
                    return Err(Refusal::new(
                        RelayEnd::CapRefused,
                        None,
                        io::Error::other("too many relays on this shard"),
                    ));
                }
                self.slots.push(Slot::default());
                self.slots.len() - 1
            }
        };
        let gen = self.slots[idx].gen.wrapping_add(1) & GEN_MASK as u32;
        self.slots[idx].gen = gen;
        let timeout = (!opts.connect_timeout().is_zero()).then(|| {
            (
                opts.connect_timeout(),
                user_data(RelayOp::ConnectTimeout, pack(idx, gen, UPSTREAM)),
            )
        });
        let posted = ring.connect(
            up.as_raw_fd(),
            SockAddr::from(upstream),
            timeout,
            user_data(RelayOp::Connect, pack(idx, gen, UPSTREAM)),
        );
        if let Err(e) = posted {
            // Nothing was posted: the upstream socket closes here.
            self.free.push(idx);
            return Err(engine_err(e));
        }
        Ok((idx, up, 1 + u32::from(timeout.is_some())))
    }

    /// One completion of a relay operation (or of the idle-scan timer).
    pub(crate) fn complete(
        &mut self,
        ring: &mut Driver,
        tag: RelayOp,
        payload: u64,
        cqe: Cqe,
        now: Instant,
    ) {
        if tag == RelayOp::Timer {
            return self.timer(ring, payload, cqe, now);
        }
        let (idx, gen, side) = decode(payload);
        let released = if tag == RelayOp::Close {
            ring.finish_close(cqe.user_data, cqe.result);
            Released::Nothing
        } else {
            ring.release(cqe.user_data)
        };
        let counters = &self.counters;
        let Some(slot) = self.slots.get_mut(idx) else {
            return;
        };
        if slot.gen != gen {
            return;
        }
        let Some(r) = slot.relay.as_mut() else {
            return;
        };
        if tag == RelayOp::Close {
            r.closes = r.closes.saturating_sub(1);
        } else {
            r.ops = r.ops.saturating_sub(1);
        }
        let result = cqe.result;
        let mut idle_deadline = None;
        match tag {
            RelayOp::ConnectTimeout | RelayOp::Close => {}
            RelayOp::Connect => {
                r.connecting = false;
                if r.end.is_none() {
                    if result < 0 {
                        r.fail(ring, idx, gen, connect_end(-result), Some(UPSTREAM));
                    } else {
                        // The idle clock starts now.
                        r.last_active = now;
                        idle_deadline = r
                            .idle_timeout
                            .and_then(|t| now.checked_add(t).map(|at| (at, t)));
                        for d in [CLIENT, UPSTREAM] {
                            let buf = vec![0u8; r.buffer_size].into_boxed_slice();
                            r.recv(ring, idx, gen, d, buf);
                        }
                    }
                }
            }
            RelayOp::Recv => {
                let d = side;
                r.steps[d] = Step::Idle;
                let Released::Bytes(buf) = released else {
                    r.fail(ring, idx, gen, RelayEnd::Error { errno: 0 }, None);
                    return self.settle(ring, idx);
                };
                if r.end.is_some() {
                    r.bufs[d] = Some(buf);
                } else if result > 0 {
                    r.last_active = now;
                    let n = (result as usize).min(buf.len());
                    r.send(ring, idx, gen, d, buf, 0, n);
                } else if result == 0 {
                    // End of stream from side d: shut the sink's write half;
                    // every byte before the FIN has already been sent.
                    r.bufs[d] = Some(buf);
                    r.first.get_or_insert(d);
                    r.shut(ring, idx, gen, d);
                } else if r.winding && result == -libc::ECANCELED {
                    // Wound down: no more reading from side d; its sink
                    // has every byte received before.
                    r.bufs[d] = Some(buf);
                    r.shut(ring, idx, gen, d);
                } else {
                    r.bufs[d] = Some(buf);
                    r.fail(ring, idx, gen, peer_end(d, -result), Some(d));
                }
            }
            RelayOp::Send => {
                let d = side;
                let Step::Send { start, end } = r.steps[d] else {
                    r.steps[d] = Step::Idle;
                    r.fail(ring, idx, gen, RelayEnd::Error { errno: 0 }, None);
                    return self.settle(ring, idx);
                };
                r.steps[d] = Step::Idle;
                let Released::Bytes(buf) = released else {
                    r.fail(ring, idx, gen, RelayEnd::Error { errno: 0 }, None);
                    return self.settle(ring, idx);
                };
                if result > 0 {
                    let counter = if d == CLIENT {
                        &counters.bytes_to_upstream
                    } else {
                        &counters.bytes_to_client
                    };
                    Counters::add(counter, result as u64);
                    r.bytes[d] += result as u64;
                    r.last_active = now;
                }
                if r.end.is_some() {
                    r.bufs[d] = Some(buf);
                } else if result > 0 {
                    let start = (start + result as usize).min(end);
                    if start < end {
                        r.send(ring, idx, gen, d, buf, start, end);
                    } else if r.winding {
                        r.bufs[d] = Some(buf);
                        r.shut(ring, idx, gen, d);
                    } else {
                        r.recv(ring, idx, gen, d, buf);
                    }
                } else {
                    // A send of at least one byte that sent none, or failed
                    // (EPIPE, ECONNRESET): the sink is gone.
                    r.bufs[d] = Some(buf);
                    r.fail(ring, idx, gen, peer_end(1 - d, -result), Some(1 - d));
                }
            }
            RelayOp::Shutdown => {
                let d = side;
                if r.steps[d] == Step::Shutdown {
                    r.steps[d] = Step::Done;
                }
                if result == -libc::EINVAL && r.end.is_none() {
                    // No IORING_OP_SHUTDOWN (before 5.11): the same call,
                    // synchronously; it does not block.
                    if let Some(fd) = &r.fds[1 - d] {
                        let _ = SockRef::from(fd).shutdown(std::net::Shutdown::Write);
                    }
                }
                // ENOTCONN here means the sink already went away; the other
                // direction finds out on its own next operation.
                if r.end.is_none() && r.steps.iter().all(|s| *s == Step::Done) {
                    r.graceful = true;
                    r.end = Some(if r.winding {
                        RelayEnd::Shutdown
                    } else {
                        RelayEnd::Completed
                    });
                }
            }
            _ => {}
        }
        self.settle(ring, idx);
        if let Some((at, t)) = idle_deadline {
            self.arm_idle(ring, now, at, t / 16);
        }
    }

    /// Makes sure an idle-scan timer fires by `at + slack`: posts one for
    /// `at` unless one already in flight fires by then.
    fn arm_idle(&mut self, ring: &mut Driver, now: Instant, at: Instant, slack: Duration) {
        if self.stopping {
            return;
        }
        let covered = self
            .timers
            .iter()
            .any(|(_, t)| at.checked_add(slack).map_or(true, |late| *t <= late));
        if covered {
            return;
        }
        self.next_timer = (self.next_timer + 1) & ((1 << 48) - 1);
        let id = self.next_timer;
        let after = at.saturating_duration_since(now);
        // A refused timer (the ring is broken) only delays idle teardown
        // until the next relay connects and arms one.
        if ring.timeout(after, user_data(RelayOp::Timer, id)).is_ok() {
            self.timers.push((id, at));
        }
    }

    /// The idle-scan timer fired (or was cancelled at shutdown): tears down
    /// every relay idle for its timeout, then re-arms for the earliest
    /// deadline left, at least 1/16 of the shortest idle timeout from now,
    /// so that scans stay a bounded number per timeout.
    fn timer(&mut self, ring: &mut Driver, id: u64, cqe: Cqe, now: Instant) {
        ring.release(cqe.user_data);
        if id == STOP_TIMER {
            self.stop_timer = false;
            if cqe.result != -libc::ECANCELED {
                self.reset_all(ring);
            }
            return;
        }
        self.timers.retain(|(t, _)| *t != id);
        if self.stopping {
            return;
        }
        let mut next: Option<Instant> = None;
        let mut shortest: Option<Duration> = None;
        for idx in 0..self.slots.len() {
            let gen = self.slots[idx].gen;
            let Some(r) = self.slots[idx].relay.as_mut() else {
                continue;
            };
            let Some(t) = r.idle_timeout else { continue };
            if r.connecting || r.end.is_some() {
                continue;
            }
            let Some(deadline) = r.last_active.checked_add(t) else {
                continue;
            };
            if deadline <= now {
                r.fail(ring, idx, gen, RelayEnd::IdleTimeout, None);
                self.settle(ring, idx);
            } else {
                next = Some(next.map_or(deadline, |n| n.min(deadline)));
                shortest = Some(shortest.map_or(t, |s| s.min(t)));
            }
        }
        if let (Some(at), Some(t)) = (next, shortest) {
            let slack = t / 16;
            let at = now.checked_add(slack).map_or(at, |soonest| at.max(soonest));
            self.arm_idle(ring, now, at, slack);
        }
    }

    /// Closes a relay's sockets once nothing of it is in flight, and frees
    /// its slot once both closes completed; then its outcome goes to its
    /// callback.
    fn settle(&mut self, ring: &mut Driver, idx: usize) {
        let Some(slot) = self.slots.get_mut(idx) else {
            return;
        };
        let gen = slot.gen;
        let Some(r) = slot.relay.as_mut() else {
            return;
        };
        let Some(end) = r.end else { return };
        if r.ops > 0 {
            return;
        }
        for side in [CLIENT, UPSTREAM] {
            if let Some(fd) = r.fds[side].take() {
                if !r.graceful {
                    // An abortive close: the peer sees RST, as a splice
                    // should report a reset or a failure of the far side.
                    let _ = SockRef::from(&fd).set_linger(Some(Duration::ZERO));
                }
                let ud = user_data(RelayOp::Close, pack(idx, gen, side));
                // On error the descriptor was dropped, hence closed, by
                // `close` itself: closed once either way.
                if ring.close(fd, ud).is_ok() {
                    r.closes += 1;
                }
            }
        }
        if r.closes > 0 {
            return;
        }
        let Some(r) = slot.relay.take() else { return };
        self.free.push(idx);
        self.live -= 1;
        if self.live == 0 && self.stop_timer {
            // Every relay wound down within the grace: take the timer back
            // so the shard can stop now.
            let _ = ring.cancel(
                user_data(RelayOp::Timer, STOP_TIMER),
                user_data(ShardOp::Cancel, 0),
            );
        }
        if end == RelayEnd::Shutdown && !r.graceful {
            Counters::add(&self.counters.reset_at_shutdown, 1);
        }
        self.memory = self.memory.saturating_sub(r.reserved);
        self.counters.active.fetch_sub(1, Ordering::Relaxed);
        count_end(&self.counters, end);
        let outcome = r.outcome(end);
        deliver(&self.counters, r.on_end, outcome);
    }

    /// Shutdown: no new relays; every live one is wound down with a
    /// half-close each way (one still dialling its upstream is torn down),
    /// within [`STOP_GRACE`], after which what is left is reset; the
    /// idle-scan timers are cancelled.
    pub(crate) fn stop(&mut self, ring: &mut Driver) {
        self.stopping = true;
        for (id, _) in &self.timers {
            let _ = ring.cancel(
                user_data(RelayOp::Timer, *id),
                user_data(ShardOp::Cancel, 0),
            );
        }
        for idx in 0..self.slots.len() {
            let gen = self.slots[idx].gen;
            if let Some(r) = self.slots[idx].relay.as_mut() {
                if r.connecting {
                    r.fail(ring, idx, gen, RelayEnd::Shutdown, None);
                } else {
                    r.wind_down(ring, idx, gen);
                }
            }
            self.settle(ring, idx);
        }
        if self.live > 0 {
            match ring.timeout(STOP_GRACE, user_data(RelayOp::Timer, STOP_TIMER)) {
                Ok(()) => self.stop_timer = true,
                // No timer, no grace: a peer could hold the shard up.
                Err(_) => self.reset_all(ring),
            }
        }
    }

    /// Tears down, with a reset, every relay not yet ended (the shutdown
    /// grace ran out).
    fn reset_all(&mut self, ring: &mut Driver) {
        for idx in 0..self.slots.len() {
            let gen = self.slots[idx].gen;
            // One that already ended (wound down, closing) is left alone.
            if let Some(r) = self.slots[idx].relay.as_mut().filter(|r| r.end.is_none()) {
                r.fail(ring, idx, gen, RelayEnd::Shutdown, None);
            }
            self.settle(ring, idx);
        }
    }

    /// How many relays are running (counting those closing).
    pub(crate) fn live(&self) -> usize {
        self.live
    }

    /// Whether no relay operation and no timer is in flight.
    pub(crate) fn is_idle(&self) -> bool {
        self.live == 0 && self.timers.is_empty() && !self.stop_timer
    }

    /// Last call on the shard thread. Normally nothing is left; after a
    /// broken ring, what is left is dropped (its sockets close here, its
    /// in-flight memory stays with the ring, which leaks it) and its
    /// outcome says shutdown.
    pub(crate) fn finish(&mut self) {
        for slot in &mut self.slots {
            if let Some(r) = slot.relay.take() {
                self.counters.active.fetch_sub(1, Ordering::Relaxed);
                Counters::add(&self.counters.closed_at_shutdown, 1);
                let outcome = r.outcome(RelayEnd::Shutdown);
                deliver(&self.counters, r.on_end, outcome);
            }
        }
        self.live = 0;
        self.memory = 0;
        self.timers.clear();
        self.free.clear();
        self.slots.clear();
    }
}

/// Consumes a complete PROXY header at the head of `fd`'s stream, if any.
fn strip_proxy_header(fd: &OwnedFd) -> io::Result<()> {
    use std::os::fd::AsFd;
    // v1 is at most 107 bytes; v2 at most 16 + 65535, but headers with TLVs
    // beyond a few hundred bytes do not occur in practice.
    const PEEK: usize = 1024;
    let head = sys::peek_now(fd.as_fd(), PEEK)?;
    if let Ok(h) = crate::conditions::proxy_protocol::parse(&head) {
        let consumed = sys::consume_now(fd.as_fd(), h.header_len)?;
        if consumed != h.header_len {
            return Err(io::Error::other("PROXY header vanished while consumed"));
        }
    }
    Ok(())
}

impl Relay {
    fn outcome(&self, end: RelayEnd) -> RelayOutcome {
        RelayOutcome {
            end,
            first: self.first.map(side_of),
            bytes_to_upstream: self.bytes[CLIENT],
            bytes_to_client: self.bytes[UPSTREAM],
            duration: self.started_at.elapsed(),
        }
    }

    fn recv(&mut self, ring: &mut Driver, idx: usize, gen: u32, d: usize, buf: Box<[u8]>) {
        if self.end.is_some() {
            self.bufs[d] = Some(buf);
            return;
        }
        let ud = user_data(RelayOp::Recv, pack(idx, gen, d));
        let posted = ring.recv_into(self.raw[d], buf, ud);
        self.posted(ring, idx, gen, d, Step::Recv, posted);
    }

    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        ring: &mut Driver,
        idx: usize,
        gen: u32,
        d: usize,
        buf: Box<[u8]>,
        start: usize,
        end: usize,
    ) {
        if self.end.is_some() {
            self.bufs[d] = Some(buf);
            return;
        }
        let ud = user_data(RelayOp::Send, pack(idx, gen, d));
        let posted = ring.send_range(self.raw[1 - d], buf, start..end, libc::MSG_NOSIGNAL, ud);
        self.posted(ring, idx, gen, d, Step::Send { start, end }, posted);
    }

    /// Posts the SHUTDOWN(SHUT_WR) of direction `d`'s sink: every byte
    /// read from its source has been sent.
    fn shut(&mut self, ring: &mut Driver, idx: usize, gen: u32, d: usize) {
        let ud = user_data(RelayOp::Shutdown, pack(idx, gen, d));
        let posted = ring.shutdown(self.raw[1 - d], libc::SHUT_WR, ud);
        self.posted(ring, idx, gen, d, Step::Shutdown, posted);
    }

    /// Starts winding the relay down (shutdown): each direction stops
    /// reading (its RECV is cancelled; its completion shuts the sink), one
    /// sending finishes its bytes first, one with nothing in flight shuts
    /// its sink now.
    fn wind_down(&mut self, ring: &mut Driver, idx: usize, gen: u32) {
        if self.end.is_some() || self.winding {
            return;
        }
        self.winding = true;
        let cancel = user_data(ShardOp::Cancel, 0);
        for d in [CLIENT, UPSTREAM] {
            match self.steps[d] {
                Step::Recv => {
                    let _ = ring.cancel(user_data(RelayOp::Recv, pack(idx, gen, d)), cancel);
                }
                Step::Idle => self.shut(ring, idx, gen, d),
                Step::Send { .. } | Step::Shutdown | Step::Done => {}
            }
        }
    }

    /// After posting direction `d`'s next operation: it is in flight as
    /// `step`, or the ring refused it and the relay fails with its errno.
    fn posted(
        &mut self,
        ring: &mut Driver,
        idx: usize,
        gen: u32,
        d: usize,
        step: Step,
        res: io::Result<()>,
    ) {
        match res {
            Ok(()) => {
                self.steps[d] = step;
                self.ops += 1;
            }
            Err(e) => {
                let errno = errno_of(&e);
                self.fail(ring, idx, gen, RelayEnd::Error { errno }, None);
            }
        }
    }

    /// Starts tearing the relay down as `end`, `side` being the side at
    /// fault if any: cancels what is in flight; the sockets are closed once
    /// every completion is in (`settle`).
    fn fail(
        &mut self,
        ring: &mut Driver,
        idx: usize,
        gen: u32,
        end: RelayEnd,
        side: Option<usize>,
    ) {
        if self.end.is_some() {
            return;
        }
        self.end = Some(end);
        if self.first.is_none() {
            self.first = side;
        }
        let cancel = user_data(ShardOp::Cancel, 0);
        if self.connecting {
            let target = user_data(RelayOp::Connect, pack(idx, gen, UPSTREAM));
            let _ = ring.cancel(target, cancel);
        }
        for d in [CLIENT, UPSTREAM] {
            if let Some(tag) = self.steps[d].in_flight() {
                let _ = ring.cancel(user_data(tag, pack(idx, gen, d)), cancel);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_payload_round_trips_and_fits_56_bits() {
        for (slot, gen, side) in [(0, 0, 0), (1, 2, 1), (0xFF_FFFF, 0x7FFF_FFFF, 1)] {
            let p = pack(slot, gen, side);
            assert!(p < 1 << 56);
            assert_eq!(decode(p), (slot, gen, side));
        }
    }

    #[test]
    fn buffer_size_is_clamped() {
        assert_eq!(RelayOptions::new().with_buffer_size(0).buffer_size(), 1);
        assert_eq!(
            RelayOptions::new()
                .with_buffer_size(usize::MAX)
                .buffer_size(),
            MAX_RELAY_BUFFER
        );
    }

    #[test]
    fn zero_idle_timeout_means_none() {
        let o = RelayOptions::new().with_idle_timeout(Duration::ZERO);
        assert_eq!(o.idle_timeout(), None);
    }

    #[test]
    fn errors_map_to_ends_by_side() {
        assert_eq!(peer_end(CLIENT, libc::ECONNRESET), RelayEnd::ClientReset);
        assert_eq!(peer_end(CLIENT, libc::EPIPE), RelayEnd::ClientReset);
        assert_eq!(
            peer_end(UPSTREAM, libc::ECONNRESET),
            RelayEnd::UpstreamReset
        );
        assert_eq!(
            peer_end(UPSTREAM, libc::ETIMEDOUT),
            RelayEnd::Error {
                errno: libc::ETIMEDOUT
            }
        );
        assert_eq!(connect_end(libc::ECONNREFUSED), RelayEnd::UpstreamRefused);
        assert_eq!(connect_end(libc::ECANCELED), RelayEnd::UpstreamTimeout);
        assert_eq!(connect_end(libc::ECONNRESET), RelayEnd::UpstreamReset);
        assert_eq!(
            connect_end(libc::ENETUNREACH),
            RelayEnd::Error {
                errno: libc::ENETUNREACH
            }
        );
    }
}
