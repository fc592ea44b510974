//! The connect side: per-core shards that post io_uring CONNECT operations,
//! on the same shard machinery as the listener ([`crate::shard`]).
//!
//! A [`Connector`] runs one shard per core (or as many as asked). Requests
//! reach a shard through its lock-free queue (`crossbeam_queue::SegQueue`)
//! and a wake-up of its eventfd; the shard creates the socket (io_uring
//! SOCKET where the kernel has it, 5.19+, else socket2), binds it if a
//! source address is given (with `IP_BIND_ADDRESS_NO_PORT`, so that many
//! source addresses share the ephemeral port range and the port is picked at
//! connect time), and posts a CONNECT with a linked LINK_TIMEOUT.
//! Completions come back four ways, all from the same shards:
//!
//! - blocking: [`Connector::connect`] / [`Connector::connect_with`];
//! - try/poll: [`Connector::submit`] returns a [`Ticket`], then
//!   [`Connector::try_complete`] / [`Connector::complete_timeout`];
//! - the completion event [`Connector::completion_event`], an eventfd
//!   readable while completions are waiting (the listener's accept-event
//!   pattern, lost-wakeup free);
//! - an inline handler ([`ConnectorBuilder::handler`]) called on the shard.
//!
//! For load generation, [`Connector::run`] executes whole *sequences* on the
//! shards' rings: CONNECT → optional SEND → optional RECV until N bytes (or
//! EOF) → close with FIN or RST, posted as one IO_LINK chain in the shard's
//! batch (one `io_uring_enter` per loop turn), closed loop (keep C in
//! flight) or open loop (a fixed rate, latency measured from the intended
//! start so that coordinated omission is not hidden), each producing a
//! [`SequenceRecord`] with its timings and [`SequenceOutcome`]. Their
//! connect timeout is a deadline the shard scans every 10 ms, not a timer
//! per connection.
//!
//! Where the kernel allows (probed per shard: a direct-descriptor table and
//! SOCKET into it; [`ConnectShardStats::direct_sockets`]), a sequence's
//! socket lives in the ring's direct table, never in the fd table, and the
//! SOCKET heads the same chain. With RST close the chain ends with a CONNECT
//! to `AF_UNSPEC`: the kernel's `tcp_disconnect` sends the RST, frees the
//! port and leaves the socket ready to connect again, so the run's next
//! sequence in that slot reuses it. On loopback the client's core carries
//! the handshake of both ends; not creating and freeing a socket, file,
//! inode and dentry per connection is what makes the tool cheaper than the
//! kernel work it drives (PERF.md). Sequences with socket attributes use
//! plain descriptors, ended and kept the same way (the attributes stay on
//! the kept socket). Sequences with explicit source addresses take a new
//! socket each (sources go round-robin per connection) and close with
//! SO_LINGER 0. Kept sockets are closed at the end of every run.
//!
//! The files: [`connector`] (the builder and the handle), [`dial`] (one
//! connect's values), [`load`] (plans, records, outcomes), [`stats`]; on the
//! shard, `dialer` (the service, its jobs and single connects), `slot` (one
//! connect or sequence in flight and its end), `sequence` (load runs) and
//! `socket` (socket creation and checks).
//!
//! [`Connector`]: connector::Connector
//! [`Connector::connect`]: connector::Connector::connect
//! [`Connector::connect_with`]: connector::Connector::connect_with
//! [`Connector::submit`]: connector::Connector::submit
//! [`Connector::try_complete`]: connector::Connector::try_complete
//! [`Connector::complete_timeout`]: connector::Connector::complete_timeout
//! [`Connector::completion_event`]: connector::Connector::completion_event
//! [`Connector::run`]: connector::Connector::run
//! [`ConnectorBuilder::handler`]: connector::ConnectorBuilder::handler
//! [`Ticket`]: dial::Ticket
//! [`SequenceRecord`]: load::SequenceRecord
//! [`SequenceOutcome`]: load::SequenceOutcome
//! [`ConnectShardStats::direct_sockets`]: stats::ConnectShardStats::direct_sockets

pub(crate) mod connector;
pub(crate) mod dial;
pub(crate) mod dialer;
pub(crate) mod job;
pub(crate) mod load;
mod sequence;
mod slot;
mod socket;
pub(crate) mod stats;

use std::time::Duration;

/// The connect timeout used when none is configured.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a sequence may spend after its connect (send, receive) before
/// it is cancelled and counted as
/// [`SequenceOutcome::TimedOut`](load::SequenceOutcome::TimedOut), by default.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The most sequences one shard keeps in flight (each holds a socket).
pub const MAX_IN_FLIGHT_PER_SHARD: usize = 16_384;
