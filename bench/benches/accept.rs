//! Accept latency, one connection at a time, **with the acceptor on the connecting thread**:
//! from the client's `connect` to the moment the application holds the admitted socket, for
//! Floodgate (blocking `accept()`, and the inline handler passing the connection through a
//! channel), a std `TcpListener`, tokio and mio, in one criterion group.
//!
//! What this measures, exactly: the bench thread (not pinned) connects, then itself calls the
//! server's accept. For std, tokio and mio the connection is already in the kernel's accept
//! queue when `connect` returns, so their accept returns at once and no thread sleeps or wakes:
//! the figure is the cost of a loopback handshake plus one accept system call. Floodgate's shard
//! is another thread (pinned to core 0) that must be woken, run the accept and hand the
//! connection over (`floodgate_accept`, `floodgate_handler`: back to the bench thread, a second
//! wake-up; `floodgate_handler_stamped`: timed to the handler, one wake-up). It is not a
//! comparison of servers as they run, where every acceptor waits on its own thread: that is the
//! `accept_fair` bench (group `accept_latency_fair`).
//!
//! Group `accept_latency`: an idle server. Group `accept_latency_under_load`: the same while
//! background client threads (closed loop, bounded in count and time) keep the same server busy
//! with connections from 127.0.0.2 that the server answers with `x`; the measured connection
//! comes from 127.0.0.1 and is told apart by its source address.
//!
//! Every client socket closes with RST (SO_LINGER 0), so no TIME_WAIT piles up. Loopback only.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion};
use floodgate::{Admitted, Listener};
use socket2::{Domain, SockRef, Socket, Type};

/// Where the measured client connects from.
const MEASURED: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Where the background clients connect from.
const BACKGROUND: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// Background client threads.
const BACKGROUND_THREADS: usize = 4;
/// Bounds of the background load: connections per thread, and time.
const BACKGROUND_MAX_CONNS: u64 = 2_000_000;
const BACKGROUND_MAX_TIME: Duration = Duration::from_secs(120);
/// Safety net for any wait in an iteration.
const WAIT: Duration = Duration::from_secs(5);

fn listen_addr() -> SocketAddr {
    SocketAddr::new(MEASURED, 0)
}

/// The measured client: connect, RST on drop.
fn client(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER");
    s
}

/// Closed-loop background clients from 127.0.0.2: connect, read to EOF, RST. Stops on the flag,
/// after `BACKGROUND_MAX_CONNS` per thread, or after `BACKGROUND_MAX_TIME`.
struct Background {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<u64>>,
}

impl Background {
    fn start(target: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..BACKGROUND_THREADS)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let deadline = Instant::now() + BACKGROUND_MAX_TIME;
                    let mut done = 0;
                    while done < BACKGROUND_MAX_CONNS
                        && !stop.load(Ordering::Relaxed)
                        && Instant::now() < deadline
                    {
                        if background_one(target).is_ok() {
                            done += 1;
                        }
                    }
                    done
                })
            })
            .collect();
        Background { stop, threads }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn background_one(target: SocketAddr) -> std::io::Result<()> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.bind(&SocketAddr::new(IpAddr::V4(BACKGROUND), 0).into())?;
    s.set_linger(Some(Duration::ZERO))?;
    s.connect_timeout(&target.into(), Duration::from_secs(1))?;
    let mut s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut buf = [0u8; 8];
    while s.read(&mut buf)? > 0 {}
    Ok(())
}

fn is_measured(peer: SocketAddr) -> bool {
    peer.ip() == MEASURED
}

/// Floodgate, blocking `accept()` on the bench thread.
fn floodgate_accept(loaded: bool) -> impl FnMut() -> Box<dyn FnMut()> {
    move || {
        let listener = Listener::builder(listen_addr())
            .shards(1)
            .build()
            .expect("floodgate listener");
        let addr = listener.local_addr();
        let bg = loaded.then(|| Background::start(addr));
        Box::new(move || {
            let _bg = &bg;
            let c = client(addr);
            let held: Admitted = loop {
                let mut conn = listener.accept().expect("accept");
                if !loaded || conn.peer_addr().map(is_measured).unwrap_or(false) {
                    break conn;
                }
                let _ = conn.write_all(b"x");
            };
            drop(held);
            drop(c);
        })
    }
}

/// Floodgate, inline handler on the shard thread passing the connection through a channel.
fn floodgate_handler(loaded: bool) -> impl FnMut() -> Box<dyn FnMut()> {
    move || {
        let (tx, rx) = mpsc::channel::<Admitted>();
        let tx = std::sync::Mutex::new(tx);
        let listener = Listener::builder(listen_addr())
            .shards(1)
            .handler(move |conn, ctx| {
                if !loaded || conn.peer_addr().map(is_measured).unwrap_or(false) {
                    if let Ok(tx) = tx.lock() {
                        let _ = tx.send(conn);
                    }
                } else {
                    let _ = ctx.reply_and_close(conn, b"x");
                }
            })
            .build()
            .expect("floodgate listener");
        let addr = listener.local_addr();
        let bg = loaded.then(|| Background::start(addr));
        Box::new(move || {
            let _keep = (&listener, &bg);
            let c = client(addr);
            let held = rx.recv_timeout(WAIT).expect("handler delivered");
            drop(held);
            drop(c);
        })
    }
}

/// std `TcpListener`, blocking accept on the bench thread.
fn std_listener(loaded: bool) -> impl FnMut() -> Box<dyn FnMut()> {
    move || {
        let listener = TcpListener::bind(listen_addr()).expect("bind");
        let addr = listener.local_addr().expect("local_addr");
        let bg = loaded.then(|| Background::start(addr));
        Box::new(move || {
            let _bg = &bg;
            let c = client(addr);
            let held = loop {
                let (mut s, peer) = listener.accept().expect("accept");
                if !loaded || is_measured(peer) {
                    break s;
                }
                let _ = s.write_all(b"x");
            };
            drop(held);
            drop(c);
        })
    }
}

/// tokio current-thread runtime: `listener.accept().await` under `block_on` on the bench thread.
fn tokio_listener(loaded: bool) -> impl FnMut() -> Box<dyn FnMut()> {
    move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("tokio runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(listen_addr()))
            .expect("bind");
        let addr = listener.local_addr().expect("local_addr");
        let bg = loaded.then(|| Background::start(addr));
        Box::new(move || {
            let _bg = &bg;
            let c = client(addr);
            let held = rt.block_on(async {
                loop {
                    let (s, peer) = listener.accept().await.expect("accept");
                    if !loaded || is_measured(peer) {
                        break s;
                    }
                    let _ = s.try_write(b"x");
                }
            });
            drop(held);
            drop(c);
        })
    }
}

/// mio (epoll): accept until WouldBlock, then poll, on the bench thread.
fn mio_listener(loaded: bool) -> impl FnMut() -> Box<dyn FnMut()> {
    move || {
        const TOKEN: mio::Token = mio::Token(0);
        let mut poll = mio::Poll::new().expect("epoll");
        let mut listener = mio::net::TcpListener::bind(listen_addr()).expect("bind");
        poll.registry()
            .register(&mut listener, TOKEN, mio::Interest::READABLE)
            .expect("register");
        let mut events = mio::Events::with_capacity(64);
        let addr = listener.local_addr().expect("local_addr");
        let bg = loaded.then(|| Background::start(addr));
        Box::new(move || {
            let _bg = &bg;
            let c = client(addr);
            let deadline = Instant::now() + WAIT;
            let held = loop {
                assert!(Instant::now() < deadline, "mio: no connection in {WAIT:?}");
                match listener.accept() {
                    Ok((mut s, peer)) => {
                        if !loaded || is_measured(peer) {
                            break s;
                        }
                        let _ = s.write(b"x");
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        poll.poll(&mut events, Some(WAIT)).expect("epoll_wait");
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => panic!("mio accept: {e}"),
                }
            };
            drop(held);
            drop(c);
        })
    }
}

/// Floodgate's inline handler, timed to the moment the handler holds the connection: the
/// handler stamps `Instant::now()` and passes it with the connection, so the channel's
/// cross-thread wake-up is not counted (only the idle group; see `group`).
fn handler_stamped(g: &mut BenchmarkGroup<'_, WallTime>) {
    let (tx, rx) = mpsc::channel::<(Admitted, Instant)>();
    let tx = std::sync::Mutex::new(tx);
    let listener = Listener::builder(listen_addr())
        .shards(1)
        .handler(move |conn, _ctx| {
            let at = Instant::now();
            if let Ok(tx) = tx.lock() {
                let _ = tx.send((conn, at));
            }
        })
        .build()
        .expect("floodgate listener");
    let addr = listener.local_addr();
    g.bench_function("floodgate_handler_stamped", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let c = client(addr);
                let (held, at) = rx.recv_timeout(WAIT).expect("handler delivered");
                total += at.saturating_duration_since(start);
                drop(held);
                drop(c);
            }
            total
        })
    });
    listener.shutdown();
}

type Setup = Box<dyn FnMut() -> Box<dyn FnMut()>>;

fn variants(loaded: bool) -> Vec<(&'static str, Setup)> {
    vec![
        ("floodgate_accept", Box::new(floodgate_accept(loaded))),
        ("floodgate_handler", Box::new(floodgate_handler(loaded))),
        ("std", Box::new(std_listener(loaded))),
        ("tokio", Box::new(tokio_listener(loaded))),
        ("mio", Box::new(mio_listener(loaded))),
    ]
}

fn group(c: &mut Criterion, name: &str, loaded: bool) {
    let mut g = c.benchmark_group(name);
    g.sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for (id, mut setup) in variants(loaded) {
        // The server (and any background load) lives for this variant only.
        let mut one = setup();
        g.bench_function(id, |b| b.iter(&mut one));
    }
    if !loaded {
        handler_stamped(&mut g);
    }
    g.finish();
}

fn accept_latency(c: &mut Criterion) {
    group(c, "accept_latency", false);
}

fn accept_latency_under_load(c: &mut Criterion) {
    group(c, "accept_latency_under_load", true);
}

criterion_group!(benches, accept_latency, accept_latency_under_load);
criterion_main!(benches);
