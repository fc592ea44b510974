//! The per-shard backlog ring: a bounded lock-free queue of accepted
//! connections waiting for the application.
//!
//! The queue is crossbeam's [`ArrayQueue`] (Vyukov's bounded MPMC array
//! queue): the shard thread pushes, any consumer pops. Its capacity is the
//! listener's effective backlog, `min(requested, provider ceiling)`.
//!
//! Backpressure, not loss: `push` hands a connection back when the ring is
//! full; the shard then holds it, sets [`Backlog::paused`] and stops
//! accepting, so further connections wait in the kernel's own backlog. A
//! consumer whose pop brings the depth down to the low-water mark wakes the
//! shard, which resumes accepting.
//!
//! A listener with an inline handler has no other consumer: the shard
//! hands each turn's connections to the handler without the ring while
//! they fit in its capacity, and the ring carries only what is past that.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crossbeam_queue::ArrayQueue;

use crate::admit::pending::Pending;

/// One shard's ring and its backpressure state.
#[derive(Debug)]
pub(crate) struct Backlog {
    queue: ArrayQueue<Pending>,
    /// Depth at or below which a paused shard resumes accepting.
    low_water: usize,
    /// Set by the shard while it has stopped accepting because the ring was
    /// full; read by consumers to know a pop must wake it.
    paused: AtomicBool,
    /// Deepest the ring has been.
    high_water: AtomicUsize,
}

impl Backlog {
    /// A ring holding up to `capacity` connections (at least 1), resuming at
    /// half of it.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Backlog {
            queue: ArrayQueue::new(capacity),
            low_water: capacity / 2,
            paused: AtomicBool::new(false),
            high_water: AtomicUsize::new(0),
        }
    }

    /// Enqueues `p`, or hands it back when the ring is full.
    pub fn push(&self, p: Pending) -> Result<(), Pending> {
        self.queue.push(p)?;
        let depth = self.queue.len();
        if depth > self.high_water.load(Ordering::Relaxed) {
            self.high_water.store(depth, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Dequeues the oldest connection. The second value says whether the
    /// shard is paused and this pop brought the ring to its low-water mark,
    /// i.e. whether the caller must wake the shard.
    pub fn pop(&self) -> Option<(Pending, bool)> {
        let p = self.queue.pop()?;
        // SeqCst pairs with `set_paused`: either the shard sees our pop when
        // it checks the depth after pausing, or we see its flag here.
        let wake = self.paused.load(Ordering::SeqCst) && self.queue.len() <= self.low_water;
        Some((p, wake))
    }

    /// Marks the shard paused (true) or accepting (false).
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }

    /// Whether the depth is at or below the low-water mark.
    pub fn drained(&self) -> bool {
        self.queue.len() <= self.low_water
    }

    /// Whether the ring is full.
    pub fn is_full(&self) -> bool {
        self.queue.is_full()
    }

    /// Current depth.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Capacity: the effective backlog.
    pub fn capacity(&self) -> usize {
        self.queue.capacity()
    }

    /// Deepest the ring has been.
    pub fn high_water(&self) -> usize {
        self.high_water.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn pending() -> Pending {
        let fd = crate::driver::sys::eventfd().expect("eventfd");
        Pending::new(fd, Instant::now())
    }

    #[test]
    fn full_ring_hands_the_connection_back() {
        let b = Backlog::new(2);
        assert!(b.push(pending()).is_ok());
        assert!(b.push(pending()).is_ok());
        assert!(b.is_full());
        assert!(b.push(pending()).is_err());
        assert_eq!(b.high_water(), 2);
    }

    #[test]
    fn pop_asks_for_wake_only_when_paused_and_drained() {
        let b = Backlog::new(4);
        for _ in 0..4 {
            b.push(pending()).expect("room");
        }
        let (_, wake) = b.pop().expect("item");
        assert!(!wake, "not paused");
        b.set_paused(true);
        let (_, wake) = b.pop().expect("item");
        assert!(wake, "depth 2 = low water of 4, paused");
        assert!(b.drained());
    }
}
