//! # Floodgate
//!
//! A lock-free, high-throughput TCP accept engine for Linux on io_uring, made
//! to be embedded in high-load proxies.
//!
//! A [`Listener`] runs one shard per core. Each shard is a thread pinned to
//! its core, with its own io_uring and its own `SO_REUSEPORT` listening
//! socket; a classic-BPF program steers each new connection to the shard on
//! the CPU that received it. The shard keeps one multishot ACCEPT posted and
//! puts each accepted socket into its lock-free backlog ring, bounded by the
//! effective backlog `min(requested, provider ceiling)`. When the ring is
//! full the shard stops accepting (backpressure, never loss) until the
//! application drains it.
//!
//! Delivery, all from the same rings:
//! - blocking [`Listener::accept`], [`Listener::try_accept`] and
//!   [`Listener::accept_timeout`], from any number of threads;
//! - the accept event [`Listener::accept_event`], a descriptor readable
//!   while connections are pending, for the application's own event loop;
//! - an inline handler ([`ListenerBuilder::handler`]), called on the shard
//!   thread: the fastest path;
//! - event registrations ([`ListenerBuilder::register`]): each admitted
//!   connection stays on its shard's io_uring with the listener's declared
//!   [`Interest`], its events going to a handler on the shard thread.
//!
//! With feature `tokio`, the `floodgate::tokio` module adds `accept().await` over the rings
//! (`floodgate::tokio::TcpListener`) and over a driven shard on a `current_thread`
//! runtime (`floodgate::tokio::DrivenListener`); with feature `axum`, both are
//! `axum::serve::Listener`s.
//!
//! ## Choosing a delivery path
//!
//! What each path costs the server, in CPU µs per connection (accept, reply one
//! byte, close; one shard; server on core 0, the `flood` client on core 1:
//! **client and server share 2 cores**), medians of 3 interleaved rounds of
//! `bench/compare.sh --servers floodgate_handler,peer_std,peer_tokio,tokio_mt,floodgate_accept,floodgate_accept_reply,floodgate_accept_many,floodgate_driven,floodgate_driven_std,floodgate_driven_accept,floodgate_driven_accept_ring,floodgate_tokio,floodgate_tokio_driven,floodgate_tokio_driven_ring --scenarios saturated,c64`
//! (2026-12-02 22:42 UTC on a quiet machine, PERF.md "Issue 10's rows on a quiet
//! machine"; other runs differ from it by up to 10–20% on a row):
//!
//! | path | use it when | saturated | C=64 |
//! |---|---|---:|---:|
//! | inline handler ([`ListenerBuilder::handler`]), replying with [`ShardContext::reply_and_close`] | the work is short and fits on the shard thread: reply, close, relay, register | 12.04 | 12.25 |
//! | driven shard ([`ListenerBuilder::build_driven`], [`DrivenShard::drive`]) | thread per core in your own event loop: the handler's path on your thread | 11.56 | 13.48 |
//! | [`DrivenShard::accept`] loop replying with [`DrivenShard::reply_and_close`] | a blocking accept loop on the shard's own thread, answering on its ring: no hop, no syscall of its own | 11.86 | 13.48 |
//! | the same, the application writing and dropping the socket | as above, with your own I/O | 15.70 | 17.45 |
//! | driven shard, the application writing and closing itself | your event loop, your own I/O | 16.75 | 17.51 |
//! | [`Listener::accept`] loop replying with [`Admitted::reply_and_close`] | plain threads that block; any number of them | 15.95 | 16.15 |
//! | [`Listener::accept`] / [`Listener::accept_many`] loop, write, drop | the same, with your own I/O | 23.92 / 22.08 | 21.81 / 20.18 |
//! | accept event ([`Listener::accept_event`]) | your own poll/epoll/mio loop on another thread; the rings of `accept()`, one eventfd write per batch, one read per empty pop | not measured alone: `TcpListener` below runs on it | |
//! | `floodgate::tokio::TcpListener` (feature `tokio`; multi-thread runtime) | tokio tasks on any runtime take connections from the engine's shard threads | 27.76 | 29.23 |
//! | `floodgate::tokio::DrivenListener::accept` (feature `tokio`; a `current_thread` runtime per core) | thread per core with tokio streams: no engine thread, no hop between threads | 18.70 | 21.46 |
//! | `DrivenListener::accept_admitted` + `DrivenListener::reply_and_close` | the same, answering on the shard's ring | 11.77 | 13.57 |
//! | axum (feature `axum`): `axum::serve(listener, app)` over either | an HTTP service; `bench/http.sh 60000 32 5`, a connection per request: 50.3 µs/request on `TcpListener`, 38.3 on `DrivenListener`, 42.3 on tokio's own listener | | |
//!
//! In the same run tokio's own listener loop cost 20.84 / 16.69 (`current_thread`)
//! and 21.51 / 17.91 (multi-thread), std's blocking loop 17.55 / 16.01. A path
//! that hands the connection to another thread pays the hop (the shard thread
//! and the consumer wake each other); a tokio stream pays its registration
//! (`epoll_ctl` twice), its own `send` and `close`, and, made from a socket
//! tokio did not accept (`TcpStream::from_std`), a reactor round before its
//! first read or write, which the tokio listeners share over a batch (PERF.md
//! counts the syscalls).
//!
//! An inline handler can also relay a connection to an upstream without
//! leaving its shard ([`ShardContext::relay`]): the dial and the copy both
//! ways run on the shard's io_uring, an L4 proxy's core (see
//! `examples/proxy.rs`).
//!
//! Ready-made conditions (CIDR filter, rate limit, PROXY protocol, SNI,
//! chaining) are in [`conditions`].
//!
//! ```
//! use std::io::Read;
//! use std::net::TcpStream;
//! use floodgate::Listener;
//!
//! // One shard, inline handler: reply "x" and close, on the shard's ring.
//! let listener = Listener::builder("127.0.0.1:0".parse()?)
//!     .shards(1)
//!     .handler(|conn, ctx| {
//!         let _ = ctx.reply_and_close(conn, b"x");
//!     })
//!     .build()?;
//! let mut client = TcpStream::connect(listener.local_addr())?;
//! let mut reply = Vec::new();
//! client.read_to_end(&mut reply)?;
//! assert_eq!(reply, b"x");
//! listener.shutdown();
//! let total = listener.stats().total();
//! assert_eq!(total.accepted, 1);
//! assert_eq!(total.delivered, 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Kernel requirements: io_uring with multishot ACCEPT (5.19; older kernels
//! fall back to single-shot accepts, reported in
//! [`ShardStats::multishot`]); SINGLE_ISSUER + DEFER_TASKRUN (6.1) are used
//! when present. Where io_uring is missing or disabled, `build()` returns
//! [`Error::UringUnavailable`] naming the cause.
//!
//! Optional features, all off by default:
//! - `serde`: `Serialize` and `Deserialize` on every stats and summary
//!   type ([`ListenerStats`], [`ConnectorStats`], [`RunSummary`],
//!   [`BackendChoice`], [`BacklogLength`], [`RelayOutcome`], ...).
//! - `prometheus`: the `metrics` module, collectors for the
//!   `prometheus-client` crate that read the stats at scrape time.
//! - `tracing`: `tracing` events (target `floodgate`) for accept backoffs,
//!   ring-full pauses and resumes, the backend's fallback, panics caught on
//!   a shard, errors surfaced to `accept()`, connector backoffs and relay
//!   refusals; none per connection.
//! - `tokio`: the `floodgate::tokio` module, async listeners giving
//!   `tokio::net::TcpStream`s.
//! - `axum` (implies `tokio`): `axum::serve::Listener` for them.
#![deny(unsafe_code, unsafe_op_in_unsafe_fn)]
#![deny(missing_docs, missing_debug_implementations)]
#![doc(test(attr(deny(warnings))))]

#[macro_use]
mod events;

#[allow(unsafe_code)]
mod driver;
mod shard;

mod admit;
mod connect;
mod listen;
mod relay;

pub mod conditions;

mod error;
#[cfg(feature = "prometheus")]
pub mod metrics;
mod stats;
#[cfg(feature = "tokio")]
pub mod tokio;

// The parsers' public paths (`floodgate::cidr`, ...) as before the folders;
// inlined so that their pages stay where they were.
#[doc(inline)]
pub use conditions::{cidr, proxy_protocol, rate_limit, sni, syn};

pub use admit::attrs::{Attr, Keepalive, SocketAttrs, INHERITED};
pub use admit::condition::{
    Condition, ConnectRequest, Mark, Marks, RejectHow, Value, Verdict, MAX_PEEK,
};
pub use admit::conn::Admitted;
pub use admit::qos::Qos;
pub use admit::register::{Events, Interest, RegisterHandler, Registered};
pub use admit::slot::ConnectionSlot;
pub use connect::connector::{Connector, ConnectorBuilder};
pub use connect::dial::{Completion, ConnectHandler, Connected, Dial, Ticket};
pub use connect::load::{
    CloseMode, Load, OutcomeCounts, RunSummary, SequenceOutcome, SequencePlan, SequenceRecord,
};
pub use connect::stats::{ConnectShardStats, ConnectorStats};
pub use connect::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_IO_TIMEOUT, MAX_IN_FLIGHT_PER_SHARD};
pub use driver::{Backend, BackendChoice, RingSetup, BACKEND_ENV};
pub use error::ConnectErrorKind;
pub use error::{ConfigError, Error, UringUnavailable};
pub use listen::accept::{BacklogLength, Listener};
pub use listen::acceptor::Handler;
pub use listen::config::{
    kernel_somaxconn, ListenerBuilder, DEFAULT_BACKLOG, DEFAULT_CEILING, DEFAULT_PENDING_TIMEOUT,
    MAX_CEILING,
};
pub use listen::drain::Drained;
pub use listen::driven::DrivenShard;
pub use listen::group::{Steering, SteeringInForce};
pub use listen::handover::{Handover, Successor, Takeover};
pub use listen::limits::{DEFAULT_ACCEPT_BUDGET, MAX_ACCEPT_BUDGET, MAX_ACCEPT_RATE};
pub use relay::context::ShardContext;
pub use relay::{
    RelayEnd, RelayOptions, RelayOutcome, RelaySide, DEFAULT_RELAY_BUFFER,
    DEFAULT_RELAY_CONNECT_TIMEOUT, DEFAULT_RELAY_IDLE_TIMEOUT, MAX_RELAYS_PER_SHARD,
    MAX_RELAY_BUFFER, STOP_GRACE as RELAY_STOP_GRACE,
};
pub use shard::{Coalesce, Moderation, ModerationStats, DEFAULT_MAX_PAUSE};
pub use stats::{
    Backoffs, KernelQueue, ListenerStats, OpenConnections, Rejected, RelayStats, ShardStats,
    Withdrawn,
};

#[cfg(test)]
mod tests {
    use crate::admit::register::RegisterOp;
    use crate::admit::replies::ReplyOp;
    use crate::admit::AdmitOp;
    use crate::connect::job::ConnectOp;
    use crate::listen::acceptor::AcceptOp;
    use crate::listen::limits::LimitOp;
    use crate::relay::RelayOp;
    use crate::shard::ShardOp;

    /// Each owner of operations on a shard's ring names its own kinds (the
    /// top byte of their user data); the shard routes by them without
    /// knowing them. They must never collide, or a completion would be
    /// taken for another owner's; nor be 0, which no operation uses.
    #[test]
    fn operation_kinds_are_unique_across_services() {
        let mut kinds: Vec<(u8, String)> = Vec::new();
        let mut add = |byte: u8, name: String| kinds.push((byte, name));
        ShardOp::ALL
            .iter()
            .for_each(|&k| add(k.into(), format!("{k:?}")));
        AcceptOp::ALL
            .iter()
            .for_each(|&k| add(k.into(), format!("{k:?}")));
        ReplyOp::ALL
            .iter()
            .for_each(|&k| add(k.into(), format!("{k:?}")));
        AdmitOp::ALL
            .iter()
            .for_each(|&k| add(k.into(), format!("{k:?}")));
        RegisterOp::ALL
            .iter()
            .for_each(|&k| add(k.into(), format!("{k:?}")));
        RelayOp::ALL
            .iter()
            .for_each(|&k| add(k.into(), format!("{k:?}")));
        ConnectOp::ALL
            .iter()
            .for_each(|&k| add(k.into(), format!("{k:?}")));
        LimitOp::ALL
            .iter()
            .for_each(|&k| add(k.into(), format!("{k:?}")));
        kinds.sort();
        for pair in kinds.windows(2) {
            assert_ne!(
                pair[0].0, pair[1].0,
                "{} and {} share a kind",
                pair[0].1, pair[1].1
            );
        }
        assert!(kinds.iter().all(|(b, _)| *b != 0), "kind 0 is used");
        assert_eq!(kinds.len(), 27);
    }
}
