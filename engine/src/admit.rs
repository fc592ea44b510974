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

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::SockRef;

use crate::attrs::SocketAttrs;
use crate::backlog::Pending;
use crate::condition::{Condition, ConnectRequest, RejectHow, Verdict};
use crate::context::Replies;
use crate::shard::{user_data, Tag};
use crate::stats::Counters;
use crate::sys::{self, Cqe, Uring};

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
        self.condition.is_none() && self.attrs.is_default()
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
    generation: u32,
    peer: SocketAddr,
    local: SocketAddr,
    syn: Option<crate::syn::SynInfo>,
    deferrals: u32,
    poll_armed: bool,
    /// When to decide with what has arrived, if the wanted bytes have not.
    peek_deadline: Instant,
    /// When to ask again after a defer.
    next_eval: Option<Instant>,
    /// The SO_RCVLOWAT currently set (1 = the kernel default).
    lowat: usize,
}

impl Waiting {
    fn deadline(&self, cfg: &AdmissionConfig) -> Instant {
        let withdraw = self.pending.accepted_at + cfg.pending_timeout;
        let decide = self.next_eval.unwrap_or(self.peek_deadline);
        withdraw.min(decide)
    }
}

/// One shard's admission stage.
#[derive(Debug)]
pub(crate) struct Admission {
    cfg: Arc<AdmissionConfig>,
    shard: usize,
    slots: Vec<Option<Waiting>>,
    free: Vec<usize>,
    generation: u32,
    polls: usize,
    /// Timers in flight: id (user-data payload) and when each fires.
    timers: Vec<(u64, Instant)>,
    next_timer: u64,
    /// Admitted connections, in order, for the acceptor to push.
    pub ready: Vec<Pending>,
}

fn payload(slot: usize, generation: u32) -> u64 {
    ((generation as u64) << 24) | (slot as u64 & 0xff_ffff)
}

fn unpack(payload: u64) -> (usize, u32) {
    ((payload & 0xff_ffff) as usize, (payload >> 24) as u32)
}

impl Admission {
    pub fn new(cfg: Arc<AdmissionConfig>, shard: usize) -> Self {
        Admission {
            cfg,
            shard,
            slots: Vec::new(),
            free: Vec::new(),
            generation: 0,
            polls: 0,
            timers: Vec::new(),
            next_timer: 0,
            ready: Vec::new(),
        }
    }

    fn waiting(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// A freshly accepted connection enters admission.
    pub fn admit(
        &mut self,
        p: Pending,
        ring: &mut Uring,
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
                .and_then(|b| crate::syn::parse_saved_syn(&b).ok())
        } else {
            None
        };
        self.generation = self.generation.wrapping_add(1) & 0xff_ffff;
        let w = Waiting {
            pending: p,
            generation: self.generation,
            peer,
            local,
            syn,
            deferrals: 0,
            poll_armed: false,
            peek_deadline: now + self.cfg.peek_wait,
            next_eval: None,
            lowat: 1,
        };
        if self.cfg.peek == 0 {
            self.decide(w, Vec::new(), false, ring, replies, c, now);
            return;
        }
        let bytes = sys::peek_now(w.pending.fd.as_fd(), self.cfg.peek).unwrap_or_default();
        if bytes.len() >= self.cfg.peek {
            self.decide(w, bytes, false, ring, replies, c, now);
        } else {
            self.wait(w, bytes.len(), ring, c);
        }
    }

    /// Parks `w` in a slot with a poll that fires once more than `have`
    /// bytes (up to the wanted count) have arrived, or the peer goes.
    fn wait(&mut self, mut w: Waiting, have: usize, ring: &mut Uring, c: &Counters) {
        let lowat = (have + 1).min(self.cfg.peek).max(1);
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
        // Poll only while bytes are still wanted: with all of them there
        // (or none wanted) the poll would fire at once, again and again; a
        // deferred connection then waits for its timer alone.
        if have < self.cfg.peek {
            use std::os::fd::AsRawFd;
            let ud = user_data(Tag::Poll, payload(slot, w.generation));
            if ring
                .poll(w.pending.fd.as_raw_fd(), POLLIN | POLLRDHUP, false, ud)
                .is_ok()
            {
                w.poll_armed = true;
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

    /// A poll on a waiting connection completed.
    pub fn polled(
        &mut self,
        ring: &mut Uring,
        replies: &mut Replies,
        c: &Counters,
        pl: u64,
        cqe: Cqe,
        now: Instant,
    ) {
        self.polls = self.polls.saturating_sub(1);
        let (slot, generation) = unpack(pl);
        let current = matches!(self.slots.get(slot), Some(Some(w)) if w.generation == generation && w.poll_armed);
        if !current {
            return; // a cancelled poll of a connection already decided
        }
        let Some(mut w) = self.take(slot, c) else {
            return;
        };
        w.poll_armed = false;
        if cqe.result < 0 {
            // -ECANCELED at shutdown, or a poll error: decide with what is there.
            let bytes = sys::peek_now(w.pending.fd.as_fd(), self.cfg.peek).unwrap_or_default();
            return self.decide(w, bytes, false, ring, replies, c, now);
        }
        let revents = cqe.result as u32;
        if revents & POLL_GONE != 0 {
            return Counters::add(&c.withdrawn_gone, 1); // RST: drop closes it
        }
        let bytes = sys::peek_now(w.pending.fd.as_fd(), self.cfg.peek).unwrap_or_default();
        let finished = revents & POLLRDHUP != 0;
        if finished && bytes.is_empty() {
            return Counters::add(&c.withdrawn_gone, 1); // FIN without a byte
        }
        if bytes.len() < self.cfg.peek
            && !finished
            && w.next_eval.is_none()
            && now < w.peek_deadline
        {
            // Woken early (a lower watermark from a defer): keep waiting.
            return self.wait(w, bytes.len(), ring, c);
        }
        if w.next_eval.is_some() {
            // Deferred and more bytes came: ask again now.
            w.next_eval = None;
        }
        self.decide(w, bytes, finished, ring, replies, c, now);
    }

    /// The admission timer fired.
    pub fn timer(
        &mut self,
        ring: &mut Uring,
        replies: &mut Replies,
        c: &Counters,
        cqe: Cqe,
        now: Instant,
    ) {
        ring.release(cqe.user_data);
        let id = crate::shard::split(cqe.user_data).1;
        self.timers.retain(|(t, _)| *t != id);
        for slot in 0..self.slots.len() {
            let due = matches!(&self.slots[slot], Some(w) if w.deadline(&self.cfg) <= now);
            if !due {
                continue;
            }
            let Some(mut w) = self.take(slot, c) else {
                continue;
            };
            if w.poll_armed {
                let ud = user_data(Tag::Poll, payload(slot, w.generation));
                let _ = ring.cancel(ud, user_data(Tag::Cancel, 0));
                w.poll_armed = false;
            }
            if now >= w.pending.accepted_at + self.cfg.pending_timeout {
                Counters::add(&c.withdrawn_timeout, 1);
                continue; // drop closes it
            }
            let bytes = sys::peek_now(w.pending.fd.as_fd(), self.cfg.peek).unwrap_or_default();
            if w.next_eval.take().is_none() && bytes.len() < self.cfg.peek {
                Counters::add(&c.peek_timeouts, 1);
            }
            self.decide(w, bytes, false, ring, replies, c, now);
        }
    }

    /// Calls the condition and carries out the verdict.
    #[allow(clippy::too_many_arguments)]
    fn decide(
        &mut self,
        mut w: Waiting,
        bytes: Vec<u8>,
        finished: bool,
        ring: &mut Uring,
        replies: &mut Replies,
        c: &Counters,
        now: Instant,
    ) {
        let verdict = match &self.cfg.condition {
            None => Verdict::accept(),
            Some(cond) => {
                let req = ConnectRequest {
                    peer: w.peer,
                    local: w.local,
                    shard: self.shard,
                    pending_for: now.saturating_duration_since(w.pending.accepted_at),
                    first_bytes: &bytes,
                    peer_finished: finished,
                    syn: w.syn,
                    deferrals: w.deferrals,
                };
                match catch_unwind(AssertUnwindSafe(|| cond.decide(&req))) {
                    Ok(v) => v,
                    Err(_) => {
                        Counters::add(&c.condition_panics, 1);
                        Verdict::reset()
                    }
                }
            }
        };
        match verdict {
            Verdict::Accept { qos, reply } => {
                if let Err(_e) = self.finish_accept(&mut w, qos, reply.as_deref()) {
                    // The socket refused an attribute: it cannot be handed
                    // over as declared; reset it.
                    let _ = SockRef::from(&w.pending.fd).set_linger(Some(Duration::ZERO));
                    Counters::add(&c.rejected_reset, 1);
                    return;
                }
                self.ready.push(w.pending);
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
                    Some(r) if !r.is_empty() => {
                        // Reply and close in one linked pair on the ring.
                        let _ = replies.post(ring, fd, &r);
                    }
                    _ => drop(fd),
                }
            }
            Verdict::Defer => {
                Counters::add(&c.deferred, 1);
                w.deferrals += 1;
                w.next_eval = Some(now + self.cfg.defer_interval);
                let have = bytes.len();
                self.wait(w, have, ring, c);
            }
        }
    }

    fn finish_accept(
        &self,
        w: &mut Waiting,
        qos: Option<crate::qos::Qos>,
        reply: Option<&[u8]>,
    ) -> io::Result<()> {
        let fd = w.pending.fd.as_fd();
        if w.lowat != 1 {
            sys::setsockopt::<i32>(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, 1)?;
            w.lowat = 1;
        }
        let attrs = &self.cfg.attrs;
        if !attrs.is_default() {
            attrs.apply(fd, self.cfg.ipv6, true)?;
            attrs.apply_file_flags(fd)?;
        }
        if let Some(q) = qos {
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
    pub fn arm_timer(&mut self, ring: &mut Uring, now: Instant) {
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
            .timeout(after, user_data(Tag::AdmitTimer, self.next_timer))
            .is_ok()
        {
            self.timers.push((self.next_timer, earliest));
        }
    }

    /// Shutdown: cancel every poll and timer.
    pub fn stop(&mut self, ring: &mut Uring) {
        for (slot, w) in self.slots.iter_mut().enumerate() {
            if let Some(w) = w {
                if w.poll_armed {
                    let ud = user_data(Tag::Poll, payload(slot, w.generation));
                    let _ = ring.cancel(ud, user_data(Tag::Cancel, 0));
                }
            }
        }
        for (t, _) in &self.timers {
            let _ = ring.cancel(user_data(Tag::AdmitTimer, *t), user_data(Tag::Cancel, 0));
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
