//! The epoll backend: the engine's operations performed with non-blocking
//! syscalls, completed with io_uring's results, flags and order.
//!
//! Posted operations wait in a submission list until the shard submits
//! (once per turn, as with io_uring). Submitting takes the list chain by
//! chain, in order (an operation posted with `link` holds the next one
//! until it succeeds; a LINK_TIMEOUT bounds the operation before it).
//! Starting an operation tries its syscall at once (`accept4`,
//! `recv`/`send` with MSG_DONTWAIT, `connect` non-blocking, …): done, it
//! completes, and the next of its chain starts; EAGAIN, it waits on its
//! descriptor, which is in the epoll set edge-triggered (EPOLL_CTL_MOD
//! re-arms it, ADD when the number is new or was closed meanwhile), and is
//! tried again when epoll reports the descriptor ready for its direction.
//! Timers are a deadline heap; the wait sleeps until the earliest
//! (`epoll_pwait2`, nanoseconds).
//!
//! Only what waits is recorded: an operation that completes when it is
//! started (a reply's SEND and its CLOSE, a cancel, a SOCKET) never enters
//! the tables, and what waits lives in a [`Slab`], not a hash map.
//!
//! Guarantees kept from io_uring: a linked SEND then CLOSE run in order and
//! the CLOSE is cancelled (-ECANCELED) if the SEND fails; a CONNECT and its
//! LINK_TIMEOUT (-ETIME on the timer, -ECANCELED on the connect, or the
//! reverse); a cancel completes its target with -ECANCELED (and itself with
//! 0, or -ENOENT when the target is gone or not yet started, as io_uring's
//! does for an SQE behind it); a multishot ACCEPT or POLL completes with
//! F_MORE until it ends; a multishot accept hands over [`ACCEPT_SLICE`]
//! connections at a time and takes at most [`ACCEPT_BUDGET`] between two
//! looks at epoll, so the other descriptors wait no longer (the kernel's
//! queue holds the rest meanwhile); one that took connections is tried
//! again before the next wait, within the same budget.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

mod ops;
mod park;
mod slab;

use ops::{interest, syscall, wait_fd};
use slab::Slab;

use super::{Cqe, Desc, KeyMap, Op, OpMemory, F_MORE};

/// Connections one try of a multishot accept takes before the shard gets
/// their completions. Small, so that each connection is replied to and
/// closed while its socket is still warm in the cache, as a hand-written
/// loop that replies to each connection it accepts does (PERF.md has the
/// interleaved A/B; on a shared machine its effect is within the noise).
pub(crate) const ACCEPT_SLICE: usize = 8;

/// Connections accepted between two looks at epoll: a listener with more
/// waiting gives its next slice in the same wait (no `epoll_pwait2`) until
/// this many, then every other descriptor gets its turn (HAProxy's
/// `tune.maxaccept` is 64 per wake-up too).
pub(crate) const ACCEPT_BUDGET: usize = 64;

const IN: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLERR | libc::EPOLLHUP) as u32;
const OUT: u32 = (libc::EPOLLOUT | libc::EPOLLERR | libc::EPOLLHUP) as u32;
const ALWAYS: u32 = (libc::POLLERR | libc::POLLHUP) as u32;

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

/// One posted operation: its user data, the operation, and whether the
/// next one posted is linked to it.
type Posted = (u64, Op, bool);

/// An operation started and waiting. Nodes are keyed by an id of their
/// own (a [`Slab`] id): io_uring allows several operations in flight with
/// the same user data (every cancel the engine posts has the same), so user
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

impl Node {
    fn new(ud: u64, op: Op) -> Self {
        Node {
            ud,
            op,
            next: None,
            link_timeout: None,
            guards: None,
            deadline: None,
            restore_flags: None,
        }
    }
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
    sq: Vec<Posted>,
    cq: VecDeque<Cqe>,
    nodes: Slab<Node>,
    /// The id of the oldest node with each user data, for a cancel (which
    /// takes the first, as io_uring's does). Later nodes with the same
    /// user data (the engine's cancels all share one) are not listed: no
    /// one cancels them.
    by_ud: KeyMap<u64>,
    fds: HashMap<RawFd, FdState, std::hash::BuildHasherDefault<super::KeyHasher>>,
    /// How many descriptors hold a `pending_err` (0: recv and send need
    /// not look theirs up).
    pending_errs: usize,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Listening sockets whose accept ran out of budget: tried again
    /// before the next wait, which then does not sleep.
    ready: Vec<RawFd>,
    events: Vec<libc::epoll_event>,
    /// Spare vectors, reused each turn instead of reallocated.
    spare_sq: Vec<Posted>,
    spare_chain: Vec<Posted>,
    spare_ids: Vec<u64>,
    spare_wait: Vec<u64>,
    spare_ready: Vec<RawFd>,
    /// A driven shard's timer descriptor, in the epoll set under
    /// [`PARK_TAG`]: armed before the application waits so that the epoll
    /// descriptor turns readable at the earliest deadline (or at once when
    /// work is already there). `None` on the engine's threads, which wait
    /// with a timeout instead (see `park.rs`).
    park: Option<OwnedFd>,
    /// When `park` was last armed for (to skip a settime that changes nothing).
    park_at: Option<Instant>,
    /// Accept slices taken since epoll was last asked.
    slices: usize,
    /// Listening sockets whose multishot accept took connections, then
    /// found the queue empty, since the last wait: tried once more before
    /// the next wait (see [`Epoll::retry_accepts`]).
    retry: Vec<RawFd>,
    spare_retry: Vec<RawFd>,
    /// Waits that skip the retry, after one found nothing.
    retry_skip: u32,
    /// How many the next retry that finds nothing makes skip (1, 2, 4 …
    /// [`RETRY_BACKOFF_MAX`]; reset by a retry that finds a connection).
    retry_backoff: u32,
}

/// The most waits a retry that found nothing makes skip the next retry.
const RETRY_BACKOFF_MAX: u32 = 64;

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
            nodes: Slab::default(),
            by_ud: KeyMap::default(),
            fds: HashMap::default(),
            pending_errs: 0,
            timers: BinaryHeap::new(),
            ready: Vec::new(),
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 256],
            spare_sq: Vec::new(),
            spare_chain: Vec::new(),
            spare_ids: Vec::new(),
            spare_wait: Vec::new(),
            spare_ready: Vec::new(),
            park: None,
            park_at: None,
            slices: 0,
            retry: Vec::new(),
            spare_retry: Vec::new(),
            retry_skip: 0,
            retry_backoff: 0,
        })
    }

    /// Queues `op` until the next submit.
    pub fn push(&mut self, op: Op, link: bool, ud: u64) -> io::Result<()> {
        self.sq.push((ud, op, link));
        Ok(())
    }

    /// Starts everything posted since the last submit, chain by chain in
    /// the order posted.
    pub fn submit(&mut self, mem: &mut KeyMap<OpMemory>) -> io::Result<usize> {
        let mut sq = std::mem::replace(&mut self.sq, std::mem::take(&mut self.spare_sq));
        let n = sq.len();
        let mut chain = std::mem::take(&mut self.spare_chain);
        for posted in sq.drain(..) {
            let link = posted.2;
            chain.push(posted);
            if !link {
                self.start_chain(&mut chain, mem);
            }
        }
        // A link flag on the last operation links to nothing (io_uring
        // ends a chain at the end of a submission too).
        if !chain.is_empty() {
            self.start_chain(&mut chain, mem);
        }
        self.spare_sq = sq;
        self.spare_chain = chain;
        Ok(n)
    }

    /// Starts one chain (emptying `chain`). Its operations are tried in
    /// order, and each that completes at once is done with: it never
    /// enters the tables. The first that has to wait is recorded, with
    /// the rest of the chain linked behind it. A chain with a LINK_TIMEOUT
    /// is recorded whole before it starts (the timeout runs beside its
    /// operation).
    fn start_chain(&mut self, chain: &mut Vec<Posted>, mem: &mut KeyMap<OpMemory>) {
        if chain
            .iter()
            .any(|(_, op, _)| matches!(op, Op::LinkTimeout { .. }))
        {
            return self.record_chain(chain, mem);
        }
        let mut ops = chain.drain(..);
        while let Some((ud, op, _)) = ops.next() {
            let res = if let Op::Cancel { target } = op {
                self.cancel_target(target, mem)
            } else {
                let mut restore = None;
                match self.try_op(&op, ud, &mut restore, mem) {
                    Try::Done(res) => {
                        self.completed(ud, &op, restore, res, 0);
                        res
                    }
                    parked => {
                        // Record it and what is linked behind it.
                        let mut node = Node::new(ud, op);
                        node.restore_flags = restore;
                        let id = self.record(node);
                        let mut last = id;
                        for (ud, op, _) in ops.by_ref() {
                            let next = self.record(Node::new(ud, op));
                            if let Some(n) = self.nodes.get_mut(last) {
                                n.next = Some(next);
                            }
                            last = next;
                        }
                        self.park(id, parked, mem);
                        return;
                    }
                }
            };
            if res < 0 {
                // The rest of the chain never runs.
                for (ud, op, _) in ops.by_ref() {
                    self.completed(ud, &op, None, -libc::ECANCELED, 0);
                }
                return;
            }
        }
    }

    /// Records a chain with a LINK_TIMEOUT whole, then starts its head
    /// (and any operation a misplaced LINK_TIMEOUT left unlinked).
    fn record_chain(&mut self, chain: &mut Vec<Posted>, mem: &mut KeyMap<OpMemory>) {
        let mut heads = std::mem::take(&mut self.spare_ids);
        heads.clear();
        let mut pred: Option<u64> = None;
        for (ud, op, link) in chain.drain(..) {
            let is_lt = matches!(op, Op::LinkTimeout { .. });
            match pred {
                Some(p) if is_lt => {
                    let mut node = Node::new(ud, op);
                    node.guards = Some(p);
                    let id = self.record(node);
                    if let Some(pn) = self.nodes.get_mut(p) {
                        pn.link_timeout = Some(id);
                    }
                    // The chain goes on from the operation it bounds.
                    pred = if link { Some(p) } else { None };
                }
                Some(p) => {
                    let id = self.record(Node::new(ud, op));
                    if let Some(pn) = self.nodes.get_mut(p) {
                        pn.next = Some(id);
                    }
                    pred = link.then_some(id);
                }
                None if is_lt => {
                    // A LINK_TIMEOUT with nothing before it: io_uring
                    // refuses it.
                    self.cq.push_back(Cqe {
                        user_data: ud,
                        result: -libc::EINVAL,
                        flags: 0,
                    });
                    pred = None;
                }
                None => {
                    let id = self.record(Node::new(ud, op));
                    heads.push(id);
                    pred = link.then_some(id);
                }
            }
        }
        for &id in &heads {
            self.start(id, mem);
        }
        self.spare_ids = heads;
    }

    /// Puts `node` in the tables; returns its id.
    fn record(&mut self, node: Node) -> u64 {
        let ud = node.ud;
        let id = self.nodes.insert(node);
        self.by_ud.entry(ud).or_insert(id);
        id
    }

    /// Submits, then waits until at least `want` completions are queued.
    pub fn submit_and_wait(&mut self, want: usize, mem: &mut KeyMap<OpMemory>) -> io::Result<()> {
        self.submit(mem)?;
        loop {
            // The clock is read only when a timer may be due.
            let now = (!self.timers.is_empty()).then(Instant::now);
            if let Some(now) = now {
                self.expire(now, mem);
            }
            if self.cq.len() >= want {
                // Completions to hand over: a listener with more waiting
                // adds its next slice to them (within the budget), so the
                // shard replies to one slice while the next is taken.
                // (The slice epoll reported was the first since it was asked.)
                if !self.ready.is_empty() && self.slices + 1 < ACCEPT_BUDGET / ACCEPT_SLICE {
                    self.take_ready(mem);
                }
                return Ok(());
            }
            // A listener whose last slice was full has more waiting: its
            // next slice comes before epoll is asked, within the budget.
            if !self.ready.is_empty() && self.slices + 1 < ACCEPT_BUDGET / ACCEPT_SLICE {
                self.take_ready(mem);
                continue;
            }
            if self.retry_accepts(mem) {
                continue;
            }
            self.slices = 0;
            let timeout = if !self.ready.is_empty() {
                Some(std::time::Duration::ZERO)
            } else {
                match (self.next_deadline(), now) {
                    (Some(d), Some(now)) => Some(d.saturating_duration_since(now)),
                    _ => None,
                }
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

    /// Before a wait: tries once more each multishot accept that took
    /// connections and then found its queue empty since the last wait;
    /// returns whether that took any. Meanwhile the shard replied to what
    /// it took, and under load the next connections came in that time: a
    /// hand-written loop finds them with its next `accept4` (it accepts,
    /// replies and accepts again until EAGAIN), where the engine, which
    /// takes a slice before replying, would otherwise ask epoll first (an
    /// `epoll_pwait2` more per 2–3 connections at C=64, PERF.md). A retry
    /// that finds nothing costs an `accept4`; it makes the next 1, 2, 4 …
    /// [`RETRY_BACKOFF_MAX`] waits skip theirs, so at light load nearly
    /// none is made. An accept tried again stays parked on its descriptor
    /// as before (its EAGAIN leaves the edge to epoll).
    fn retry_accepts(&mut self, mem: &mut KeyMap<OpMemory>) -> bool {
        if self.retry.is_empty() {
            return false;
        }
        if self.retry_skip > 0 {
            self.retry_skip -= 1;
            self.retry.clear();
            return false;
        }
        // A retry is a slice of the budget: a listener whose every retry
        // finds more would otherwise keep epoll from ever being asked, and
        // the shard's other descriptors (its wake-up, relays) from a turn.
        if self.slices + 1 >= ACCEPT_BUDGET / ACCEPT_SLICE {
            self.retry.clear();
            return false;
        }
        self.slices += 1;
        let before = self.cq.len();
        let spare = std::mem::take(&mut self.spare_retry);
        let mut retry = std::mem::replace(&mut self.retry, spare);
        for fd in retry.drain(..) {
            self.readiness(fd, libc::EPOLLIN as u32, mem);
        }
        self.spare_retry = retry;
        if self.cq.len() > before {
            self.retry_backoff = 0;
            return true;
        }
        // Found nothing: what the retries of this wait pushed is cleared too.
        self.retry.clear();
        self.retry_backoff = (self.retry_backoff * 2).clamp(1, RETRY_BACKOFF_MAX);
        self.retry_skip = self.retry_backoff;
        false
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
        self.take_ready(mem);
    }

    /// Gives each listener whose accept used up its slice the next one.
    fn take_ready(&mut self, mem: &mut KeyMap<OpMemory>) {
        if self.ready.is_empty() {
            return;
        }
        self.slices += 1;
        let spare = std::mem::take(&mut self.spare_ready);
        let mut ready = std::mem::replace(&mut self.ready, spare);
        for fd in ready.drain(..) {
            self.readiness(fd, libc::EPOLLIN as u32, mem);
        }
        self.spare_ready = ready;
    }

    /// Moves every queued completion into `out`.
    pub fn drain(&mut self, out: &mut Vec<Cqe>) {
        out.extend(self.cq.drain(..));
    }

    fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(Reverse((at, id))) = self.timers.peek().copied() {
            match self.nodes.get(id) {
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
            let Some(Reverse((_, id))) = self.timers.pop() else {
                return;
            };
            let Some(node) = self.take_node(id) else {
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
                        self.finish(t, -libc::ECANCELED, 0, mem);
                    }
                }
                None => self.finish(node, -libc::ETIME, 0, mem),
            }
        }
    }

    /// Removes node `id` from the tables (not from a descriptor's list).
    fn take_node(&mut self, id: u64) -> Option<Node> {
        let node = self.nodes.remove(id)?;
        if self.by_ud.get(&node.ud) == Some(&id) {
            self.by_ud.remove(&node.ud);
        }
        Some(node)
    }

    /// Takes a node out of whatever it waits on.
    fn unlink(&mut self, id: u64) -> Option<Node> {
        let node = self.take_node(id)?;
        if let Some(fd) = wait_fd(&node.op) {
            if let Some(st) = self.fds.get_mut(&fd) {
                st.waiting.retain(|w| *w != id);
            }
        }
        Some(node)
    }

    /// Cancels the oldest operation in flight with user data `target`;
    /// returns the cancel's own result.
    fn cancel_target(&mut self, target: u64, mem: &mut KeyMap<OpMemory>) -> i32 {
        let Some(&first) = self.by_ud.get(&target) else {
            return -libc::ENOENT;
        };
        match self.unlink(first) {
            Some(t) if t.guards.is_none() => {
                self.finish(t, -libc::ECANCELED, 0, mem);
                0
            }
            Some(t) => {
                // Cancelling a LINK_TIMEOUT: it ends; its operation goes on.
                if let Some(g) = t.guards.and_then(|g| self.nodes.get_mut(g)) {
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
        }
    }

    /// Starts recorded operation `id`: tries it, and completes it or parks it.
    fn start(&mut self, id: u64, mem: &mut KeyMap<OpMemory>) {
        let Some(node) = self.nodes.get(id) else {
            return;
        };
        if let Some(lt) = node.link_timeout {
            if let Some(Op::LinkTimeout { after }) = self.nodes.get(lt).map(|n| &n.op) {
                let at = Instant::now() + *after;
                if let Some(n) = self.nodes.get_mut(lt) {
                    n.deadline = Some(at);
                }
                self.timers.push(Reverse((at, lt)));
            }
        }
        if let Some(&Op::Cancel { target }) = self.nodes.get(id).map(|n| &n.op) {
            let res = self.cancel_target(target, mem);
            if let Some(node) = self.take_node(id) {
                self.finish(node, res, 0, mem);
            }
            return;
        }
        self.attempt(id, mem);
    }

    /// Tries the syscall of started operation `id` once more.
    fn attempt(&mut self, id: u64, mem: &mut KeyMap<OpMemory>) {
        let Some(node) = self.nodes.get(id) else {
            return;
        };
        let (ud, op, mut restore) = (node.ud, node.op.clone(), node.restore_flags);
        let outcome = self.try_op(&op, ud, &mut restore, mem);
        if let Some(n) = self.nodes.get_mut(id) {
            n.restore_flags = restore;
        }
        match outcome {
            Try::Done(res) => {
                if let Some(node) = self.unlink(id) {
                    self.finish(node, res, 0, mem);
                }
            }
            parked => self.park(id, parked, mem),
        }
    }

    /// Parks recorded operation `id` as `how` says: on its descriptor, or
    /// until its deadline.
    fn park(&mut self, id: u64, how: Try, mem: &mut KeyMap<OpMemory>) {
        match how {
            Try::Done(_) => {}
            Try::Wait(fd) => self.wait_on(fd, id, mem),
            Try::Sleep(at) => {
                if let Some(n) = self.nodes.get_mut(id) {
                    n.deadline = Some(at);
                }
                self.timers.push(Reverse((at, id)));
            }
        }
    }

    /// Parks `id` on `fd` and makes sure epoll reports `fd`. An operation
    /// tried again after a readiness report is still parked and needs
    /// nothing more: its EAGAIN means the next arrival is a new edge.
    fn wait_on(&mut self, fd: RawFd, id: u64, mem: &mut KeyMap<OpMemory>) {
        let st = self.fds.entry(fd).or_default();
        if st.waiting.contains(&id) {
            return;
        }
        st.waiting.push(id);
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
                st.waiting.retain(|w| *w != id);
                if let Some(node) = self.take_node(id) {
                    self.finish(node, -errno(&e), 0, mem);
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
        for &id in &waiting {
            let Some(node) = self.nodes.get(id) else {
                continue;
            };
            let wanted = interest(&node.op);
            if bits & wanted == 0 {
                self.fds.entry(fd).or_default().waiting.push(id);
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
                    self.fds.entry(fd).or_default().waiting.push(id);
                } else if let Some(node) = self.take_node(id) {
                    self.finish(node, revents as i32, 0, mem);
                }
                continue;
            }
            self.fds.entry(fd).or_default().waiting.push(id);
            self.attempt(id, mem);
        }
        waiting.clear();
        self.spare_wait = waiting;
    }

    /// The completion of an operation `op` (recorded or not) with `res`:
    /// puts back the file flags a CONNECT changed, forgets a closed
    /// descriptor, queues the CQE.
    fn completed(&mut self, ud: u64, op: &Op, restore: Option<i32>, res: i32, flags: u32) {
        match (restore, op) {
            (Some(f), Op::Connect { desc: Desc::Fd(fd) }) => {
                // SAFETY: fcntl on a descriptor number with an integer argument.
                let _ = unsafe { libc::fcntl(*fd, libc::F_SETFL, f) };
            }
            // A close that ran forgot its descriptor before closing it.
            (_, Op::Close { fd }) if res < 0 => {
                self.forget_fd(*fd);
            }
            _ => {}
        }
        self.cq.push_back(Cqe {
            user_data: ud,
            result: res,
            flags,
        });
    }

    /// Drops what is known of `fd` (it is closed, or about to be).
    fn forget_fd(&mut self, fd: RawFd) -> Option<FdState> {
        let st = self.fds.remove(&fd)?;
        if st.pending_err.is_some() {
            self.pending_errs -= 1;
        }
        Some(st)
    }

    /// Completes recorded `node` with `res`, then starts its successor (on
    /// success) or cancels the rest of its chain.
    fn finish(&mut self, node: Node, res: i32, flags: u32, mem: &mut KeyMap<OpMemory>) {
        self.completed(node.ud, &node.op, node.restore_flags, res, flags);
        if let Some(lt) = node.link_timeout {
            if let Some(t) = self.take_node(lt) {
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

    /// Completes `id` and everything linked after it with -ECANCELED.
    fn cancel_chain(&mut self, id: u64, mem: &mut KeyMap<OpMemory>) {
        if let Some(node) = self.unlink(id) {
            self.finish(node, -libc::ECANCELED, 0, mem);
        }
    }

    /// Takes the error a connect left for `fd`'s next recv or send.
    fn take_pending_err(&mut self, fd: RawFd) -> Option<i32> {
        if self.pending_errs == 0 {
            return None;
        }
        let err = self.fds.get_mut(&fd)?.pending_err.take()?;
        self.pending_errs -= 1;
        Some(err)
    }

    /// Leaves `err` for `fd`'s next recv or send.
    fn set_pending_err(&mut self, fd: RawFd, err: Option<i32>) {
        let st = self.fds.entry(fd).or_default();
        let was = st.pending_err.is_some();
        st.pending_err = err;
        match (was, err.is_some()) {
            (false, true) => self.pending_errs += 1,
            (true, false) => self.pending_errs -= 1,
            _ => {}
        }
    }
}
