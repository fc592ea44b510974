//! The epoll backend: the engine's operations performed with non-blocking
//! syscalls, completed with io_uring's results, flags and order.
//!
//! Posted operations wait in a submission list until the shard submits
//! (once per turn, as with io_uring). Submitting links each chain (an
//! operation posted with `link` holds the next one until it succeeds; a
//! LINK_TIMEOUT bounds the operation before it), then starts every chain
//! head in order. Starting an operation tries its syscall at once
//! (`accept4`, `recv`/`send` with MSG_DONTWAIT, `connect` non-blocking, …):
//! done, it completes; EAGAIN, it waits on its descriptor, which is in the
//! epoll set edge-triggered (EPOLL_CTL_MOD re-arms it, ADD when the number
//! is new or was closed meanwhile), and is tried again when epoll reports
//! the descriptor ready for its direction. Timers are a deadline heap; the
//! wait sleeps until the earliest (`epoll_pwait2`, nanoseconds).
//!
//! Guarantees kept from io_uring: a linked SEND then CLOSE run in order and
//! the CLOSE is cancelled (-ECANCELED) if the SEND fails; a CONNECT and its
//! LINK_TIMEOUT (-ETIME on the timer, -ECANCELED on the connect, or the
//! reverse); a cancel completes its target with -ECANCELED (and itself with
//! 0, or -ENOENT when the target is gone); a multishot ACCEPT or POLL
//! completes with F_MORE until it ends; a multishot accept takes at most
//! [`ACCEPT_BUDGET`] connections per turn, then lets the turn run and goes
//! on in the next (the kernel's queue holds the rest meanwhile).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

use super::{Cqe, Desc, KeyMap, Op, OpMemory, F_MORE};

/// Connections one multishot accept takes per turn before the turn runs
/// (HAProxy's `tune.maxaccept` is 64 per wake-up too).
pub(crate) const ACCEPT_BUDGET: usize = 64;

const IN: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLERR | libc::EPOLLHUP) as u32;
const OUT: u32 = (libc::EPOLLOUT | libc::EPOLLERR | libc::EPOLLHUP) as u32;
const ALWAYS: u32 = (libc::POLLERR | libc::POLLHUP) as u32;

/// Runs a libc call that returns -1 and sets errno on failure.
macro_rules! syscall {
    ($e:expr) => {{
        let r = $e;
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }};
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// What trying an operation came to.
enum Try {
    /// Completed with this result (and flags).
    Done(i32),
    /// Waits on its descriptor.
    Wait(RawFd),
    /// Waits for a deadline.
    Sleep(Instant),
}

/// An operation submitted and not yet completed. Nodes are keyed by an
/// id of their own: io_uring allows several operations in flight with the
/// same user data (every cancel the engine posts has the same), so user
/// data cannot be the key.
struct Node {
    /// The user data it completes with.
    ud: u64,
    op: Op,
    /// The operation linked after it, held until it succeeds.
    next: Option<u64>,
    /// Its LINK_TIMEOUT, if one bounds it.
    link_timeout: Option<u64>,
    /// For a LINK_TIMEOUT: the operation it bounds.
    guards: Option<u64>,
    /// When a timer operation fires.
    deadline: Option<Instant>,
    /// A CONNECT on a blocking socket: its file flags, put back after.
    restore_flags: Option<i32>,
}

#[derive(Default)]
struct FdState {
    /// In the epoll set (as far as we know: a close removes it silently).
    registered: bool,
    /// Operations waiting on it, in the order they started.
    waiting: Vec<u64>,
    /// O_NONBLOCK already set (listening sockets).
    nonblocking: bool,
    /// An error taken from SO_ERROR for the connect that it did not
    /// concern (the peer reset right after the handshake): the next recv
    /// or send gets it, as it would have without the connect's look.
    pending_err: Option<i32>,
}

/// One shard's epoll instance and the operations it carries.
pub(crate) struct Epoll {
    ep: OwnedFd,
    sq: Vec<(u64, Op, bool)>,
    cq: VecDeque<Cqe>,
    next_id: u64,
    nodes: KeyMap<Node>,
    /// The id of the oldest node with each user data, for a cancel (which
    /// takes the first, as io_uring's does). Later nodes with the same
    /// user data (the engine's cancels all share one) are not listed: no
    /// one cancels them.
    by_ud: KeyMap<u64>,
    fds: HashMap<RawFd, FdState, std::hash::BuildHasherDefault<super::KeyHasher>>,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Listening sockets whose accept ran out of budget: tried again
    /// before the next wait, which then does not sleep.
    ready: Vec<RawFd>,
    events: Vec<libc::epoll_event>,
    /// Spare vectors, reused each turn instead of reallocated.
    spare_sq: Vec<(u64, Op, bool)>,
    spare_ids: Vec<u64>,
    spare_wait: Vec<u64>,
    /// A driven shard's timer descriptor, in the epoll set under
    /// [`PARK_TAG`]: armed before the application waits so that the epoll
    /// descriptor turns readable at the earliest deadline (or at once when
    /// completions are already queued). `None` on the engine's threads,
    /// which wait with a timeout instead.
    park: Option<OwnedFd>,
    /// When `park` was last armed for (to skip a settime that changes nothing).
    park_at: Option<Instant>,
}

/// The epoll user data of the park timer (no descriptor number is this).
const PARK_TAG: u64 = u64::MAX;

impl Epoll {
    /// A new epoll instance (close-on-exec).
    pub fn new() -> io::Result<Self> {
        // SAFETY: epoll_create1 takes no pointers; the new descriptor is
        // owned here from birth.
        let fd = syscall!(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
        let ep = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Epoll {
            ep,
            sq: Vec::new(),
            cq: VecDeque::new(),
            next_id: 0,
            nodes: KeyMap::default(),
            by_ud: KeyMap::default(),
            fds: HashMap::default(),
            timers: BinaryHeap::new(),
            ready: Vec::new(),
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 256],
            spare_sq: Vec::new(),
            spare_ids: Vec::new(),
            spare_wait: Vec::new(),
            park: None,
            park_at: None,
        })
    }

    /// Queues `op` until the next submit.
    pub fn push(&mut self, op: Op, link: bool, ud: u64) -> io::Result<()> {
        self.sq.push((ud, op, link));
        Ok(())
    }

    /// Links and starts everything posted since the last submit.
    pub fn submit(&mut self, mem: &mut KeyMap<OpMemory>) -> io::Result<usize> {
        let mut sq = std::mem::replace(&mut self.sq, std::mem::take(&mut self.spare_sq));
        let n = sq.len();
        let mut heads = std::mem::take(&mut self.spare_ids);
        heads.clear();
        let mut pred: Option<u64> = None;
        for (ud, op, link) in sq.drain(..) {
            let id = self.next_id;
            self.next_id += 1;
            let is_lt = matches!(op, Op::LinkTimeout { .. });
            let mut node = Node {
                ud,
                op,
                next: None,
                link_timeout: None,
                guards: None,
                deadline: None,
                restore_flags: None,
            };
            match pred {
                Some(p) if is_lt => {
                    if let Some(pn) = self.nodes.get_mut(&p) {
                        pn.link_timeout = Some(id);
                    }
                    node.guards = Some(p);
                    // The chain goes on from the operation it bounds.
                    pred = if link { Some(p) } else { None };
                }
                Some(p) => {
                    if let Some(pn) = self.nodes.get_mut(&p) {
                        pn.next = Some(id);
                    }
                    pred = link.then_some(id);
                }
                None => {
                    if is_lt {
                        // A LINK_TIMEOUT with nothing before it: io_uring
                        // refuses it.
                        self.cq.push_back(Cqe {
                            user_data: ud,
                            result: -libc::EINVAL,
                            flags: 0,
                        });
                        pred = None;
                        continue;
                    }
                    heads.push(id);
                    pred = link.then_some(id);
                }
            }
            self.by_ud.entry(ud).or_insert(id);
            self.nodes.insert(id, node);
        }
        self.spare_sq = sq;
        for &id in &heads {
            self.start(id, mem);
        }
        self.spare_ids = heads;
        Ok(n)
    }

    /// Submits, then waits until at least `want` completions are queued.
    pub fn submit_and_wait(&mut self, want: usize, mem: &mut KeyMap<OpMemory>) -> io::Result<()> {
        self.submit(mem)?;
        loop {
            let now = Instant::now();
            self.expire(now, mem);
            if self.cq.len() >= want {
                return Ok(());
            }
            let timeout = if !self.ready.is_empty() {
                Some(std::time::Duration::ZERO)
            } else {
                self.next_deadline()
                    .map(|d| d.saturating_duration_since(now))
            };
            let ts = timeout.map(|t| libc::timespec {
                tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
                tv_nsec: libc::c_long::from(t.subsec_nanos() as i32),
            });
            let tsp = ts
                .as_ref()
                .map_or(std::ptr::null(), |t| t as *const libc::timespec);
            let cap = self.events.len() as libc::c_int;
            // SAFETY: `events` is a live buffer of `cap` entries the kernel
            // fills; `tsp` is null or points at `ts`, alive for the call.
            let n = unsafe {
                libc::epoll_pwait2(
                    self.ep.as_raw_fd(),
                    self.events.as_mut_ptr(),
                    cap,
                    tsp,
                    std::ptr::null(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    return Ok(());
                }
                return Err(e);
            }
            self.dispatch(n as usize, mem);
        }
    }

    /// Acts on the first `n` events of the last wait, then on the listening
    /// sockets whose accept ran out of budget.
    fn dispatch(&mut self, n: usize, mem: &mut KeyMap<OpMemory>) {
        for i in 0..n {
            let ev = self.events[i];
            if ev.u64 == PARK_TAG {
                // Re-armed (which resets it) by the next `prepare_wait`.
                self.park_at = None;
                continue;
            }
            let (fd, bits) = (ev.u64 as RawFd, ev.events);
            self.readiness(fd, bits, mem);
        }
        for fd in std::mem::take(&mut self.ready) {
            self.readiness(fd, libc::EPOLLIN as u32, mem);
        }
    }

    /// For a driven shard: adds the park timer to the epoll set.
    pub fn enable_parking(&mut self) -> io::Result<()> {
        // SAFETY: timerfd_create takes no pointers; the descriptor is owned
        // here from birth.
        let fd = syscall!(unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        })?;
        // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
        let timer = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut ev = libc::epoll_event {
            events: IN | libc::EPOLLET as u32,
            u64: PARK_TAG,
        };
        // SAFETY: `ev` is a live epoll_event for the call.
        syscall!(unsafe {
            libc::epoll_ctl(
                self.ep.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                timer.as_raw_fd(),
                &mut ev,
            )
        })?;
        self.park = Some(timer);
        Ok(())
    }

    /// Submits, then collects what is ready without sleeping: fired timers,
    /// and one epoll wait with a zero timeout.
    pub fn reap(&mut self, mem: &mut KeyMap<OpMemory>) -> io::Result<()> {
        self.submit(mem)?;
        self.expire(Instant::now(), mem);
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let cap = self.events.len() as libc::c_int;
        // SAFETY: `events` is a live buffer of `cap` entries the kernel
        // fills; `zero` lives for the call.
        let n = unsafe {
            libc::epoll_pwait2(
                self.ep.as_raw_fd(),
                self.events.as_mut_ptr(),
                cap,
                &zero,
                std::ptr::null(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::EINTR) {
                Ok(())
            } else {
                Err(e)
            };
        }
        self.dispatch(n as usize, mem);
        self.expire(Instant::now(), mem);
        Ok(())
    }

    /// Arms the park timer (see `park`): at once when completions are queued
    /// or a listener has accepts left over, else at the earliest deadline,
    /// else never (a readiness report wakes the waiter by itself).
    pub fn prepare_wait(&mut self) -> io::Result<()> {
        let Some(timer) = self.park.as_ref().map(|t| t.as_raw_fd()) else {
            return Ok(());
        };
        let now = Instant::now();
        let at = if self.has_work() {
            Some(now)
        } else {
            self.next_deadline()
        };
        if at.is_some() && at == self.park_at && at != Some(now) {
            return Ok(());
        }
        let after = at.map(|a| a.saturating_duration_since(now));
        // 0 would disarm it: "now" is one nanosecond.
        let value = match after {
            None => libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            Some(d) => libc::timespec {
                tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
                tv_nsec: if d.is_zero() {
                    1
                } else {
                    libc::c_long::from(d.subsec_nanos() as i32)
                },
            },
        };
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: value,
        };
        // SAFETY: `spec` lives for the call; the old value is not asked for.
        syscall!(unsafe { libc::timerfd_settime(timer, 0, &spec, std::ptr::null_mut()) })?;
        self.park_at = at;
        Ok(())
    }

    /// Completions to drain, accepts left over, or operations to submit.
    pub fn has_work(&self) -> bool {
        !self.cq.is_empty() || !self.ready.is_empty() || !self.sq.is_empty()
    }

    /// The epoll descriptor (readable while an event waits).
    pub fn fd(&self) -> RawFd {
        self.ep.as_raw_fd()
    }

    /// Moves every queued completion into `out`.
    pub fn drain(&mut self, out: &mut Vec<Cqe>) {
        out.extend(self.cq.drain(..));
    }

    fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(Reverse((at, ud))) = self.timers.peek().copied() {
            match self.nodes.get(&ud) {
                Some(n) if n.deadline == Some(at) => return Some(at),
                _ => {
                    self.timers.pop();
                }
            }
        }
        None
    }

    /// Fires every timer due at `now`.
    fn expire(&mut self, now: Instant, mem: &mut KeyMap<OpMemory>) {
        while let Some(at) = self.next_deadline() {
            if at > now {
                return;
            }
            let Some(Reverse((_, ud))) = self.timers.pop() else {
                return;
            };
            let Some(node) = self.take_node(&ud) else {
                continue;
            };
            match node.guards {
                // A LINK_TIMEOUT: its operation is cancelled, then it ends.
                Some(target) => {
                    self.cq.push_back(Cqe {
                        user_data: node.ud,
                        result: -libc::ETIME,
                        flags: 0,
                    });
                    if let Some(mut t) = self.unlink(target) {
                        t.link_timeout = None;
                        self.finish(target, t, -libc::ECANCELED, 0, mem);
                    }
                }
                None => self.finish(ud, node, -libc::ETIME, 0, mem),
            }
        }
    }

    /// Removes node `id` from the tables (not from a descriptor's list).
    fn take_node(&mut self, id: &u64) -> Option<Node> {
        let node = self.nodes.remove(id)?;
        if self.by_ud.get(&node.ud) == Some(id) {
            self.by_ud.remove(&node.ud);
        }
        Some(node)
    }

    /// Takes a node out of whatever it waits on.
    fn unlink(&mut self, ud: u64) -> Option<Node> {
        let node = self.take_node(&ud)?;
        if let Some(fd) = wait_fd(&node.op) {
            if let Some(st) = self.fds.get_mut(&fd) {
                st.waiting.retain(|w| *w != ud);
            }
        }
        Some(node)
    }

    /// Starts operation `ud`: tries it, and completes it or parks it.
    fn start(&mut self, ud: u64, mem: &mut KeyMap<OpMemory>) {
        let Some(node) = self.nodes.get(&ud) else {
            return;
        };
        if let Some(lt) = node.link_timeout {
            if let Some(Op::LinkTimeout { after }) = self.nodes.get(&lt).map(|n| &n.op) {
                let at = Instant::now() + *after;
                if let Some(n) = self.nodes.get_mut(&lt) {
                    n.deadline = Some(at);
                }
                self.timers.push(Reverse((at, lt)));
            }
        }
        if let Some(Op::Cancel { target }) = self.nodes.get(&ud).map(|n| n.op.clone()) {
            let first = self.by_ud.get(&target).copied();
            let res = match first.and_then(|id| self.unlink(id)) {
                Some(t) if t.guards.is_none() => {
                    let id = first.unwrap_or_default();
                    self.finish(id, t, -libc::ECANCELED, 0, mem);
                    0
                }
                Some(t) => {
                    // Cancelling a LINK_TIMEOUT: it ends; its operation goes on.
                    if let Some(g) = t.guards.and_then(|g| self.nodes.get_mut(&g)) {
                        g.link_timeout = None;
                    }
                    self.cq.push_back(Cqe {
                        user_data: target,
                        result: -libc::ECANCELED,
                        flags: 0,
                    });
                    0
                }
                None => -libc::ENOENT,
            };
            if let Some(node) = self.take_node(&ud) {
                self.finish(ud, node, res, 0, mem);
            }
            return;
        }
        self.attempt(ud, mem);
    }

    /// Tries the syscall of started operation `ud` once more.
    fn attempt(&mut self, ud: u64, mem: &mut KeyMap<OpMemory>) {
        let outcome = self.try_op(ud, mem);
        match outcome {
            Try::Done(res) => {
                if let Some(node) = self.unlink(ud) {
                    self.finish(ud, node, res, 0, mem);
                }
            }
            Try::Wait(fd) => self.wait_on(fd, ud),
            Try::Sleep(at) => {
                if let Some(n) = self.nodes.get_mut(&ud) {
                    n.deadline = Some(at);
                }
                self.timers.push(Reverse((at, ud)));
            }
        }
    }

    /// Parks `ud` on `fd` and makes sure epoll reports `fd`. An operation
    /// tried again after a readiness report is still parked and needs
    /// nothing more: its EAGAIN means the next arrival is a new edge.
    fn wait_on(&mut self, fd: RawFd, ud: u64) {
        let st = self.fds.entry(fd).or_default();
        if st.waiting.contains(&ud) {
            return;
        }
        st.waiting.push(ud);
        let mut ev = libc::epoll_event {
            events: IN | OUT | libc::EPOLLET as u32,
            u64: fd as u64,
        };
        let ep = self.ep.as_raw_fd();
        let ctl = |op: libc::c_int, ev: &mut libc::epoll_event| {
            // SAFETY: `ev` is a live epoll_event for the call; epoll_ctl
            // takes descriptor numbers, and a stale one only fails.
            syscall!(unsafe { libc::epoll_ctl(ep, op, fd, ev) })
        };
        // MOD re-arms the edge (and reports readiness that is already
        // there); ENOENT means the number was closed and reused: ADD.
        let first = if st.registered {
            libc::EPOLL_CTL_MOD
        } else {
            libc::EPOLL_CTL_ADD
        };
        let r = ctl(first, &mut ev);
        let r = match r {
            Err(e) if first == libc::EPOLL_CTL_MOD && e.raw_os_error() == Some(libc::ENOENT) => {
                ctl(libc::EPOLL_CTL_ADD, &mut ev)
            }
            Err(e) if first == libc::EPOLL_CTL_ADD && e.raw_os_error() == Some(libc::EEXIST) => {
                ctl(libc::EPOLL_CTL_MOD, &mut ev)
            }
            other => other,
        };
        match r {
            Ok(_) => st.registered = true,
            Err(e) => {
                // Not pollable (a closed number): it fails as io_uring's
                // operation would.
                st.waiting.retain(|w| *w != ud);
                if let Some(node) = self.take_node(&ud) {
                    let mut none = KeyMap::default();
                    self.finish(ud, node, -errno(&e), 0, &mut none);
                }
            }
        }
    }

    /// `fd` is ready for `bits`: try again what waits on it for them.
    fn readiness(&mut self, fd: RawFd, bits: u32, mem: &mut KeyMap<OpMemory>) {
        let Some(st) = self.fds.get_mut(&fd) else {
            return;
        };
        let spare = std::mem::take(&mut self.spare_wait);
        let mut waiting = std::mem::replace(&mut st.waiting, spare);
        for &ud in &waiting {
            let Some(node) = self.nodes.get(&ud) else {
                continue;
            };
            let wanted = interest(&node.op);
            if bits & wanted == 0 {
                self.fds.entry(fd).or_default().waiting.push(ud);
                continue;
            }
            if let Op::Poll {
                events, multishot, ..
            } = node.op
            {
                let revents = bits & (events | ALWAYS);
                if multishot {
                    self.cq.push_back(Cqe {
                        user_data: node.ud,
                        result: revents as i32,
                        flags: F_MORE,
                    });
                    self.fds.entry(fd).or_default().waiting.push(ud);
                } else if let Some(node) = self.take_node(&ud) {
                    self.finish(ud, node, revents as i32, 0, mem);
                }
                continue;
            }
            self.fds.entry(fd).or_default().waiting.push(ud);
            self.attempt(ud, mem);
        }
        waiting.clear();
        self.spare_wait = waiting;
    }

    /// Completes `ud` with `res`, then starts its successor (on success) or
    /// cancels the rest of its chain.
    fn finish(&mut self, ud: u64, node: Node, res: i32, flags: u32, mem: &mut KeyMap<OpMemory>) {
        if let (Some(f), Op::Connect { desc: Desc::Fd(fd) }) = (node.restore_flags, &node.op) {
            // SAFETY: fcntl on a descriptor number with an integer argument.
            let _ = unsafe { libc::fcntl(*fd, libc::F_SETFL, f) };
        }
        if let Op::Close { fd } = node.op {
            self.fds.remove(&fd);
        }
        let _ = ud;
        self.cq.push_back(Cqe {
            user_data: node.ud,
            result: res,
            flags,
        });
        if let Some(lt) = node.link_timeout {
            if let Some(t) = self.take_node(&lt) {
                self.cq.push_back(Cqe {
                    user_data: t.ud,
                    result: -libc::ECANCELED,
                    flags: 0,
                });
            }
        }
        let Some(next) = node.next else {
            return;
        };
        if res >= 0 {
            self.start(next, mem);
        } else {
            self.cancel_chain(next, mem);
        }
    }

    /// Completes `ud` and everything linked after it with -ECANCELED.
    fn cancel_chain(&mut self, ud: u64, mem: &mut KeyMap<OpMemory>) {
        if let Some(node) = self.unlink(ud) {
            self.finish(ud, node, -libc::ECANCELED, 0, mem);
        }
    }

    /// One non-blocking try of operation `ud`'s syscall.
    fn try_op(&mut self, ud: u64, mem: &mut KeyMap<OpMemory>) -> Try {
        let Some(node) = self.nodes.get_mut(&ud) else {
            return Try::Done(-libc::ECANCELED);
        };
        let id = ud;
        let ud = node.ud;
        let fixed = Try::Done(-libc::EBADF);
        match node.op.clone() {
            Op::Accept { fd, multishot } => {
                let st = self.fds.entry(fd).or_default();
                if !st.nonblocking {
                    if let Err(e) = set_nonblocking(fd) {
                        return Try::Done(-errno(&e));
                    }
                    st.nonblocking = true;
                }
                let mut taken = 0;
                loop {
                    // SAFETY: accept4 with null address pointers writes nothing
                    // of ours; the new descriptor is handed out in the CQE and
                    // adopted as an OwnedFd by the service.
                    let r = syscall!(unsafe {
                        libc::accept4(
                            fd,
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                            libc::SOCK_CLOEXEC,
                        )
                    });
                    match r {
                        Ok(new) if multishot => {
                            self.cq.push_back(Cqe {
                                user_data: ud,
                                result: new,
                                flags: F_MORE,
                            });
                            taken += 1;
                            if taken >= ACCEPT_BUDGET {
                                self.ready.push(fd);
                                return Try::Wait(fd);
                            }
                        }
                        Ok(new) => return Try::Done(new),
                        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return Try::Wait(fd),
                        Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                        Err(e) => return Try::Done(-errno(&e)),
                    }
                }
            }
            Op::Cancel { .. } | Op::LinkTimeout { .. } => Try::Done(-libc::EINVAL),
            Op::ReadWord { fd } => {
                let Some(OpMemory::Word(w)) = mem.get_mut(&ud) else {
                    return Try::Done(-libc::EFAULT);
                };
                let ptr: *mut u64 = &mut **w;
                // SAFETY: `ptr` points at the op's own 8-byte word, alive
                // in the driver's memory until the completion is released.
                match syscall!(unsafe { libc::read(fd, ptr.cast(), 8) }) {
                    Ok(n) => Try::Done(n as i32),
                    Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Try::Wait(fd),
                    Err(e) => Try::Done(-errno(&e)),
                }
            }
            Op::Timeout { after } => Try::Sleep(Instant::now() + after),
            Op::Recv { desc, flags } => {
                let Desc::Fd(fd) = desc else { return fixed };
                if let Some(err) = self.fds.get_mut(&fd).and_then(|st| st.pending_err.take()) {
                    return Try::Done(-err);
                }
                let Some(OpMemory::Bytes(b)) = mem.get_mut(&ud) else {
                    return Try::Done(-libc::EFAULT);
                };
                // SAFETY: `b` is the op's own buffer, alive for the call;
                // recv writes at most its length.
                let r = syscall!(unsafe {
                    libc::recv(
                        fd,
                        b.as_mut_ptr().cast(),
                        b.len(),
                        flags | libc::MSG_DONTWAIT,
                    )
                });
                match r {
                    Ok(n) => Try::Done(n as i32),
                    Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Try::Wait(fd),
                    Err(e) => Try::Done(-errno(&e)),
                }
            }
            Op::Send { desc, range, flags } => {
                let Desc::Fd(fd) = desc else { return fixed };
                if let Some(err) = self.fds.get_mut(&fd).and_then(|st| st.pending_err.take()) {
                    return Try::Done(-err);
                }
                let Some(bytes) = (match mem.get(&ud) {
                    Some(OpMemory::Bytes(b)) => b.get(range),
                    _ => None,
                }) else {
                    return Try::Done(-libc::EFAULT);
                };
                // SAFETY: `bytes` is the op's own buffer, alive for the call.
                let r = syscall!(unsafe {
                    libc::send(
                        fd,
                        bytes.as_ptr().cast(),
                        bytes.len(),
                        flags | libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                });
                match r {
                    Ok(n) => Try::Done(n as i32),
                    Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Try::Wait(fd),
                    Err(e) => Try::Done(-errno(&e)),
                }
            }
            Op::Poll { fd, events, .. } => {
                let mut p = libc::pollfd {
                    fd,
                    events: events as i16,
                    revents: 0,
                };
                // SAFETY: one live pollfd, a zero timeout.
                match syscall!(unsafe { libc::poll(&mut p, 1, 0) }) {
                    Ok(1) => {
                        let revents = (p.revents as u16 as u32) & (events | ALWAYS);
                        if revents & (libc::POLLNVAL as u32) != 0 {
                            return Try::Done(-libc::EBADF);
                        }
                        if let Some(Node {
                            op:
                                Op::Poll {
                                    multishot: true, ..
                                },
                            ..
                        }) = self.nodes.get(&id)
                        {
                            self.cq.push_back(Cqe {
                                user_data: ud,
                                result: revents as i32,
                                flags: F_MORE,
                            });
                            return Try::Wait(fd);
                        }
                        Try::Done(revents as i32)
                    }
                    Ok(_) => Try::Wait(fd),
                    Err(e) => Try::Done(-errno(&e)),
                }
            }
            Op::Close { fd } => {
                // Nothing may wait on a descriptor that goes (io_uring's
                // operations would hold the file; these would hang).
                let stale = self
                    .fds
                    .remove(&fd)
                    .map(|st| st.waiting)
                    .unwrap_or_default();
                for w in stale {
                    if let Some(n) = self.take_node(&w) {
                        self.finish(w, n, -libc::ECANCELED, 0, mem);
                    }
                }
                // The descriptor is owned by the op's memory; the service
                // forgets it on a result >= 0 (Driver::finish_close).
                // SAFETY: closing a number this operation owns.
                match syscall!(unsafe { libc::close(fd) }) {
                    Ok(_) => Try::Done(0),
                    // Linux frees the number even when close fails.
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => Try::Done(0),
                    Err(e) => Try::Done(-errno(&e)),
                }
            }
            Op::CloseDirect { .. } => fixed,
            Op::Connect { desc } => {
                let Desc::Fd(fd) = desc else { return fixed };
                if node.restore_flags.is_some() {
                    // Woken for writability: the connect has finished.
                    return match take_so_error(fd) {
                        Ok(0) => Try::Done(0),
                        // Connected, then reset before we looked: the
                        // connect succeeded; the reset is the next op's.
                        Ok(err) if err == libc::ECONNRESET || err == libc::EPIPE => {
                            self.fds.entry(fd).or_default().pending_err = Some(err);
                            Try::Done(0)
                        }
                        Ok(err) => Try::Done(-err),
                        Err(e) => Try::Done(-errno(&e)),
                    };
                }
                let Some(OpMemory::Addr(addr)) = mem.get(&ud) else {
                    return Try::Done(-libc::EFAULT);
                };
                match make_nonblocking(fd) {
                    Ok(old) => node.restore_flags = Some(old),
                    Err(e) => return Try::Done(-errno(&e)),
                }
                // SAFETY: `addr` is the op's own address, alive for the call.
                match syscall!(unsafe { libc::connect(fd, addr.as_ptr().cast(), addr.len()) }) {
                    Ok(_) => Try::Done(0),
                    Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Try::Wait(fd),
                    Err(e) => Try::Done(-errno(&e)),
                }
            }
            Op::Disconnect { desc } => {
                let Desc::Fd(fd) = desc else { return fixed };
                if let Some(st) = self.fds.get_mut(&fd) {
                    st.pending_err = None;
                }
                let unspec = libc::sockaddr {
                    sa_family: libc::AF_UNSPEC as libc::sa_family_t,
                    sa_data: [0; 14],
                };
                let len = size_of::<libc::sockaddr>() as libc::socklen_t;
                // SAFETY: `unspec` is a live sockaddr for the call.
                match syscall!(unsafe { libc::connect(fd, &unspec, len) }) {
                    Ok(_) => Try::Done(0),
                    Err(e) => Try::Done(-errno(&e)),
                }
            }
            Op::Socket {
                direct: Some(_), ..
            } => Try::Done(-libc::EOPNOTSUPP),
            Op::Socket {
                domain,
                direct: None,
            } => {
                // SAFETY: socket takes no pointers; the descriptor is handed
                // out in the CQE and adopted by the service.
                match syscall!(unsafe {
                    libc::socket(
                        domain,
                        libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                        libc::IPPROTO_TCP,
                    )
                }) {
                    Ok(fd) => Try::Done(fd),
                    Err(e) => Try::Done(-errno(&e)),
                }
            }
            Op::Shutdown { fd, how } => {
                // SAFETY: shutdown takes no pointers.
                match syscall!(unsafe { libc::shutdown(fd, how) }) {
                    Ok(_) => Try::Done(0),
                    Err(e) => Try::Done(-errno(&e)),
                }
            }
        }
    }
}

/// The descriptor an operation waits on, if any.
fn wait_fd(op: &Op) -> Option<RawFd> {
    match op {
        Op::Accept { fd, .. }
        | Op::ReadWord { fd }
        | Op::Poll { fd, .. }
        | Op::Recv {
            desc: Desc::Fd(fd), ..
        }
        | Op::Send {
            desc: Desc::Fd(fd), ..
        }
        | Op::Connect { desc: Desc::Fd(fd) } => Some(*fd),
        _ => None,
    }
}

/// The epoll events that may let a waiting operation progress.
fn interest(op: &Op) -> u32 {
    match op {
        Op::Send { .. } | Op::Connect { .. } => OUT,
        Op::Poll { events, .. } => events | ALWAYS,
        _ => IN,
    }
}

/// Sets O_NONBLOCK on `fd`.
fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    make_nonblocking(fd).map(|_| ())
}

/// Sets O_NONBLOCK on `fd`; returns the flags it had.
fn make_nonblocking(fd: RawFd) -> io::Result<i32> {
    // SAFETY: fcntl with integer arguments on a descriptor number.
    let flags = syscall!(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    if flags & libc::O_NONBLOCK == 0 {
        // SAFETY: as above.
        syscall!(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    }
    Ok(flags)
}

/// getsockopt(SO_ERROR): the pending error of a socket (0: none).
fn take_so_error(fd: RawFd) -> io::Result<i32> {
    let mut err: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `err` and `len` are live locals of the sizes given.
    syscall!(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(err)
}
