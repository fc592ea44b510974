//! The listener: from the shards' listening sockets to the application.
//!
//! - [`config`]: the builder; validates everything, binds the shards'
//!   `SO_REUSEPORT` sockets, starts their threads;
//! - [`acceptor`]: the listener's service on each shard: multishot ACCEPT,
//!   re-arm, backpressure and backoff, handing sockets to admission;
//! - [`group`]: the shards' `SO_REUSEPORT` group: a fresh one, or joining
//!   the group of listeners already on the port, and its steering;
//! - [`backlog`]: the per-shard lock-free ring admitted sockets wait in;
//! - [`accept`]: the running [`Listener`](accept::Listener) and its delivery
//!   (blocking, try, timeout, the accept event), shutdown and drain;
//! - [`driven`]: shards the application drives on its own threads;
//! - [`limits`]: max open connections, accept budget and accept rate, which
//!   the acceptor consults once per turn (the builder's settings for them are
//!   in `builder_limits`);
//! - [`activation`]: systemd socket activation (`LISTEN_FDS`);
//! - [`drain`]: stop accepting, let work finish, close the rest;
//! - [`handover`]: the listening sockets to a successor process.

pub(crate) mod accept;
pub(crate) mod acceptor;
pub(crate) mod activation;
pub(crate) mod backlog;
mod builder_limits;
pub(crate) mod config;
pub(crate) mod drain;
pub(crate) mod driven;
pub(crate) mod group;
pub(crate) mod handover;
pub(crate) mod limits;
