//! A driven shard under a tokio `current_thread` runtime.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

use ::tokio::io::unix::AsyncFd;

use super::{into_tokio, Accepted};
use crate::admit::conn::Admitted;
use crate::driver::runtime;
use crate::error::Error;
use crate::listen::driven::DrivenShard;

/// One [`DrivenShard`] as a tokio listener, for a `current_thread`
/// runtime per core (thread per core): the runtime's thread runs the
/// shard, so a connection is accepted, admitted and handed over on the
/// thread that serves it.
///
/// `accept().await` waits until the shard's descriptor is readable (it is
/// registered with the runtime's reactor), then drives the shard
/// ([`DrivenShard::drive`]) into a local queue and returns from it; a
/// batch is driven once, its streams registered with the reactor at once
/// (so one reactor round reports them all ready), and handed out one by
/// one. Cancel-safe: what a drive took waits in the queue for the next
/// `accept()`.
///
/// A driven shard is bound to the thread that first drives it
/// ([`Error::WrongThread`] from any other): use it on a `current_thread`
/// runtime (or a `LocalSet`), whose tasks all run on one thread, not on a
/// multi-thread runtime, whose tasks move between workers. Pin that thread
/// to the shard's core ([`DrivenListener::index`]: CPU steering sends
/// shard `k` the connections that arrive on CPU `k`).
///
/// ```
/// use floodgate::Listener;
///
/// let (listener, mut shards) = Listener::builder("127.0.0.1:0".parse()?)
///     .shards(1)
///     .build_driven()?;
/// let shard = shards.pop().expect("one shard");
/// let addr = listener.local_addr();
/// let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
/// rt.block_on(async move {
///     let mut driven = floodgate::tokio::DrivenListener::new(shard)?;
///     let client = std::thread::spawn(move || std::net::TcpStream::connect(addr));
///     let (stream, meta) = driven.accept().await?;
///     assert_eq!(meta.shard, 0);
///     drop(stream);
///     client.join().expect("client")?;
///     Ok::<_, std::io::Error>(())
/// })?;
/// listener.shutdown();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct DrivenListener {
    /// A duplicate of the shard's descriptor, registered with the reactor;
    /// dropped (deregistered and closed) before the shard, so the shard's
    /// ring or epoll instance ends with the shard.
    ready: AsyncFd<OwnedFd>,
    shard: DrivenShard,
    /// What drives handed over, not yet registered (nor returned by
    /// `accept_admitted()`).
    incoming: VecDeque<Admitted>,
    /// Registered streams not yet returned by `accept()`.
    queue: VecDeque<Accepted>,
    started: bool,
    closed: bool,
    /// The shard accepts non-blocking sockets (SOCK_NONBLOCK).
    nonblocking: bool,
    /// The last drive handed connections over, so the descriptor's
    /// readiness was kept and the next wait drives again at once (and
    /// submits what was queued meanwhile).
    drive_again: bool,
}

impl DrivenListener {
    /// Registers the shard's descriptor with the current runtime's
    /// reactor. The shard's listener should accept non-blocking
    /// ([`ListenerBuilder::nonblocking`](crate::ListenerBuilder::nonblocking)),
    /// or each connection costs an `fcntl` here.
    ///
    /// # Errors
    /// `Other` outside a tokio runtime; the reactor's registration error.
    pub fn new(mut shard: DrivenShard) -> io::Result<Self> {
        let fd = shard.as_fd().try_clone_to_owned()?;
        let ready = runtime::readable(fd)?;
        // The reactor waits edge-triggered: woken by each signal, it needs
        // no read of the descriptor per wait.
        shard.wait_edge_triggered();
        Ok(DrivenListener {
            ready,
            nonblocking: shard.accepts_nonblocking(),
            shard,
            incoming: VecDeque::new(),
            queue: VecDeque::new(),
            started: false,
            closed: false,
            drive_again: false,
        })
    }

    /// The shard's index (its core under CPU steering).
    pub fn index(&self) -> usize {
        self.shard.index()
    }

    /// The address the shard listens on ([`DrivenShard::local_addr`]).
    ///
    /// # Errors
    /// As [`DrivenShard::local_addr`].
    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.shard.local_addr()
    }

    /// The shard, for [`DrivenShard::is_finished`] and the like.
    pub fn shard(&self) -> &DrivenShard {
        &self.shard
    }

    /// Connections driven and not yet returned by `accept()` or
    /// `accept_admitted()`.
    pub fn queued(&self) -> usize {
        self.queue.len() + self.incoming.len()
    }

    /// Takes the next connection, driving the shard whenever its
    /// descriptor is readable and the queue is empty.
    ///
    /// # Errors
    /// `NotConnected` once the listener was shut down and the shard has
    /// finished (the queue returned first); `Other` for
    /// [`Error::WrongThread`]; a shard's accept error (it backs off and goes
    /// on); the reactor's.
    pub async fn accept(&mut self) -> io::Result<Accepted> {
        loop {
            if let Some(got) = self.queue.pop_front() {
                return Ok(got);
            }
            if !self.incoming.is_empty() {
                self.register()?;
                continue;
            }
            if self.closed {
                return Err(Error::Closed.into());
            }
            self.wait_and_drive().await?;
        }
    }

    /// As [`DrivenListener::accept`], the connection as the engine admitted
    /// it ([`Admitted`]), not made a tokio stream: for an application that
    /// answers on the shard's ring ([`DrivenListener::reply_and_close`],
    /// [`DrivenListener::shard_mut`]'s context) or hands the socket on. It
    /// pays no reactor registration, `getpeername` or `fcntl`. Streams that
    /// `accept()` already registered are left to `accept()`.
    ///
    /// ```
    /// use std::io::Read;
    /// use floodgate::Listener;
    ///
    /// let (listener, mut shards) = Listener::builder("127.0.0.1:0".parse()?)
    ///     .shards(1)
    ///     .build_driven()?;
    /// let shard = shards.pop().expect("one shard");
    /// let addr = listener.local_addr();
    /// let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    /// let client = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
    ///     let mut got = Vec::new();
    ///     std::net::TcpStream::connect(addr)?.read_to_end(&mut got)?;
    ///     Ok(got)
    /// });
    /// rt.block_on(async move {
    ///     let mut driven = floodgate::tokio::DrivenListener::new(shard)?;
    ///     let conn = driven.accept_admitted().await?;
    ///     driven.reply_and_close(conn, b"x")?;
    ///     Ok::<_, std::io::Error>(())
    /// })?;
    /// assert_eq!(client.join().expect("client")?, b"x");
    /// listener.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`DrivenListener::accept`].
    pub async fn accept_admitted(&mut self) -> io::Result<Admitted> {
        loop {
            if let Some(conn) = self.incoming.pop_front() {
                return Ok(conn);
            }
            if self.closed {
                return Err(Error::Closed.into());
            }
            self.wait_and_drive().await?;
        }
    }

    /// One step of the accept loops, once the queues are empty: starts the
    /// shard with its first drive, or else submits the replies still
    /// queued, waits until the descriptor is readable and drives the shard.
    async fn wait_and_drive(&mut self) -> io::Result<()> {
        if !self.started {
            // The first drive starts the shard (posts its accept): before
            // it, the descriptor has nothing to report.
            self.started = true;
            self.drive()?;
            return Ok(());
        }
        if !self.drive_again {
            // The replies queued since: nothing else would submit them
            // while this task sleeps. (Else the drive below, which does
            // not wait, submits them.)
            self.flush()?;
        }
        let mut ready = self.ready.readable().await?;
        // Readiness is cleared only when a drive found nothing, so work
        // that came during it is not lost.
        let n = drive(&mut self.shard, &mut self.incoming, &mut self.closed)?;
        self.drive_again = n > 0 && !self.closed;
        if n == 0 && !self.closed {
            ready.clear_ready();
        }
        Ok(())
    }

    /// Sends `reply` on `conn` and closes it on the shard's ring
    /// ([`DrivenShard::reply_and_close`]), submitted with the listener's
    /// next `accept()`/`accept_admitted()` (before it waits, or with the
    /// drive it makes at once: the replies to one drive's connections go
    /// in one `io_uring_enter`, which also runs their CLOSEs) or
    /// [`DrivenListener::flush`]; an accept loop that answers this way pays
    /// no syscall of its own per connection. A task that will not accept
    /// again soon calls `flush()`; dropping the listener submits them too.
    ///
    /// # Errors
    /// As [`DrivenShard::reply_and_close`], as an `io::Error`.
    pub fn reply_and_close(&mut self, conn: Admitted, reply: &[u8]) -> io::Result<()> {
        self.shard.reply_and_close(conn, reply)?;
        Ok(())
    }

    /// Submits the replies queued by [`DrivenListener::reply_and_close`]
    /// (or through [`DrivenListener::shard_mut`]'s context) now.
    ///
    /// # Errors
    /// As [`DrivenShard::flush`], as an `io::Error`.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.shard.has_queued() {
            self.shard.flush()?;
        }
        Ok(())
    }

    /// The shard, for its context ([`DrivenShard::context`]) and
    /// [`DrivenShard::flush`]. Drive it through this listener only.
    pub fn shard_mut(&mut self) -> &mut DrivenShard {
        &mut self.shard
    }

    /// Drives the shard once if the queue is empty (without waiting) and
    /// takes the next connection; `Ok(None)` when there is none.
    ///
    /// # Errors
    /// As [`DrivenListener::accept`].
    pub fn try_accept(&mut self) -> io::Result<Option<Accepted>> {
        if let Some(got) = self.queue.pop_front() {
            return Ok(Some(got));
        }
        if !self.incoming.is_empty() {
            self.register()?;
            return Ok(self.queue.pop_front());
        }
        if self.closed {
            return Err(Error::Closed.into());
        }
        self.started = true;
        self.drive()?;
        self.register()?;
        Ok(self.queue.pop_front())
    }

    /// One `drive()`: see [`drive`].
    fn drive(&mut self) -> io::Result<usize> {
        drive(&mut self.shard, &mut self.incoming, &mut self.closed)
    }

    /// Makes everything in `incoming` registered streams in `queue`, all
    /// of the batch before the first is used, so that one reactor round
    /// reports them all.
    fn register(&mut self) -> io::Result<()> {
        let mut failed = None;
        for conn in self.incoming.drain(..) {
            match into_tokio(conn, self.nonblocking) {
                Ok(Some(got)) => self.queue.push_back(got),
                Ok(None) => self.shard.peer_gone_after_delivery(),
                // That connection is lost (closed); the others are queued.
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// One `drive()` of `shard`: its connections wait in `incoming`. Sets
/// `closed` once the shard has finished.
fn drive(
    shard: &mut DrivenShard,
    incoming: &mut VecDeque<Admitted>,
    closed: &mut bool,
) -> io::Result<usize> {
    match shard.drive(|conn, _| incoming.push_back(conn)) {
        Ok(n) => {
            *closed = shard.is_finished();
            Ok(n)
        }
        Err(Error::Closed) => {
            *closed = true;
            Ok(0)
        }
        Err(e) => Err(e.into()),
    }
}
