//! One shard's connect service, the [`Dialer`]: the jobs the connector
//! queues for it, its state, single connects from job to CONNECT, and the
//! [`Service`] the shard loop drives (completions, deadline scan, timer).
//! A slot's life is in [`super::slot`], load sequences in
//! [`super::sequence`].

mod connects;
mod runs;

use std::collections::VecDeque;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_queue::SegQueue;
use socket2::{SockAddr, SockRef};

use crate::admit::attrs::SocketAttrs;
use crate::driver::{op, sys, Cqe, Driver};
use crate::error::Error;
use crate::listen::accept::Delivery;
use crate::shard::{user_data, Service, ShardControl, ShardOp};

use crate::connect::dial::{Completion, ConnectHandler, Ticket};
use crate::connect::job::{ConnectJob, ConnectOp, Job, Reply, RunJob};
use crate::connect::load::{CloseMode, OutcomeCounts};
use crate::connect::sequence::{direct_table, Parked, PlainSocket, Run, MIN_BACKOFF, RECV_CHUNK};
use crate::connect::slot::{
    Cancel, Opening, Slot, OP_CLOSE, OP_CONNECT, OP_DISCONNECT, OP_RECV, OP_SEND, OP_SOCKET,
    OP_TIMEOUT,
};
use crate::connect::socket::{configure_socket, errno_of, open_socket};
use crate::connect::stats::{add, sub, Counters};

/// How often a shard with sequences in flight checks their deadlines.
const SCAN_INTERVAL: Duration = Duration::from_millis(10);

/// How soon a closed loop that could not start its sequences retries.
const RETRY_AFTER: Duration = Duration::from_millis(1);

/// The shortest timer a shard posts (open-loop pacing batches below it).
const MIN_TIMER: Duration = Duration::from_micros(20);

/// What a shard shares with the connector handle.
#[derive(Debug)]
pub(super) struct ShardShared {
    pub(super) queue: SegQueue<Job>,
    pub(super) counters: Counters,
    pub(super) control: Arc<ShardControl>,
}

/// What every shard shares: the completion queue and its event, the
/// handler, the sources.
pub(super) struct Common {
    pub(super) completions: SegQueue<Completion>,
    pub(super) delivery: Delivery,
    pub(super) handler: Option<Arc<ConnectHandler>>,
    pub(super) sources: Vec<IpAddr>,
    pub(super) next_source: AtomicUsize,
    pub(super) timeout: Option<Duration>,
    pub(super) attrs: Arc<SocketAttrs>,
}

impl std::fmt::Debug for Common {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Common")
            .field("completions", &self.completions.len())
            .field("handler", &self.handler.is_some())
            .field("sources", &self.sources)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// A job that will never run: tell its waiter (or queue its completion)
/// and count it as cancelled.
pub(super) fn refuse(job: Job, shard: usize, counters: &Counters, common: &Common) {
    match job {
        Job::Connect(j) => {
            counters.connect_done(Err(None));
            match j.reply {
                Reply::Wait(tx) => {
                    let _ = tx.send(Err(Error::Closed));
                }
                Reply::Deliver => {
                    common.delivery.will_push();
                    common.completions.push(Completion {
                        ticket: Ticket(j.ticket),
                        shard,
                        result: Err(Error::Closed),
                    });
                    common.delivery.notify();
                }
            }
        }
        Job::Run(r) => {
            let _ = r.done.send((0, OutcomeCounts::default(), Instant::now()));
        }
    }
}

/// One shard's connect service.
pub(super) struct Dialer {
    pub(super) index: usize,
    pub(super) shared: Arc<ShardShared>,
    pub(super) common: Arc<Common>,
    pub(super) slots: Vec<Slot>,
    pub(super) free: Vec<usize>,
    pub(super) busy: usize,
    pub(super) run: Option<Run>,
    pending_runs: VecDeque<Box<RunJob>>,
    timer_armed: Option<Instant>,
    timer_cancelling: bool,
    next_scan: Instant,
    pub(super) stopping: bool,
    pub(super) pushed: bool,
    /// Whether sockets are created with io_uring SOCKET (5.19) rather than
    /// socket(2); probed when the shard starts.
    pub(super) uring_socket: bool,
    /// Size of the ring's direct-descriptor table that load sequences use
    /// (slot `i` for slot `i`); 0 when the kernel cannot (probed at start).
    pub(super) direct_slots: u32,
    /// Per slot: a disconnected socket kept by an earlier sequence of the
    /// run, ready to connect again.
    pub(super) parked: Vec<Option<Parked>>,
    pub(super) parked_count: usize,
    /// CLOSEs of kept sockets in flight.
    pub(super) unparking: usize,
    /// No sequence starts before this (sockets could not be created).
    pub(super) backoff_until: Option<Instant>,
    /// The next back-off's length.
    pub(super) backoff_step: Duration,
    /// The most sequences in flight while sockets are scarce (see
    /// [`Dialer::exhausted`]); `None`: the run's own concurrency.
    pub(super) cap: Option<usize>,
    /// Successes since the cap last grew.
    pub(super) cap_successes: usize,
}

impl Dialer {
    /// Shard `index`'s dialer, idle until the shard starts it.
    pub(super) fn new(index: usize, shared: Arc<ShardShared>, common: Arc<Common>) -> Self {
        Dialer {
            index,
            shared,
            common,
            slots: Vec::new(),
            free: Vec::new(),
            busy: 0,
            run: None,
            pending_runs: VecDeque::new(),
            timer_armed: None,
            timer_cancelling: false,
            next_scan: Instant::now(),
            stopping: false,
            pushed: false,
            uring_socket: false,
            direct_slots: 0,
            parked: Vec::new(),
            parked_count: 0,
            unparking: 0,
            backoff_until: None,
            backoff_step: MIN_BACKOFF,
            cap: None,
            cap_successes: 0,
        }
    }
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("index", &self.index)
            .field("busy", &self.busy)
            .field("run", &self.run.is_some())
            .finish_non_exhaustive()
    }
}

impl Dialer {
    pub(super) fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    fn pick_source(&mut self) -> Option<IpAddr> {
        let n = self.common.sources.len();
        if n == 0 {
            return None;
        }
        let i = self.common.next_source.fetch_add(1, Ordering::Relaxed) % n;
        Some(self.common.sources[i])
    }

    /// Posts a single connect: its socket first (an io_uring SOCKET where
    /// the kernel has it, else socket(2)), then the CONNECT chain.
    fn start_connect(&mut self, ring: &mut Driver, job: ConnectJob, now: Instant) {
        let source = job.source.or_else(|| self.pick_source());
        let i = self.alloc(now);
        {
            let s = &mut self.slots[i];
            s.busy = true;
            s.addr = job.addr;
            s.intended = now;
            s.started = now;
            s.job = Some((job.ticket, job.reply));
            s.attrs = Some(job.attrs.clone());
        }
        if self.uring_socket {
            self.slots[i].opening = Some(Opening::Connect {
                timeout: job.timeout,
                source,
                attrs: job.attrs,
            });
            self.open_on_ring(ring, i, now);
            return;
        }
        match open_socket(job.addr, source, false, &job.attrs) {
            Ok(socket) => {
                add(&self.counters().sockets_created, 1);
                self.post_connect(ring, i, socket.into(), job.timeout, now)
            }
            Err(e) => {
                self.slots[i].connect_res = Some(-errno_of(&e));
                self.finish_slot(ring, i, now);
            }
        }
    }

    /// Posts the io_uring SOCKET of slot `i`; its completion continues with
    /// [`Dialer::socket_opened`].
    pub(super) fn open_on_ring(&mut self, ring: &mut Driver, i: usize, now: Instant) {
        let domain = if self.slots[i].addr.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        match ring.socket(domain, user_data(ConnectOp::Socket, i as u64)) {
            Ok(()) => self.slots[i].ops = OP_SOCKET,
            Err(e) => {
                self.slots[i].opening = None;
                self.slots[i].connect_res = Some(-errno_of(&e));
                self.finish_slot(ring, i, now);
            }
        }
    }

    /// The io_uring SOCKET of slot `i` completed with `res`.
    fn socket_opened(&mut self, ring: &mut Driver, i: usize, res: i32, now: Instant) {
        self.slots[i].ops &= !OP_SOCKET;
        let Some(opening) = self.slots[i].opening.take() else {
            return;
        };
        if res < 0 {
            self.slots[i].connect_res = Some(res);
            return self.finish_slot(ring, i, now);
        }
        // Owned from the moment the completion is read.
        let fd = sys::adopt_fd(res);
        add(&self.counters().sockets_created, 1);
        if self.slots[i].cancel != Cancel::No {
            drop(fd);
            self.slots[i].connect_res = Some(-libc::ECANCELED);
            return self.finish_slot(ring, i, now);
        }
        let addr = self.slots[i].addr;
        let (source, reset, attrs) = match &opening {
            Opening::Connect { source, attrs, .. } => (*source, false, attrs.clone()),
            Opening::Sequence { plan, source } => (
                *source,
                plan.close == CloseMode::Reset,
                self.common.attrs.clone(),
            ),
        };
        if let Err(e) = configure_socket(&SockRef::from(&fd), addr, source, reset, &attrs) {
            drop(fd);
            self.slots[i].connect_res = Some(-errno_of(&e));
            return self.finish_slot(ring, i, now);
        }
        match opening {
            Opening::Connect { timeout, .. } => self.post_connect(ring, i, fd, timeout, now),
            Opening::Sequence { plan, source } => {
                let keep = plan.close == CloseMode::Reset && source.is_none();
                self.post_sequence(ring, i, fd, &plan, now, PlainSocket::new(keep))
            }
        }
    }

    /// Posts the CONNECT (+ LINK_TIMEOUT) of a single connect on `fd`.
    fn post_connect(
        &mut self,
        ring: &mut Driver,
        i: usize,
        fd: OwnedFd,
        timeout: Option<Duration>,
        now: Instant,
    ) {
        add(&self.counters().open_sockets, 1);
        let raw = fd.as_raw_fd();
        let addr = self.slots[i].addr;
        {
            let s = &mut self.slots[i];
            s.raw = raw;
            s.fd = Some(fd);
        }
        let p = i as u64;
        let t = timeout.map(|d| (d, user_data(ConnectOp::Timeout, p)));
        let posted = ring.reserve(2).and_then(|()| {
            ring.connect_chain(
                raw,
                SockAddr::from(addr),
                t,
                false,
                user_data(ConnectOp::Connect, p),
            )
        });
        match posted {
            Ok(()) => {
                self.slots[i].ops = OP_CONNECT | if t.is_some() { OP_TIMEOUT } else { 0 };
            }
            Err(e) => {
                self.slots[i].connect_res = Some(-errno_of(&e));
                self.finish_slot(ring, i, now);
            }
        }
    }

    fn on_cqe(&mut self, ring: &mut Driver, tag: ConnectOp, i: usize, cqe: Cqe, now: Instant) {
        let res = cqe.result;
        match tag {
            ConnectOp::Socket if self.slots[i].direct.is_some() => {
                let s = &mut self.slots[i];
                s.ops &= !OP_SOCKET;
                if res < 0 {
                    s.connect_res = Some(res);
                } else {
                    s.direct_open = true;
                    add(&self.counters().open_sockets, 1);
                    add(&self.counters().sockets_created, 1);
                }
            }
            ConnectOp::Socket => return self.socket_opened(ring, i, res, now),
            ConnectOp::Disconnect => {
                let s = &mut self.slots[i];
                s.ops &= !OP_DISCONNECT;
                // Otherwise (cancelled with a broken chain, or refused) the
                // socket is still in the slot and finish_slot ends it.
                s.parkable = res == 0;
            }
            ConnectOp::Connect => {
                ring.release(cqe.user_data);
                let s = &mut self.slots[i];
                s.ops &= !OP_CONNECT;
                // A failed SOCKET before it said why first
                // (this CONNECT was then cancelled with its chain).
                if s.connect_res.is_none() {
                    s.connect_res = Some(res);
                }
                if res == 0 {
                    s.connect_at = Some(now);
                }
            }
            ConnectOp::Timeout => {
                ring.release(cqe.user_data);
                let s = &mut self.slots[i];
                s.ops &= !OP_TIMEOUT;
                if -res == libc::ETIME {
                    s.timeout_fired = true;
                }
            }
            ConnectOp::Send => {
                ring.release(cqe.user_data);
                let s = &mut self.slots[i];
                s.ops &= !OP_SEND;
                s.send_res = Some(res);
                if res > 0 {
                    s.sent += res as usize;
                }
            }
            ConnectOp::Recv => {
                ring.release(cqe.user_data);
                let s = &mut self.slots[i];
                s.ops &= !OP_RECV;
                match res {
                    r if r > 0 => {
                        s.received += r as usize;
                        s.first_byte_at.get_or_insert(now);
                    }
                    0 => s.eof = true,
                    r => s.recv_err = Some(-r),
                }
                let more = res > 0
                    && !s.close_linked
                    && s.received < s.expect
                    && s.cancel == Cancel::No
                    && !self.stopping;
                if more {
                    let len = (s.expect - s.received).min(RECV_CHUNK);
                    let (desc, p) = (Self::desc_of(s), i as u64);
                    if ring
                        .recv_linked(desc, len, 0, false, user_data(ConnectOp::Recv, p))
                        .is_ok()
                    {
                        self.slots[i].ops |= OP_RECV;
                    }
                }
            }
            ConnectOp::Close if self.slots[i].direct.is_some() => {
                let s = &mut self.slots[i];
                s.ops &= !OP_CLOSE;
                // -ECANCELED: the chain broke before its CLOSE ran; the
                // slot still holds the socket and finish_slot closes it.
                if s.direct_open && res != -libc::ECANCELED {
                    s.direct_open = false;
                    sub(&self.counters().open_sockets, 1);
                }
            }
            ConnectOp::Close => {
                ring.finish_close(cqe.user_data, res);
                self.slots[i].ops &= !OP_CLOSE;
                sub(&self.counters().open_sockets, 1);
            }
            _ => return,
        }
        if self.slots[i].ops == 0 {
            self.finish_slot(ring, i, now);
        }
    }

    /// Checks the deadlines of the sequences in flight.
    fn scan(&mut self, ring: &mut Driver, now: Instant) {
        for i in 0..self.slots.len() {
            let s = &self.slots[i];
            let overdue = s.deadline.is_some_and(|d| d <= now)
                || (s.ops & OP_CONNECT != 0 && s.connect_deadline.is_some_and(|d| d <= now));
            if s.busy
                && s.cancel == Cancel::No
                && s.ops & (OP_CONNECT | OP_SEND | OP_RECV) != 0
                && overdue
            {
                self.cancel_slot(ring, i, Cancel::Deadline);
            }
        }
    }

    fn take_jobs(&mut self, ring: &mut Driver, now: Instant) {
        while let Some(job) = self.shared.queue.pop() {
            if self.stopping {
                refuse(job, self.index, &self.shared.counters, &self.common);
                continue;
            }
            match job {
                Job::Connect(j) => self.start_connect(ring, j, now),
                Job::Run(r) => self.pending_runs.push_back(r),
            }
        }
        if self.run.is_none() {
            if let Some(job) = self.pending_runs.pop_front() {
                let job = *job;
                let deadline = job.plan.duration.map(|d| job.started + d);
                // A new run starts without the last one's restraint.
                self.cap = None;
                self.cap_successes = 0;
                self.backoff_until = None;
                self.backoff_step = MIN_BACKOFF;
                self.run = Some(Run {
                    next_due: job.started,
                    deadline,
                    last_end: job.started,
                    in_flight: 0,
                    started: 0,
                    outcomes: OutcomeCounts::default(),
                    next_source: self.index,
                    job,
                });
            }
        }
    }

    /// Keeps one timer posted for the earliest thing the shard must do by
    /// itself: an open-loop start or a deadline scan.
    fn arm_timer(&mut self, ring: &mut Driver, now: Instant) {
        let mut want: Option<Instant> = None;
        if let Some(run) = &self.run {
            if run.in_flight < run.job.concurrency && run.may_start(now) {
                let at = match run.job.interval {
                    Some(_) => run.next_due,
                    // A closed loop that could not fill up (sockets could
                    // not be created): retry shortly rather than wait for
                    // a completion that will not come.
                    None => now + RETRY_AFTER,
                };
                want = Some(self.backoff_until.map_or(at, |b| at.max(b)));
            }
        }
        if self.busy > 0 {
            let scan = self.next_scan;
            want = Some(want.map_or(scan, |w| w.min(scan)));
        }
        let Some(want) = want else {
            return;
        };
        match self.timer_armed {
            None => {
                let after = want.saturating_duration_since(now).max(MIN_TIMER);
                if ring.timeout(after, user_data(ConnectOp::Timer, 0)).is_ok() {
                    self.timer_armed = Some(now + after);
                }
            }
            Some(until) if !self.timer_cancelling && want + MIN_TIMER < until => {
                if ring
                    .cancel(
                        user_data(ConnectOp::Timer, 0),
                        user_data(ShardOp::Cancel, 0),
                    )
                    .is_ok()
                {
                    self.timer_cancelling = true;
                }
            }
            Some(_) => {}
        }
    }
}

impl Service for Dialer {
    fn start(&mut self, ring: &mut Driver) -> io::Result<()> {
        if !ring.supports(op::CONNECT) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring CONNECT is not supported by this kernel (needs Linux 5.5+)",
            ));
        }
        // SOCKET needs 5.19; older kernels get socket(2), the same socket.
        self.uring_socket = ring.supports(op::SOCKET);
        self.direct_slots = if self.uring_socket {
            direct_table(ring)
        } else {
            0
        };
        self.parked = (0..self.direct_slots).map(|_| None).collect();
        self.shared
            .counters
            .direct_sockets
            .store(self.direct_slots > 0, Ordering::Relaxed);
        self.shared
            .counters
            .uring_socket
            .store(self.uring_socket, Ordering::Relaxed);
        Ok(())
    }

    fn complete(&mut self, ring: &mut Driver, kind: u8, payload: u64, cqe: Cqe, now: Instant) {
        let Some(tag) = ConnectOp::from_byte(kind) else {
            return;
        };
        if tag == ConnectOp::Timer {
            ring.release(cqe.user_data);
            self.timer_armed = None;
            self.timer_cancelling = false;
            return;
        }
        if tag == ConnectOp::Unpark {
            // A plain descriptor's CLOSE holds it until here (nothing for a
            // direct slot's).
            ring.finish_close(cqe.user_data, cqe.result);
            self.unparking -= 1;
            sub(&self.counters().open_sockets, 1);
            return;
        }
        let i = payload as usize;
        if i < self.slots.len() && self.slots[i].busy {
            self.on_cqe(ring, tag, i, cqe, now);
        }
    }

    fn turn(&mut self, ring: &mut Driver, now: Instant) {
        self.take_jobs(ring, now);
        if !self.stopping {
            self.drive_run(ring);
        }
        if self.busy > 0 && now >= self.next_scan {
            self.scan(ring, now);
            self.next_scan = now + SCAN_INTERVAL;
        }
        if std::mem::take(&mut self.pushed) {
            self.common.delivery.notify();
        }
        if !self.stopping {
            self.arm_timer(ring, now);
        }
    }

    fn stop(&mut self, ring: &mut Driver) {
        self.stopping = true;
        while let Some(job) = self.shared.queue.pop() {
            refuse(job, self.index, &self.shared.counters, &self.common);
        }
        for r in self.pending_runs.drain(..) {
            refuse(Job::Run(r), self.index, &self.shared.counters, &self.common);
        }
        for i in 0..self.slots.len() {
            if self.slots[i].busy {
                self.cancel_slot(ring, i, Cancel::Shutdown);
            }
        }
        self.close_parked(ring);
        if self.timer_armed.is_some() && !self.timer_cancelling {
            let _ = ring.cancel(
                user_data(ConnectOp::Timer, 0),
                user_data(ShardOp::Cancel, 0),
            );
            self.timer_cancelling = true;
        }
        // A run with nothing in flight ends now; one with sequences in
        // flight ends as they complete (cancelled).
        if let Some(run) = &mut self.run {
            run.job.count = Some(run.started);
        }
        self.drive_run_end();
    }

    fn idle(&self) -> bool {
        self.busy == 0 && self.timer_armed.is_none() && self.unparking == 0
    }

    fn finish(&mut self) {
        while let Some(job) = self.shared.queue.pop() {
            refuse(job, self.index, &self.shared.counters, &self.common);
        }
        if let Some(run) = self.run.take() {
            let _ = run.job.done.send((run.started, run.outcomes, run.last_end));
        }
        if std::mem::take(&mut self.pushed) {
            self.common.delivery.notify();
        }
    }
}
