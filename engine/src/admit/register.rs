//! Event registrations: the listener's declared interest, carried over to
//! every admitted connection on its shard's io_uring.
//!
//! With [`ListenerBuilder::register`](crate::ListenerBuilder::register),
//! each admitted connection is put in the shard's registry instead of its
//! backlog ring: one multishot POLL_ADD (5.13; re-posted whenever a
//! completion comes without `IORING_CQE_F_MORE`) watches it for the
//! declared [`Interest`], and each batch of events calls the listener's
//! registration handler on the shard thread with a [`Registered`] view of
//! the connection. The handler reads and writes it, and may
//! [`close`](Registered::close) it, [`take`](Registered::take) it (into
//! the backlog ring, for [`Listener::accept`](crate::Listener::accept)) or
//! [`release`](Registered::release) it (get the [`Admitted`] back). Until
//! then it stays registered.
//!
//! Registered sockets are non-blocking (the handler runs on the shard
//! thread and must never block); a taken or released socket gets its
//! blocking mode back. Poll events are edge-like: the handler is called
//! when the socket's state changes, so it should read until `WouldBlock`.
//!
//! A handler should close (or take) a connection once it reports
//! [`Events::is_hangup`] or [`Events::is_error`]; one kept after its
//! poll ended on a hang-up is closed by the engine (nothing more can
//! happen on it), one kept otherwise stays registered until shutdown.
//!
//! Counting: a registered connection is in
//! [`ShardStats::registered`](crate::ShardStats::registered) until it
//! leaves. Closed by the handler
//! (or after a final hang-up) it counts as `delivered`: it was delivered to
//! the registration handler, which finished it. Taken, it goes back to the
//! ring (`pending`) and counts as `delivered` once `accept()` returns it.
//! Released, it is `delivered`. Closed at shutdown, `closed_at_shutdown`.
//! So `accepted == delivered + rejected + withdrawn + closed_at_shutdown +
//! pending + registered` holds throughout.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::admit::conn::Admitted;
use crate::admit::pending::Pending;
use crate::driver::{Cqe, Driver};
use crate::shard::{op_kinds, user_data, ShardOp};
use crate::stats::Counters;

op_kinds! {
    /// The operations of event registrations.
    pub(crate) enum RegisterOp {
        /// The multishot poll on a registered connection.
        Poll = 48,
    }
}

const POLLIN: u32 = libc::POLLIN as u32;
const POLLOUT: u32 = libc::POLLOUT as u32;
const POLLRDHUP: u32 = libc::POLLRDHUP as u32;
const POLLHUP: u32 = libc::POLLHUP as u32;
const POLLERR: u32 = libc::POLLERR as u32;

/// The events a listener's registration watches on each admitted
/// connection. Hang-up and errors are always reported; `hangup` adds the
/// peer's half-close (`POLLRDHUP`).
///
/// ```
/// use floodgate::Interest;
///
/// let i = Interest::READABLE | Interest::HANGUP;
/// assert!(i.readable && i.hangup && !i.writable);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Interest {
    /// Data (or EOF) to read: `POLLIN`.
    pub readable: bool,
    /// Room to write: `POLLOUT`.
    pub writable: bool,
    /// The peer closed its side: `POLLRDHUP`.
    pub hangup: bool,
}

impl Interest {
    /// Readable only.
    pub const READABLE: Interest = Interest {
        readable: true,
        writable: false,
        hangup: false,
    };
    /// Writable only.
    pub const WRITABLE: Interest = Interest {
        readable: false,
        writable: true,
        hangup: false,
    };
    /// Hang-up only.
    pub const HANGUP: Interest = Interest {
        readable: false,
        writable: false,
        hangup: true,
    };

    /// The `poll(2)` bits.
    fn bits(self) -> u32 {
        let mut b = 0;
        if self.readable {
            b |= POLLIN;
        }
        if self.writable {
            b |= POLLOUT;
        }
        if self.hangup {
            b |= POLLRDHUP;
        }
        b
    }
}

impl std::ops::BitOr for Interest {
    type Output = Interest;

    fn bitor(self, o: Interest) -> Interest {
        Interest {
            readable: self.readable || o.readable,
            writable: self.writable || o.writable,
            hangup: self.hangup || o.hangup,
        }
    }
}

/// The events of one notification on a registered connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Events {
    bits: u32,
}

impl Events {
    /// From `poll(2)` bits.
    pub fn from_bits(bits: u32) -> Self {
        Events { bits }
    }

    /// The `poll(2)` bits (`POLLIN`, `POLLOUT`, `POLLRDHUP`, `POLLHUP`,
    /// `POLLERR`).
    pub fn bits(self) -> u32 {
        self.bits
    }

    /// Data, or EOF, to read.
    pub fn is_readable(self) -> bool {
        self.bits & POLLIN != 0
    }

    /// Room to write.
    pub fn is_writable(self) -> bool {
        self.bits & POLLOUT != 0
    }

    /// The peer closed (half-close `POLLRDHUP`, or both ways `POLLHUP`).
    pub fn is_hangup(self) -> bool {
        self.bits & (POLLRDHUP | POLLHUP) != 0
    }

    /// An error on the socket (`POLLERR`, e.g. a reset), or the poll failed.
    pub fn is_error(self) -> bool {
        self.bits & POLLERR != 0
    }
}

/// What the handler asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Keep,
    Close,
    Take,
}

/// A registered connection, as the registration handler sees it.
///
/// It reads and writes like a non-blocking [`TcpStream`] (`Read` and
/// `Write` are implemented; [`Registered::stream`] borrows the stream).
/// After [`Registered::release`] it holds no connection and reads and
/// writes fail with `NotConnected`.
#[derive(Debug)]
pub struct Registered<'a> {
    conn: Option<Admitted>,
    action: Action,
    was_nonblocking: bool,
    shard: usize,
    _shard: std::marker::PhantomData<&'a mut ()>,
}

impl Registered<'_> {
    /// The connection's stream (non-blocking); `None` after
    /// [`Registered::release`].
    pub fn stream(&self) -> Option<&TcpStream> {
        self.conn.as_ref().map(Admitted::as_std)
    }

    /// The shard it is registered on.
    pub fn shard(&self) -> usize {
        self.shard
    }

    /// The client's address.
    ///
    /// # Errors
    /// ENOTCONN if the client already reset it, or after `release`.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        match &self.conn {
            Some(c) => c.peer_addr(),
            None => Err(not_connected()),
        }
    }

    /// When the shard took it from the kernel.
    pub fn accepted_at(&self) -> Option<Instant> {
        self.conn.as_ref().map(Admitted::accepted_at)
    }

    /// What the condition attached when it accepted the connection, if it
    /// is a `T` (see [`Admitted::value`]); `None` after `release`.
    pub fn value<T: std::any::Any>(&self) -> Option<&T> {
        self.conn.as_ref()?.value::<T>()
    }

    /// Deregisters and closes it when the handler returns.
    pub fn close(&mut self) {
        self.action = Action::Close;
    }

    /// Deregisters it when the handler returns and delivers it to the
    /// listener's backlog ring, for [`Listener::accept`](crate::Listener::accept)
    /// (or the inline handler), in its original blocking mode.
    pub fn take(&mut self) {
        self.action = Action::Take;
    }

    /// Deregisters it and hands it over now, in its original blocking
    /// mode; `None` if already released.
    pub fn release(&mut self) -> Option<Admitted> {
        let conn = self.conn.take()?;
        let _ = conn.as_std().set_nonblocking(self.was_nonblocking);
        Some(conn)
    }
}

fn not_connected() -> io::Error {
    io::Error::from(io::ErrorKind::NotConnected)
}

impl Read for Registered<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.conn {
            Some(c) => c.read(buf),
            None => Err(not_connected()),
        }
    }
}

impl Write for Registered<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.conn {
            Some(c) => c.write(buf),
            None => Err(not_connected()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The registration handler: called on the shard thread for each batch of
/// events on a registered connection.
pub type RegisterHandler = dyn Fn(&mut Registered<'_>, Events) + Send + Sync;

/// A listener's registration: interest and handler.
#[derive(Clone)]
pub(crate) struct Registration {
    pub interest: Interest,
    pub handler: Arc<RegisterHandler>,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("interest", &self.interest)
            .finish_non_exhaustive()
    }
}

/// One registered connection.
#[derive(Debug)]
struct Slot {
    conn: Admitted,
    generation: u32,
    /// Whether the socket was non-blocking before it was registered.
    was_nonblocking: bool,
    /// Whether a poll of this generation is armed (its final CQE not seen).
    armed: bool,
}

fn payload(slot: usize, generation: u32) -> u64 {
    ((generation as u64) << 24) | (slot as u64 & 0xff_ffff)
}

fn unpack(payload: u64) -> (usize, u32) {
    ((payload & 0xff_ffff) as usize, (payload >> 24) as u32)
}

/// One shard's registered connections: a slab with generation-tagged
/// user data, so that a completion for a connection already gone (closed,
/// taken, and its slot reused) is recognised and ignored.
#[derive(Debug)]
pub(crate) struct Registry {
    reg: Registration,
    shard: usize,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    generation: u32,
    /// Admitted connections waiting for their poll to be posted.
    incoming: Vec<Pending>,
    /// Polls posted whose final completion has not come.
    in_flight: usize,
    /// Connections taken by the handler, for the acceptor's ring.
    pub taken: Vec<Pending>,
}

impl Registry {
    pub fn new(reg: Registration, shard: usize) -> Self {
        Registry {
            reg,
            shard,
            slots: Vec::new(),
            free: Vec::new(),
            generation: 0,
            incoming: Vec::new(),
            in_flight: 0,
            taken: Vec::new(),
        }
    }

    /// An admitted connection enters the registry (its poll is posted in
    /// the next [`Registry::arm_incoming`]).
    pub fn add(&mut self, p: Pending, c: &Counters) {
        Counters::add(&c.registered, 1);
        self.incoming.push(p);
    }

    /// Posts a multishot poll for each connection that entered.
    pub fn arm_incoming(&mut self, ring: &mut Driver, c: &Counters) {
        while let Some(p) = self.incoming.pop() {
            let stream = TcpStream::from(p.fd);
            let was_nonblocking = socket2::SockRef::from(&stream)
                .nonblocking()
                .unwrap_or(false);
            // Accepted non-blocking already (SOCK_NONBLOCK) when declared.
            if !was_nonblocking && stream.set_nonblocking(true).is_err() {
                // Not a usable socket any more: it was delivered to the
                // registration and ends here.
                Self::gone(c);
                continue;
            }
            let conn = Admitted::new(
                Pending {
                    fd: OwnedFd::from(stream),
                    ..p
                },
                self.shard,
            );
            self.generation = self.generation.wrapping_add(1) & 0xff_ffff;
            let slot = match self.free.pop() {
                Some(s) => s,
                None => {
                    self.slots.push(None);
                    self.slots.len() - 1
                }
            };
            let mut s = Slot {
                conn,
                generation: self.generation,
                was_nonblocking,
                armed: false,
            };
            if self.post(ring, slot, &mut s).is_err() {
                // The ring refused the SQE: put it back and retry next turn.
                self.free.push(slot);
                self.incoming.push(s.conn.into_pending());
                return;
            }
            self.slots[slot] = Some(s);
        }
    }

    fn post(&mut self, ring: &mut Driver, slot: usize, s: &mut Slot) -> io::Result<()> {
        let ud = user_data(RegisterOp::Poll, payload(slot, s.generation));
        let events = self.reg.interest.bits();
        ring.poll(s.conn.as_raw_fd(), events, true, ud)?;
        s.armed = true;
        self.in_flight += 1;
        Ok(())
    }

    fn cancel(ring: &mut Driver, slot: usize, generation: u32, armed: bool) {
        if armed {
            let ud = user_data(RegisterOp::Poll, payload(slot, generation));
            let _ = ring.cancel(ud, user_data(ShardOp::Cancel, 0));
        }
    }

    /// A connection left the registry for good (closed): delivered.
    fn gone(c: &Counters) {
        c.registered.fetch_sub(1, Ordering::Relaxed);
        Counters::add(&c.delivered, 1);
    }

    /// A poll completion.
    pub fn event(&mut self, ring: &mut Driver, pl: u64, cqe: Cqe, stopping: bool, c: &Counters) {
        if !cqe.more() {
            self.in_flight = self.in_flight.saturating_sub(1);
        }
        let (slot, generation) = unpack(pl);
        let current = matches!(self.slots.get(slot), Some(Some(s)) if s.generation == generation);
        if !current {
            return; // a connection already gone
        }
        let Some(mut s) = self.slots.get_mut(slot).and_then(Option::take) else {
            return;
        };
        if !cqe.more() {
            s.armed = false;
        }
        if cqe.result == -libc::ECANCELED {
            self.slots[slot] = Some(s); // our cancel at shutdown
            return;
        }
        let bits = if cqe.result < 0 {
            POLLERR
        } else {
            cqe.result as u32
        };
        Counters::add(&c.register_events, 1);
        let Slot {
            conn,
            generation,
            was_nonblocking,
            mut armed,
        } = s;
        let handler = self.reg.handler.clone();
        let mut r = Registered {
            conn: Some(conn),
            action: Action::Keep,
            was_nonblocking,
            shard: self.shard,
            _shard: std::marker::PhantomData,
        };
        if catch_unwind(AssertUnwindSafe(|| {
            handler(&mut r, Events::from_bits(bits))
        }))
        .is_err()
        {
            Counters::add(&c.handler_panics, 1);
            event!(
                error,
                shard = self.shard,
                "registration handler panicked: connection closed"
            );
            r.action = Action::Close;
        }
        // After a final hang-up (no more events can come) a connection the
        // handler kept is closed: re-arming would fire at once, forever.
        let final_hangup = !armed && bits & (POLLHUP | POLLERR) != 0;
        let action = match (r.conn.is_some(), r.action) {
            (false, _) => None, // released
            (true, Action::Keep) if final_hangup => Some(Action::Close),
            (true, a) => Some(a),
        };
        if action != Some(Action::Keep) {
            Self::cancel(ring, slot, generation, armed);
            self.free.push(slot);
        }
        let Some(conn) = r.conn.take() else {
            Self::gone(c); // handed over to the application
            return;
        };
        match action {
            Some(Action::Keep) | None => {
                let mut s = Slot {
                    conn,
                    generation,
                    was_nonblocking,
                    armed,
                };
                if !armed && !stopping {
                    Counters::add(&c.register_rearms, 1);
                    if self.post(ring, slot, &mut s).is_ok() {
                        armed = true;
                    }
                }
                s.armed = armed;
                self.slots[slot] = Some(s);
            }
            Some(Action::Close) => {
                drop(conn); // closes it, once
                Self::gone(c);
            }
            Some(Action::Take) => {
                let _ = conn.as_std().set_nonblocking(was_nonblocking);
                c.registered.fetch_sub(1, Ordering::Relaxed);
                self.taken.push(conn.into_pending());
            }
        }
    }

    /// Cancels every armed poll (shutdown).
    pub fn stop(&mut self, ring: &mut Driver) {
        for (i, s) in self.slots.iter().enumerate() {
            if let Some(s) = s {
                Self::cancel(ring, i, s.generation, s.armed);
            }
        }
    }

    /// Whether no connection is registered (or about to be).
    pub fn is_empty(&self) -> bool {
        self.slots.iter().flatten().next().is_none() && self.incoming.is_empty()
    }

    /// Whether no poll is in flight.
    pub fn idle(&self) -> bool {
        self.in_flight == 0
    }

    /// Closes every registered connection; returns how many.
    pub fn close_all(&mut self, c: &Counters) -> u64 {
        let n = (self.slots.iter().flatten().count() + self.incoming.len()) as u64;
        self.slots.clear();
        self.free.clear();
        self.incoming.clear();
        c.registered.fetch_sub(n, Ordering::Relaxed);
        n
    }
}
