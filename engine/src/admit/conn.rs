//! An admitted connection, as the application receives it.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::time::Instant;

use crate::admit::condition::Value;
use crate::admit::pending::Pending;
use crate::admit::slot::ConnectionSlot;

/// A connection accepted by a shard and delivered to the application.
///
/// It owns its socket: dropping it closes the connection. It reads and
/// writes like a [`TcpStream`] and converts into one with
/// [`Admitted::into_std`] (or into an [`OwnedFd`](std::os::fd::OwnedFd)) for any runtime.
///
/// On a listener with a [`max_connections`](crate::ListenerBuilder::max_connections)
/// it counts as open until it is dropped; the socket taken out of it
/// (`into_std`, `From`) stops counting at that moment, unless it is taken
/// with [`Admitted::into_std_with_slot`], whose [`ConnectionSlot`] keeps
/// it counted until the slot is dropped.
#[derive(Debug)]
pub struct Admitted {
    stream: TcpStream,
    shard: usize,
    accepted_at: Instant,
    value: Option<Value>,
    slot: ConnectionSlot,
}

impl Admitted {
    pub(crate) fn new(p: Pending, shard: usize) -> Self {
        Admitted {
            stream: TcpStream::from(p.fd),
            shard,
            accepted_at: p.accepted_at,
            value: p.value,
            slot: p.slot,
        }
    }

    /// Back into the engine's form (a registration hands it back), value kept.
    pub(crate) fn into_pending(self) -> Pending {
        Pending {
            fd: self.stream.into(),
            accepted_at: self.accepted_at,
            value: self.value,
            slot: self.slot,
        }
    }

    /// The socket and the slot that keeps it counted, for the engine's own
    /// paths that close it later (a reply, a relay).
    pub(crate) fn into_fd_and_slot(self) -> (std::os::fd::OwnedFd, ConnectionSlot) {
        (self.stream.into(), self.slot)
    }

    /// What the condition attached when it accepted the connection
    /// ([`Verdict::Accept`](crate::Verdict::Accept)'s `value`), if it is a `T`.
    ///
    /// ```
    /// use floodgate::{Listener, Value, Verdict};
    ///
    /// let listener = Listener::builder("127.0.0.1:0".parse()?)
    ///     .shards(1)
    ///     .condition(|_: &floodgate::ConnectRequest<'_>| Verdict::accept_with(Value::new(7u32)))
    ///     .build()?;
    /// let _client = std::net::TcpStream::connect(listener.local_addr())?;
    /// let conn = listener.accept()?;
    /// assert_eq!(conn.value::<u32>(), Some(&7));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn value<T: std::any::Any>(&self) -> Option<&T> {
        self.value.as_ref()?.get::<T>()
    }

    /// The condition's value as it was given, whatever its type.
    pub fn raw_value(&self) -> Option<&Value> {
        self.value.as_ref()
    }

    /// The shard that accepted it.
    pub fn shard(&self) -> usize {
        self.shard
    }

    /// When the shard took it from the kernel.
    pub fn accepted_at(&self) -> Instant {
        self.accepted_at
    }

    /// The client's address (`getpeername`).
    ///
    /// # Errors
    /// ENOTCONN if the client has already reset the connection.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.stream.peer_addr()
    }

    /// The local address (`getsockname`).
    ///
    /// # Errors
    /// As `getsockname(2)`.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.stream.local_addr()
    }

    /// Borrows the socket as a [`TcpStream`].
    pub fn as_std(&self) -> &TcpStream {
        &self.stream
    }

    /// Gives the socket to the caller as a [`TcpStream`]. On a listener
    /// with a [`max_connections`](crate::ListenerBuilder::max_connections)
    /// the connection stops counting as open here (see
    /// [`Admitted::into_std_with_slot`]).
    pub fn into_std(self) -> TcpStream {
        self.stream
    }

    /// Sends `reply` and closes the connection, the reply leaving in the
    /// same segment as the FIN: a `send` with `MSG_MORE` (held back until
    /// the close pushes it), then the close. One segment instead of two
    /// against a plain `write` then drop, which is what the inline
    /// handler's [`ShardContext::reply_and_close`](crate::ShardContext::reply_and_close)
    /// does on the ring; on a [`DrivenShard`](crate::DrivenShard),
    /// [`DrivenShard::reply_and_close`](crate::DrivenShard::reply_and_close)
    /// does it with no syscall of the caller's.
    ///
    /// Linux resets (RST) a connection closed with unread input, and the
    /// reply is then lost: read what the client sent first if it may have.
    ///
    /// ```
    /// use std::io::Read;
    /// use floodgate::Listener;
    ///
    /// let listener = Listener::builder("127.0.0.1:0".parse()?).shards(1).build()?;
    /// let mut client = std::net::TcpStream::connect(listener.local_addr())?;
    /// listener.accept()?.reply_and_close(b"bye")?;
    /// let mut got = Vec::new();
    /// client.read_to_end(&mut got)?;
    /// assert_eq!(got, b"bye");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As `send(2)` (the connection is closed either way); `WouldBlock` on
    /// a non-blocking socket
    /// ([`ListenerBuilder::nonblocking`](crate::ListenerBuilder::nonblocking))
    /// whose send buffer cannot take the whole reply.
    pub fn reply_and_close(self, reply: &[u8]) -> io::Result<()> {
        let sock = socket2::SockRef::from(&self.stream);
        let mut sent = 0;
        while sent < reply.len() {
            match sock.send_with_flags(&reply[sent..], libc::MSG_MORE | libc::MSG_NOSIGNAL) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // Dropping `self` closes the socket: the FIN carries what MSG_MORE
        // held back.
        Ok(())
    }

    /// Gives the socket to the caller with its [`ConnectionSlot`]: on a
    /// listener with a [`max_connections`](crate::ListenerBuilder::max_connections)
    /// the connection counts as open until the slot is dropped (drop it
    /// when you close the stream). Without a maximum the slot is empty.
    pub fn into_std_with_slot(self) -> (TcpStream, ConnectionSlot) {
        (self.stream, self.slot)
    }
}

/// The std traits of a type that owns a connected `TcpStream` in a field
/// named `stream`: fd access, conversion into the fd or the stream, and
/// Read/Write by delegation.
macro_rules! stream_owner {
    ($t:ty) => {
        impl std::os::fd::AsFd for $t {
            fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
                std::os::fd::AsFd::as_fd(&self.stream)
            }
        }

        impl std::os::fd::AsRawFd for $t {
            fn as_raw_fd(&self) -> std::os::fd::RawFd {
                std::os::fd::AsRawFd::as_raw_fd(&self.stream)
            }
        }

        impl From<$t> for std::os::fd::OwnedFd {
            fn from(c: $t) -> std::os::fd::OwnedFd {
                c.stream.into()
            }
        }

        impl From<$t> for std::net::TcpStream {
            fn from(c: $t) -> std::net::TcpStream {
                c.stream
            }
        }

        impl std::io::Read for $t {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                std::io::Read::read(&mut self.stream, buf)
            }
        }

        impl std::io::Write for $t {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                std::io::Write::write(&mut self.stream, buf)
            }

            fn flush(&mut self) -> std::io::Result<()> {
                std::io::Write::flush(&mut self.stream)
            }
        }
    };
}
pub(crate) use stream_owner;

stream_owner!(Admitted);
