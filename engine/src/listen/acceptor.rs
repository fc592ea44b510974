//! The accept path of one shard: a multishot ACCEPT on each of the shard's
//! `SO_REUSEPORT` listeners (usually one; several when a listener adopted
//! more sockets than it has shards), each re-armed when a completion comes without
//! `IORING_CQE_F_MORE`; accepted sockets go into the shard's backlog ring.
//!
//! Backpressure: when the ring is full the accept is cancelled; completions
//! that were already on their way are held (never dropped) and moved into
//! the ring first when it drains; accepting resumes at the low-water mark.
//! Resource exhaustion (EMFILE, ENFILE, ENOBUFS, ENOMEM) stops accepting for
//! a backoff period that doubles up to [`MAX_BACKOFF`]; the kernel's backlog
//! holds the connections meanwhile.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::admit::conn::Admitted;
use crate::admit::pending::Pending;
use crate::admit::register::RegisterOp;
use crate::admit::replies::{Replies, ReplyOp};
use crate::admit::slot::ConnectionSlot;
use crate::admit::{Admission, AdmissionConfig, AdmitOp};
use crate::driver::sys::{classify, AcceptErrorKind};
use crate::driver::{sys, Cqe, Driver};
use crate::listen::accept::{Delivery, ShardShared};
use crate::listen::limits::{LimitOp, Limits, Stop};
use crate::relay::context::ShardContext;
use crate::relay::{RelayOp, Relays};
use crate::shard::{op_kinds, user_data, Coalesce, Service, ShardOp};
use crate::stats::Counters;

op_kinds! {
    /// The acceptor's own operations (its hosted parts, admission,
    /// registrations, replies and relays, name theirs).
    pub(crate) enum AcceptOp {
        /// The listener's accept operation.
        Accept = 2,
        /// The accept backoff timer.
        Backoff = 4,
    }
}

/// First backoff after a resource-exhaustion error.
pub(crate) const MIN_BACKOFF: Duration = Duration::from_millis(1);
/// Longest backoff.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_millis(100);
/// At most this many connections taken per socket from the queue a
/// draining shard lets go of (see `Acceptor::let_go`).
const LEFTOVER_BUDGET: usize = 4096;

/// How many connections a delivery hands over between two reads of the
/// clock (see [`Acceptor::deliver_to`]).
const CLOCK_EVERY: usize = 16;

/// The application's inline handler: called on the shard thread with each
/// connection, with the shard's context.
pub type Handler = dyn Fn(Admitted, &mut ShardContext<'_>) + Send + Sync;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arm {
    /// No accept operation in flight.
    Idle,
    /// An accept operation is posted.
    Armed,
    /// A cancel was posted; the accept's final completion is still to come.
    Cancelling,
}

/// One shard's accept service.
pub(crate) struct Acceptor {
    index: usize,
    /// The shard's listening sockets; emptied once it stopped accepting
    /// (drain or hand-over) and every accept on them is over.
    sockets: Vec<Arc<Socket>>,
    /// One accept state per socket (the accept's user data payload is the
    /// socket's position here).
    arms: Vec<Arm>,
    /// Stopped accepting for good (drain): no re-arm; the rest goes on.
    draining: bool,
    shard: Arc<ShardShared>,
    delivery: Arc<Delivery>,
    handler: Option<Arc<Handler>>,
    /// Delivered by the application's own `drive()` (a driven shard): no
    /// accept-event notification, no inline handler.
    driven: bool,
    multishot: bool,
    /// Accepted sockets are non-blocking from the accept itself
    /// (SOCK_NONBLOCK), as `SocketAttrs::nonblocking` declares.
    nonblocking: bool,
    accepted_any: bool,
    armed_before: bool,
    backoff_step: Duration,
    backoff_timer: bool,
    held: VecDeque<Pending>,
    /// An inline handler's connections of this turn: they go to it at the
    /// turn's end without passing through the ring (no other thread takes
    /// from a listener with a handler), at most the ring's capacity; more
    /// take the ring as before.
    inline: VecDeque<Pending>,
    paused: bool,
    stopping: bool,
    pushed: bool,
    replies: Replies,
    relays: Relays,
    admission: Option<Admission>,
    coalesce: Option<Coalesce>,
    accepted_this_turn: usize,
    /// Event registrations, when the listener declares them.
    registry: Option<crate::admit::register::Registry>,
    /// Older connections are withdrawn at the head of the ring.
    pending_timeout: Duration,
    /// The listener's limits, when it has any: the shard then polls its
    /// listener and accepts by itself (see `limits`).
    limits: Option<Limits>,
    /// The connections one turn took under the limits (kept for reuse).
    taken: Vec<(OwnedFd, ConnectionSlot)>,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptor")
            .field("index", &self.index)
            .field("arms", &self.arms)
            .field("held", &self.held.len())
            .field("paused", &self.paused)
            .finish_non_exhaustive()
    }
}

impl Acceptor {
    pub fn new(
        index: usize,
        sockets: Vec<Arc<Socket>>,
        shard: Arc<ShardShared>,
        delivery: Arc<Delivery>,
        handler: Option<Arc<Handler>>,
        admission: Arc<AdmissionConfig>,
    ) -> Self {
        shard
            .counters
            .multishot
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let relays = Relays::new(Arc::clone(&shard.counters.relay));
        Acceptor {
            index,
            arms: vec![Arm::Idle; sockets.len()],
            sockets,
            draining: false,
            shard,
            delivery,
            handler,
            driven: false,
            multishot: true,
            nonblocking: admission.attrs.nonblocking,
            accepted_any: false,
            armed_before: false,
            backoff_step: MIN_BACKOFF,
            backoff_timer: false,
            held: VecDeque::new(),
            inline: VecDeque::new(),
            paused: false,
            stopping: false,
            pushed: false,
            replies: Replies::default(),
            relays,
            admission: (!admission.is_noop()).then(|| Admission::new(admission.clone(), index)),
            coalesce: None,
            accepted_this_turn: 0,
            registry: None,
            pending_timeout: admission.pending_timeout,
            limits: None,
            taken: Vec::new(),
        }
    }

    /// Accepts under the listener's limits (max connections, accept
    /// budget, accept rate), if it has any.
    pub fn with_limits(mut self, limits: Option<Limits>) -> Self {
        if limits.is_some() {
            self.multishot = false;
            self.shard
                .counters
                .multishot
                .store(false, std::sync::atomic::Ordering::Relaxed);
        }
        self.limits = limits;
        self
    }

    /// The user data of the operation that waits for connections on socket
    /// `j`: the ACCEPT, or with limits the POLL.
    fn waiting_op(&self, j: usize) -> u64 {
        if self.limits.is_some() {
            user_data(LimitOp::Ready, j as u64)
        } else {
            user_data(AcceptOp::Accept, j as u64)
        }
    }

    /// Registers admitted connections for the listener's declared events.
    pub fn with_registration(mut self, r: Option<crate::admit::register::Registration>) -> Self {
        self.registry = r.map(|r| crate::admit::register::Registry::new(r, self.index));
        self
    }

    /// Makes this a shard the application drives: connections wait in the
    /// ring for its [`Acceptor::deliver_to`], called right after each turn.
    pub fn driven(mut self) -> Self {
        self.driven = true;
        self.handler = None;
        self
    }

    /// Turns on wake-up coalescing for this shard.
    pub fn with_coalesce(mut self, c: Option<Coalesce>) -> Self {
        self.coalesce = c;
        self
    }

    /// Caps this shard's relays (see
    /// [`crate::ListenerBuilder::max_relays_per_shard`]).
    pub fn with_relay_limits(mut self, limits: crate::relay::RelayLimits) -> Self {
        self.relays.set_limits(limits);
        self
    }

    /// Sends replies at once instead of with the FIN (see
    /// [`crate::ListenerBuilder::replies_at_once`]).
    pub fn with_replies_at_once(mut self, on: bool) -> Self {
        self.replies.at_once = on;
        self
    }

    /// Whether accepted sockets are non-blocking from the accept.
    #[cfg(feature = "tokio")]
    pub fn accepts_nonblocking(&self) -> bool {
        self.nonblocking
    }

    fn counters(&self) -> &Counters {
        &self.shard.counters
    }

    /// Arms an accept on every socket that has none.
    fn arm(&mut self, ring: &mut Driver) -> io::Result<()> {
        for j in 0..self.sockets.len() {
            if self.arms[j] != Arm::Idle {
                continue;
            }
            let fd = self.sockets[j].as_raw_fd();
            if self.limits.is_some() {
                ring.poll(fd, libc::POLLIN as u32, true, self.waiting_op(j))?;
            } else if self.multishot {
                ring.accept_multi(fd, self.nonblocking, self.waiting_op(j))?;
            } else {
                ring.accept_once(fd, self.nonblocking, self.waiting_op(j))?;
            }
            if self.armed_before {
                Counters::add(&self.counters().rearms, 1);
            }
            self.arms[j] = Arm::Armed;
        }
        self.armed_before = true;
        Ok(())
    }

    fn cancel(&mut self, ring: &mut Driver) {
        for j in 0..self.arms.len() {
            if self.arms[j] == Arm::Armed
                && ring
                    .cancel(self.waiting_op(j), user_data(ShardOp::Cancel, 0))
                    .is_ok()
            {
                self.arms[j] = Arm::Cancelling;
            }
        }
    }

    fn all_idle(&self) -> bool {
        self.arms.iter().all(|a| *a == Arm::Idle)
    }

    fn any_armed(&self) -> bool {
        self.arms.contains(&Arm::Armed)
    }

    fn start_backoff(&mut self, ring: &mut Driver) {
        if self.backoff_timer {
            return;
        }
        if ring
            .timeout(self.backoff_step, user_data(AcceptOp::Backoff, 0))
            .is_ok()
        {
            self.backoff_timer = true;
            self.backoff_step = (self.backoff_step * 2).min(MAX_BACKOFF);
        }
    }

    /// Takes ownership of a freshly accepted socket.
    fn accepted(&mut self, ring: &mut Driver, fd: i32, now: Instant) {
        self.accepted_fd(ring, sys::adopt_fd(fd), ConnectionSlot::none(), now);
    }

    /// A connection taken from the kernel, with its slot of the listener's
    /// maximum (empty without one).
    fn accepted_fd(&mut self, ring: &mut Driver, fd: OwnedFd, slot: ConnectionSlot, now: Instant) {
        let mut pending = Pending::new(fd, now);
        pending.slot = slot;
        Counters::add(&self.counters().accepted, 1);
        self.accepted_this_turn += 1;
        self.accepted_any = true;
        self.backoff_step = MIN_BACKOFF;
        match &mut self.admission {
            None => self.enqueue(pending),
            Some(a) => {
                a.admit(pending, ring, &mut self.replies, &self.shard.counters, now);
                self.take_admitted();
            }
        }
    }

    /// Moves what admission accepted into the ring (or the held queue).
    fn take_admitted(&mut self) {
        let Some(a) = &mut self.admission else { return };
        let ready = std::mem::take(&mut a.ready);
        for p in ready {
            self.enqueue(p);
        }
    }

    fn enqueue(&mut self, pending: Pending) {
        if let Some(r) = &mut self.registry {
            // Registered in this turn's `turn()`, not delivered to the ring.
            return r.add(pending, &self.shard.counters);
        }
        self.enqueue_ring(pending);
    }

    fn enqueue_ring(&mut self, pending: Pending) {
        if self.handler.is_some()
            && self.held.is_empty()
            && self.inline.len() < self.shard.backlog.capacity()
            && (!self.inline.is_empty() || self.shard.backlog.len() == 0)
        {
            // Older than anything the ring may take after it (the ring is
            // used only once this is full), so the order holds.
            self.inline.push_back(pending);
            self.count_held();
            return;
        }
        if self.held.is_empty() {
            if let Err(p) = self.push(pending) {
                self.held.push_back(p);
            }
        } else {
            self.held.push_back(pending);
        }
    }

    fn push(&mut self, p: Pending) -> Result<(), Pending> {
        self.delivery.will_push();
        match self.shard.backlog.push(p) {
            Ok(()) => {
                self.pushed = true;
                Ok(())
            }
            Err(p) => {
                self.delivery.push_failed();
                Err(p)
            }
        }
    }

    fn deliver_inline(&mut self, ring: &mut Driver) {
        let Some(handler) = self.handler.clone() else {
            return;
        };
        self.deliver_to(ring, usize::MAX, &mut |conn, ctx| handler(conn, ctx));
    }

    /// Hands every deliverable connection in the ring to `handler`, on this
    /// thread, with the shard's context; returns how many. A panicking
    /// handler is counted and the next connection goes on.
    pub fn deliver_to(
        &mut self,
        ring: &mut Driver,
        max: usize,
        handler: &mut dyn FnMut(Admitted, &mut ShardContext<'_>),
    ) -> usize {
        let mut n = 0;
        // One clock read per few connections rather than one each: what
        // it decides (withdrawal after the pending timeout, the reset
        // check after a millisecond in the ring) does not need more.
        let mut now = Instant::now();
        while n < max {
            if n > 0 && n % CLOCK_EVERY == 0 {
                now = Instant::now();
            }
            let p = match self.inline.pop_front() {
                Some(p) => match self.inline_deliverable(p, now) {
                    Some(p) => p,
                    None => continue,
                },
                None => match self.take_one_at(Some(now)) {
                    Some(p) => p,
                    None => break,
                },
            };
            n += 1;
            let conn = p;
            let mut ctx = ShardContext::new(self.index, ring, &mut self.replies, &mut self.relays);
            if catch_unwind(AssertUnwindSafe(|| handler(conn, &mut ctx))).is_err() {
                Counters::add(&self.counters().handler_panics, 1);
                event!(
                    error,
                    shard = self.index,
                    "inline handler panicked: connection dropped"
                );
            }
        }
        n
    }

    /// A connection the inline handler takes without the ring, judged as
    /// one from the ring would be; the stats stop counting it pending.
    fn inline_deliverable(&mut self, p: Pending, now: Instant) -> Option<Admitted> {
        self.count_held();
        self.shard
            .deliverable(p, self.pending_timeout, Some(now), true)
            .map(|p| Admitted::new(p, self.index))
    }

    /// Pending in the stats, besides the ring: what the shard holds while
    /// the ring is full, and what goes to the inline handler without it. A
    /// plain store: only this thread writes the gauge.
    fn count_held(&self) {
        let n = (self.held.len() + self.inline.len()) as u64;
        self.counters().held.store(n, Ordering::Relaxed);
    }

    /// The shard's context outside [`Acceptor::deliver_to`]: for a
    /// connection [`Acceptor::take_one`] returned to a driven shard's
    /// `accept()` (its replies and relays go on `ring` like a handler's).
    pub fn context<'a>(&'a mut self, ring: &'a mut Driver) -> ShardContext<'a> {
        ShardContext::new(self.index, ring, &mut self.replies, &mut self.relays)
    }

    /// The next connection of the ring that can still be delivered (counted
    /// delivered), without touching the ring's driver.
    pub fn take_one(&mut self) -> Option<Admitted> {
        self.take_one_at(None)
    }

    /// As [`Acceptor::take_one`], judging the time a connection waited by
    /// `now` (`None`: the clock).
    fn take_one_at(&mut self, now: Option<Instant>) -> Option<Admitted> {
        self.shard
            .take_deliverable(&self.delivery, self.pending_timeout, now, true)
            .map(|p| Admitted::new(p, self.index))
    }

    /// A failed accept (or readiness poll): skip, back off or fall back.
    fn accept_error(&mut self, ring: &mut Driver, errno: i32) {
        let c = &self.shard.counters;
        match classify(errno) {
            AcceptErrorKind::Cancelled => {}
            AcceptErrorKind::Exhausted => {
                c.last_errno
                    .store(errno as u64, std::sync::atomic::Ordering::Relaxed);
                let counter = match errno {
                    libc::EMFILE => &c.backoff_emfile,
                    libc::ENFILE => &c.backoff_enfile,
                    libc::ENOBUFS => &c.backoff_enobufs,
                    _ => &c.backoff_enomem,
                };
                Counters::add(counter, 1);
                event!(warn, shard = self.index, errno, error = %io::Error::from_raw_os_error(errno), backoff_ms = self.backoff_step.as_millis() as u64, "accept out of resources: backing off");
                self.cancel(ring);
                self.start_backoff(ring);
            }
            AcceptErrorKind::Transient => {
                c.last_errno
                    .store(errno as u64, std::sync::atomic::Ordering::Relaxed);
                Counters::add(&c.aborted, 1);
            }
            AcceptErrorKind::Other
                if errno == libc::EINVAL && self.multishot && !self.accepted_any =>
            {
                // Multishot accept needs 5.19; older kernels refuse
                // the flag with EINVAL. Fall back to single-shot.
                self.multishot = false;
                c.multishot
                    .store(false, std::sync::atomic::Ordering::Relaxed);
            }
            AcceptErrorKind::Other => {
                c.last_errno
                    .store(errno as u64, std::sync::atomic::Ordering::Relaxed);
                Counters::add(&c.accept_errors, 1);
                event!(error, shard = self.index, errno, error = %io::Error::from_raw_os_error(errno), "accept failed: surfaced to accept()");
                self.shard.surface(io::Error::from_raw_os_error(errno));
                self.cancel(ring);
                self.start_backoff(ring);
            }
        }
    }

    /// Draining, once no accept is on the sockets any more: takes what
    /// their queues still hold, then lets them go (the kernel's queues stay
    /// with whoever else holds them: a successor after a hand-over).
    ///
    /// # Why the queues are emptied first
    ///
    /// An io_uring ACCEPT waits on the socket as an exclusive waiter: each
    /// new connection wakes one waiter, and the first in the queue — ours,
    /// added before a successor's — takes the wake-up even when its task
    /// has not run the accept yet. A cancel that comes in between ends the
    /// accept without it (the poll sees the cancel first), and the wake-ups
    /// it took are gone: the connections stay queued while the successor's
    /// accept sleeps, until another connection arrives. When none does (a
    /// client waiting on all of them), they wait out their timeout. One
    /// pass to EAGAIN after our waiter is gone leaves the queue empty at a
    /// moment when every later arrival wakes the successor. Bounded: under
    /// load the successor takes from the same queue, and arrivals wake it.
    /// (With limits the shard waits on a plain, non-exclusive poll and
    /// takes nothing it did not see: nothing is lost to recover.)
    fn let_go(&mut self, ring: &mut Driver, now: Instant) {
        if !self.all_idle() || self.sockets.is_empty() {
            return;
        }
        let sockets = std::mem::take(&mut self.sockets);
        if self.limits.is_none() {
            for socket in &sockets {
                // The io_uring path's listeners are blocking; the accept4
                // below must not wait. O_NONBLOCK is a flag of the open
                // file, which a successor shares: it is set only for this
                // pass and put back (a successor's accept issued in between
                // may end with EAGAIN, which it re-arms like any transient
                // error).
                let was_nonblocking = socket.nonblocking().unwrap_or(false);
                if !was_nonblocking && socket.set_nonblocking(true).is_err() {
                    continue;
                }
                for _ in 0..LEFTOVER_BUDGET {
                    let errno = match sys::accept4(socket.as_fd(), self.nonblocking) {
                        Ok(fd) => {
                            self.accepted_fd(ring, fd, ConnectionSlot::none(), now);
                            continue;
                        }
                        Err(e) => e.raw_os_error().unwrap_or(libc::EIO),
                    };
                    match errno {
                        // Empty.
                        libc::EAGAIN => break,
                        libc::EINTR => continue,
                        _ => {
                            let c = &self.shard.counters;
                            c.last_errno
                                .store(errno as u64, std::sync::atomic::Ordering::Relaxed);
                            if classify(errno) == AcceptErrorKind::Transient {
                                Counters::add(&c.aborted, 1);
                                continue;
                            }
                            // Out of descriptors, or anything else: what is
                            // left stays in the queue, with the successor.
                            event!(warn, shard = self.index, errno, error = %io::Error::from_raw_os_error(errno), "draining: leaving the rest of the accept queue");
                            break;
                        }
                    }
                }
                if !was_nonblocking {
                    let _ = socket.set_nonblocking(false);
                }
            }
        }
        drop(sockets);
        self.shard.release_sockets();
    }

    /// With limits: takes what the limits allow from the kernel's queue,
    /// then arranges the next try (a wake-up, a timer, a backoff).
    fn take_limited(&mut self, ring: &mut Driver, now: Instant) {
        let Some(l) = &mut self.limits else { return };
        if !l.readable
            || l.refill_timer
            || self.paused
            || self.backoff_timer
            || !self.held.is_empty()
            || self.shard.backlog.is_full()
        {
            return;
        }
        // Each socket's queue in turn, until one stops short of empty (with
        // several sockets on a shard the budget applies per socket).
        let mut taken = std::mem::take(&mut self.taken);
        let mut stop = Stop::Drained;
        for socket in &self.sockets {
            stop = l.take_from_kernel(
                socket,
                self.nonblocking,
                &self.shard.counters,
                now,
                &mut taken,
            );
            if !matches!(stop, Stop::Drained) {
                // More waits on this one.
                l.readable = true;
                break;
            }
        }
        for (fd, slot) in taken.drain(..) {
            self.accepted_fd(ring, fd, slot, now);
        }
        self.taken = taken;
        match stop {
            // The poll says when more arrive; a close wakes the shard.
            Stop::Drained | Stop::AtLimit => {}
            // More may wait: another turn at once, after the others' work.
            Stop::Budget => self.shard.control.wake(),
            Stop::Rate(wait) => {
                if ring.timeout(wait, user_data(LimitOp::Refill, 0)).is_ok() {
                    if let Some(l) = &mut self.limits {
                        l.refill_timer = true;
                    }
                } else {
                    self.shard.control.wake();
                }
            }
            Stop::Error(errno) => self.accept_error(ring, errno),
        }
    }

    fn close_all_pending(&mut self) {
        let mut closed = match &mut self.admission {
            Some(a) => a.close_all(&self.shard.counters),
            None => 0,
        };
        for p in self.held.drain(..).chain(self.inline.drain(..)) {
            drop(p);
            closed += 1;
        }
        while let Some((p, _)) = self.shard.backlog.pop() {
            self.delivery.popped();
            drop(p);
            closed += 1;
        }
        Counters::add(&self.counters().closed_at_shutdown, closed);
        self.count_held();
    }
}

impl Acceptor {
    /// A completion of an operation one of the parts the acceptor hosts
    /// posted, routed by the kinds each part names.
    fn complete_hosted(
        &mut self,
        ring: &mut Driver,
        kind: u8,
        payload: u64,
        cqe: Cqe,
        now: Instant,
    ) {
        if let Some(op) = ReplyOp::from_byte(kind) {
            self.replies.complete(ring, op, cqe);
        } else if let Some(op) = RelayOp::from_byte(kind) {
            self.relays.complete(ring, op, payload, cqe, now);
        } else if let Some(RegisterOp::Poll) = RegisterOp::from_byte(kind) {
            if let Some(r) = &mut self.registry {
                r.event(ring, payload, cqe, self.stopping, &self.shard.counters);
                for p in std::mem::take(&mut r.taken) {
                    self.enqueue_ring(p);
                }
            }
        } else if let Some(op) = AdmitOp::from_byte(kind) {
            if let Some(a) = &mut self.admission {
                match op {
                    AdmitOp::Poll => a.polled(
                        ring,
                        &mut self.replies,
                        &self.shard.counters,
                        payload,
                        cqe,
                        now,
                    ),
                    AdmitOp::Timer => {
                        a.timer(ring, &mut self.replies, &self.shard.counters, cqe, now)
                    }
                }
            }
            self.take_admitted();
        }
    }
}

impl Service for Acceptor {
    fn start(&mut self, ring: &mut Driver) -> io::Result<()> {
        if let Some(c) = self.coalesce {
            // Pauses must be as short as asked: the default 50 µs slack
            // would double them. A refusal only costs precision.
            let _ = sys::set_timer_slack((c.pause.as_nanos() as u64 / 50).max(1_000));
        }
        if self.limits.is_some() {
            for socket in &self.sockets {
                crate::listen::limits::prepare(socket)?;
            }
        }
        self.arm(ring)
    }

    fn complete(&mut self, ring: &mut Driver, kind: u8, payload: u64, cqe: Cqe, now: Instant) {
        match AcceptOp::from_byte(kind) {
            Some(AcceptOp::Accept) => {
                if !cqe.more() {
                    if let Some(a) = self.arms.get_mut(payload as usize) {
                        *a = Arm::Idle;
                    }
                }
                if cqe.result >= 0 {
                    self.accepted(ring, cqe.result, now);
                    return;
                }
                self.accept_error(ring, -cqe.result);
            }
            Some(AcceptOp::Backoff) => {
                ring.release(cqe.user_data);
                self.backoff_timer = false;
            }
            None => match LimitOp::from_byte(kind) {
                Some(LimitOp::Ready) => {
                    if !cqe.more() {
                        if let Some(a) = self.arms.get_mut(payload as usize) {
                            *a = Arm::Idle;
                        }
                    }
                    if cqe.result >= 0 {
                        if let Some(l) = &mut self.limits {
                            l.readable = true;
                        }
                    } else {
                        self.accept_error(ring, -cqe.result);
                    }
                }
                Some(LimitOp::Refill) => {
                    ring.release(cqe.user_data);
                    if let Some(l) = &mut self.limits {
                        l.refill_timer = false;
                    }
                }
                None => self.complete_hosted(ring, kind, payload, cqe, now),
            },
        }
    }

    fn turn(&mut self, ring: &mut Driver, now: Instant) {
        if !self.stopping {
            // With limits, this turn's connections are taken here, before
            // the turn delivers.
            self.take_limited(ring, now);
            if self.draining {
                self.let_go(ring, now);
            }
        }
        if let Some(a) = &mut self.admission {
            if !self.stopping {
                a.arm_timer(ring, now);
            }
        }
        if let Some(r) = &mut self.registry {
            if !self.stopping {
                r.arm_incoming(ring, &self.shard.counters);
            }
        }
        // Held connections go first, in order.
        while let Some(p) = self.held.pop_front() {
            if let Err(p) = self.push(p) {
                self.held.push_front(p);
                break;
            }
        }
        self.count_held();
        if self.handler.is_some() {
            self.pushed = false;
            self.deliver_inline(ring);
        } else if self.driven {
            // The application's drive() delivers right after this turn.
            self.pushed = false;
        } else if std::mem::take(&mut self.pushed) {
            self.delivery.notify();
        }
        if self.stopping {
            return;
        }
        let full = !self.held.is_empty() || self.shard.backlog.is_full();
        if !self.paused && full {
            self.paused = true;
            self.shard.backlog.set_paused(true);
            Counters::add(&self.counters().ring_full_pauses, 1);
            event!(
                debug,
                shard = self.index,
                held = self.held.len(),
                "backlog ring full: accepting paused"
            );
        }
        if self.paused && self.held.is_empty() && self.shard.backlog.drained() {
            self.paused = false;
            self.shard.backlog.set_paused(false);
            Counters::add(&self.counters().resumes, 1);
            event!(
                debug,
                shard = self.index,
                "backlog ring drained: accepting resumed"
            );
        }
        if self.draining {
            // Stopped accepting: the sockets go in `let_go` once no accept
            // is on them.
            self.cancel(ring);
            return;
        }
        // With limits, no poll while the shard waits at the maximum or for
        // a token: arrivals would only wake it for nothing.
        let held_back = self
            .limits
            .as_ref()
            .is_some_and(|l| l.at_limit() || l.refill_timer);
        let want = !self.paused && !self.backoff_timer && !held_back;
        if want {
            if let Err(e) = self.arm(ring) {
                event!(error, shard = self.index, error = %e, "accept could not be posted: surfaced to accept()");
                self.shard.surface(e);
                self.start_backoff(ring);
            }
        } else if self.any_armed() {
            self.cancel(ring);
        }
    }

    fn drain(&mut self, ring: &mut Driver) {
        self.draining = true;
        self.cancel(ring);
    }

    fn drained(&self) -> bool {
        self.draining
            && self.sockets.is_empty()
            && self.all_idle()
            && self.held.is_empty()
            && self.inline.is_empty()
            && self.shard.backlog.len() == 0
            && self.replies.is_empty()
            && self.relays.live() == 0
            && self
                .registry
                .as_ref()
                .map_or(true, crate::admit::register::Registry::is_empty)
            && self.admission.as_ref().map_or(true, |a| a.waiting() == 0)
    }

    fn stop(&mut self, ring: &mut Driver) {
        self.stopping = true;
        self.cancel(ring);
        self.relays.stop(ring);
        if let Some(r) = &mut self.registry {
            r.stop(ring);
        }
        if let Some(a) = &mut self.admission {
            a.stop(ring);
        }
        if self.backoff_timer {
            let _ = ring.cancel(
                user_data(AcceptOp::Backoff, 0),
                user_data(ShardOp::Cancel, 0),
            );
        }
        if self.limits.as_ref().is_some_and(|l| l.refill_timer) {
            let _ = ring.cancel(user_data(LimitOp::Refill, 0), user_data(ShardOp::Cancel, 0));
        }
    }

    fn idle(&self) -> bool {
        self.all_idle()
            && !self.backoff_timer
            && !self.limits.as_ref().is_some_and(|l| l.refill_timer)
            && self.replies.is_empty()
            && self.relays.is_idle()
            && self
                .registry
                .as_ref()
                .map_or(true, crate::admit::register::Registry::idle)
            && self.admission.as_ref().map_or(true, Admission::idle)
    }

    fn pause(&mut self) -> Option<Duration> {
        let accepted = std::mem::take(&mut self.accepted_this_turn);
        // Only this thread writes it: a load and a store, no RMW.
        let max = &self.counters().max_turn_accepts;
        if accepted as u64 > max.load(std::sync::atomic::Ordering::Relaxed) {
            max.store(accepted as u64, std::sync::atomic::Ordering::Relaxed);
        }
        let c = self.coalesce?;
        if accepted < c.threshold || self.stopping {
            return None;
        }
        // Counted by the shard when it takes the pause.
        Some(c.pause)
    }

    fn finish(&mut self) {
        // The accept is over: close the listening socket (the handle's copy
        // goes at shutdown too), then every connection not delivered.
        self.sockets.clear();
        if let Some(l) = &mut self.limits {
            l.finish();
        }
        if let Some(r) = &mut self.registry {
            let n = r.close_all(&self.shard.counters);
            Counters::add(&self.shard.counters.closed_at_shutdown, n);
        }
        self.close_all_pending();
        self.relays.finish();
    }
}
