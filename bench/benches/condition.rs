//! The condition path.
//!
//! Group `condition_path`, end to end per connection: the client connects and writes its first
//! bytes; the bench thread's blocking `accept()` returns the admitted socket. Variants: no
//! condition; a trivial condition (`Verdict::accept()`); peek 16 bytes and decide on them; peek
//! a PROXY v2 header and parse it (`floodgate::proxy_protocol::parse`). Every variant's client
//! sends the same bytes (a PROXY v2 header made with `encode_v2`, 28 bytes for IPv4), so only
//! the admission work differs.
//!
//! Group `proxy_v2_parse`: the parse alone, on an IPv4 and an IPv6 header.
//!
//! Every client socket closes with RST (SO_LINGER 0). Loopback only.

use std::hint::black_box;
use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use floodgate::proxy_protocol::{encode_v2, parse};
use floodgate::{ConnectRequest, Listener, ListenerBuilder, Verdict};
use socket2::SockRef;

/// How long a peek waits for the bytes (they are written right after connect).
const PEEK_WAIT: Duration = Duration::from_secs(1);

fn header_v4() -> Vec<u8> {
    encode_v2(
        "192.0.2.10:40000".parse().expect("addr"),
        "198.51.100.1:443".parse().expect("addr"),
    )
}

fn header_v6() -> Vec<u8> {
    encode_v2(
        "[2001:db8::10]:40000".parse().expect("addr"),
        "[2001:db8::1]:443".parse().expect("addr"),
    )
}

fn builder() -> ListenerBuilder {
    Listener::builder("127.0.0.1:0".parse().expect("addr")).shards(1)
}

fn one(listener: &Listener, payload: &[u8]) {
    let mut c = TcpStream::connect(listener.local_addr()).expect("connect");
    SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER");
    c.write_all(payload).expect("write");
    let held = listener.accept().expect("accept");
    drop(held);
    drop(c);
}

fn condition_path(c: &mut Criterion) {
    let payload = header_v4();
    let header_len = payload.len();
    let variants: Vec<(&str, ListenerBuilder)> = vec![
        ("none", builder()),
        (
            "trivial",
            builder().condition(|_: &ConnectRequest<'_>| Verdict::accept()),
        ),
        (
            "peek16",
            builder()
                .peek(16, PEEK_WAIT)
                .condition(|req: &ConnectRequest<'_>| {
                    if req.first_bytes.len() == 16 {
                        Verdict::accept()
                    } else {
                        Verdict::reset()
                    }
                }),
        ),
        (
            "proxy_v2",
            builder().peek(header_len, PEEK_WAIT).condition(
                |req: &ConnectRequest<'_>| match parse(req.first_bytes) {
                    Ok(h) if h.source.is_some() => Verdict::accept(),
                    _ => Verdict::reset(),
                },
            ),
        ),
    ];
    let mut g = c.benchmark_group("condition_path");
    g.sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for (id, b) in variants {
        let listener = b.build().expect("floodgate listener");
        g.bench_function(id, |bench| bench.iter(|| one(&listener, &payload)));
        listener.shutdown();
    }
    g.finish();
}

fn proxy_v2_parse(c: &mut Criterion) {
    let v4 = header_v4();
    let v6 = header_v6();
    let mut g = c.benchmark_group("proxy_v2_parse");
    g.sample_size(30)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    g.bench_function("ipv4", |b| b.iter(|| parse(black_box(&v4))));
    g.bench_function("ipv6", |b| b.iter(|| parse(black_box(&v6))));
    g.finish();
}

criterion_group!(benches, condition_path, proxy_v2_parse);
criterion_main!(benches);
