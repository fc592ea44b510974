//! The dialer's slots: taking one for a connect or a sequence, cancelling
//! it, and its end (the outcome it is counted as, the result handed to
//! its caller or the completion queue).

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use crate::connect::dial::{Completion, Connected, Ticket};
use crate::connect::job::{ConnectOp, Reply};
use crate::connect::load::{SequenceOutcome, SequenceRecord};
use crate::connect::sequence::Parked;
use crate::connect::slot::{Cancel, Slot, OP_CONNECT, OP_RECV, OP_SEND};
use crate::connect::stats::{add, sub};
use crate::driver::{Desc, Driver};
use crate::error::{ConnectErrorKind, Error};
use crate::shard::{user_data, ShardOp};

use super::Dialer;

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
