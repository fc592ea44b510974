//! Drain: stop accepting, let what is under way finish, then close the rest.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use crate::listen::accept::Listener;

/// What [`Listener::drain`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// When the shards were told to stop accepting (wall clock, so that
    /// another process can compare: the hand-over gap).
    pub stopped_accepting_at: SystemTime,
    /// Whether every shard finished its work before the deadline.
    pub finished: bool,
    /// Connections still pending (in admission, registered, in the rings)
    /// when the deadline came, closed then and counted in
    /// `closed_at_shutdown`.
    pub closed_at_deadline: u64,
    /// Relays still running at the deadline, wound down then with a
    /// half-close each way (counted in
    /// [`crate::RelayStats::closed_at_shutdown`]; those reset because a
    /// peer took nothing within the grace also in
    /// [`crate::RelayStats::reset_at_shutdown`]).
    pub relays_cut: u64,
}

impl Listener {
    /// Stops accepting and lets everything under way finish, for at most
    /// `deadline`: each shard cancels its accepts and lets go of its
    /// listening sockets (closed unless another process holds them: a
    /// successor after a [`crate::Handover`]), while admission, the inline
    /// handler, registrations, relays and delivery to `accept()` go on.
    /// A shard stops by itself once it has nothing left; at the deadline
    /// the rest is closed as by [`Listener::shutdown`] and counted: a relay
    /// stops reading, sends what it already received, and shuts both write
    /// halves (FIN each way, not a reset); one whose peer does not take
    /// those bytes within [`RELAY_STOP_GRACE`](crate::RELAY_STOP_GRACE) is
    /// reset then. Then the listener is shut down. The calling thread
    /// sleeps until the shards finish or the deadline comes (it is woken
    /// by each shard as it finishes; no polling).
    ///
    /// ```
    /// use std::time::Duration;
    /// use floodgate::Listener;
    ///
    /// let listener = Listener::builder("127.0.0.1:0".parse()?).shards(1).build()?;
    /// let drained = listener.drain(Duration::from_secs(5));
    /// assert!(drained.finished);
    /// assert!(listener.stats().conserved());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn drain(&self, deadline: Duration) -> Drained {
        let stopped_accepting_at = SystemTime::now();
        let end = Instant::now().checked_add(deadline);
        if let Ok(mut g) = self.group.lock() {
            g.clear();
        }
        for s in &self.shards {
            s.control.drain();
        }
        // Woken by each shard as it finishes (no polling); a shard waiting
        // in its ring is woken by the pop that empties its backlog
        // (`ShardShared::take_deliverable`).
        for s in &self.shards {
            s.control.watch();
        }
        let finished = loop {
            if self.shards.iter().all(|s| s.control.is_finished()) {
                break true;
            }
            let now = Instant::now();
            match end {
                Some(e) if now >= e => break false,
                Some(e) => std::thread::park_timeout(e - now),
                None => std::thread::park(),
            }
        };
        let before = self.stats().total();
        let relays_before = self.relay_closed_at_shutdown();
        self.shutdown();
        let after = self.stats().total();
        Drained {
            stopped_accepting_at,
            finished: finished && after.closed_at_shutdown == before.closed_at_shutdown,
            closed_at_deadline: after
                .closed_at_shutdown
                .saturating_sub(before.closed_at_shutdown),
            relays_cut: self
                .relay_closed_at_shutdown()
                .saturating_sub(relays_before),
        }
    }

    fn relay_closed_at_shutdown(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.counters.relay.closed_at_shutdown.load(Ordering::Relaxed))
            .sum()
    }
}
