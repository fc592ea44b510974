//! Admission on the shard thread: between a connection's accept completion
//! and the backlog ring.
//!
//! For each accepted socket the shard gathers what the condition needs (the
//! addresses; the SYN's QoS from `TCP_SAVED_SYN`; the first bytes, peeked),
//! calls the condition, and carries out its verdict: accept (attributes that
//! Linux did not inherit, the verdict's QoS, a reply) into the ring; reject
//! (reply, then close or reset); or defer. A connection waiting for its
//! first bytes, or deferred, waits in a slot of its own with a poll posted
//! on the shard's ring (`SO_RCVLOWAT` makes the poll fire only once the
//! wanted bytes are there), so it never holds up the ones behind it.
//! Waiting connections are withdrawn when the peer goes away or their
//! pending timeout passes.
//!
//! It also holds what every service above it hands on, so that imports
//! point one way (driver, shard, admission, then the conditions, the relay,
//! the listener and the connect side): [`pending`] (a connection between
//! its accept and its delivery), [`conn`] (`Admitted`, as delivered),
//! [`slot`] (its slot of a listener's maximum of open connections),
//! [`replies`] (reply, then close, on the shard's ring) and [`syn`] (the
//! saved-SYN parser the condition's request carries).

pub(crate) mod attrs;
pub(crate) mod condition;
pub(crate) mod conn;
pub(crate) mod pending;
pub(crate) mod qos;
pub(crate) mod register;
pub(crate) mod replies;
pub(crate) mod slot;
pub mod syn;

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::SockRef;

use crate::admit::attrs::SocketAttrs;
use crate::admit::condition::{Condition, ConnectRequest, Marks, RejectHow, Verdict, MAX_PEEK};
use crate::admit::pending::Pending;
use crate::admit::replies::Replies;
use crate::driver::{sys, Cqe, Driver};
use crate::shard::{op_kinds, user_data, ShardOp};
use crate::stats::Counters;

op_kinds! {
    /// The operations of admission.
    pub(crate) enum AdmitOp {
        /// The shard's deadline timer (pending timeouts, defers).
        Timer = 8,
        /// A poll on a pending connection (its first bytes, or its peer
        /// going away).
        Poll = 9,
    }
}

/// A listener's admission settings.
pub(crate) struct AdmissionConfig {
    pub condition: Option<Arc<dyn Condition>>,
    pub peek: usize,
    pub peek_wait: Duration,
    pub pending_timeout: Duration,
    pub defer_interval: Duration,
    pub save_syn: bool,
    pub attrs: SocketAttrs,
    pub ipv6: bool,
    /// The listener's bound address when it is not a wildcard: every
    /// accepted socket's local address.
    pub local: Option<SocketAddr>,
}

impl AdmissionConfig {
    /// Whether admission has nothing to do (the fast path skips it).
    pub fn is_noop(&self) -> bool {
        self.condition.is_none() && self.attrs.nothing_after_accept() && self.peek == 0
    }
}

impl std::fmt::Debug for AdmissionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdmissionConfig")
            .field("condition", &self.condition.is_some())
            .field("peek", &self.peek)
            .field("peek_wait", &self.peek_wait)
            .field("pending_timeout", &self.pending_timeout)
            .field("save_syn", &self.save_syn)
            .finish_non_exhaustive()
    }
}

const POLLIN: u32 = libc::POLLIN as u32;
const POLLRDHUP: u32 = libc::POLLRDHUP as u32;
const POLL_GONE: u32 = (libc::POLLERR | libc::POLLHUP) as u32;

/// A connection waiting in admission.
#[derive(Debug)]
struct Waiting {
    pending: Pending,
    peer: SocketAddr,
    local: SocketAddr,
    syn: Option<crate::admit::syn::SynInfo>,
    deferrals: u32,
    /// The token of its poll while one is in flight and current. Every poll
    /// gets a token of its own, so a cancelled poll's completion can never
    /// be taken for a newer one's, and a cancel always finds its target.
    poll: Option<u32>,
    /// How many first bytes are peeked for the condition: the listener's
    /// `peek`, grown by [`Verdict::NeedBytes`].
    limit: usize,
    /// How many must have arrived before the condition is asked again.
    need: usize,
    /// With the listener's `peek(n, wait)`: when to decide with what has
    /// arrived, if `need` bytes have not.
    peek_deadline: Option<Instant>,
    /// When to ask again after a defer.
    next_eval: Option<Instant>,
    /// The caller half-closed: nothing more will arrive, so no poll is
    /// posted again (it would fire at once, forever); timers alone remain.
    finished: bool,
    /// The SO_RCVLOWAT currently set (1 = the kernel default).
    lowat: usize,
    marks: Marks,
}

impl Waiting {
    fn deadline(&self, cfg: &AdmissionConfig) -> Instant {
        let withdraw = self.pending.accepted_at + cfg.pending_timeout;
        match self.next_eval.or(self.peek_deadline) {
            Some(decide) => withdraw.min(decide),
            None => withdraw,
        }
    }
}

/// One shard's admission stage.
#[derive(Debug)]
pub(crate) struct Admission {
    cfg: Arc<AdmissionConfig>,
    shard: usize,
    slots: Vec<Option<Waiting>>,
    free: Vec<usize>,
    /// The next poll token.
    token: u32,
    /// Polls in flight, current or cancelled.
    polls: usize,
    /// Timers in flight: id (user-data payload) and when each fires.
    timers: Vec<(u64, Instant)>,
    next_timer: u64,
    stopping: bool,
    /// Admitted connections, in order, for the acceptor to push.
    pub ready: Vec<Pending>,
}

/// Poll user data: a 32-bit token above a 24-bit slot.
fn payload(slot: usize, token: u32) -> u64 {
    ((token as u64) << 24) | (slot as u64 & 0xff_ffff)
}

fn unpack(payload: u64) -> (usize, u32) {
    ((payload & 0xff_ffff) as usize, (payload >> 24) as u32)
}

/// Makes the close of `fd` an RST (SO_LINGER 0).
fn set_reset(p: &Pending) {
    let _ = SockRef::from(&p.fd).set_linger(Some(Duration::ZERO));
}

impl Admission {
    pub fn new(cfg: Arc<AdmissionConfig>, shard: usize) -> Self {
        Admission {
            cfg,
            shard,
            slots: Vec::new(),
            free: Vec::new(),
            token: 0,
            polls: 0,
            timers: Vec::new(),
            next_timer: 0,
            stopping: false,
            ready: Vec::new(),
        }
    }

    pub(crate) fn waiting(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// A freshly accepted connection enters admission.
    pub fn admit(
        &mut self,
        p: Pending,
        ring: &mut Driver,
        replies: &mut Replies,
        c: &Counters,
        now: Instant,
    ) {
        let sock = SockRef::from(&p.fd);
        // The local address is the listener's unless it listens on a
        // wildcard address: then ask the socket (one getsockname saved per
        // connection otherwise).
        let local = match self.cfg.local {
            Some(l) => Some(l),
            None => sock.local_addr().ok().and_then(|a| a.as_socket()),
        };
        let (peer, local) = match (sock.peer_addr().ok().and_then(|a| a.as_socket()), local) {
            (Some(pa), Some(la)) => (pa, la),
            // ENOTCONN: the peer reset before we looked.
            _ => return Counters::add(&c.withdrawn_gone, 1),
        };
        let syn = if self.cfg.save_syn {
            sys::saved_syn(p.fd.as_fd())
                .ok()
                .and_then(|b| crate::admit::syn::parse_saved_syn(&b).ok())
        } else {
            None
        };
        let peek = self.cfg.peek;
        let w = Waiting {
            pending: p,
            peer,
            local,
            syn,
            deferrals: 0,
            poll: None,
            limit: peek,
            need: peek,
            peek_deadline: (peek > 0).then(|| now + self.cfg.peek_wait),
            next_eval: None,
            finished: false,
            lowat: 1,
            marks: Marks::new(),
        };
        self.run(w, false, ring, replies, c, now);
    }

    /// Peeks what the condition may see and either asks it (and carries
    /// out its verdict) or parks the connection until what it waits for
    /// arrives. `force` asks even if fewer than `need` bytes are there (a
    /// deadline passed, a deferred connection got more bytes).
    fn run(
        &mut self,
        mut w: Waiting,
        mut force: bool,
        ring: &mut Driver,
        replies: &mut Replies,
        c: &Counters,
        now: Instant,
    ) {
        loop {
            let bytes = if w.limit > 0 {
                sys::peek_now(w.pending.fd.as_fd(), w.limit).unwrap_or_default()
            } else {
                Vec::new()
            };
            let short = bytes.len() < w.need && !w.finished;
            if !force && short && w.peek_deadline.map_or(true, |d| now < d) {
                return self.park(w, bytes.len(), ring, c);
            }
            force = false;
            match self.ask(&w, &bytes, c, now) {
                Verdict::NeedBytes(n) if n.min(MAX_PEEK) > bytes.len() && !w.finished => {
                    // Asked for more than it has: wait for exactly that
                    // (the pending timeout still bounds it).
                    let n = n.min(MAX_PEEK);
                    Counters::add(&c.deferred, 1);
                    w.deferrals += 1;
                    w.need = n;
                    w.limit = w.limit.max(n);
                    w.peek_deadline = None;
                    w.next_eval = None;
                }
                Verdict::NeedBytes(_) | Verdict::Defer => {
                    Counters::add(&c.deferred, 1);
                    w.deferrals += 1;
                    w.next_eval = Some(now + self.cfg.defer_interval);
                    w.peek_deadline = None;
                    // Wake on the next byte if the condition looks at
                    // bytes and more could matter; else only on the peer
                    // leaving, or the timer.
                    w.need = if bytes.len() < w.limit {
                        bytes.len() + 1
                    } else {
                        0
                    };
                    return self.park(w, bytes.len(), ring, c);
                }
                Verdict::Accept { qos, reply, value } => {
                    if self.finish_accept(&mut w, qos, reply.as_deref()).is_err() {
                        // The socket refused an attribute: it cannot be
                        // handed over as declared; reset it.
                        set_reset(&w.pending);
                        Counters::add(&c.rejected_reset, 1);
                        return;
                    }
                    w.pending.value = value;
                    self.ready.push(w.pending);
                    return;
                }
                Verdict::Reject { how, reply } => {
                    let fd = w.pending.fd;
                    match how {
                        RejectHow::Close => {
                            // Unread bytes would turn the close into an RST.
                            sys::discard_now(fd.as_fd());
                            Counters::add(&c.rejected_close, 1);
                        }
                        RejectHow::Reset => {
                            let _ = SockRef::from(&fd).set_linger(Some(Duration::ZERO));
                            Counters::add(&c.rejected_reset, 1);
                        }
                    }
                    match reply {
                        // Reply and close in one linked pair on the ring.
                        Some(r) if !r.is_empty() => {
                            let _ = replies.post_counted(ring, fd, &r, w.pending.slot);
                        }
                        _ => drop(fd),
                    }
                    return;
                }
            }
        }
    }

    /// Calls the condition (none: accept), catching a panic.
    fn ask(&self, w: &Waiting, bytes: &[u8], c: &Counters, now: Instant) -> Verdict {
        let Some(cond) = &self.cfg.condition else {
            return Verdict::accept();
        };
        let req = ConnectRequest {
            peer: w.peer,
            local: w.local,
            shard: self.shard,
            pending_for: now.saturating_duration_since(w.pending.accepted_at),
            first_bytes: bytes,
            peek_full: bytes.len() >= w.limit,
            peer_finished: w.finished,
            syn: w.syn,
            deferrals: w.deferrals,
            marks: &w.marks,
        };
        match catch_unwind(AssertUnwindSafe(|| cond.decide(&req))) {
            Ok(v) => v,
            Err(_) => {
                Counters::add(&c.condition_panics, 1);
                event!(error, shard = self.shard, peer = %req.peer, "condition panicked: connection reset");
                Verdict::reset()
            }
        }
    }

    /// Parks `w` in a slot with a poll of its own: for POLLIN once `need`
    /// bytes are there (SO_RCVLOWAT) when it waits for bytes, else only for
    /// the peer leaving; none once the peer has finished.
    fn park(&mut self, mut w: Waiting, have: usize, ring: &mut Driver, c: &Counters) {
        let wants_bytes = w.need > have;
        let lowat = if wants_bytes { w.need.max(1) } else { 1 };
        if lowat != w.lowat
            && sys::setsockopt::<i32>(
                w.pending.fd.as_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                lowat as i32,
            )
            .is_ok()
        {
            w.lowat = lowat;
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        if !w.finished && !self.stopping {
            use std::os::fd::AsRawFd;
            let events = if wants_bytes {
                POLLIN | POLLRDHUP
            } else {
                POLLRDHUP
            };
            self.token = self.token.wrapping_add(1);
            let ud = user_data(AdmitOp::Poll, payload(slot, self.token));
            if ring
                .poll(w.pending.fd.as_raw_fd(), events, false, ud)
                .is_ok()
            {
                w.poll = Some(self.token);
                self.polls += 1;
            }
        }
        self.slots[slot] = Some(w);
        Counters::add(&c.admitting, 1);
    }

    fn take(&mut self, slot: usize, c: &Counters) -> Option<Waiting> {
        let w = self.slots.get_mut(slot)?.take()?;
        self.free.push(slot);
        c.admitting
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        Some(w)
    }

    /// Cancels the poll of the connection in `slot`, if one is current.
    fn cancel_poll(ring: &mut Driver, slot: usize, w: &mut Waiting) {
        if let Some(token) = w.poll.take() {
            let ud = user_data(AdmitOp::Poll, payload(slot, token));
            let _ = ring.cancel(ud, user_data(ShardOp::Cancel, 0));
        }
    }

    /// A poll on a waiting connection completed.
    pub fn polled(
        &mut self,
        ring: &mut Driver,
        replies: &mut Replies,
        c: &Counters,
        pl: u64,
        cqe: Cqe,
        now: Instant,
    ) {
        self.polls = self.polls.saturating_sub(1);
        let (slot, token) = unpack(pl);
        let current = matches!(self.slots.get(slot), Some(Some(w)) if w.poll == Some(token));
        if !current {
            return; // a cancelled poll of a connection decided or re-parked since
        }
        if self.stopping {
            // Cancelled at shutdown: it stays in its slot to be closed and
            // counted with the rest.
            if let Some(Some(w)) = self.slots.get_mut(slot) {
                w.poll = None;
            }
            return;
        }
        let Some(mut w) = self.take(slot, c) else {
            return;
        };
        w.poll = None;
        if cqe.result < 0 {
            // A poll error: decide with what is there.
            return self.run(w, true, ring, replies, c, now);
        }
        let revents = cqe.result as u32;
        if revents & POLL_GONE != 0 {
            return Counters::add(&c.withdrawn_gone, 1); // RST: drop closes it
        }
        if revents & POLLRDHUP != 0 {
            w.finished = true;
            let any = sys::peek_now(w.pending.fd.as_fd(), 1).unwrap_or_default();
            if any.is_empty() {
                return Counters::add(&c.withdrawn_gone, 1); // FIN without a byte
            }
        }
        // Deferred and more bytes came (or the peer finished): ask again now.
        let force = w.next_eval.take().is_some() || w.finished;
        self.run(w, force, ring, replies, c, now);
    }

    /// The admission timer fired.
    pub fn timer(
        &mut self,
        ring: &mut Driver,
        replies: &mut Replies,
        c: &Counters,
        cqe: Cqe,
        now: Instant,
    ) {
        ring.release(cqe.user_data);
        let id = crate::shard::split(cqe.user_data).1;
        self.timers.retain(|(t, _)| *t != id);
        if self.stopping {
            return;
        }
        for slot in 0..self.slots.len() {
            let due = matches!(&self.slots[slot], Some(w) if w.deadline(&self.cfg) <= now);
            if !due {
                continue;
            }
            let Some(mut w) = self.take(slot, c) else {
                continue;
            };
            Self::cancel_poll(ring, slot, &mut w);
            if now >= w.pending.accepted_at + self.cfg.pending_timeout {
                // Withdrawn: an RST tells the caller at once and frees the
                // socket now (the cancelled poll holds it only until the
                // cancel is submitted, at the end of this turn).
                set_reset(&w.pending);
                Counters::add(&c.withdrawn_timeout, 1);
                continue;
            }
            if w.next_eval.take().is_none() {
                Counters::add(&c.peek_timeouts, 1);
            }
            w.peek_deadline = None;
            self.run(w, true, ring, replies, c, now);
        }
    }

    fn finish_accept(
        &self,
        w: &mut Waiting,
        qos: Option<crate::admit::qos::Qos>,
        reply: Option<&[u8]>,
    ) -> io::Result<()> {
        let fd = w.pending.fd.as_fd();
        if w.lowat != 1 {
            sys::setsockopt::<i32>(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, 1)?;
            w.lowat = 1;
        }
        let attrs = &self.cfg.attrs;
        if !attrs.nothing_after_accept() {
            attrs.apply_after_accept(fd, self.cfg.ipv6)?;
        }
        if let Some(mut q) = qos {
            // Linux resets SO_PRIORITY when IP_TOS changes: put the
            // declared priority back after the verdict's TOS.
            if q.tos.is_some() && q.priority.is_none() {
                q.priority = attrs.qos.priority;
            }
            q.apply(fd, w.local.is_ipv6())?;
        }
        if let Some(r) = reply {
            let n = SockRef::from(&w.pending.fd)
                .send_with_flags(r, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)?;
            if n != r.len() {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "reply did not fit the send buffer",
                ));
            }
        }
        Ok(())
    }

    /// Arms the timer for the earliest deadline if none is armed for it.
    pub fn arm_timer(&mut self, ring: &mut Driver, now: Instant) {
        let Some(earliest) = self
            .slots
            .iter()
            .flatten()
            .map(|w| w.deadline(&self.cfg))
            .min()
        else {
            return;
        };
        // A timer already due no later than the earliest deadline covers it.
        if self.timers.iter().any(|(_, at)| *at <= earliest) {
            return;
        }
        let after = earliest.saturating_duration_since(now);
        self.next_timer = (self.next_timer + 1) & 0xffff_ffff;
        if ring
            .timeout(after, user_data(AdmitOp::Timer, self.next_timer))
            .is_ok()
        {
            self.timers.push((self.next_timer, earliest));
        }
    }

    /// Shutdown: cancel every poll and timer.
    pub fn stop(&mut self, ring: &mut Driver) {
        self.stopping = true;
        for (slot, w) in self.slots.iter_mut().enumerate() {
            if let Some(w) = w {
                Self::cancel_poll(ring, slot, w);
            }
        }
        for (t, _) in &self.timers {
            let _ = ring.cancel(user_data(AdmitOp::Timer, *t), user_data(ShardOp::Cancel, 0));
        }
    }

    /// Whether no poll or timer is in flight.
    pub fn idle(&self) -> bool {
        self.polls == 0 && self.timers.is_empty()
    }

    /// Closes every waiting connection; returns how many.
    pub fn close_all(&mut self, c: &Counters) -> u64 {
        let n = self.waiting() as u64;
        self.slots.clear();
        self.free.clear();
        c.admitting.store(0, std::sync::atomic::Ordering::Relaxed);
        n
    }
}
