//! One connect or sequence in flight on a shard, a [`Slot`]: the
//! operations it has posted, how it is cancelled, and its end: the outcome
//! it is counted as and the result handed over.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::{OwnedFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::admit::attrs::SocketAttrs;
use crate::driver::{Desc, Driver};
use crate::error::{ConnectErrorKind, Error};
use crate::shard::{user_data, ShardOp};

use super::dial::{Completion, Connected, Ticket};
use super::dialer::{ConnectOp, Dialer, Reply};
use super::load::{SequenceOutcome, SequencePlan, SequenceRecord};
use super::sequence::Parked;
use super::stats::{add, sub};

/// Bits of the operations a slot has in flight.
pub(super) const OP_CONNECT: u8 = 1;
pub(super) const OP_TIMEOUT: u8 = 2;
pub(super) const OP_SEND: u8 = 4;
pub(super) const OP_RECV: u8 = 8;
pub(super) const OP_CLOSE: u8 = 16;
pub(super) const OP_SOCKET: u8 = 32;
pub(super) const OP_DISCONNECT: u8 = 64;

/// What a slot does once its io_uring SOCKET completes.
pub(super) enum Opening {
    /// A single connect.
    Connect {
        timeout: Option<Duration>,
        source: Option<IpAddr>,
        attrs: Arc<SocketAttrs>,
    },
    /// A load sequence.
    Sequence {
        plan: Arc<SequencePlan>,
        source: Option<IpAddr>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cancel {
    No,
    Deadline,
    Shutdown,
}

/// One connect or sequence in flight on a shard.
pub(super) struct Slot {
    pub(super) busy: bool,
    pub(super) fd: Option<OwnedFd>,
    pub(super) raw: RawFd,
    pub(super) addr: SocketAddr,
    pub(super) ops: u8,
    pub(super) intended: Instant,
    pub(super) started: Instant,
    pub(super) deadline: Option<Instant>,
    pub(super) cancel: Cancel,
    pub(super) connect_res: Option<i32>,
    pub(super) timeout_fired: bool,
    /// A single connect's job (None for a sequence).
    pub(super) job: Option<(u64, Reply)>,
    // Sequence state.
    pub(super) connect_at: Option<Instant>,
    pub(super) first_byte_at: Option<Instant>,
    pub(super) send_res: Option<i32>,
    pub(super) sent: usize,
    pub(super) received: usize,
    pub(super) expect: usize,
    pub(super) eof: bool,
    pub(super) recv_err: Option<i32>,
    pub(super) close_linked: bool,
    /// Set while the slot's socket is being created by an io_uring SOCKET.
    pub(super) opening: Option<Opening>,
    /// A sequence whose socket lives in this direct slot of the ring.
    pub(super) direct: Option<u32>,
    /// Whether that direct slot holds the slot's socket (created, not yet
    /// closed).
    pub(super) direct_open: bool,
    /// When a sequence's connect is overdue (checked by the scan, so that
    /// no per-connect timer is needed).
    pub(super) connect_deadline: Option<Instant>,
    /// The sequence closes with an RST.
    pub(super) reset: bool,
    /// A disconnect (CONNECT to AF_UNSPEC) was posted for it.
    pub(super) disconnect_tried: bool,
    /// Its disconnect succeeded: the socket stays in the direct slot for
    /// the next sequence.
    pub(super) parkable: bool,
    /// A single connect's attributes (their file flags are set when the
    /// connected socket is handed over).
    pub(super) attrs: Option<Arc<SocketAttrs>>,
}

impl Slot {
    fn empty(now: Instant) -> Self {
        Slot {
            busy: false,
            fd: None,
            raw: -1,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            ops: 0,
            intended: now,
            started: now,
            deadline: None,
            cancel: Cancel::No,
            connect_res: None,
            timeout_fired: false,
            job: None,
            connect_at: None,
            first_byte_at: None,
            send_res: None,
            sent: 0,
            received: 0,
            expect: 0,
            eof: false,
            recv_err: None,
            close_linked: false,
            opening: None,
            direct: None,
            direct_open: false,
            connect_deadline: None,
            reset: false,
            disconnect_tried: false,
            parkable: false,
            attrs: None,
        }
    }
}

fn connect_error(kind: ConnectErrorKind, addr: SocketAddr, errno: i32) -> Error {
    Error::Connect {
        kind,
        addr,
        source: io::Error::from_raw_os_error(errno),
    }
}

impl Dialer {
    pub(super) fn alloc(&mut self, now: Instant) -> usize {
        let i = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot::empty(now));
                self.slots.len() - 1
            }
        };
        if self.parked.len() <= i {
            self.parked.resize_with(i + 1, || None);
        }
        self.busy += 1;
        i
    }

    /// The descriptor a slot's operations name.
    pub(super) fn desc_of(s: &Slot) -> Desc {
        s.direct.map_or(Desc::Fd(s.raw), Desc::Fixed)
    }

    /// Cancels what a slot has in flight (the kernel cancels the rest of a
    /// chain with its head).
    pub(super) fn cancel_slot(&mut self, ring: &mut Driver, i: usize, why: Cancel) {
        let s = &mut self.slots[i];
        if s.cancel != Cancel::No {
            if why == Cancel::Shutdown {
                s.cancel = why;
            }
            return;
        }
        s.cancel = why;
        let p = i as u64;
        for (bit, tag) in [
            (OP_CONNECT, ConnectOp::Connect),
            (OP_SEND, ConnectOp::Send),
            (OP_RECV, ConnectOp::Recv),
        ] {
            if s.ops & bit != 0 {
                let _ = ring.cancel(user_data(tag, p), user_data(ShardOp::Cancel, p));
            }
        }
    }

    /// The connect's result as counted: Ok, a kind, or None for cancelled.
    fn connect_outcome(s: &Slot) -> Result<(), Option<ConnectErrorKind>> {
        match s.connect_res {
            Some(0) => Ok(()),
            Some(r) if -r == libc::ECANCELED => {
                if s.timeout_fired || s.cancel == Cancel::Deadline {
                    Err(Some(ConnectErrorKind::TimedOut))
                } else if s.cancel == Cancel::Shutdown {
                    Err(None)
                } else {
                    Err(Some(ConnectErrorKind::Other))
                }
            }
            Some(r) => Err(Some(ConnectErrorKind::from_errno(-r))),
            None => Err(None),
        }
    }

    fn io_outcome(s: &Slot, errno: i32) -> SequenceOutcome {
        match errno {
            libc::ECANCELED if s.cancel == Cancel::Deadline => SequenceOutcome::TimedOut,
            libc::ECANCELED if s.cancel == Cancel::Shutdown => SequenceOutcome::Cancelled,
            libc::ECONNRESET | libc::EPIPE => SequenceOutcome::Reset,
            _ => SequenceOutcome::Io,
        }
    }

    fn sequence_outcome(s: &Slot) -> SequenceOutcome {
        match Self::connect_outcome(s) {
            Err(Some(kind)) => return SequenceOutcome::Connect(kind),
            Err(None) => return SequenceOutcome::Cancelled,
            Ok(()) => {}
        }
        if let Some(r) = s.send_res {
            if r < 0 {
                return Self::io_outcome(s, -r);
            }
        }
        if s.expect == 0 || s.received >= s.expect {
            return SequenceOutcome::Ok;
        }
        if let Some(e) = s.recv_err {
            return Self::io_outcome(s, e);
        }
        if s.eof {
            return SequenceOutcome::ShortRead;
        }
        match s.cancel {
            Cancel::Shutdown => SequenceOutcome::Cancelled,
            _ => SequenceOutcome::TimedOut,
        }
    }

    /// Every operation of the slot has completed: account for it, hand its
    /// result over, free it.
    pub(super) fn finish_slot(&mut self, ring: &mut Driver, i: usize, now: Instant) {
        let holds_socket = self.slots[i].direct_open
            || (self.slots[i].job.is_none() && self.slots[i].fd.is_some());
        if holds_socket {
            // A sequence's socket: keep it when its disconnect worked, else
            // end it on the ring (disconnect for an RST, or close) and come
            // back when that completes.
            let v4 = self.slots[i].addr.is_ipv4();
            if self.slots[i].parkable && !self.stopping {
                let kept = if self.slots[i].direct_open {
                    self.slots[i].direct_open = false;
                    Some(Parked::Direct { v4 })
                } else {
                    self.slots[i].fd.take().map(|fd| Parked::Fd { fd, v4 })
                };
                if kept.is_some() {
                    self.parked[i] = kept;
                    self.parked_count += 1;
                }
            } else if self.end_socket(ring, i) {
                return;
            }
        }
        let mut s = std::mem::replace(&mut self.slots[i], Slot::empty(now));
        self.free.push(i);
        self.busy -= 1;
        let outcome = Self::connect_outcome(&s);
        match s.job.take() {
            Some((ticket, reply)) => {
                self.counters().connect_done(outcome);
                let result = match (outcome, s.fd.take()) {
                    (Ok(()), Some(fd)) => {
                        sub(&self.counters().open_sockets, 1);
                        let flags = s.attrs.as_ref().map_or(Ok(()), |a| a.apply_file_flags(&fd));
                        if let Err(e) = flags {
                            // Counted as connected: the connect itself worked.
                            Err(Error::setup("fcntl (attrs file flags)", e))
                        } else {
                            Ok(Connected {
                                stream: TcpStream::from(fd),
                                peer: s.addr,
                                shard: self.index,
                                latency: now.saturating_duration_since(s.started),
                            })
                        }
                    }
                    (outcome, fd) => {
                        if fd.is_some() {
                            sub(&self.counters().open_sockets, 1);
                        }
                        drop(fd);
                        let errno = s.connect_res.map(|r| -r).unwrap_or(libc::ECANCELED);
                        Err(match outcome {
                            Err(None) => Error::Closed,
                            Err(Some(ConnectErrorKind::TimedOut)) => {
                                connect_error(ConnectErrorKind::TimedOut, s.addr, libc::ETIMEDOUT)
                            }
                            Err(Some(kind)) => connect_error(kind, s.addr, errno),
                            Ok(()) => connect_error(ConnectErrorKind::Other, s.addr, errno),
                        })
                    }
                };
                self.deliver(ticket, reply, result);
            }
            None => {
                // A sequence: its connect is accounted here too.
                self.counters().connect_done(outcome);
                match outcome {
                    Err(Some(ConnectErrorKind::Exhausted)) => self.exhausted(now),
                    Ok(()) => self.connected_ok(),
                    Err(_) => {}
                }
                let seq = Self::sequence_outcome(&s);
                let c = self.counters();
                add(&c.sequences[seq.index()], 1);
                add(&c.bytes_sent, s.sent as u64);
                add(&c.bytes_received, s.received as u64);
                let record = SequenceRecord {
                    shard: self.index,
                    outcome: seq,
                    intended: s.intended,
                    start_delay: s.started.saturating_duration_since(s.intended),
                    connect: s
                        .connect_at
                        .map(|t| t.saturating_duration_since(s.intended)),
                    first_byte: s
                        .first_byte_at
                        .map(|t| t.saturating_duration_since(s.intended)),
                    total: now.saturating_duration_since(s.intended),
                    sent: s.sent,
                    received: s.received,
                };
                if let Some(run) = self.run.as_mut() {
                    run.in_flight = run.in_flight.saturating_sub(1);
                    run.outcomes.0[seq.index()] += 1;
                    run.last_end = now;
                    let sink = &mut run.job.sink;
                    if catch_unwind(AssertUnwindSafe(|| sink(&record))).is_err() {
                        add(&self.shared.counters.handler_panics, 1);
                        event!(error, shard = self.index, "load run sink panicked");
                    }
                }
            }
        }
    }

    /// Hands a single connect's result to its waiter, the inline handler,
    /// or the completion queue.
    fn deliver(&mut self, ticket: u64, reply: Reply, result: Result<Connected, Error>) {
        match reply {
            Reply::Wait(tx) => {
                // A caller that went away drops the connection here.
                let _ = tx.send(result);
            }
            Reply::Deliver => {
                let c = Completion {
                    ticket: Ticket(ticket),
                    shard: self.index,
                    result,
                };
                if let Some(h) = self.common.handler.clone() {
                    if catch_unwind(AssertUnwindSafe(|| h(c))).is_err() {
                        add(&self.counters().handler_panics, 1);
                        event!(error, shard = self.index, "connect handler panicked");
                    }
                } else {
                    self.common.delivery.will_push();
                    self.common.completions.push(c);
                    self.pushed = true;
                }
            }
        }
    }
}
