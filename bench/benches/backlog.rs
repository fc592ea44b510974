//! The backlog ring alone: push/pop throughput of crossbeam's `ArrayQueue` with the engine's
//! backpressure bookkeeping, against a bare `ArrayQueue`.
//!
//! The engine's `Backlog` (engine/src/listen/backlog.rs) is `pub(crate)`, so [`Bookkept`]
//! replicates its bookkeeping faithfully: after each successful push, the depth (`len()`) is
//! compared with a high-water mark (Relaxed load, store when deeper); after each pop, the
//! `paused` flag is read with SeqCst and, when set, the depth is compared with the low-water
//! mark (half the capacity). The items mirror the engine's
//! `Pending { fd: OwnedFd, accepted_at: Instant }` with a plain `i32` for the fd (no real
//! descriptors are opened or closed here).
//!
//! Two shapes: one thread pushing a batch then popping it (the ring's own cost), and one
//! producer thread with one consumer thread (the shard and the application), bounded in count.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use crossbeam_queue::ArrayQueue;

/// The ring's capacity (the engine's default backlog).
const CAPACITY: usize = 1024;
/// Items per single-thread batch.
const BATCH: usize = 512;
/// Items per producer/consumer run.
const SPSC_ITEMS: usize = 100_000;

/// Stand-in for the engine's `Pending`.
#[derive(Debug)]
struct Item {
    fd: i32,
    at: Instant,
}

/// What the benches need of a ring.
trait Ring: Send + Sync + 'static {
    fn push(&self, item: Item) -> Result<(), Item>;
    fn pop(&self) -> Option<(Item, bool)>;
}

/// A bare `ArrayQueue`.
struct Bare(ArrayQueue<Item>);

impl Ring for Bare {
    fn push(&self, item: Item) -> Result<(), Item> {
        self.0.push(item)
    }
    fn pop(&self) -> Option<(Item, bool)> {
        self.0.pop().map(|i| (i, false))
    }
}

/// `ArrayQueue` with the engine's backpressure bookkeeping (see the module docs).
struct Bookkept {
    queue: ArrayQueue<Item>,
    low_water: usize,
    paused: AtomicBool,
    high_water: AtomicUsize,
}

impl Bookkept {
    fn new(capacity: usize) -> Self {
        Bookkept {
            queue: ArrayQueue::new(capacity),
            low_water: capacity / 2,
            paused: AtomicBool::new(false),
            high_water: AtomicUsize::new(0),
        }
    }
}

impl Ring for Bookkept {
    fn push(&self, item: Item) -> Result<(), Item> {
        self.queue.push(item)?;
        let depth = self.queue.len();
        if depth > self.high_water.load(Ordering::Relaxed) {
            self.high_water.store(depth, Ordering::Relaxed);
        }
        Ok(())
    }
    fn pop(&self) -> Option<(Item, bool)> {
        let item = self.queue.pop()?;
        let wake = self.paused.load(Ordering::SeqCst) && self.queue.len() <= self.low_water;
        Some((item, wake))
    }
}

fn batch<R: Ring>(ring: &R) {
    let at = Instant::now();
    for fd in 0..BATCH as i32 {
        if ring.push(Item { fd, at }).is_err() {
            panic!("ring full at {fd}");
        }
    }
    for _ in 0..BATCH {
        let (item, wake) = ring.pop().expect("item");
        black_box((item.fd, item.at, wake));
    }
}

/// One producer, one consumer, `SPSC_ITEMS` items; a full (or empty) ring makes its side spin.
fn spsc<R: Ring>(ring: &Arc<R>) -> Duration {
    let start = Instant::now();
    let producer = {
        let ring = ring.clone();
        std::thread::spawn(move || {
            let at = Instant::now();
            for fd in 0..SPSC_ITEMS as i32 {
                let mut item = Item { fd, at };
                while let Err(back) = ring.push(item) {
                    item = back;
                    std::hint::spin_loop();
                }
            }
        })
    };
    let mut got = 0;
    while got < SPSC_ITEMS {
        match ring.pop() {
            Some((item, wake)) => {
                black_box((item.fd, wake));
                got += 1;
            }
            None => std::hint::spin_loop(),
        }
    }
    producer.join().expect("producer");
    start.elapsed()
}

fn backlog_ring(c: &mut Criterion) {
    let mut g = c.benchmark_group("backlog_ring_push_pop");
    g.sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(BATCH as u64));
    let bare = Bare(ArrayQueue::new(CAPACITY));
    let kept = Bookkept::new(CAPACITY);
    g.bench_function("bare_arrayqueue", |b| b.iter(|| batch(&bare)));
    g.bench_function("engine_bookkeeping", |b| b.iter(|| batch(&kept)));
    g.finish();

    let mut g = c.benchmark_group("backlog_ring_spsc");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(SPSC_ITEMS as u64));
    let bare = Arc::new(Bare(ArrayQueue::new(CAPACITY)));
    let kept = Arc::new(Bookkept::new(CAPACITY));
    g.bench_function("bare_arrayqueue", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| spsc(&bare)).sum())
    });
    g.bench_function("engine_bookkeeping", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| spsc(&kept)).sum())
    });
    g.finish();
}

criterion_group!(benches, backlog_ring);
criterion_main!(benches);
