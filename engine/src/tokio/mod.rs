//! tokio listeners (feature `tokio`): `accept().await` gives a
//! [`tokio::net::TcpStream`] with its
//! [`AcceptedMeta`].
//!
//! Two ways, as the engine has them:
//! - [`TcpListener`]: the engine's shard threads accept; any number of
//!   tasks on any runtime (multi-thread or `current_thread`) take
//!   connections from the shards' rings. A task that finds work takes it
//!   without a syscall; one that finds none waits on the listener's accept
//!   event, registered with tokio's reactor.
//! - [`DrivenListener`]: a driven shard
//!   ([`ListenerBuilder::build_driven`]) under a `current_thread` runtime,
//!   one per core: the runtime's thread runs the shard (no engine thread,
//!   no hop between threads); `accept().await` drives it when its
//!   descriptor is readable.
//!
//! Both accept non-blocking sockets (SOCK_NONBLOCK in the accept itself,
//! [`ListenerBuilder::nonblocking`]), which the stream needs; both are
//! cancel-safe: the pop that takes a connection is synchronous, so an
//! `accept()` future dropped at any await loses none. No `unsafe` is
//! needed to use them (tokio's `AsyncFd` registration is done inside the
//! engine). With feature `axum` both implement `axum::serve::Listener`, so
//! `axum::serve(listener, app)` runs on Floodgate.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! let listener = floodgate::tokio::TcpListener::from_builder(
//!     floodgate::Listener::builder("127.0.0.1:0".parse().unwrap()).shards(1),
//! )?;
//! let addr = listener.local_addr();
//! let client = tokio::spawn(async move {
//!     let mut s = tokio::net::TcpStream::connect(addr).await?;
//!     let mut reply = Vec::new();
//!     s.read_to_end(&mut reply).await?;
//!     Ok::<_, std::io::Error>(reply)
//! });
//! let (mut stream, meta) = listener.accept().await?;
//! assert_eq!(meta.shard, 0);
//! stream.write_all(b"x").await?;
//! drop(stream);
//! assert_eq!(client.await.unwrap()?, b"x");
//! listener.shutdown();
//! assert!(listener.stats().conserved());
//! # Ok(())
//! # }
//! ```

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ::tokio::io::unix::AsyncFd;

use crate::admit::condition::Value;
use crate::admit::conn::Admitted;
use crate::admit::slot::ConnectionSlot;
use crate::driver::runtime;
use crate::error::Error;
use crate::listen::accept::Listener;
use crate::listen::config::ListenerBuilder;
use crate::stats::ListenerStats;

#[cfg(feature = "axum")]
mod axum;
mod driven;

pub use driven::DrivenListener;

/// What the engine knows of a connection it hands over as a tokio stream.
#[derive(Debug)]
#[non_exhaustive]
pub struct AcceptedMeta {
    /// The shard that accepted it.
    pub shard: usize,
    /// The client's address.
    pub peer_addr: SocketAddr,
    /// When the shard took it from the kernel.
    pub accepted_at: Instant,
    /// What the condition attached when it accepted the connection
    /// ([`Verdict::Accept`](crate::Verdict::Accept)'s `value`), if any.
    pub value: Option<Value>,
    /// On a listener with a
    /// [`max_connections`](crate::ListenerBuilder::max_connections): keeps
    /// the connection counted as open until dropped (drop it with the
    /// stream). Empty otherwise.
    pub slot: ConnectionSlot,
}

impl AcceptedMeta {
    /// The condition's value, if it is a `T`.
    pub fn value<T: std::any::Any>(&self) -> Option<&T> {
        self.value.as_ref()?.get::<T>()
    }
}

/// A tokio stream and what the engine knows of it.
pub(crate) type Accepted = (::tokio::net::TcpStream, AcceptedMeta);

/// An admitted connection as a tokio stream and its meta; `fcntl` makes it
/// non-blocking unless the accept did (`accepted_nonblocking`). A peer that
/// is already gone (no address to give) is `None`: the caller counts it
/// withdrawn instead of delivered (`peer_gone`).
pub(crate) fn into_tokio(
    conn: Admitted,
    accepted_nonblocking: bool,
) -> io::Result<Option<Accepted>> {
    let shard = conn.shard();
    let accepted_at = conn.accepted_at();
    let peer_addr = match conn.peer_addr() {
        Ok(a) => a,
        Err(_) => return Ok(None),
    };
    let value = conn.raw_value().cloned();
    let (stream, slot) = conn.into_std_with_slot();
    if !accepted_nonblocking {
        stream.set_nonblocking(true)?;
    }
    let stream = ::tokio::net::TcpStream::from_std(stream)?;
    Ok(Some((
        stream,
        AcceptedMeta {
            shard,
            peer_addr,
            accepted_at,
            value,
            slot,
        },
    )))
}

/// A Floodgate listener for tokio: the engine's shards accept on their
/// threads, tasks take the connections with `accept().await`.
///
/// Create it inside a tokio runtime (multi-thread or `current_thread`);
/// share it (`Arc`) between tasks that accept, or give it to
/// `axum::serve` (feature `axum`). [`TcpListener::listener`] reaches the
/// engine's [`Listener`] (stats, drain, hand-over). Dropping it shuts the
/// listener down when no other handle holds it.
///
/// Its shards are pinned to cores `0..N` by default, as any listener's;
/// beside a multi-thread runtime that uses every core,
/// `.pin(false)` (or fewer shards) leaves the scheduler to place them.
#[derive(Debug)]
pub struct TcpListener {
    /// A duplicate of the listener's accept event, registered with the
    /// reactor (dropped, and so deregistered, before the listener).
    event: AsyncFd<OwnedFd>,
    listener: Arc<Listener>,
    /// Connections taken from the rings in one batch and registered with
    /// the reactor, not yet returned by `accept()`.
    queue: Mutex<VecDeque<Accepted>>,
}

/// Connections taken from the rings at once: registered together, they are
/// reported ready by one reactor round.
const BATCH: usize = 16;

impl TcpListener {
    /// Listens on `addr` with the default builder ([`Listener::builder`]).
    ///
    /// # Errors
    /// As [`TcpListener::from_builder`].
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        Self::from_builder(Listener::builder(addr))
    }

    /// Builds the listener `builder` describes, with non-blocking accepts
    /// ([`ListenerBuilder::nonblocking`]: the stream needs them, and they
    /// cost no syscall), and registers its accept event with the current
    /// runtime's reactor.
    ///
    /// # Errors
    /// The builder's errors (as [`io::Error`], the engine's error inside);
    /// `Unsupported` if the builder has an inline handler; `Other` outside
    /// a tokio runtime; the reactor's registration error.
    pub fn from_builder(builder: ListenerBuilder) -> io::Result<Self> {
        if builder.has_handler() {
            return Err(Error::InlineDelivery.into());
        }
        let listener = Arc::new(builder.nonblocking(true).build()?);
        let event = listener.accept_event().try_clone_to_owned()?;
        Ok(TcpListener {
            event: runtime::readable(event)?,
            listener,
            queue: Mutex::new(VecDeque::new()),
        })
    }

    /// Takes the next connection: at once if one is pending (no syscall),
    /// otherwise when a shard's batch signals the accept event.
    ///
    /// Cancel-safe: dropping the future loses no connection (a connection
    /// is taken from its ring only in a synchronous step that returns it).
    ///
    /// # Errors
    /// As [`io::Error`]s converted from the engine's: `NotConnected` after
    /// shutdown; a shard's accept error (the shard backs off and goes on);
    /// the stream's registration with the reactor.
    pub async fn accept(&self) -> io::Result<Accepted> {
        loop {
            if let Some(got) = self.try_accept()? {
                return Ok(got);
            }
            let mut ready = self.event.readable().await?;
            // The empty pop above cleared the event (and set it again if a
            // push raced with it); readiness is cleared only after another
            // empty pop, so a signal that came meanwhile is not lost.
            match self.try_accept()? {
                Some(got) => return Ok(got),
                None => ready.clear_ready(),
            }
        }
    }

    /// Takes the next pending connection without waiting; `Ok(None)` when
    /// none is pending.
    ///
    /// Connections are taken from the rings up to 16 at a time
    /// ([`Listener::accept_many`]) and all registered with the reactor at
    /// once: a stream made from a socket tokio did not accept itself
    /// (`TcpStream::from_std`) learns that it is ready from the reactor, and
    /// one reactor round then answers for the whole batch instead of one
    /// per connection. The rest wait in this listener ([`TcpListener::queued`]);
    /// they count as delivered in the stats.
    ///
    /// # Errors
    /// As [`TcpListener::accept`].
    pub fn try_accept(&self) -> io::Result<Option<Accepted>> {
        if let Some(got) = self.lock().pop_front() {
            return Ok(Some(got));
        }
        let mut batch = Vec::with_capacity(BATCH);
        self.listener.accept_many_asking_peer(&mut batch, BATCH)?;
        let mut first = None;
        let mut failed = None;
        let mut queue = self.lock();
        for conn in batch {
            let shard = conn.shard();
            match into_tokio(conn, true) {
                Ok(Some(got)) if first.is_none() => first = Some(got),
                Ok(Some(got)) => queue.push_back(got),
                Ok(None) => self.listener.peer_gone_after_delivery(shard),
                // That connection is lost (closed); the others are kept.
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        match (first, failed) {
            (Some(got), _) => Ok(Some(got)),
            (None, Some(e)) => Err(e),
            (None, None) => Ok(None),
        }
    }

    /// Connections taken from the rings and registered, not yet returned.
    pub fn queued(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Accepted>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The address the shards listen on.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr()
    }

    /// The engine's counters ([`Listener::stats`]).
    pub fn stats(&self) -> ListenerStats {
        self.listener.stats()
    }

    /// Shuts the listener down ([`Listener::shutdown`]): pending
    /// connections are closed and counted; waiting `accept()` calls return
    /// `NotConnected`.
    pub fn shutdown(&self) {
        self.listener.shutdown();
    }

    /// The engine's listener, for everything else it offers.
    pub fn listener(&self) -> &Arc<Listener> {
        &self.listener
    }
}
