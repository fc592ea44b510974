//! `axum::serve::Listener` for the tokio listeners (feature `axum`).
//!
//! axum's `accept` must not fail: it retries, as axum does for tokio's
//! `TcpListener` (a connection error: at once; anything else: after 1 s).
//! A shard's accept error is retried at once, since the shard itself backs
//! off (EMFILE and the like); once the listener is shut down, `accept`
//! waits forever, and axum's graceful shutdown ends the serving.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use ::tokio::net::TcpStream;

use super::{DrivenListener, TcpListener};
use crate::error::Error;

/// Waits as long as the error calls for (forever once shut down).
async fn after_error(e: &io::Error) {
    let engine = e.get_ref().and_then(|i| i.downcast_ref::<Error>());
    match engine {
        Some(Error::Closed) => std::future::pending::<()>().await,
        // The shard backs off by itself.
        Some(Error::Accept { .. }) => {}
        _ if matches!(
            e.kind(),
            io::ErrorKind::ConnectionRefused
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
        ) => {}
        _ => ::tokio::time::sleep(Duration::from_secs(1)).await,
    }
}

/// `axum::serve(listener, app)` over the engine's shard threads. The
/// stream's [`AcceptedMeta`](super::AcceptedMeta) is dropped (axum takes
/// only the stream and the address): on a listener with
/// [`max_connections`](crate::ListenerBuilder::max_connections) the
/// connection stops counting as open when axum takes it.
///
/// ```no_run
/// # #[tokio::main]
/// # async fn main() -> std::io::Result<()> {
/// let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello\n" }));
/// let listener = floodgate::tokio::TcpListener::bind("127.0.0.1:3000".parse().unwrap())?;
/// axum::serve(listener, app).await
/// # }
/// ```
impl axum::serve::Listener for TcpListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match TcpListener::accept(self).await {
                Ok((stream, meta)) => return (stream, meta.peer_addr),
                Err(e) => after_error(&e).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(TcpListener::local_addr(self))
    }
}

/// `axum::serve(listener, app)` on a `current_thread` runtime over one
/// driven shard (thread per core: one such runtime and `serve` per core).
impl axum::serve::Listener for DrivenListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match DrivenListener::accept(self).await {
                Ok((stream, meta)) => return (stream, meta.peer_addr),
                Err(e) => after_error(&e).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.local_addr()
    }
}
