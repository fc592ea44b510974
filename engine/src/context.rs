//! What an inline handler can do on its shard's io_uring.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;

use crate::conn::Admitted;
use crate::shard::{user_data, Tag};
use crate::sys::{Cqe, Uring};

/// The shard an inline handler runs on, and its io_uring.
///
/// Operations posted through it are submitted with the shard's next
/// `io_uring_enter`, batched with everything else of that turn.
#[derive(Debug)]
pub struct ShardContext<'a> {
    shard: usize,
    ring: &'a mut Uring,
    replies: &'a mut Replies,
}

impl<'a> ShardContext<'a> {
    pub(crate) fn new(shard: usize, ring: &'a mut Uring, replies: &'a mut Replies) -> Self {
        ShardContext {
            shard,
            ring,
            replies,
        }
    }

    /// The shard's index.
    pub fn shard(&self) -> usize {
        self.shard
    }

    /// Sends `reply` on `conn` and closes it, as two linked io_uring
    /// operations submitted with this turn's batch: a SEND with `MSG_MORE`,
    /// so that the reply leaves in the same segment as the FIN, and a CLOSE.
    /// If the send fails the close is cancelled by the kernel and the shard
    /// closes the socket itself: it is closed exactly once either way.
    ///
    /// # Errors
    /// Only if the submission queue cannot take the operations (the ring is
    /// broken); `conn` is closed then.
    ///
    /// Linux resets (RST) a connection closed with unread input, and the
    /// reply is then lost: when the client may have sent something, use
    /// [`ShardContext::drain_reply_and_close`].
    pub fn reply_and_close(&mut self, conn: Admitted, reply: &[u8]) -> io::Result<()> {
        let fd: OwnedFd = conn.into();
        self.replies.post(self.ring, fd, reply)
    }

    /// As [`ShardContext::reply_and_close`], after reading and discarding
    /// whatever the client has sent so far (one non-blocking `recv`), so
    /// that the close is a FIN carrying the reply rather than an RST.
    ///
    /// # Errors
    /// As [`ShardContext::reply_and_close`].
    pub fn drain_reply_and_close(&mut self, conn: Admitted, reply: &[u8]) -> io::Result<()> {
        use std::os::fd::AsFd;
        crate::sys::discard_now(conn.as_fd());
        self.reply_and_close(conn, reply)
    }
}

/// Linked reply-and-close operations in flight.
#[derive(Debug, Default)]
pub(crate) struct Replies {
    next: u64,
    /// SEND completions still to come.
    sends: HashMap<u64, ()>,
    /// CLOSE completions still to come.
    closes: usize,
}

impl Replies {
    pub(crate) fn post(&mut self, ring: &mut Uring, fd: OwnedFd, reply: &[u8]) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        self.next = self.next.wrapping_add(1) & ((1 << 48) - 1);
        let id = self.next;
        let raw = fd.as_raw_fd();
        let bytes: Box<[u8]> = reply.into();
        let flags = libc::MSG_MORE | libc::MSG_NOSIGNAL;
        ring.reserve(2)?;
        ring.send(raw, bytes, flags, true, user_data(Tag::ReplySend, id))?;
        self.sends.insert(id, ());
        ring.close(fd, user_data(Tag::ReplyClose, id))?;
        self.closes += 1;
        Ok(())
    }

    pub(crate) fn complete(&mut self, ring: &mut Uring, tag: Tag, payload: u64, cqe: Cqe) {
        match tag {
            Tag::ReplySend => {
                ring.release(cqe.user_data);
                self.sends.remove(&payload);
            }
            Tag::ReplyClose => {
                ring.finish_close(cqe.user_data, cqe.result);
                self.closes = self.closes.saturating_sub(1);
            }
            _ => {}
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.sends.is_empty() && self.closes == 0
    }
}
