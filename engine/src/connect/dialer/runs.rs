//! The dialer's load runs: starting sequences at the run's pace, posting
//! each one's linked chain (on a direct slot or a plain descriptor),
//! keeping or closing its socket, back-off when out of descriptors.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use socket2::SockAddr;

use crate::connect::job::ConnectOp;
use crate::connect::load::{CloseMode, SequencePlan};
use crate::connect::sequence::{Parked, PlainSocket, MAX_BACKOFF, MIN_BACKOFF, RECV_CHUNK};
use crate::connect::slot::{
    Opening, OP_CLOSE, OP_CONNECT, OP_DISCONNECT, OP_RECV, OP_SEND, OP_SOCKET,
};
use crate::connect::socket::{errno_of, open_socket};
use crate::connect::stats::{add, sub};
use crate::driver::{Desc, Driver};
use crate::shard::user_data;

use super::Dialer;

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
        user_data(ConnectOp::Connect, p),
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
            user_data(ConnectOp::Send, p),
        )?;
        *ops |= OP_SEND;
    }
    if recv {
        let len = plan.expect.min(RECV_CHUNK);
        ring.recv_linked(fd, len, 0, end_linked, user_data(ConnectOp::Recv, p))?;
        *ops |= OP_RECV;
    }
    if end_linked && keep {
        ring.disconnect(fd, user_data(ConnectOp::Disconnect, p))?;
        *ops |= OP_DISCONNECT;
    }
    Ok(())
}

impl Dialer {
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
    pub(super) fn post_sequence(
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
                match ring.close(fd, user_data(ConnectOp::Close, p)) {
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
                ring.socket_direct(domain, slot, true, user_data(ConnectOp::Socket, p))?;
                ops |= OP_SOCKET;
            }
            post_chain(ring, fixed, plan, p, reset, &mut ops)?;
            if close_linked && !reset {
                ring.close_direct(slot, user_data(ConnectOp::Close, p))?;
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
    pub(super) fn end_socket(&mut self, ring: &mut Driver, i: usize) -> bool {
        // Stopping too: the RST is what RST close promises the server.
        let s = &mut self.slots[i];
        if s.reset && !s.disconnect_tried && !s.parkable {
            s.disconnect_tried = true;
            let desc = Self::desc_of(s);
            if ring
                .disconnect(desc, user_data(ConnectOp::Disconnect, i as u64))
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

    /// Posts the CLOSE of a sequence whose chain did not include one.
    fn post_close(&mut self, ring: &mut Driver, i: usize) {
        let Some(fd) = self.slots[i].fd.take() else {
            return;
        };
        match ring.close(fd, user_data(ConnectOp::Close, i as u64)) {
            Ok(()) => self.slots[i].ops |= OP_CLOSE,
            Err(_) => sub(&self.counters().open_sockets, 1),
        }
    }

    /// Posts the CLOSE of a sequence's direct slot whose chain did not
    /// close it (no CLOSE in the chain, or the chain broke before it).
    fn post_close_direct(&mut self, ring: &mut Driver, i: usize) {
        let Some(slot) = self.slots[i].direct else {
            return;
        };
        match ring.close_direct(slot, user_data(ConnectOp::Close, i as u64)) {
            Ok(()) => self.slots[i].ops |= OP_CLOSE,
            Err(_) => {
                // The next SOCKET into this slot replaces (and closes) it.
                self.slots[i].direct_open = false;
                sub(&self.counters().open_sockets, 1);
            }
        }
    }

    /// Lets go of a kept socket that the slot's next sequence cannot use.
    fn discard_parked(&mut self, ring: &mut Driver, i: usize, parked: Parked) {
        match parked {
            Parked::Fd { fd, .. } => {
                drop(fd);
                sub(&self.counters().open_sockets, 1);
            }
            Parked::Direct { .. } => {
                match ring.close_direct(i as u32, user_data(ConnectOp::Unpark, i as u64)) {
                    Ok(()) => self.unparking += 1,
                    Err(_) => sub(&self.counters().open_sockets, 1),
                }
            }
        }
    }

    /// Closes the sockets kept in direct slots (at the end of a run, or on
    /// stop); each CLOSE completes as [`ConnectOp::Unpark`].
    pub(super) fn close_parked(&mut self, ring: &mut Driver) {
        if self.parked_count == 0 {
            return;
        }
        for i in 0..self.parked.len() {
            let Some(parked) = self.parked[i].take() else {
                continue;
            };
            self.parked_count -= 1;
            let ud = user_data(ConnectOp::Unpark, i as u64);
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

    /// A sequence's socket could not be created (out of descriptors or
    /// memory): rather than fail the rest of the load at full speed, the
    /// shard keeps no more sequences in flight than it has now (the
    /// most the system gave it) and, when it has none, starts nothing for
    /// a while (1 ms, doubling to [`MAX_BACKOFF`]).
    pub(super) fn exhausted(&mut self, now: Instant) {
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
        event!(
            warn,
            shard = self.index,
            in_flight = others,
            paused = others == 0,
            "connect out of descriptors or memory: load holding back"
        );
    }

    /// A sequence connected: the pause resets, and a cap set by
    /// [`Dialer::exhausted`] grows by one per cap's worth of successes
    /// (additive increase) until it no longer limits the load.
    pub(super) fn connected_ok(&mut self) {
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

    /// Starts what the run allows now.
    pub(super) fn drive_run(&mut self, ring: &mut Driver) {
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

    /// Ends the run now if nothing of it is in flight (on stop).
    pub(super) fn drive_run_end(&mut self) {
        let now = Instant::now();
        if self.run.as_ref().is_some_and(|r| r.finished(now)) {
            if let Some(run) = self.run.take() {
                let _ = run.job.done.send((run.started, run.outcomes, run.last_end));
            }
        }
    }
}
