//! The running listener and its delivery: blocking `accept()`,
//! `try_accept()`, `accept_timeout()` and the accept event fd share one path
//! over the shards' backlog rings.
//!
//! The accept event is an eventfd that is readable while connections are
//! pending in the rings (the seed's FD_ACCEPT notification): a shard that
//! pushes signals it once; a consumer that finds the rings empty clears it
//! and checks again, so a push racing with the clear re-signals. Blocking
//! accept waits on the same eventfd with `poll(2)`.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::admit::conn::Admitted;
use crate::driver::{sys, RingSetup};
use crate::error::Error;
use crate::listen::backlog::Backlog;
use crate::shard::ShardControl;
use crate::stats::{Counters, KernelQueue, ListenerStats};

/// A connection that waited in its ring this long is checked for a reset
/// before delivery.
pub(crate) const RESET_CHECK_AFTER: Duration = Duration::from_millis(1);

/// Listener-wide state of the notified accept.
///
/// Two ways to wait, each paid for only by whoever uses it:
/// - blocking `accept()` / `accept_timeout()` sleep on a condition variable
///   after announcing themselves in `waiters`; a shard that pushed a batch
///   wakes them only if someone waits (one futex wake per batch, none while
///   the consumer keeps finding work);
/// - the accept event is an eventfd a shard signals once per batch, and
///   only once the application has asked for it ([`Listener::accept_event`]):
///   a consumer that never uses it pays no eventfd syscall at all.
#[derive(Debug)]
pub(crate) struct Delivery {
    pub(crate) event: OwnedFd,
    signalled: AtomicBool,
    /// Whether the eventfd is in use (always for the connector; for a
    /// listener from its first `accept_event()`).
    event_used: AtomicBool,
    /// Connections pushed into rings and not yet popped (may run ahead of
    /// the rings by the pushes in progress, never behind).
    pub(crate) pending: AtomicUsize,
    pub(crate) closed: AtomicBool,
    /// Blocking consumers asleep or about to sleep on `wake`.
    waiters: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

impl Delivery {
    /// Delivery through the eventfd (the connector's completions).
    pub fn new() -> Result<Self, Error> {
        Self::with_event(true)
    }

    /// A listener's delivery: the eventfd is signalled only once asked for.
    pub fn for_listener() -> Result<Self, Error> {
        Self::with_event(false)
    }

    fn with_event(used: bool) -> Result<Self, Error> {
        Ok(Delivery {
            event: sys::eventfd().map_err(|e| Error::setup("eventfd", e))?,
            signalled: AtomicBool::new(false),
            event_used: AtomicBool::new(used),
            pending: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            waiters: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        })
    }

    /// Before a push: count it first so a consumer never sees the ring ahead
    /// of the count.
    pub fn will_push(&self) {
        self.pending.fetch_add(1, Ordering::SeqCst);
    }

    /// The push that `will_push` announced failed (ring full).
    pub fn push_failed(&self) {
        self.pending.fetch_sub(1, Ordering::SeqCst);
    }

    /// After a pop.
    pub fn popped(&self) {
        self.pending.fetch_sub(1, Ordering::SeqCst);
    }

    /// After a batch of pushes (or at shutdown): wakes blocking consumers
    /// if any wait, and makes the accept event readable if it is in use
    /// (one write until it is cleared).
    pub fn notify(&self) {
        // SeqCst pairs with `wait`: either we see its waiter count, or its
        // re-check (after counting itself) sees our push.
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let _g = self.lock.lock();
            self.wake.notify_all();
        }
        if self.event_used.load(Ordering::SeqCst) && !self.signalled.swap(true, Ordering::SeqCst) {
            sys::eventfd_signal(self.event.as_fd());
        }
    }

    /// Puts the accept event in use: from now on pushes signal it; what is
    /// already pending signals it now (SeqCst pairs with `notify`'s load).
    pub(crate) fn use_event(&self) {
        if !self.event_used.swap(true, Ordering::SeqCst) {
            self.quiesce();
        }
    }

    /// Clears the accept event, then re-signals if anything is pending or
    /// the listener closed meanwhile. Nothing when the event is not in use.
    ///
    /// The re-signal writes unconditionally: a shard that pushed between our
    /// `store(false)` and the clear saw `signalled == false`, set it and
    /// wrote, and the clear swallowed its write; `signalled` is then already
    /// true, so `notify` would not write again and the event would be lost.
    pub(crate) fn quiesce(&self) {
        if !self.event_used.load(Ordering::Relaxed) {
            return;
        }
        self.signalled.store(false, Ordering::SeqCst);
        sys::eventfd_clear(self.event.as_fd());
        if self.pending.load(Ordering::SeqCst) > 0 || self.closed.load(Ordering::SeqCst) {
            self.signalled.store(true, Ordering::SeqCst);
            sys::eventfd_signal(self.event.as_fd());
        }
    }

    /// Sleeps until a shard pushes, the listener closes, or `deadline`
    /// passes, unless `ready()` (asked after this thread counted itself as
    /// a waiter, under the lock a notifier takes) finds work already.
    fn wait(&self, deadline: Option<Instant>, ready: impl FnOnce() -> bool) {
        let guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.waiters.fetch_add(1, Ordering::SeqCst);
        if !ready() && !self.closed.load(Ordering::SeqCst) {
            match deadline {
                None => drop(self.wake.wait(guard)),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    drop(self.wake.wait_timeout(guard, left));
                }
            }
        } else {
            drop(guard);
        }
        self.waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a shard shares with the listener handle.
#[derive(Debug)]
pub(crate) struct ShardShared {
    pub backlog: Backlog,
    pub counters: Counters,
    pub control: Arc<ShardControl>,
    /// The shard's listening sockets, for the kernel's view in stats;
    /// empty once it stopped accepting.
    pub socket: Mutex<Vec<Arc<Socket>>>,
    error: Mutex<Option<io::Error>>,
    has_error: AtomicBool,
}

impl ShardShared {
    pub fn new(capacity: usize, control: Arc<ShardControl>, sockets: Vec<Arc<Socket>>) -> Self {
        ShardShared {
            backlog: Backlog::new(capacity),
            counters: Counters::default(),
            control,
            socket: Mutex::new(sockets),
            error: Mutex::new(None),
            has_error: AtomicBool::new(false),
        }
    }

    /// Drops the shard's references to its listening sockets (it stopped
    /// accepting on them).
    pub fn release_sockets(&self) {
        if let Ok(mut s) = self.socket.lock() {
            s.clear();
        }
    }

    /// Records an error for the next `accept()` to return.
    pub fn surface(&self, e: io::Error) {
        if let Ok(mut slot) = self.error.lock() {
            *slot = Some(e);
            self.has_error.store(true, Ordering::Release);
        }
    }

    /// Pops the next connection that can still be delivered, withdrawing
    /// (closing and counting) the ones that cannot: pending longer than
    /// `pending_timeout` (its client has most likely given up), or, with
    /// `reset_check`, reset by the peer while it waited in the ring at
    /// least [`RESET_CHECK_AFTER`] (`SO_ERROR` set: one getsockopt,
    /// PERF.md). `now` is the time to judge the wait by (`None`: the
    /// clock). Counts the one returned as delivered and wakes the shard
    /// when this pop ends its backpressure pause.
    pub fn take_deliverable(
        &self,
        delivery: &Delivery,
        pending_timeout: Duration,
        now: Option<Instant>,
        reset_check: bool,
    ) -> Option<crate::admit::pending::Pending> {
        while let Some((p, wake)) = self.backlog.pop() {
            delivery.popped();
            // A draining shard waits for its backlog to empty before it
            // stops: the pop that empties it tells the shard.
            if wake || (self.control.draining() && self.backlog.len() == 0) {
                self.control.wake();
            }
            if let Some(p) = self.deliverable(p, pending_timeout, now, reset_check) {
                return Some(p);
            }
        }
        None
    }

    /// `p`, counted delivered, unless it waited past `pending_timeout` or
    /// (with `reset_check`, after [`RESET_CHECK_AFTER`]) its peer reset it:
    /// then it is counted withdrawn and dropped, which closes it.
    pub fn deliverable(
        &self,
        p: crate::admit::pending::Pending,
        pending_timeout: Duration,
        now: Option<Instant>,
        reset_check: bool,
    ) -> Option<crate::admit::pending::Pending> {
        let waited = match now {
            Some(now) => now.saturating_duration_since(p.accepted_at),
            None => p.accepted_at.elapsed(),
        };
        if waited > pending_timeout {
            Counters::add(&self.counters.withdrawn_timeout, 1);
            return None; // drop closes it
        }
        // The getsockopt costs ~0.45 µs here (PERF.md): asked only of a
        // connection that sat in the ring; a reset in the first moments
        // is no different from one just after delivery.
        if reset_check
            && waited >= RESET_CHECK_AFTER
            && !matches!(socket2::SockRef::from(&p.fd).take_error(), Ok(None))
        {
            Counters::add(&self.counters.withdrawn_gone, 1);
            return None;
        }
        Counters::add(&self.counters.delivered, 1);
        Some(p)
    }

    /// A connection counted as delivered was gone (reset, no peer address)
    /// before the application saw it: it counts as withdrawn instead.
    #[cfg(feature = "tokio")]
    pub(crate) fn peer_gone_after_delivery(&self) {
        self.counters.delivered.fetch_sub(1, Ordering::Relaxed);
        Counters::add(&self.counters.withdrawn_gone, 1);
    }

    /// Whether an error waits for `accept()`.
    pub(crate) fn has_error(&self) -> bool {
        self.has_error.load(Ordering::Acquire)
    }

    pub(crate) fn take_error(&self) -> Option<io::Error> {
        if !self.has_error() {
            return None;
        }
        if !self.has_error.swap(false, Ordering::AcqRel) {
            return None;
        }
        self.error.lock().ok().and_then(|mut s| s.take())
    }
}

/// The backlog lengths: what was asked, the provider ceiling, and what is in
/// force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct BacklogLength {
    /// The length the application asked for.
    pub requested: usize,
    /// The provider ceiling (by default the kernel's `net.core.somaxconn`).
    pub ceiling: usize,
    /// `min(requested, ceiling)`: each shard's ring capacity and the length
    /// passed to `listen(2)`.
    pub effective: usize,
    /// The accept queue the kernel keeps per shard: `listen(2)` silently
    /// caps `effective` at `net.core.somaxconn`, so with an explicit ceiling
    /// above that this is less than `effective` (the ring still holds
    /// `effective`; the kernel queue behind it holds this many).
    pub kernel: usize,
}

/// A running listener: one shard per core, each accepting on its own
/// `SO_REUSEPORT` socket into its own backlog ring.
///
/// Built with [`Listener::builder`]. Connections are delivered either to
/// the inline handler given to the builder, or to [`Listener::accept`],
/// [`Listener::try_accept`] and [`Listener::accept_timeout`], which any
/// number of threads may call; [`Listener::accept_event`] is a descriptor
/// for callers with their own event loop. Dropping the listener shuts it
/// down.
///
/// ```
/// use std::io::Read;
/// use std::net::TcpStream;
/// use floodgate::Listener;
///
/// let listener = Listener::builder("127.0.0.1:0".parse()?).shards(1).build()?;
/// let mut client = TcpStream::connect(listener.local_addr())?;
/// let conn = listener.accept()?;
/// drop(conn); // closes it
/// let mut buf = [0u8; 1];
/// assert_eq!(client.read(&mut buf)?, 0); // EOF
/// listener.shutdown();
/// assert!(listener.stats().conserved());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Listener {
    pub(crate) shards: Vec<Arc<ShardShared>>,
    pub(crate) delivery: Arc<Delivery>,
    pub(crate) threads: Mutex<Vec<JoinHandle<()>>>,
    pub(crate) local_addr: SocketAddr,
    pub(crate) backlog: BacklogLength,
    pub(crate) inline: bool,
    /// The application drives the shards (`build_driven`).
    pub(crate) driven: bool,
    pub(crate) next: AtomicUsize,
    pub(crate) setup: RingSetup,
    pub(crate) backend: Option<crate::driver::BackendChoice>,
    pub(crate) pending_timeout: Duration,
    /// The open-connection count, with a maximum.
    pub(crate) open: Option<Arc<crate::admit::slot::OpenCount>>,
    pub(crate) steering: crate::listen::group::SteeringInForce,
    /// Every listening socket, in group order, while the listener may
    /// still hand them over; emptied by drain and shutdown.
    pub(crate) group: Mutex<Vec<Arc<Socket>>>,
}

impl Listener {
    /// The address the shards listen on (the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The backlog lengths; `effective` is `min(requested, ceiling)`.
    pub fn backlog(&self) -> BacklogLength {
        self.backlog
    }

    /// How the kernel spreads connections over the shards' sockets: the
    /// CPU program on a group of this listener's own, or the kernel's
    /// choice on `SO_INCOMING_CPU` after joining the group of listeners
    /// that were on the port first (another instance, or one that died).
    pub fn steering(&self) -> crate::listen::group::SteeringInForce {
        self.steering
    }

    /// The number of shards.
    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// How the shards' rings were set up (the same for all).
    pub fn ring_setup(&self) -> RingSetup {
        self.setup
    }

    /// The backend the shards run on, and why it was chosen ("asked for",
    /// "io_uring available", or the refusal that made `Auto` fall back to
    /// epoll).
    pub fn backend(&self) -> crate::driver::BackendChoice {
        self.backend
            .clone()
            .unwrap_or_else(crate::driver::BackendChoice::none_started)
    }

    /// Takes the next pending connection from any shard, without waiting.
    ///
    /// # Errors
    /// [`Error::Closed`] after shutdown; [`Error::Accept`] once for a
    /// shard's accept error that is neither transient nor exhaustion (the
    /// shard keeps retrying); [`Error::InlineDelivery`] when the listener
    /// delivers to an inline handler.
    pub fn try_accept(&self) -> Result<Option<Admitted>, Error> {
        let mut got = None;
        self.take(1, true, &mut |c| got = Some(c))?;
        Ok(got)
    }

    /// Takes up to `max` pending connections from the shards, without
    /// waiting, appending them to `out`; returns how many. One call drains
    /// a batch for the cost of one: the rings are visited once and the
    /// accept event (if in use) is cleared at most once.
    ///
    /// ```
    /// use std::net::TcpStream;
    /// use floodgate::Listener;
    ///
    /// let listener = Listener::builder("127.0.0.1:0".parse()?).shards(1).build()?;
    /// let _clients: Vec<_> = (0..3)
    ///     .map(|_| TcpStream::connect(listener.local_addr()))
    ///     .collect::<Result<_, _>>()?;
    /// let mut conns = Vec::new();
    /// while conns.len() < 3 {
    ///     if listener.accept_many(&mut conns, 64)? == 0 {
    ///         listener.accept_timeout(std::time::Duration::from_secs(5))?
    ///             .map(|c| conns.push(c));
    ///     }
    /// }
    /// assert_eq!(conns.len(), 3);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`Listener::try_accept`]; a shard's accept error is returned only
    /// when no connection was taken (it waits for the next call otherwise).
    pub fn accept_many(&self, out: &mut Vec<Admitted>, max: usize) -> Result<usize, Error> {
        self.take(max, true, &mut |c| out.push(c))
    }

    /// As [`Listener::accept_many`], for a caller that asks each
    /// connection's peer address at once (the tokio listener): a peer
    /// that reset while its connection waited in the ring has none, which
    /// finds it as the ring's own check (`SO_ERROR` after a millisecond)
    /// would, so that check is not made twice.
    #[cfg(feature = "tokio")]
    pub(crate) fn accept_many_asking_peer(
        &self,
        out: &mut Vec<Admitted>,
        max: usize,
    ) -> Result<usize, Error> {
        self.take(max, false, &mut |c| out.push(c))
    }

    /// The one delivery path of `try_accept`, `accept_many`, `accept` and
    /// `accept_timeout`: up to `max` connections to `sink`, round-robin over
    /// the shards from a rotating start.
    fn take(
        &self,
        max: usize,
        reset_check: bool,
        sink: &mut dyn FnMut(Admitted),
    ) -> Result<usize, Error> {
        if self.inline {
            return Err(Error::InlineDelivery);
        }
        if self.driven {
            return Err(Error::DrivenDelivery);
        }
        if self.delivery.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        let n = self.shards.len();
        let start = if n > 1 {
            self.next.fetch_add(1, Ordering::Relaxed)
        } else {
            0
        };
        let mut taken = 0;
        for i in 0..n {
            let index = (start + i) % n;
            let shard = &self.shards[index];
            if taken == 0 {
                if let Some(e) = shard.take_error() {
                    return Err(Error::Accept {
                        shard: index,
                        source: e,
                    });
                }
            }
            while taken < max {
                let Some(p) =
                    shard.take_deliverable(&self.delivery, self.pending_timeout, None, reset_check)
                else {
                    break;
                };
                sink(Admitted::new(p, index));
                taken += 1;
            }
            if taken == max {
                break;
            }
        }
        if taken == 0 || self.delivery.pending.load(Ordering::SeqCst) == 0 {
            self.delivery.quiesce();
        }
        Ok(taken)
    }

    /// Whether a blocking accept has anything to look at.
    fn ready(&self) -> bool {
        self.delivery.pending.load(Ordering::SeqCst) > 0
            || self.shards.iter().any(|s| s.has_error())
    }

    /// Waits for the next pending connection from any shard. A consumer
    /// that finds one takes it without a syscall; one that finds none
    /// sleeps until a shard's batch wakes it (one wake-up per batch).
    ///
    /// # Errors
    /// As [`Listener::try_accept`].
    pub fn accept(&self) -> Result<Admitted, Error> {
        loop {
            if let Some(c) = self.try_accept()? {
                return Ok(c);
            }
            self.delivery.wait(None, || self.ready());
        }
    }

    /// Waits at most `timeout` for the next pending connection.
    ///
    /// # Errors
    /// As [`Listener::accept`]. `Ok(None)` when the time ran out.
    pub fn accept_timeout(&self, timeout: Duration) -> Result<Option<Admitted>, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.try_accept()? {
                return Ok(Some(c));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            self.delivery.wait(Some(deadline), || self.ready());
        }
    }

    /// See [`ShardShared::peer_gone_after_delivery`].
    #[cfg(feature = "tokio")]
    pub(crate) fn peer_gone_after_delivery(&self, shard: usize) {
        if let Some(s) = self.shards.get(shard) {
            s.peer_gone_after_delivery();
        }
    }

    /// The accept event: a descriptor that is readable while connections
    /// are pending (and after shutdown, so waiters wake up). Register it
    /// for readability in any event loop (poll, epoll, mio), then call
    /// [`Listener::try_accept`] until it returns `Ok(None)`, which also
    /// clears the event. Do not read from it.
    pub fn accept_event(&self) -> BorrowedFd<'_> {
        self.delivery.use_event();
        self.delivery.event.as_fd()
    }

    /// A snapshot of every shard's counters, with the kernel's view of its
    /// listening socket while open.
    pub fn stats(&self) -> ListenerStats {
        let shards = self
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut st = s.counters.snapshot(i);
                st.moderation = s.control.moderation.snapshot();
                st.coalesced_pauses = st.moderation.pauses;
                st.ring_depth = s.backlog.len();
                st.pending += st.ring_depth as u64;
                st.ring_high_water = s.backlog.high_water();
                st.ring_capacity = s.backlog.capacity();
                st.kernel = s.socket.lock().ok().and_then(|g| {
                    let queues: Vec<_> = g
                        .iter()
                        .filter_map(|sock| sys::listener_queue(sock.as_fd()).ok())
                        .collect();
                    (!queues.is_empty()).then(|| KernelQueue {
                        accept_queue: queues.iter().map(|q| q.0).sum(),
                        backlog: queues.iter().map(|q| q.1).sum(),
                    })
                });
                st
            })
            .collect();
        ListenerStats {
            shards,
            open: self.open.as_ref().map(|o| o.snapshot()),
        }
    }

    /// Whether [`Listener::drain`] was called: the listener has stopped
    /// accepting, or is stopping (what a readiness probe reports while the
    /// work under way finishes).
    pub fn is_draining(&self) -> bool {
        self.shards.iter().any(|s| s.control.draining())
    }

    /// Stops accepting, closes the listening sockets, closes (and counts as
    /// `closed_at_shutdown`) every connection not yet delivered, and joins
    /// the shard threads. Waiting `accept()` calls return [`Error::Closed`].
    /// Idempotent; `Drop` calls it.
    pub fn shutdown(&self) {
        if self.delivery.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        for s in &self.shards {
            s.control.stop();
        }
        let threads = match self.threads.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        for t in threads {
            let _ = t.join();
        }
        for s in &self.shards {
            // A shard thread that died by panic could not drain its ring.
            let mut closed = 0;
            while let Some((p, _)) = s.backlog.pop() {
                self.delivery.popped();
                drop(p);
                closed += 1;
            }
            Counters::add(&s.counters.closed_at_shutdown, closed);
            s.release_sockets();
        }
        if let Ok(mut g) = self.group.lock() {
            g.clear();
        }
        self.delivery.notify();
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.shutdown();
    }
}
