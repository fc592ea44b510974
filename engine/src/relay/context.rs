//! What an inline handler can do on its shard's io_uring.

use std::io;

use crate::admit::conn::Admitted;
use crate::admit::replies::Replies;
use crate::driver::Driver;
use crate::relay::{OnEnd, RelayOptions, RelayOutcome, Relays};

/// The shard an inline handler runs on, and its io_uring.
///
/// Operations posted through it are submitted with the shard's next
/// `io_uring_enter`, batched with everything else of that turn.
#[derive(Debug)]
pub struct ShardContext<'a> {
    shard: usize,
    ring: &'a mut Driver,
    replies: &'a mut Replies,
    relays: &'a mut Relays,
}

impl<'a> ShardContext<'a> {
    pub(crate) fn new(
        shard: usize,
        ring: &'a mut Driver,
        replies: &'a mut Replies,
        relays: &'a mut Relays,
    ) -> Self {
        ShardContext {
            shard,
            ring,
            replies,
            relays,
        }
    }

    /// Relays `conn` to `upstream` on this shard's io_uring until either
    /// side closes: an L4 proxy's splice, without leaving the shard.
    ///
    /// The upstream socket is created here and dialled with a CONNECT
    /// (5.5) and a linked timeout ([`RelayOptions::with_connect_timeout`]).
    /// Once connected, bytes are copied both ways, each direction through
    /// its own buffer ([`RelayOptions::with_buffer_size`]) as RECV → SEND
    /// of exactly the bytes received → RECV. End of stream from one side
    /// shuts down the other side's write half (SHUTDOWN, 5.11) after the
    /// bytes before it were sent; both sockets close once both directions
    /// ended. A reset or error on either side, an upstream that refuses or
    /// times out, a relay idle for its idle timeout
    /// ([`RelayOptions::with_idle_timeout`], 10 min by default) resets
    /// both sockets. The listener's shutdown (or a drain's deadline) winds
    /// the relay down instead: no more reading, what was read is sent, then
    /// a half-close each way (FIN), unless a peer takes nothing for
    /// [`crate::RELAY_STOP_GRACE`] (then a reset). TCP_NODELAY is set on both
    /// sockets unless [`RelayOptions::with_nodelay`] says otherwise.
    /// Progress and outcomes are counted in [`crate::ShardStats::relays`];
    /// [`ShardContext::relay_with`] also tells the application how each
    /// relay ended.
    ///
    /// At the shard's cap ([`crate::ListenerBuilder::max_relays_per_shard`],
    /// [`crate::ListenerBuilder::relay_memory_per_shard`]) the relay is
    /// refused: the client is reset and `refused_cap` counted. A handler
    /// that would rather answer such a client itself can keep count of its
    /// relays with [`ShardContext::relay_with`] and reply before relaying.
    ///
    /// Whatever the client sent first (a PROXY header, peeked by admission)
    /// is relayed as it is, unless [`RelayOptions::with_strip_proxy_header`]
    /// asks for a leading PROXY header to be consumed.
    ///
    /// ```
    /// use std::io::{Read, Write};
    /// use std::net::{Shutdown, TcpListener, TcpStream};
    /// use floodgate::{Listener, RelayOptions};
    ///
    /// // An upstream that answers "pong" and closes.
    /// let upstream = TcpListener::bind("127.0.0.1:0")?;
    /// let up_addr = upstream.local_addr()?;
    /// let server = std::thread::spawn(move || -> std::io::Result<()> {
    ///     let (mut s, _) = upstream.accept()?;
    ///     let mut req = Vec::new();
    ///     s.read_to_end(&mut req)?;
    ///     s.write_all(b"pong")?;
    ///     Ok(())
    /// });
    /// let listener = Listener::builder("127.0.0.1:0".parse()?)
    ///     .shards(1)
    ///     .handler(move |conn, ctx| {
    ///         let _ = ctx.relay(conn, up_addr, RelayOptions::default());
    ///     })
    ///     .build()?;
    /// let mut client = TcpStream::connect(listener.local_addr())?;
    /// client.write_all(b"ping")?;
    /// client.shutdown(Shutdown::Write)?;
    /// let mut reply = Vec::new();
    /// client.read_to_end(&mut reply)?;
    /// assert_eq!(reply, b"pong");
    /// server.join().expect("upstream thread")?;
    /// listener.shutdown();
    /// let relays = listener.stats().total().relays;
    /// assert_eq!(relays.started, 1);
    /// assert_eq!(relays.bytes_to_upstream, 4);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// If the shard is at its relay cap, the upstream socket cannot be
    /// created (EMFILE …), the ring cannot take the CONNECT, or the listener
    /// is shutting down; `conn` is reset then and nothing is left in flight.
    pub fn relay(
        &mut self,
        conn: Admitted,
        upstream: std::net::SocketAddr,
        opts: RelayOptions,
    ) -> io::Result<()> {
        let (fd, slot) = conn.into_fd_and_slot();
        self.relays.start(self.ring, fd, slot, upstream, opts, None)
    }

    /// As [`ShardContext::relay`], and once the relay is over (both of its
    /// sockets closed) `on_end` is called with its [`RelayOutcome`]: how it
    /// ended, which side ended first, the bytes each way and how long it
    /// lived.
    ///
    /// `on_end` is called exactly once for each call of `relay_with`,
    /// whatever it returns: for a relay that could not start (at the cap:
    /// [`crate::RelayEnd::CapRefused`]) before `relay_with` returns its
    /// error, otherwise later. It runs on the shard thread, between
    /// completions, so it must not block (hand the outcome to a channel or
    /// a counter). A panic in it is caught and counted in
    /// [`crate::RelayStats::callback_panics`]; the shard goes on.
    ///
    /// ```
    /// use std::io::Read;
    /// use std::net::{TcpListener, TcpStream};
    /// use std::sync::mpsc;
    /// use floodgate::{Listener, RelayEnd, RelayOptions, RelaySide};
    ///
    /// // An upstream address nothing listens on: the dial is refused.
    /// let closed = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// let (tx, rx) = mpsc::channel();
    /// let listener = Listener::builder("127.0.0.1:0".parse()?)
    ///     .shards(1)
    ///     .handler(move |conn, ctx| {
    ///         let tx = tx.clone();
    ///         let _ = ctx.relay_with(conn, closed, RelayOptions::default(), move |outcome| {
    ///             let _ = tx.send(outcome);
    ///         });
    ///     })
    ///     .build()?;
    /// let mut client = TcpStream::connect(listener.local_addr())?;
    /// let _ = client.read(&mut [0u8; 1]); // reset by the relay
    /// let outcome = rx.recv()?;
    /// assert_eq!(outcome.end, RelayEnd::UpstreamRefused);
    /// assert_eq!(outcome.first, Some(RelaySide::Upstream));
    /// assert_eq!(outcome.bytes_to_upstream, 0);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`ShardContext::relay`].
    pub fn relay_with<F>(
        &mut self,
        conn: Admitted,
        upstream: std::net::SocketAddr,
        opts: RelayOptions,
        on_end: F,
    ) -> io::Result<()>
    where
        F: FnOnce(RelayOutcome) + Send + 'static,
    {
        let on_end = OnEnd(Box::new(on_end));
        let (fd, slot) = conn.into_fd_and_slot();
        self.relays
            .start(self.ring, fd, slot, upstream, opts, Some(on_end))
    }

    /// The shard's index.
    pub fn shard(&self) -> usize {
        self.shard
    }

    /// Sends `reply` on `conn` and closes it, as two linked io_uring
    /// operations submitted with this turn's batch: a SEND with `MSG_MORE`,
    /// so that the reply leaves in the same segment as the FIN (unless the
    /// listener sends replies at once:
    /// [`crate::ListenerBuilder::replies_at_once`]), and a CLOSE.
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
        let (fd, slot) = conn.into_fd_and_slot();
        self.replies.post_counted(self.ring, fd, reply, slot)
    }

    /// As [`ShardContext::reply_and_close`], after reading and discarding
    /// whatever the client has sent so far (one non-blocking `recv`), so
    /// that the close is a FIN carrying the reply rather than an RST.
    ///
    /// # Errors
    /// As [`ShardContext::reply_and_close`].
    pub fn drain_reply_and_close(&mut self, conn: Admitted, reply: &[u8]) -> io::Result<()> {
        use std::os::fd::AsFd;
        crate::driver::sys::discard_now(conn.as_fd());
        self.reply_and_close(conn, reply)
    }
}
