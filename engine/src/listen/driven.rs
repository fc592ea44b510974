//! Shards the application drives: no engine thread; each shard is a handle
//! the application moves onto a thread it owns and drives from there.
//!
//! A [`DrivenShard`] holds the shard's driver (io_uring ring or epoll
//! instance), its acceptor and admission. Its descriptor ([`AsFd`]) is
//! readable while the shard has work; [`DrivenShard::drive`] then reaps the
//! completions, runs admission and hands the admitted connections to the
//! caller's handler on the calling thread, with the shard's context (reply
//! and close, relay): the inline handler's path, with no hop between
//! threads. A shard that is not driven takes nothing from the kernel (its
//! ring runs deferred work only when driven; epoll accepts only when
//! waited on): the kernel's queue holds the connections meanwhile.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use crate::admit::conn::Admitted;
use crate::driver::sys;
use crate::error::Error;
use crate::listen::accept::ShardShared;
use crate::listen::acceptor::Acceptor;
use crate::relay::context::ShardContext;
use crate::shard::Shard;

/// Turns one `drive()` takes at most while work is already there (a reply
/// whose completion came with its submission, deferred task work): enough
/// to finish what a batch started, few enough to hand the thread back.
const ROUNDS: usize = 4;

/// One shard of a listener built with
/// [`ListenerBuilder::build_driven`](crate::ListenerBuilder::build_driven),
/// for the application to drive on a thread of its own.
///
/// It is `Send`: move it to its thread, then call [`DrivenShard::drive`]
/// there whenever its descriptor is readable (and once at the start). The
/// first `drive()` binds it to its thread; driving it from another returns
/// [`Error::WrongThread`]. The listener's shutdown makes the descriptor
/// readable, and `drive()` then finishes the shard and returns
/// [`Error::Closed`], so a thread waiting on it learns of the shutdown by
/// itself. Dropping it stops the shard: what it holds is closed and counted
/// (`closed_at_shutdown`), as a shutdown does.
///
/// ```
/// use std::io::Read;
/// use std::net::TcpStream;
/// use floodgate::Listener;
///
/// let (listener, mut shards) = Listener::builder("127.0.0.1:0".parse()?)
///     .shards(1)
///     .build_driven()?;
/// let mut shard = shards.pop().expect("one shard");
/// let addr = listener.local_addr();
/// let server = std::thread::spawn(move || -> Result<(), floodgate::Error> {
///     let mut served = 0;
///     while served < 1 {
///         served += shard.drive(|conn, ctx| {
///             let _ = ctx.reply_and_close(conn, b"x");
///         })?;
///         if served < 1 {
///             shard.wait(None)?;
///         }
///     }
///     Ok(())
/// });
/// let mut reply = Vec::new();
/// TcpStream::connect(addr)?.read_to_end(&mut reply)?;
/// assert_eq!(reply, b"x");
/// server.join().expect("server thread")?;
/// listener.shutdown();
/// assert!(listener.stats().conserved());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct DrivenShard {
    index: usize,
    shard: Shard<Acceptor>,
    shared: Arc<ShardShared>,
    owner: Option<ThreadId>,
}

impl std::fmt::Debug for DrivenShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrivenShard")
            .field("index", &self.index)
            .field("owner", &self.owner)
            .field("shard", &self.shard)
            .finish()
    }
}

impl DrivenShard {
    pub(crate) fn new(index: usize, shard: Shard<Acceptor>, shared: Arc<ShardShared>) -> Self {
        DrivenShard {
            index,
            shard,
            shared,
            owner: None,
        }
    }

    /// The shard's index (its place in the listener's reuseport group, the
    /// core steering sends to it).
    pub fn index(&self) -> usize {
        self.index
    }

    /// Does the shard's work that is ready, without waiting: submits what it
    /// queued, reaps completions, runs admission, re-arms the accept, and
    /// calls `handler` on this thread for every admitted connection, with
    /// the shard's context. Returns how many connections it handed over.
    /// Call it whenever the descriptor is readable; it never blocks on the
    /// kernel. Under sustained load the listener's
    /// [`Moderation`](crate::Moderation) (adaptive by default) may make one
    /// call nap once, at most its `max_pause` (64 µs by default), in place
    /// of the caller's next wait, and hand over what gathered meanwhile;
    /// what the handler queued is submitted before the nap.
    /// [`Moderation::Off`](crate::Moderation::Off) never naps.
    ///
    /// The first call binds the shard to the calling thread and starts it
    /// (posts its accept).
    ///
    /// # Errors
    /// [`Error::Closed`] once the listener was shut down and the shard has
    /// finished (everything it held closed and counted; a call that hands
    /// over connections and finishes returns them, and
    /// [`DrivenShard::is_finished`] is then true);
    /// [`Error::WrongThread`] from another thread than the first call's;
    /// [`Error::Setup`] if the shard could not start;
    /// [`Error::Accept`] once for a shard's accept error that is neither
    /// transient nor exhaustion (the shard keeps retrying with backoff).
    pub fn drive<F>(&mut self, mut handler: F) -> Result<usize, Error>
    where
        F: FnMut(Admitted, &mut ShardContext<'_>),
    {
        self.drive_up_to(usize::MAX, &mut handler)
    }

    /// Blocks the calling thread until this shard admits a connection and
    /// returns it: an `accept()` loop on the application's own thread, with
    /// no hop between threads. The thread waits in the shard's own ring
    /// (one `io_uring_enter` that also submits what was queued, or one
    /// `epoll_pwait2`) and runs admission itself; a connection already
    /// admitted is returned without a syscall. Binds the shard to the
    /// thread as [`DrivenShard::drive`] does.
    ///
    /// What the application does with the connection is its own; to answer
    /// and close it as the inline handler does (the reply leaving with the
    /// FIN, submitted with the next wait), use
    /// [`DrivenShard::reply_and_close`], or [`DrivenShard::context`] for the
    /// rest of the shard's context (relays).
    ///
    /// ```
    /// use std::io::{Read, Write};
    /// use std::net::TcpStream;
    /// use floodgate::Listener;
    ///
    /// let (listener, mut shards) = Listener::builder("127.0.0.1:0".parse()?)
    ///     .shards(1)
    ///     .build_driven()?;
    /// let mut shard = shards.pop().expect("one shard");
    /// let addr = listener.local_addr();
    /// let server = std::thread::spawn(move || -> Result<(), floodgate::Error> {
    ///     let conn = shard.accept()?;
    ///     let _ = conn.into_std().write_all(b"x");
    ///     Ok(())
    /// });
    /// let mut reply = Vec::new();
    /// TcpStream::connect(addr)?.read_to_end(&mut reply)?;
    /// assert_eq!(reply, b"x");
    /// server.join().expect("server thread")?;
    /// listener.shutdown();
    /// assert!(listener.stats().conserved());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`DrivenShard::drive`]; [`Error::Closed`] once the listener was
    /// shut down.
    pub fn accept(&mut self) -> Result<Admitted, Error> {
        self.bind()?;
        loop {
            if let Some(conn) = self.shard.service.take_one() {
                return Ok(conn);
            }
            if self.shard.finished() {
                return Err(Error::Closed);
            }
            // Nothing admitted yet: wait in the ring (what the application
            // queued, replies included, is submitted by the same call).
            if !self.shard.turn(true) {
                self.finish_ready();
                return Err(Error::Closed);
            }
            if let Some(e) = self.shared.take_error() {
                return Err(Error::Accept {
                    shard: self.index,
                    source: e,
                });
            }
            // Stopped, and the cancels that ended its operations came in
            // this turn: hand over one connection already admitted, close
            // and count the rest, as `drive()` does.
            if self.shard.stopped_and_idle() {
                let last = self.shard.service.take_one();
                self.finish_ready();
                return last.ok_or(Error::Closed);
            }
        }
    }

    /// As [`DrivenShard::accept`], waiting at most `timeout` (`None`: no
    /// limit); `Ok(None)` when it passed with no connection.
    ///
    /// # Errors
    /// As [`DrivenShard::accept`].
    pub fn accept_timeout(&mut self, timeout: Option<Duration>) -> Result<Option<Admitted>, Error> {
        let Some(t) = timeout else {
            return self.accept().map(Some);
        };
        let deadline = Instant::now().checked_add(t);
        loop {
            if self.shard.started() {
                if let Some(conn) = self.shard.service.take_one() {
                    return Ok(Some(conn));
                }
            }
            let mut got = None;
            self.drive_up_to(1, &mut |conn, _| got = Some(conn))?;
            if got.is_some() {
                return Ok(got);
            }
            // A deadline too far to represent: no limit.
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left == Some(Duration::ZERO) {
                return Ok(None);
            }
            self.wait(left)?;
        }
    }

    /// The shard's context on this thread, for a connection
    /// [`DrivenShard::accept`] returned: what an inline handler can do
    /// ([`ShardContext::reply_and_close`], [`ShardContext::relay`]), queued
    /// on the shard's ring and submitted with its next `accept()`,
    /// `drive()`, `wait()` or [`DrivenShard::flush`].
    ///
    /// # Errors
    /// [`Error::WrongThread`] from another thread than the one the shard is
    /// bound to; [`Error::Closed`] once the shard has finished; as
    /// [`DrivenShard::drive`] for a shard that cannot start.
    pub fn context(&mut self) -> Result<ShardContext<'_>, Error> {
        self.bind()?;
        if self.shard.finished() {
            return Err(Error::Closed);
        }
        Ok(self.shard.service.context(&mut self.shard.ring))
    }

    /// Sends `reply` on `conn` and closes it on the shard's ring, as the
    /// inline handler's [`ShardContext::reply_and_close`] does (a linked
    /// SEND with `MSG_MORE`, so the reply leaves with the FIN, and a CLOSE),
    /// submitted with the shard's next `accept()`, `drive()`, `wait()` or
    /// [`DrivenShard::flush`]: an `accept()` loop that answers this way pays
    /// no syscall of its own per connection. (On the epoll backend the send
    /// and close are made at once, as an epoll loop makes them, unless the
    /// send would block.)
    ///
    /// ```
    /// use std::io::Read;
    /// use std::net::TcpStream;
    /// use floodgate::Listener;
    ///
    /// let (listener, mut shards) = Listener::builder("127.0.0.1:0".parse()?)
    ///     .shards(1)
    ///     .build_driven()?;
    /// let mut shard = shards.pop().expect("one shard");
    /// let addr = listener.local_addr();
    /// let server = std::thread::spawn(move || -> Result<(), floodgate::Error> {
    ///     let conn = shard.accept()?;
    ///     shard.reply_and_close(conn, b"x")?;
    ///     shard.flush()
    /// });
    /// let mut reply = Vec::new();
    /// TcpStream::connect(addr)?.read_to_end(&mut reply)?;
    /// assert_eq!(reply, b"x");
    /// server.join().expect("server thread")?;
    /// listener.shutdown();
    /// assert!(listener.stats().conserved());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`DrivenShard::context`] (`conn` is closed then);
    /// [`Error::Setup`] if the ring cannot take the operations (`conn` is
    /// closed then).
    pub fn reply_and_close(&mut self, conn: Admitted, reply: &[u8]) -> Result<(), Error> {
        self.context()?
            .reply_and_close(conn, reply)
            .map_err(|e| Error::setup("driven shard reply", e))
    }

    /// Submits what the application queued on the shard's ring (through
    /// [`DrivenShard::context`] or [`DrivenShard::reply_and_close`]) now,
    /// and runs the work it set off, without waiting (the completions stay
    /// for the next `drive()` or `accept()`, and the descriptor is left
    /// readable for them): for a thread that will not call
    /// `accept()`, `drive()` or `wait()` again soon.
    ///
    /// # Errors
    /// [`Error::WrongThread`] from another thread than the one the shard is
    /// bound to; [`Error::Setup`] if the ring refuses the submission.
    pub fn flush(&mut self) -> Result<(), Error> {
        if !self.shard.started() || self.shard.finished() {
            return Ok(());
        }
        self.bind()?;
        // Not a bare submit: an io_uring CLOSE linked after a SEND that
        // completed at submission is deferred task work, which only an
        // enter that reaps runs (and until it does, the reply sent with
        // MSG_MORE waits for that close).
        let ring = &mut self.shard.ring;
        // The completions it made are work for the next drive(): the
        // descriptor says so (on epoll they are the driver's own, which no
        // kernel event would announce).
        ring.submit_settled()
            .and_then(|()| ring.prepare_wait(false))
            .map_err(|e| Error::setup("driven shard submit", e))
    }

    /// Finishes the shard (everything it holds closed and counted) and
    /// leaves its descriptor readable, so that a caller waiting on it next
    /// learns at once.
    fn finish_ready(&mut self) {
        self.shard.finish();
        let _ = self.shard.ring.prepare_wait(true);
    }

    fn drive_up_to(
        &mut self,
        max: usize,
        handler: &mut dyn FnMut(Admitted, &mut ShardContext<'_>),
    ) -> Result<usize, Error> {
        self.bind()?;
        if self.shard.finished() {
            return Err(Error::Closed);
        }
        let mut n = 0;
        for _ in 0..ROUNDS {
            if !self.shard.turn(false) {
                self.shard.finish();
                return Err(Error::Closed);
            }
            let ring = &mut self.shard.ring;
            n += self.shard.service.deliver_to(ring, max - n, handler);
            if n >= max {
                break;
            }
            // What the handler queued (replies, relays) completes at once
            // more often than not: reap it in another round rather than
            // through one more wake-up of the caller.
            if !ring.has_work() {
                break;
            }
        }
        // Under sustained load the controller asks for a pause: take it
        // here, in place of the caller's next wait, and do what it gathered
        // (once per call, so drive() returns within one pause).
        if n < max && self.shard.pause() {
            if !self.shard.turn(false) {
                self.shard.finish();
                return Err(Error::Closed);
            }
            let ring = &mut self.shard.ring;
            n += self.shard.service.deliver_to(ring, max - n, handler);
        }
        // Stopped, and the cancels that ended its operations came within
        // this call: nothing more will make the descriptor readable, so the
        // shard finishes now rather than at a drive nobody would make.
        if self.shard.stopped_and_idle() {
            self.shard.finish();
            if n == 0 {
                return Err(Error::Closed);
            }
            // The connections handed over are returned now; the descriptor
            // stays readable so that a caller that waits on it next learns
            // at once (the next drive() says Closed).
            let _ = self.shard.ring.prepare_wait(true);
            return Ok(n);
        }
        // Whatever is still queued goes now (nothing else would wake this
        // shard to submit it), in an enter that also runs the work it sets
        // off: an io_uring CLOSE linked after a SEND that completed at
        // submission is deferred task work, and left for the next drive it
        // would cost the caller one more wake-up (and hold the MSG_MORE
        // reply until then). The descriptor is left readable if work
        // already waits.
        let ring = &mut self.shard.ring;
        let submitted = ring
            .submit_settled()
            .and_then(|()| ring.prepare_wait(false));
        if let Err(e) = submitted {
            return Err(Error::setup("driven shard submit", e));
        }
        if let Some(e) = self.shared.take_error() {
            return Err(Error::Accept {
                shard: self.index,
                source: e,
            });
        }
        Ok(n)
    }

    /// Waits until the descriptor is readable, at most `timeout` (`None`:
    /// no limit), for a thread that does nothing else; an event loop
    /// registers the descriptor instead (and calls [`DrivenShard::flush`]
    /// before its wait if it queued operations outside `drive()`). What the
    /// application queued is submitted first. Returns whether it is readable
    /// (at once, true, for a shard not started yet or already finished).
    ///
    /// # Errors
    /// `poll(2)` failures as [`Error::Setup`]; as [`DrivenShard::flush`].
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<bool, Error> {
        if !self.shard.started() || self.shard.finished() {
            return Ok(true);
        }
        // What the application queued since the last drive (replies through
        // the context) goes before the wait: nothing else would send it.
        if self.shard.ring.has_work() {
            self.flush()?;
        }
        // A tokio listener's edge-triggered waits leave the descriptor set.
        self.shard.ring.prepare_level_wait();
        sys::poll_readable(self.as_fd(), timeout).map_err(|e| Error::setup("poll", e))
    }

    /// Whether operations wait on the ring to be submitted.
    #[cfg(feature = "tokio")]
    pub(crate) fn has_queued(&mut self) -> bool {
        self.shard.ring.has_queued()
    }

    /// The application waits on [`DrivenShard::as_fd`] edge-triggered
    /// (tokio's reactor): the drive leaves the descriptor as it is rather
    /// than read it clear (the driver's `wait_edge_triggered`).
    #[cfg(feature = "tokio")]
    pub(crate) fn wait_edge_triggered(&mut self) {
        self.shard.ring.wait_edge_triggered();
    }

    /// Whether the shard's accepts give non-blocking sockets.
    #[cfg(feature = "tokio")]
    pub(crate) fn accepts_nonblocking(&self) -> bool {
        self.shard.service.accepts_nonblocking()
    }

    /// A connection `drive()` handed over turned out to be gone before the
    /// application saw it (a tokio stream needs its peer's address).
    #[cfg(feature = "tokio")]
    pub(crate) fn peer_gone_after_delivery(&self) {
        self.shared.peer_gone_after_delivery();
    }

    /// The address the shard's listening socket is bound to.
    ///
    /// # Errors
    /// `NotConnected` once the shard stopped accepting (its sockets are
    /// released); `getsockname(2)`'s error.
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        let gone = || std::io::Error::from(std::io::ErrorKind::NotConnected);
        let sockets = self.shared.socket.lock().map_err(|_| gone())?;
        let first = sockets.first().ok_or_else(gone)?;
        first.local_addr()?.as_socket().ok_or_else(gone)
    }

    /// Whether the shard stopped and has closed and counted what it held.
    pub fn is_finished(&self) -> bool {
        self.shard.finished()
    }

    fn bind(&mut self) -> Result<(), Error> {
        let me = std::thread::current().id();
        match self.owner {
            Some(t) if t == me => Ok(()),
            Some(_) => Err(Error::WrongThread { shard: self.index }),
            None => {
                self.owner = Some(me);
                self.shard
                    .ring
                    .enable()
                    .map_err(|e| Error::setup("io_uring_register(ENABLE_RINGS)", e))?;
                self.shard
                    .start()
                    .map_err(|e| Error::setup("driven shard start", e))
            }
        }
    }
}

impl AsRawFd for DrivenShard {
    /// The shard's descriptor: readable while it has work for
    /// [`DrivenShard::drive`]. Register it for readability (edge or level)
    /// in any event loop; never read from it or close it.
    fn as_raw_fd(&self) -> RawFd {
        self.shard.ring.wait_fd()
    }
}

impl AsFd for DrivenShard {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.shard.ring.wait_fd_borrowed()
    }
}

impl Drop for DrivenShard {
    fn drop(&mut self) {
        let here = self
            .owner
            .map_or(true, |t| t == std::thread::current().id());
        if here {
            self.shard.stop_and_finish();
        } else {
            // Bound to another thread: its ring takes nothing from this one.
            // Close and count what it holds; in-flight operations end with
            // the ring.
            self.shard.finish();
        }
    }
}
