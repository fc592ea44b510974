//! Per-core shard threads: pinning, the io_uring, the wake-up eventfd and the
//! run loop. The same machinery carries the listener's accept path and the
//! connector's connect path: each is a [`Service`] the loop drives.
//!
//! One turn of the loop is one `io_uring_enter`: submit what the services
//! queued, wait for at least one completion, drain every completion, let
//! the services act on the batch, repeat.

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

/// User data layout: the top byte is the [`Tag`]; the rest is the service's.
const TAG_SHIFT: u32 = 56;

/// What an operation belongs to, in the top byte of its user data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Tag {
    /// The shard's own wake-up eventfd read.
    Wake = 1,
    /// The listener's accept operation.
    Accept = 2,
    /// A cancel the shard posted (its result is not interesting).
    Cancel = 3,
    /// The accept backoff timer.
    Backoff = 4,
    /// A linked reply SEND posted by `reply_and_close`.
    ReplySend = 5,
    /// The CLOSE linked after a reply.
    ReplyClose = 6,
    /// Admission: MSG_PEEK of a pending connection's first bytes.
    Peek = 7,
    /// Admission: the shard's deadline timer (pending timeouts, defers).
    AdmitTimer = 8,
    /// Admission: a poll on a pending or registered connection.
    Poll = 9,
    /// Admission: a reply SEND before accept or reject.
    AdmitSend = 10,
    /// Admission: a CLOSE after a reject.
    AdmitClose = 11,
    /// Connect side: SOCKET creation.
    ConnectSocket = 16,
    /// Connect side: the CONNECT operation.
    Connect = 17,
    /// Connect side: the LINK_TIMEOUT linked to a CONNECT.
    ConnectTimeout = 18,
    /// Connect side: a SEND of a connection's payload.
    ConnectSend = 19,
    /// Connect side: a RECV of a connection's response.
    ConnectRecv = 20,
    /// Connect side: a CLOSE.
    ConnectClose = 21,
    /// Connect side: a timer.
    ConnectTimer = 22,
    /// Connect side: a CONNECT to AF_UNSPEC that ends a sequence (RST) and
    /// keeps its socket for the next one.
    ConnectDisconnect = 24,
    /// Connect side: the CLOSE of a kept socket at the end of a run.
    ConnectUnpark = 25,
    /// Relay: the CONNECT of a relay's upstream socket.
    RelayConnect = 40,
    /// Relay: the LINK_TIMEOUT linked to a relay's CONNECT.
    RelayConnectTimeout = 41,
    /// Relay: a RECV of one direction of a relay.
    RelayRecv = 42,
    /// Relay: a SEND of one direction of a relay.
    RelaySend = 43,
    /// Relay: a SHUTDOWN(SHUT_WR) ending one direction of a relay.
    RelayShutdown = 44,
    /// Relay: the CLOSE of one of a relay's sockets.
    RelayClose = 45,
    /// Relay: the shard's idle-scan timer.
    RelayTimer = 46,
    /// Registrations: the multishot poll on a registered connection.
    RegPoll = 48,
}

impl Tag {
    fn from_u8(v: u8) -> Option<Tag> {
        const ALL: [Tag; 28] = [
            Tag::Wake,
            Tag::Accept,
            Tag::Cancel,
            Tag::Backoff,
            Tag::ReplySend,
            Tag::ReplyClose,
            Tag::Peek,
            Tag::AdmitTimer,
            Tag::Poll,
            Tag::AdmitSend,
            Tag::AdmitClose,
            Tag::ConnectSocket,
            Tag::Connect,
            Tag::ConnectTimeout,
            Tag::ConnectSend,
            Tag::ConnectRecv,
            Tag::ConnectClose,
            Tag::ConnectTimer,
            Tag::ConnectDisconnect,
            Tag::ConnectUnpark,
            Tag::RelayConnect,
            Tag::RelayConnectTimeout,
            Tag::RelayRecv,
            Tag::RelaySend,
            Tag::RelayShutdown,
            Tag::RelayClose,
            Tag::RelayTimer,
            Tag::RegPoll,
        ];
        ALL.into_iter().find(|t| *t as u8 == v)
    }
}

/// Builds user data from a tag and a 56-bit payload.
pub(crate) fn user_data(tag: Tag, payload: u64) -> u64 {
    ((tag as u64) << TAG_SHIFT) | (payload & ((1 << TAG_SHIFT) - 1))
}

/// Splits user data into its tag and payload.
pub(crate) fn split(user_data: u64) -> (Option<Tag>, u64) {
    (
        Tag::from_u8((user_data >> TAG_SHIFT) as u8),
        user_data & ((1 << TAG_SHIFT) - 1),
    )
}

/// What other threads share with a running shard: its stop flag and its
/// wake-up eventfd.
#[derive(Debug)]
pub(crate) struct ShardControl {
    stop: AtomicBool,
    wake_pending: AtomicBool,
    wake: OwnedFd,
}

impl ShardControl {
    pub fn new() -> Result<Self, Error> {
        Ok(ShardControl {
            stop: AtomicBool::new(false),
            wake_pending: AtomicBool::new(false),
            wake: sys::eventfd().map_err(|e| Error::setup("eventfd", e))?,
        })
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

    fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// Something a shard drives: it posts operations on the shard's ring and is
/// handed their completions.
pub(crate) trait Service: Send + 'static {
    /// Posts the service's first operations.
    fn start(&mut self, ring: &mut Driver) -> io::Result<()>;
    /// One completion of an operation the service posted.
    fn complete(&mut self, ring: &mut Driver, tag: Tag, payload: u64, cqe: Cqe, now: Instant);
    /// After each batch of completions and after each wake-up.
    fn turn(&mut self, ring: &mut Driver, now: Instant);
    /// Stop: cancel what is in flight; `idle` must become true eventually.
    fn stop(&mut self, ring: &mut Driver);
    /// Whether no operation of the service is in flight.
    fn idle(&self) -> bool;
    /// Last thing on the shard thread, after `idle`: release what is held.
    fn finish(&mut self);
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
            if let Some(core) = placement.core {
                // A refused pin (core offline, cpuset) leaves the thread
                // unpinned; steering still works, only locality is lost.
                let _ = core_affinity::set_for_current(core);
            }
            let (mut ring, choice) = match Driver::new(RING_ENTRIES, placement.backend) {
                Ok(r) => r,
                Err(e) => {
                    let op = if placement.backend == Backend::Epoll {
                        "epoll_create1"
                    } else {
                        "io_uring_setup"
                    };
                    let _ = tx.send(Err(Error::setup(op, e)));
                    return;
                }
            };
            let mut service = service;
            let started = service.start(&mut ring).and_then(|()| {
                ring.read_counter(control.wake.as_raw_fd(), user_data(Tag::Wake, 0))
            });
            if let Err(e) = started {
                service.stop(&mut ring);
                drive_to_idle(&mut ring, &mut service);
                service.finish();
                let _ = tx.send(Err(Error::setup("io_uring submit", e)));
                return;
            }
            let _ = tx.send(Ok(Started {
                setup: ring.setup(),
                backend: choice,
            }));
            run(&mut ring, &control, &mut service);
            service.finish();
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

/// The run loop: one `io_uring_enter` per turn.
fn run<S: Service>(ring: &mut Driver, control: &ShardControl, service: &mut S) {
    let mut batch = Vec::with_capacity(256);
    let mut wake_armed = true;
    let mut stopping = false;
    loop {
        if stopping && !wake_armed && service.idle() {
            return;
        }
        if let Err(e) = ring.submit_and_wait(1) {
            // Only a broken ring gets here (EBADF, EFAULT): nothing more can
            // be submitted or reaped, so stop the services and leave; memory
            // of in-flight operations is leaked by the ring's Drop, not freed.
            let _ = e;
            if !stopping {
                service.stop(ring);
            }
            return;
        }
        batch.clear();
        ring.drain(&mut batch);
        let now = Instant::now();
        for cqe in batch.drain(..) {
            match split(cqe.user_data) {
                (Some(Tag::Wake), _) => {
                    ring.release(cqe.user_data);
                    wake_armed = false;
                    control.wake_pending.store(false, Ordering::Release);
                }
                (Some(Tag::Cancel), _) => {}
                (Some(tag), payload) => service.complete(ring, tag, payload, cqe, now),
                (None, _) => {}
            }
        }
        if !stopping && control.stop_requested() {
            stopping = true;
            service.stop(ring);
            // Take the wake-up read back so the loop can end.
            if wake_armed
                && ring
                    .cancel(user_data(Tag::Wake, 0), user_data(Tag::Cancel, 0))
                    .is_err()
            {
                return;
            }
        }
        if !stopping && !wake_armed {
            match ring.read_counter(control.wake.as_raw_fd(), user_data(Tag::Wake, 0)) {
                Ok(()) => wake_armed = true,
                Err(_) => {
                    stopping = true;
                    service.stop(ring);
                }
            }
        }
        service.turn(ring, now);
        if let Some(pause) = service.pause() {
            // Submit first: a reply or close left queued would wait out the
            // pause (PERF-NOTES measured p50 314 µs that way).
            if !stopping && ring.submit().is_ok() {
                std::thread::sleep(pause);
            }
        }
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
            if let (Some(tag), payload) = split(cqe.user_data) {
                if !matches!(tag, Tag::Wake | Tag::Cancel) {
                    service.complete(ring, tag, payload, cqe, now);
                }
            }
        }
    }
}
