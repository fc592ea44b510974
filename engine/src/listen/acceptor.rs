//! The accept path of one shard: a multishot ACCEPT on the shard's own
//! `SO_REUSEPORT` listener, re-armed when a completion comes without
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
use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::admit::register::RegisterOp;
use crate::admit::{Admission, AdmissionConfig, AdmitOp};
use crate::driver::{sys, Cqe, Driver};
use crate::listen::accept::{Delivery, ShardShared};
use crate::listen::backlog::Pending;
use crate::listen::conn::Admitted;
use crate::relay::context::{Replies, ReplyOp, ShardContext};
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

/// How an accept error is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AcceptErrorKind {
    /// Our own cancel.
    Cancelled,
    /// Out of a resource: back off.
    Exhausted,
    /// The connection died before we took it, or a firewall refused it: skip.
    Transient,
    /// Anything else: surface it, back off.
    Other,
}

/// Classifies a negative accept result.
pub(crate) fn classify(errno: i32) -> AcceptErrorKind {
    match errno {
        libc::ECANCELED => AcceptErrorKind::Cancelled,
        libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM => AcceptErrorKind::Exhausted,
        libc::ECONNABORTED
        | libc::EPROTO
        | libc::EPERM
        | libc::EAGAIN
        | libc::EINTR
        | libc::ENETDOWN
        | libc::ENOPROTOOPT
        | libc::EHOSTDOWN
        | libc::ENONET
        | libc::EHOSTUNREACH
        | libc::EOPNOTSUPP
        | libc::ENETUNREACH
        | libc::ETIMEDOUT => AcceptErrorKind::Transient,
        _ => AcceptErrorKind::Other,
    }
}

/// One shard's accept service.
pub(crate) struct Acceptor {
    index: usize,
    socket: Option<Arc<Socket>>,
    shard: Arc<ShardShared>,
    delivery: Arc<Delivery>,
    handler: Option<Arc<Handler>>,
    multishot: bool,
    accepted_any: bool,
    arm: Arm,
    armed_before: bool,
    backoff_step: Duration,
    backoff_timer: bool,
    held: VecDeque<Pending>,
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
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptor")
            .field("index", &self.index)
            .field("arm", &self.arm)
            .field("held", &self.held.len())
            .field("paused", &self.paused)
            .finish_non_exhaustive()
    }
}

impl Acceptor {
    pub fn new(
        index: usize,
        socket: Arc<Socket>,
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
            socket: Some(socket),
            shard,
            delivery,
            handler,
            multishot: true,
            accepted_any: false,
            arm: Arm::Idle,
            armed_before: false,
            backoff_step: MIN_BACKOFF,
            backoff_timer: false,
            held: VecDeque::new(),
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
        }
    }

    /// Registers admitted connections for the listener's declared events.
    pub fn with_registration(mut self, r: Option<crate::admit::register::Registration>) -> Self {
        self.registry = r.map(|r| crate::admit::register::Registry::new(r, self.index));
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

    fn counters(&self) -> &Counters {
        &self.shard.counters
    }

    fn arm(&mut self, ring: &mut Driver) -> io::Result<()> {
        let Some(socket) = &self.socket else {
            return Ok(());
        };
        let fd = socket.as_raw_fd();
        let ud = user_data(AcceptOp::Accept, 0);
        if self.multishot {
            ring.accept_multi(fd, ud)?;
        } else {
            ring.accept_once(fd, ud)?;
        }
        if self.armed_before {
            Counters::add(&self.counters().rearms, 1);
        }
        self.armed_before = true;
        self.arm = Arm::Armed;
        Ok(())
    }

    fn cancel(&mut self, ring: &mut Driver) {
        if self.arm == Arm::Armed
            && ring
                .cancel(
                    user_data(AcceptOp::Accept, 0),
                    user_data(ShardOp::Cancel, 0),
                )
                .is_ok()
        {
            self.arm = Arm::Cancelling;
        }
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
        let pending = Pending::new(sys::adopt_fd(fd), now);
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
        while let Some(p) = self
            .shard
            .take_deliverable(&self.delivery, self.pending_timeout)
        {
            let conn = Admitted::new(p, self.index);
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
    }

    fn close_all_pending(&mut self) {
        let mut closed = match &mut self.admission {
            Some(a) => a.close_all(&self.shard.counters),
            None => 0,
        };
        for p in self.held.drain(..) {
            drop(p);
            closed += 1;
        }
        while let Some((p, _)) = self.shard.backlog.pop() {
            self.delivery.popped();
            drop(p);
            closed += 1;
        }
        Counters::add(&self.counters().closed_at_shutdown, closed);
        self.counters()
            .held
            .store(0, std::sync::atomic::Ordering::Relaxed);
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
        self.arm(ring)
    }

    fn complete(&mut self, ring: &mut Driver, kind: u8, payload: u64, cqe: Cqe, now: Instant) {
        match AcceptOp::from_byte(kind) {
            Some(AcceptOp::Accept) => {
                if !cqe.more() {
                    self.arm = Arm::Idle;
                }
                if cqe.result >= 0 {
                    self.accepted(ring, cqe.result, now);
                    return;
                }
                let errno = -cqe.result;
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
            Some(AcceptOp::Backoff) => {
                ring.release(cqe.user_data);
                self.backoff_timer = false;
            }
            None => self.complete_hosted(ring, kind, payload, cqe, now),
        }
    }

    fn turn(&mut self, ring: &mut Driver, now: Instant) {
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
        self.counters()
            .held
            .store(self.held.len() as u64, std::sync::atomic::Ordering::Relaxed);
        if self.handler.is_some() {
            self.pushed = false;
            self.deliver_inline(ring);
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
        let want = !self.paused && !self.backoff_timer;
        match (want, self.arm) {
            (true, Arm::Idle) => {
                if let Err(e) = self.arm(ring) {
                    event!(error, shard = self.index, error = %e, "accept could not be posted: surfaced to accept()");
                    self.shard.surface(e);
                    self.start_backoff(ring);
                }
            }
            (false, Arm::Armed) => self.cancel(ring),
            _ => {}
        }
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
    }

    fn idle(&self) -> bool {
        self.arm == Arm::Idle
            && !self.backoff_timer
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
        let c = self.coalesce?;
        if accepted < c.threshold || self.stopping {
            return None;
        }
        Counters::add(&self.counters().coalesced_pauses, 1);
        Some(c.pause)
    }

    fn finish(&mut self) {
        // The accept is over: close the listening socket (the handle's copy
        // goes at shutdown too), then every connection not delivered.
        self.socket = None;
        if let Some(r) = &mut self.registry {
            let n = r.close_all(&self.shard.counters);
            Counters::add(&self.shard.counters.closed_at_shutdown, n);
        }
        self.close_all_pending();
        self.relays.finish();
    }
}
