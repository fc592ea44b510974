//! What load sequences keep on a shard: a run's pacing and back-off state,
//! the sockets kept from one sequence to the next, the direct descriptor
//! table (what the dialer does with them is in `dialer/runs.rs`).

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use crate::driver::Driver;

use super::job::RunJob;
use super::load::OutcomeCounts;

/// The largest single RECV a sequence posts; larger expectations loop.
pub(super) const RECV_CHUNK: usize = 64 * 1024;

/// First and longest pause of a load whose sockets cannot be created.
pub(super) const MIN_BACKOFF: Duration = Duration::from_millis(1);
pub(super) const MAX_BACKOFF: Duration = Duration::from_millis(100);

/// A run in progress on one shard.
pub(super) struct Run {
    pub(super) job: RunJob,
    pub(super) in_flight: usize,
    pub(super) started: u64,
    pub(super) outcomes: OutcomeCounts,
    pub(super) next_due: Instant,
    pub(super) deadline: Option<Instant>,
    pub(super) last_end: Instant,
    pub(super) next_source: usize,
}

impl Run {
    pub(super) fn may_start(&self, now: Instant) -> bool {
        if self.job.count.is_some_and(|c| self.started >= c) {
            return false;
        }
        let at = if self.job.interval.is_some() {
            self.next_due
        } else {
            now
        };
        !self.deadline.is_some_and(|d| at >= d)
    }

    pub(super) fn finished(&self, now: Instant) -> bool {
        self.in_flight == 0 && !self.may_start(now)
    }
}

/// Where a sequence's plain descriptor comes from and how it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PlainSocket {
    /// New; closed at the end (FIN, or an RST by SO_LINGER 0).
    NewClosed,
    /// New; disconnected at the end (the RST) and kept for the next one.
    NewKept,
    /// Kept from the slot's last sequence, and kept again.
    Reused,
}

impl PlainSocket {
    pub(super) fn new(keep: bool) -> Self {
        if keep {
            PlainSocket::NewKept
        } else {
            PlainSocket::NewClosed
        }
    }
}

/// A disconnected socket a slot keeps for the run's next sequence.
pub(super) enum Parked {
    /// In the ring's direct table, at the slot's own index.
    Direct { v4: bool },
    /// A plain descriptor (sequences with source addresses or attributes).
    Fd { fd: OwnedFd, v4: bool },
}

/// Sizes of direct-descriptor table tried, largest first: the kernel refuses
/// a table larger than RLIMIT_NOFILE. 4,096 slots (32 KiB of kernel memory
/// per shard) cover flood's largest default (4,096 in flight); sequences
/// in slots beyond the table use plain descriptors.
const DIRECT_TABLE_SIZES: [u32; 3] = [4_096, 1_024, 128];

/// Registers a direct-descriptor table on a fresh ring and checks that
/// sockets can live in it (SOCKET into a slot, disconnect, CLOSE). Returns
/// its size, or 0 when load sequences must use plain descriptors.
pub(super) fn direct_table(ring: &mut Driver) -> u32 {
    let Some(size) = DIRECT_TABLE_SIZES
        .into_iter()
        .find(|&n| ring.register_direct_table(n).is_ok())
    else {
        return 0;
    };
    match ring.probe_direct_sockets() {
        Ok(()) => size,
        Err(_) => 0,
    }
}
