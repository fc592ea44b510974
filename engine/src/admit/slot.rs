//! The open-connection count of a listener with a maximum, and the slot
//! each of its connections carries until it closes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::shard::ShardControl;

/// A listener's count of open connections, shared by its shards, its
/// handle and every [`ConnectionSlot`].
#[derive(Debug)]
pub(crate) struct OpenCount {
    limit: usize,
    /// Open connections, plus for a moment the one a shard is accepting.
    open: AtomicUsize,
    high_water: AtomicUsize,
    /// Shards stopped at the limit: a close wakes them when non-zero.
    paused: AtomicUsize,
    /// The shards to wake (filled in as they start).
    shards: Mutex<Vec<Arc<ShardControl>>>,
}

impl OpenCount {
    pub fn new(limit: usize) -> Self {
        OpenCount {
            limit,
            open: AtomicUsize::new(0),
            high_water: AtomicUsize::new(0),
            paused: AtomicUsize::new(0),
            shards: Mutex::new(Vec::new()),
        }
    }

    /// A started shard, to be woken by closes while it waits at the limit.
    pub fn add_shard(&self, control: Arc<ShardControl>) {
        if let Ok(mut s) = self.shards.lock() {
            s.push(control);
        }
    }

    /// Takes a slot if the count is below the limit.
    pub fn reserve(&self) -> bool {
        let mut n = self.open.load(Ordering::SeqCst);
        loop {
            if n >= self.limit {
                return false;
            }
            match self
                .open
                .compare_exchange_weak(n, n + 1, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return true,
                Err(now) => n = now,
            }
        }
    }

    /// A slot given back (a close, or an accept that found nothing): wakes
    /// the shards waiting at the limit.
    pub fn release(&self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
        // SeqCst pairs with `pause`: either the pausing shard sees this
        // decrement when it checks again, or this sees its flag.
        if self.paused.load(Ordering::SeqCst) > 0 {
            if let Ok(s) = self.shards.lock() {
                for c in s.iter() {
                    c.wake();
                }
            }
        }
    }

    /// A shard stops at the limit: closes wake the shards from now on.
    pub fn pause(&self) {
        self.paused.fetch_add(1, Ordering::SeqCst);
    }

    /// A shard no longer waits at the limit.
    pub fn unpause(&self) {
        self.paused.fetch_sub(1, Ordering::SeqCst);
    }

    /// Records the count now in the high-water mark.
    pub fn note_high_water(&self) {
        let n = self.open.load(Ordering::Relaxed);
        self.high_water.fetch_max(n, Ordering::Relaxed);
    }

    /// The snapshot for the listener's stats.
    pub fn snapshot(&self) -> crate::stats::OpenConnections {
        crate::stats::OpenConnections {
            open: self.open.load(Ordering::SeqCst) as u64,
            high_water: self.high_water.load(Ordering::Relaxed) as u64,
            limit: self.limit as u64,
            shards_paused: self.paused.load(Ordering::SeqCst) as u64,
        }
    }
}

/// One of a listener's [`max_connections`](crate::ListenerBuilder::max_connections)
/// slots: the connection it came with counts as open until it is dropped.
///
/// Every connection of a listener with a maximum carries one, from its
/// accept on: inside the [`Admitted`](crate::Admitted), a relay, a
/// registration, or a reply being sent. An application that takes the
/// socket out of an `Admitted` with
/// [`Admitted::into_std_with_slot`](crate::Admitted::into_std_with_slot)
/// gets the slot beside it and keeps the connection counted for as long as
/// it keeps the slot; [`Admitted::into_std`](crate::Admitted::into_std)
/// and the `From` conversions drop it, so the connection stops counting at
/// that moment. Without a maximum the slot is empty and dropping it does
/// nothing.
///
/// ```
/// use floodgate::Listener;
///
/// let listener = Listener::builder("127.0.0.1:0".parse()?)
///     .shards(1)
///     .max_connections(1)
///     .build()?;
/// let _client = std::net::TcpStream::connect(listener.local_addr())?;
/// let (stream, slot) = listener.accept()?.into_std_with_slot();
/// assert!(slot.is_counted());
/// assert_eq!(listener.stats().open.map(|o| o.open), Some(1));
/// drop(slot); // counted as closed now, whatever happens to `stream`
/// assert_eq!(listener.stats().open.map(|o| o.open), Some(0));
/// # drop(stream);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Default)]
pub struct ConnectionSlot(Option<Arc<OpenCount>>);

impl ConnectionSlot {
    /// The slot of a connection of a listener without a maximum.
    pub(crate) fn none() -> Self {
        ConnectionSlot(None)
    }

    /// One of `open`'s slots, already reserved.
    pub(crate) fn counted(open: Arc<OpenCount>) -> Self {
        ConnectionSlot(Some(open))
    }

    /// Whether it holds one of a listener's slots (the listener has a
    /// maximum of open connections).
    pub fn is_counted(&self) -> bool {
        self.0.is_some()
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.release();
        }
    }
}
