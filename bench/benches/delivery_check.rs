//! What the engine's check at delivery costs per connection: before a
//! connection leaves the backlog ring (for `accept()` or the inline
//! handler), the engine withdraws it if the peer reset it while it waited
//! (`getsockopt(SO_ERROR)` through socket2's `take_error`) or if it waited
//! longer than the pending timeout (`Instant::elapsed`). Measured on a live,
//! connected loopback socket, against the clock read alone.

use std::hint::black_box;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};

fn delivery_check(c: &mut Criterion) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    let accepted_at = Instant::now();
    let timeout = Duration::from_secs(10);
    let mut g = c.benchmark_group("delivery_check");
    g.bench_function("pending_timeout_only", |b| {
        b.iter(|| black_box(accepted_at.elapsed() > timeout))
    });
    g.bench_function("pending_timeout_and_so_error", |b| {
        b.iter(|| {
            let old = accepted_at.elapsed() > timeout;
            let gone = !matches!(socket2::SockRef::from(&server).take_error(), Ok(None));
            black_box(old || gone)
        })
    });
    g.finish();
    drop(client);
}

criterion_group!(benches, delivery_check);
criterion_main!(benches);
