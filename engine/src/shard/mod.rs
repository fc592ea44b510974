//! Per-core shard threads: pinning, the io_uring, the wake-up eventfd and the
//! run loop. The same machinery carries the listener's accept path and the
//! connector's connect path: each is a [`Service`] the loop drives.
//!
//! One turn of the loop is one `io_uring_enter`: submit what the services
//! queued, wait for at least one completion, drain every completion, let
//! the services act on the batch, repeat.
//!
//! A completion is routed by the top byte of its user data, the kind of its
//! operation: the shard keeps its wake-up read and cancels ([`ShardOp`]) and
//! hands every other kind to its service, which names its own kinds
//! ([`op_kinds!`]) and routes them to its parts.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crate::driver::{sys, Backend, BackendChoice, Cqe, Driver, RingSetup};
use crate::error::Error;

/// Submission-queue slots per shard ring.
const RING_ENTRIES: u32 = 256;

/// User data layout: the top byte is the operation's kind; the other 56
/// bits are the payload of whoever posted it.
const KIND_SHIFT: u32 = 56;

/// Defines the kinds of operation one owner posts: a `#[repr(u8)]` enum
/// whose values are the top byte of their user data. The shard knows only
/// its own ([`ShardOp`]); each service defines its own next to the code that
/// posts them, with values no other owner uses (the crate's tests check
/// that every kind is unique).
macro_rules! op_kinds {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $($(#[$vmeta:meta])* $variant:ident = $value:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(u8)]
        $vis enum $name {
            $($(#[$vmeta])* $variant = $value,)+
        }

        impl $name {
            /// Every kind, for the uniqueness test.
            #[cfg(test)]
            pub(crate) const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The kind whose value is `byte`, if it is one of these.
            pub(crate) fn from_byte(byte: u8) -> Option<Self> {
                match byte {
                    $($value => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl From<$name> for u8 {
            fn from(kind: $name) -> u8 {
                kind as u8
            }
        }
    };
}
pub(crate) use op_kinds;

op_kinds! {
    /// The operations the shard itself tells apart: everything else goes to
    /// its service, which routes it by its own kinds.
    pub(crate) enum ShardOp {
        /// The shard's own wake-up eventfd read.
        Wake = 1,
        /// A cancel (posted by the shard or a service; its result is not
        /// interesting).
        Cancel = 3,
    }
}

/// Builds user data from an operation kind and a 56-bit payload.
pub(crate) fn user_data(kind: impl Into<u8>, payload: u64) -> u64 {
    ((kind.into() as u64) << KIND_SHIFT) | (payload & ((1 << KIND_SHIFT) - 1))
}

/// Splits user data into its kind and payload.
pub(crate) fn split(user_data: u64) -> (u8, u64) {
    (
        (user_data >> KIND_SHIFT) as u8,
        user_data & ((1 << KIND_SHIFT) - 1),
    )
}

/// What other threads share with a running shard: its stop flag and its
/// wake-up eventfd.
#[derive(Debug)]
pub(crate) struct ShardControl {
    stop: AtomicBool,
    drain: AtomicBool,
    wake_pending: AtomicBool,
    wake: OwnedFd,
    /// The shard has finished (its thread ended, or a driven shard was
    /// stopped and finished).
    finished: AtomicBool,
    /// A thread waiting for the shard to finish ([`Listener::drain`]),
    /// unparked when it does.
    ///
    /// [`Listener::drain`]: crate::Listener::drain
    watcher: std::sync::Mutex<Option<std::thread::Thread>>,
}

impl ShardControl {
    pub fn new() -> Result<Self, Error> {
        Ok(ShardControl {
            stop: AtomicBool::new(false),
            drain: AtomicBool::new(false),
            wake_pending: AtomicBool::new(false),
            wake: sys::eventfd().map_err(|e| Error::setup("eventfd", e))?,
            finished: AtomicBool::new(false),
            watcher: std::sync::Mutex::new(None),
        })
    }

    /// Whether a drain was asked for.
    pub fn draining(&self) -> bool {
        self.drain.load(Ordering::Relaxed)
    }

    /// Whether the shard has finished.
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::SeqCst)
    }

    /// Makes the calling thread the one unparked when the shard finishes.
    /// Check [`ShardControl::is_finished`] after: a shard that finished
    /// before this call unparks no one.
    pub fn watch(&self) {
        if let Ok(mut w) = self.watcher.lock() {
            *w = Some(std::thread::current());
        }
    }

    /// Marks the shard finished and unparks its watcher (idempotent).
    pub fn mark_finished(&self) {
        self.finished.store(true, Ordering::SeqCst);
        if let Ok(mut w) = self.watcher.lock() {
            if let Some(t) = w.take() {
                t.unpark();
            }
        }
    }

    /// Interrupts the shard's wait (at most one eventfd write until the
    /// shard has seen it).
    pub fn wake(&self) {
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            sys::eventfd_signal(self.wake.as_fd());
        }
    }

    /// Asks the shard to stop and wakes it.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake();
    }

    /// Asks the shard to drain (see [`Service::drain`]) and wakes it; it
    /// stops by itself once drained.
    pub fn drain(&self) {
        self.drain.store(true, Ordering::SeqCst);
        self.wake();
    }

    fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// Something a shard drives: it posts operations on the shard's ring and is
/// handed their completions.
pub(crate) trait Service: Send + 'static {
    /// Posts the service's first operations.
    fn start(&mut self, ring: &mut Driver) -> io::Result<()>;
    /// One completion of an operation the service posted: `kind` is the
    /// top byte of its user data, one of the service's own kinds (a kind it
    /// does not know is ignored), `payload` the rest.
    fn complete(&mut self, ring: &mut Driver, kind: u8, payload: u64, cqe: Cqe, now: Instant);
    /// After each batch of completions and after each wake-up.
    fn turn(&mut self, ring: &mut Driver, now: Instant);
    /// Stop: cancel what is in flight; `idle` must become true eventually.
    fn stop(&mut self, ring: &mut Driver);
    /// Whether no operation of the service is in flight.
    fn idle(&self) -> bool;
    /// Last thing on the shard thread, after `idle`: release what is held.
    fn finish(&mut self);
    /// Drain: stop taking new work (a listener stops accepting) and let
    /// what is under way finish; the shard stops once `drained`.
    fn drain(&mut self, _ring: &mut Driver) {}
    /// Whether a drain has finished all the work it let run.
    fn drained(&self) -> bool {
        false
    }
    /// Wake-up coalescing, asked after each turn: `Some(d)` makes the
    /// shard submit what is queued and pause `d` before waiting again, so
    /// that the next wait finds a batch instead of a single completion.
    /// The default never pauses.
    fn pause(&mut self) -> Option<std::time::Duration> {
        None
    }
}

/// Load-adaptive wake-up coalescing for a listener's shards: after a turn
/// that took at least `threshold` connections from the kernel, the shard
/// submits what it queued and pauses `pause` before waiting again. Under
/// load this turns one wake-up per connection into one per batch; at light
/// load turns never reach the threshold, so it never pauses and adds no
/// latency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coalesce {
    /// Connections one turn must accept before the shard pauses.
    pub threshold: usize,
    /// How long it pauses.
    pub pause: std::time::Duration,
}

impl Default for Coalesce {
    /// 8 connections, 50 µs: the setting measured in PERF-NOTES.
    fn default() -> Self {
        Coalesce {
            threshold: 8,
            pause: std::time::Duration::from_micros(50),
        }
    }
}

/// Where and how a shard thread runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Placement {
    pub index: usize,
    pub core: Option<core_affinity::CoreId>,
    /// The backend asked for.
    pub backend: Backend,
}

/// What a started shard runs on.
#[derive(Debug, Clone)]
pub(crate) struct Started {
    pub setup: RingSetup,
    pub backend: BackendChoice,
}

/// One shard: its driver, its wake-up state and the service it runs. The
/// engine's threads run it in [`spawn`]'s loop; an application-driven
/// shard calls [`Shard::turn`] without waiting from the application's own
/// thread.
pub(crate) struct Shard<S: Service> {
    pub ring: Driver,
    pub control: Arc<ShardControl>,
    pub service: S,
    batch: Vec<Cqe>,
    wake_armed: bool,
    stopping: bool,
    draining: bool,
    started: bool,
    finished: bool,
}

impl<S: Service> std::fmt::Debug for Shard<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("ring", &self.ring)
            .field("stopping", &self.stopping)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl<S: Service> Shard<S> {
    /// A shard on `ring`, not started.
    pub fn new(ring: Driver, control: Arc<ShardControl>, service: S) -> Self {
        Shard {
            ring,
            control,
            service,
            batch: Vec::with_capacity(256),
            wake_armed: false,
            stopping: false,
            draining: false,
            started: false,
            finished: false,
        }
    }

    /// Posts the service's first operations and the wake-up read. On error
    /// what was posted is driven to its end and released.
    pub fn start(&mut self) -> io::Result<()> {
        let started = self.service.start(&mut self.ring).and_then(|()| {
            self.ring
                .read_counter(self.control.wake.as_raw_fd(), user_data(ShardOp::Wake, 0))
        });
        if let Err(e) = started {
            self.service.stop(&mut self.ring);
            drive_to_idle(&mut self.ring, &mut self.service);
            self.finish();
            return Err(e);
        }
        self.wake_armed = true;
        self.started = true;
        Ok(())
    }

    /// Whether [`Shard::start`] succeeded.
    pub fn started(&self) -> bool {
        self.started
    }

    /// Whether the shard has stopped and its service is idle: the next
    /// [`Shard::turn`] would return false.
    pub fn stopped_and_idle(&self) -> bool {
        self.stopping && !self.wake_armed && self.service.idle()
    }

    /// Whether the shard stopped and everything it posted has ended.
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// One turn: submit what the services queued, take the completions
    /// (waiting for at least one when `wait`, else only what is ready),
    /// route them, let the service act. Returns false once the shard has
    /// stopped and its service is idle (then call [`Shard::finish`]).
    pub fn turn(&mut self, wait: bool) -> bool {
        if self.finished {
            return false;
        }
        if self.stopped_and_idle() {
            return false;
        }
        let reaped = if wait {
            self.ring.submit_and_wait(1)
        } else {
            self.ring.reap()
        };
        if reaped.is_err() {
            // Only a broken ring gets here (EBADF, EFAULT): nothing more can
            // be submitted or reaped, so stop the services and leave; memory
            // of in-flight operations is leaked by the ring's Drop, not freed.
            if !self.stopping {
                self.stopping = true;
                self.service.stop(&mut self.ring);
            }
            self.wake_armed = false;
            return false;
        }
        self.batch.clear();
        self.ring.drain(&mut self.batch);
        let now = Instant::now();
        let ring = &mut self.ring;
        for cqe in self.batch.drain(..) {
            let (kind, payload) = split(cqe.user_data);
            match ShardOp::from_byte(kind) {
                Some(ShardOp::Wake) => {
                    ring.release(cqe.user_data);
                    self.wake_armed = false;
                    self.control.wake_pending.store(false, Ordering::Release);
                }
                Some(ShardOp::Cancel) => {}
                None => self.service.complete(ring, kind, payload, cqe, now),
            }
        }
        if !self.stopping && !self.draining && self.control.drain.load(Ordering::SeqCst) {
            self.draining = true;
            self.service.drain(ring);
        }
        if !self.stopping && self.control.stop_requested() {
            self.stopping = true;
            self.service.stop(ring);
            // Take the wake-up read back so the loop can end.
            if self.wake_armed
                && ring
                    .cancel(user_data(ShardOp::Wake, 0), user_data(ShardOp::Cancel, 0))
                    .is_err()
            {
                return false;
            }
        }
        if !self.stopping && !self.wake_armed {
            match ring.read_counter(self.control.wake.as_raw_fd(), user_data(ShardOp::Wake, 0)) {
                Ok(()) => self.wake_armed = true,
                Err(_) => {
                    self.stopping = true;
                    self.service.stop(ring);
                }
            }
        }
        self.service.turn(ring, now);
        if self.draining && !self.stopping && self.service.drained() {
            // Stop on the next turn, which the wake-up starts at once.
            self.control.stop();
        }
        if wait {
            if let Some(pause) = self.service.pause() {
                // Submit first: a reply or close left queued would wait out
                // the pause (PERF-NOTES measured p50 314 µs that way).
                if !self.stopping && ring.submit().is_ok() {
                    std::thread::sleep(pause);
                }
            }
        }
        true
    }

    /// Stops the shard (as a stop request would) and drives it, waiting,
    /// until everything it posted has ended; then [`Shard::finish`].
    pub fn stop_and_finish(&mut self) {
        if self.started {
            self.control.stop();
            while self.turn(true) {}
        }
        self.finish();
    }

    /// Last thing: the service releases what it holds (once).
    pub fn finish(&mut self) {
        if !self.finished {
            self.finished = true;
            self.service.finish();
            self.control.mark_finished();
        }
    }
}

/// Starts a shard thread running `service` and waits until its ring is set
/// up, so that a setup failure (no io_uring, a refused flag) comes back from
/// here, naming its cause.
pub(crate) fn spawn<S: Service>(
    name: &str,
    placement: Placement,
    control: Arc<ShardControl>,
    service: S,
) -> Result<(JoinHandle<()>, Started), Error> {
    let (tx, rx) = mpsc::sync_channel::<Result<Started, Error>>(1);
    let handle = std::thread::Builder::new()
        .name(format!("{name}-{}", placement.index))
        .spawn(move || {
            // Marks the shard finished however the thread ends (a panic
            // included), so a drain waiting for it is woken.
            struct Finished(Arc<ShardControl>);
            impl Drop for Finished {
                fn drop(&mut self) {
                    self.0.mark_finished();
                }
            }
            let _finished = Finished(control.clone());
            if let Some(core) = placement.core {
                // A refused pin (core offline, cpuset) leaves the thread
                // unpinned; steering still works, only locality is lost.
                let _ = core_affinity::set_for_current(core);
            }
            let (ring, choice) = match Driver::new(RING_ENTRIES, placement.backend) {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(Error::setup(setup_op(placement.backend), e)));
                    return;
                }
            };
            let mut shard = Shard::new(ring, control, service);
            if let Err(e) = shard.start() {
                let _ = tx.send(Err(Error::setup("io_uring submit", e)));
                return;
            }
            let _ = tx.send(Ok(Started {
                setup: shard.ring.setup(),
                backend: choice,
            }));
            while shard.turn(true) {}
            shard.finish();
        })
        .map_err(|e| Error::setup("thread spawn", e))?;
    match rx.recv() {
        Ok(Ok(started)) => Ok((handle, started)),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        Err(_) => {
            let _ = handle.join();
            Err(Error::setup(
                "shard start",
                io::Error::other("shard thread exited during setup"),
            ))
        }
    }
}

/// Sets up a shard for the application to drive: its driver is made here
/// (setup errors come back from `build()`), bound to the thread that first
/// drives it; nothing is posted until then.
pub(crate) fn prepare_driven<S: Service>(
    placement: Placement,
    control: Arc<ShardControl>,
    service: S,
) -> Result<(Shard<S>, Started), Error> {
    let (ring, choice) = Driver::new_driven(RING_ENTRIES, placement.backend)
        .map_err(|e| Error::setup(setup_op(placement.backend), e))?;
    let started = Started {
        setup: ring.setup(),
        backend: choice,
    };
    Ok((Shard::new(ring, control, service), started))
}

/// The setup call named in an error for `backend`.
fn setup_op(backend: Backend) -> &'static str {
    if backend == Backend::Epoll {
        "epoll_create1"
    } else {
        "io_uring_setup"
    }
}

/// Used when start failed: wait for whatever was posted to finish.
fn drive_to_idle<S: Service>(ring: &mut Driver, service: &mut S) {
    let mut batch = Vec::new();
    let now = Instant::now();
    while !service.idle() {
        if ring.submit_and_wait(1).is_err() {
            return;
        }
        batch.clear();
        ring.drain(&mut batch);
        for cqe in batch.drain(..) {
            let (kind, payload) = split(cqe.user_data);
            if ShardOp::from_byte(kind).is_none() {
                service.complete(ring, kind, payload, cqe, now);
            }
        }
    }
}
