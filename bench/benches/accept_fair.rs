//! Fair accept latency (group `accept_latency_fair`): every server measured the way a server
//! runs, with its acceptor asleep in its wait on its own thread pinned to core 0 and the client
//! connecting from the bench thread pinned to core 1.
//!
//! One iteration: wait until every other thread of the bench process is asleep (`S` in
//! `/proc/self/task/*/stat`), create the client socket, take `t0` just before `connect()`; the
//! acceptor, the moment the application code holds the accepted socket, takes `t1`, closes the
//! socket and pushes `t1` into a lock-free queue (`crossbeam_queue::ArrayQueue`) the client pops
//! (spinning); the iteration counts `t1 - t0` (`iter_custom`). Both stamps read the one
//! `CLOCK_MONOTONIC`. The way back (close, push, pop) is after `t1`, the same code for every
//! peer, and not counted. The client closes with RST (`SO_LINGER` 0). Details in
//! `floodgate_bench::fair`.
//!
//! Peers (`floodgate_bench::fair::peers::PEERS`): `std_blocking` (`TcpListener::accept` in a
//! loop), `mio_epoll` (`epoll_wait`, then `accept4` until `EAGAIN`), `tokio_current_thread`
//! (`accept().await` in a loop), `raw_io_uring` (multishot ACCEPT, `submit_and_wait(1)`),
//! `floodgate_handler` (inline handler on the shard, io_uring), `floodgate_driven` (a driven
//! shard: its application thread blocked in `poll(2)` on the shard's descriptor, then
//! `drive()`), `floodgate_accept`
//! (`Listener::accept()` on an application thread, both it and the shard on core 0),
//! `floodgate_epoll_handler` (inline handler, `Backend::Epoll`).
//!
//! Loopback only; each peer's server lives for its benchmark only (threads joined, descriptors
//! closed); every wait is bounded (`fair::STEP_TIMEOUT`).

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use floodgate_bench::fair::peers::{self, PEERS};
use floodgate_bench::fair::{self, Probe, CLIENT_CORE};

fn accept_latency_fair(c: &mut Criterion) {
    if let Err(e) = fair::pin_here(CLIENT_CORE) {
        eprintln!("accept_latency_fair: client thread not pinned ({e}): figures are not fair");
    }
    let mut g = c.benchmark_group("accept_latency_fair");
    g.sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for peer in PEERS {
        let probe = Arc::new(Probe::default());
        let running = match peers::start_checked(*peer, probe.clone()) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("accept_latency_fair/{}: skipped: {e}", peer.name);
                continue;
            }
        };
        let addr = running.addr();
        g.bench_function(peer.name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += fair::measure_one(&probe, addr)
                        .unwrap_or_else(|e| panic!("accept_latency_fair/{}: {e}", peer.name));
                }
                total
            })
        });
        drop(running);
    }
    g.finish();
}

criterion_group!(benches, accept_latency_fair);
criterion_main!(benches);
