//! Benchmark peers and measurement helpers for Floodgate.
//!
//! - [`peer`]: the command line, pinning and listener setup shared by the peer servers in
//!   `src/bin/` (`peer_std`, `peer_epoll`, `peer_tokio`, `peer_uring`). Each peer accepts a TCP
//!   connection, writes one byte (`x`) and closes it, on one thread.
//! - [`fair`]: the fair accept-latency measurement (every acceptor asleep in its wait on its
//!   own pinned thread, the client on another core) and its peers, for the `accept_fair` bench
//!   and the `fair_latency` binary.
//! - [`harness`]: starting a pinned server, running `flood run` against it, medians: what the
//!   comparison binaries (`compare`, `client_cost`) share.
//! - [`measure`]: readers of `/proc` counters (process CPU time, voluntary context switches, a
//!   core's busy time) and [`measure::CpuQuota`], a cgroup CPU cap for saturated runs.
//!
//! Only loopback addresses are ever used by anything in this crate.

#![warn(missing_docs)]

pub mod fair;
pub mod harness;
pub mod measure;
pub mod peer;
