//! Reply, then close: the linked SEND and CLOSE of a verdict's reply or of
//! a handler's `reply_and_close`, on the shard's ring.

use std::io;
use std::os::fd::OwnedFd;

use crate::admit::slot::ConnectionSlot;
use crate::driver::{Cqe, Driver};
use crate::shard::{op_kinds, user_data};

op_kinds! {
    /// The operations of replies (`reply_and_close`).
    pub(crate) enum ReplyOp {
        /// A linked reply SEND.
        Send = 5,
        /// The CLOSE linked after a reply.
        Close = 6,
    }
}

/// Linked reply-and-close operations in flight.
#[derive(Debug, Default)]
pub(crate) struct Replies {
    /// Send without `MSG_MORE` (the reply leaves before the FIN).
    pub(crate) at_once: bool,
    /// Id of the last pair: it keeps the user data (and so the memory the
    /// ring holds for each operation) of concurrent pairs apart.
    next: u64,
    /// SEND completions still to come.
    sends: usize,
    /// CLOSE completions still to come.
    closes: usize,
    /// The open-connection slots of pairs in flight, by id, released when
    /// their CLOSE completes (only on a listener with a maximum).
    slots: crate::driver::KeyMap<ConnectionSlot>,
}

impl Replies {
    /// Posts the linked SEND of `reply` and CLOSE of `fd`, keeping `slot`
    /// (the connection's count of the listener's maximum) until the CLOSE
    /// completes.
    pub(crate) fn post_counted(
        &mut self,
        ring: &mut Driver,
        fd: OwnedFd,
        reply: &[u8],
        slot: ConnectionSlot,
    ) -> io::Result<()> {
        self.next = self.next.wrapping_add(1) & ((1 << 48) - 1);
        let id = self.next;
        let flags = if self.at_once {
            libc::MSG_NOSIGNAL
        } else {
            libc::MSG_MORE | libc::MSG_NOSIGNAL
        };
        let (send_ud, close_ud) = (user_data(ReplyOp::Send, id), user_data(ReplyOp::Close, id));
        if ring.send_then_close(fd, reply, flags, send_ud, close_ud)? {
            // Sent and closed already: the slot goes with the socket.
            drop(slot);
            return Ok(());
        }
        self.sends += 1;
        self.closes += 1;
        if slot.is_counted() {
            self.slots.insert(id, slot);
        }
        Ok(())
    }

    pub(crate) fn complete(&mut self, ring: &mut Driver, op: ReplyOp, cqe: Cqe) {
        match op {
            ReplyOp::Send => {
                ring.release(cqe.user_data);
                self.sends = self.sends.saturating_sub(1);
            }
            ReplyOp::Close => {
                ring.finish_close(cqe.user_data, cqe.result);
                self.closes = self.closes.saturating_sub(1);
                if !self.slots.is_empty() {
                    self.slots.remove(&crate::shard::split(cqe.user_data).1);
                }
            }
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.sends == 0 && self.closes == 0
    }
}
