//! An admitted connection, as the application receives it.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Instant;

use crate::backlog::Pending;

/// A connection accepted by a shard and delivered to the application.
///
/// It owns its socket: dropping it closes the connection. It reads and
/// writes like a [`TcpStream`] and converts into one with
/// [`Admitted::into_std`] (or into an [`OwnedFd`]) for any runtime.
#[derive(Debug)]
pub struct Admitted {
    stream: TcpStream,
    shard: usize,
    accepted_at: Instant,
}

impl Admitted {
    pub(crate) fn new(p: Pending, shard: usize) -> Self {
        Admitted {
            stream: TcpStream::from(p.fd),
            shard,
            accepted_at: p.accepted_at,
        }
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

    /// Gives the socket to the caller as a [`TcpStream`].
    pub fn into_std(self) -> TcpStream {
        self.stream
    }
}

impl AsFd for Admitted {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

impl AsRawFd for Admitted {
    fn as_raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}

impl From<Admitted> for OwnedFd {
    fn from(a: Admitted) -> OwnedFd {
        a.stream.into()
    }
}

impl From<Admitted> for TcpStream {
    fn from(a: Admitted) -> TcpStream {
        a.stream
    }
}

impl Read for Admitted {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buf)
    }
}

impl Write for Admitted {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}
