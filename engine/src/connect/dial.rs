//! One connect's values: what to dial ([`Dial`]), the [`Ticket`] of a
//! submitted one, its [`Completion`], the [`Connected`] socket, and the
//! inline handler type.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crate::admit::attrs::SocketAttrs;
use crate::error::Error;

/// The application's inline completion handler, called on the shard thread.
pub type ConnectHandler = dyn Fn(Completion) + Send + Sync;

/// A connect to make: the target, and optionally its own source address and
/// timeout (otherwise the connector's).
///
/// ```
/// use std::time::Duration;
/// use floodgate::Dial;
///
/// let dial = Dial::new("127.0.0.1:8080".parse()?)
///     .source("127.0.0.2".parse()?)
///     .timeout(Duration::from_millis(200));
/// assert_eq!(dial.addr().port(), 8080);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dial {
    pub(super) addr: SocketAddr,
    pub(super) source: Option<IpAddr>,
    pub(super) timeout: Option<Option<Duration>>,
    pub(super) attrs: Option<Arc<SocketAttrs>>,
}

impl Dial {
    /// A connect to `addr` with the connector's source and timeout.
    pub fn new(addr: SocketAddr) -> Self {
        Dial {
            addr,
            source: None,
            timeout: None,
            attrs: None,
        }
    }

    /// These socket attributes instead of the connector's
    /// ([`ConnectorBuilder::attrs`](crate::ConnectorBuilder::attrs)).
    pub fn attrs(mut self, attrs: SocketAttrs) -> Self {
        self.attrs = Some(Arc::new(attrs));
        self
    }

    /// Binds to `ip` (any free port) instead of the connector's sources.
    pub fn source(mut self, ip: IpAddr) -> Self {
        self.source = Some(ip);
        self
    }

    /// This connect's timeout.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(Some(t));
        self
    }

    /// No timeout for this connect (the kernel's SYN retries decide).
    pub fn no_timeout(mut self) -> Self {
        self.timeout = Some(None);
        self
    }

    /// The target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl From<SocketAddr> for Dial {
    fn from(addr: SocketAddr) -> Self {
        Dial::new(addr)
    }
}

/// Identifies a connect posted with [`Connector::submit`](crate::Connector::submit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(pub(super) u64);

impl Ticket {
    /// The number (unique per connector, increasing).
    pub fn id(&self) -> u64 {
        self.0
    }
}

/// The result of a submitted connect.
#[derive(Debug)]
pub struct Completion {
    /// The ticket [`Connector::submit`](crate::Connector::submit) returned.
    pub ticket: Ticket,
    /// The shard that ran it.
    pub shard: usize,
    /// The connection, or why there is none ([`Error::Connect`] with its
    /// kind, or [`Error::Closed`] when shutdown cancelled it).
    pub result: Result<Connected, Error>,
}

/// A connection the connector established. It owns its socket (blocking
/// mode, close-on-exec): dropping it closes the connection.
#[derive(Debug)]
pub struct Connected {
    pub(super) stream: TcpStream,
    pub(super) peer: SocketAddr,
    pub(super) shard: usize,
    pub(super) latency: Duration,
}

impl Connected {
    /// The shard that connected it.
    pub fn shard(&self) -> usize {
        self.shard
    }

    /// From the request reaching the shard to the connect's completion.
    pub fn latency(&self) -> Duration {
        self.latency
    }

    /// The address connected to.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// The local address the kernel bound (`getsockname`).
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

crate::admit::conn::stream_owner!(Connected);
