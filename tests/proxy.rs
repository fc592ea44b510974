//! Relays (`ShardContext::relay`): an L4 proxy in miniature. Admitted
//! connections are dialled upstream on the shard that accepted them and
//! copied both ways on its io_uring, with half-close, resets, refused
//! upstreams, CIDR denial (PROXY-header aware) and shutdown.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use floodgate::cidr::CidrList;
use floodgate::proxy_protocol::{self, ProxyError};
use floodgate::{
    ConnectRequest, Error, Listener, ListenerBuilder, RelayEnd, RelayOptions, RelayOutcome,
    RelaySide, Verdict,
};
use floodgate_tests::{
    accept_from, connect, refusing_port, relay_listener, relays, reset_on_drop, serial,
    silent_upstream, still_relays, wait_for, FdTable,
};

/// An echo server on loopback: one thread per connection copying what it
/// reads back until end of stream, then closing.
struct Echo {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Echo {
    fn start() -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (s, c) = (Arc::clone(&stop), Arc::clone(&conns));
        let acceptor = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                let h = std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match conn.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if conn.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
                c.lock().unwrap().push(h);
            }
        });
        Echo {
            addr,
            stop,
            acceptor: Some(acceptor),
            conns,
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for h in self.conns.lock().unwrap().drain(..) {
            let _ = h.join();
        }
    }
}

/// A deterministic byte stream (xorshift64*).
fn bytes(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        out.extend_from_slice(&seed.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

#[test]
fn four_mib_each_way_arrive_intact() {
    let _g = serial();
    let echo = Echo::start();
    let listener = relay_listener(echo.addr);
    const LEN: usize = 4 * 1024 * 1024;
    let data = bytes(LEN, 0x9E37_79B9_7F4A_7C15);
    let client = connect(listener.local_addr()).unwrap();
    let mut reader = client.try_clone().unwrap();
    let started = Instant::now();
    let writer = {
        let data = data.clone();
        let mut w = client;
        std::thread::spawn(move || -> io::Result<()> {
            for chunk in data.chunks(100_003) {
                w.write_all(chunk)?;
            }
            w.shutdown(Shutdown::Write)
        })
    };
    let mut back = Vec::with_capacity(LEN);
    reader.read_to_end(&mut back).unwrap();
    let took = started.elapsed();
    writer.join().unwrap().unwrap();
    assert_eq!(back.len(), LEN);
    assert!(back == data, "the echoed bytes differ from the bytes sent");
    eprintln!(
        "4 MiB each way through the relay in {took:?}: {:.0} MiB/s per direction",
        4.0 / took.as_secs_f64()
    );
    wait_for("the relay completes", || relays(&listener).completed == 1);
    let r = relays(&listener);
    assert_eq!(r.bytes_to_upstream, LEN as u64);
    assert_eq!(r.bytes_to_client, LEN as u64);
    assert_eq!((r.started, r.failed, r.active), (1, 0, 0));
}

#[test]
fn client_half_close_still_gets_every_echoed_byte_then_eof() {
    let _g = serial();
    let echo = Echo::start();
    let listener = relay_listener(echo.addr);
    let data = bytes(48 * 1024, 7);
    let mut client = connect(listener.local_addr()).unwrap();
    client.write_all(&data).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    // Nothing was read before the FIN: every echoed byte still comes, then
    // end of stream (the echo server only closes once it saw the FIN).
    let mut back = Vec::new();
    client.read_to_end(&mut back).unwrap();
    assert!(back == data);
    wait_for("the relay completes", || relays(&listener).completed == 1);
    assert_eq!(relays(&listener).failed, 0);
}

#[test]
fn upstream_half_close_reaches_the_client_which_can_still_send() {
    let _g = serial();
    // An upstream that greets, shuts its write side, then reads to the end.
    let up = TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = up.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    let server = std::thread::spawn(move || -> io::Result<()> {
        let (mut s, _) = up.accept()?;
        s.write_all(b"hello")?;
        s.shutdown(Shutdown::Write)?;
        let mut got = Vec::new();
        s.read_to_end(&mut got)?;
        let _ = tx.send(got);
        Ok(())
    });
    let listener = relay_listener(up_addr);
    let mut client = connect(listener.local_addr()).unwrap();
    let mut greeting = Vec::new();
    client.read_to_end(&mut greeting).unwrap();
    assert_eq!(greeting, b"hello");
    client.write_all(b"bye").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let got = rx.recv().unwrap();
    assert_eq!(got, b"bye");
    server.join().unwrap().unwrap();
    wait_for("the relay completes", || relays(&listener).completed == 1);
    assert_eq!(relays(&listener).failed, 0);
}

/// The proxy's condition: deny sources in `deny`, taking the source from a
/// PROXY header when the client's first bytes carry one.
fn deny_condition(deny: CidrList) -> impl Fn(&ConnectRequest<'_>) -> Verdict + Send + Sync {
    move |req: &ConnectRequest<'_>| {
        let source: IpAddr = match proxy_protocol::parse(req.first_bytes) {
            Ok(h) => h.source.map_or(req.peer.ip(), |s| s.ip()),
            Err(ProxyError::Incomplete { .. })
                if !req.first_bytes.is_empty() && !req.peer_finished =>
            {
                return Verdict::Defer
            }
            Err(_) => req.peer.ip(),
        };
        if deny.contains(source) {
            Verdict::reset()
        } else {
            Verdict::accept()
        }
    }
}

fn connect_from(src: &str, to: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let src: SocketAddr = format!("{src}:0").parse().unwrap();
    s.bind(&src.into()).unwrap();
    s.connect(&to.into()).unwrap();
    s.into()
}

/// Whether the server ended the connection without sending anything.
fn refused(mut s: TcpStream) -> bool {
    let mut b = [0u8; 64];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn denied_sources_are_rejected_by_address_or_by_proxy_header() {
    let _g = serial();
    let echo = Echo::start();
    let up = echo.addr;
    let listener = Listener::builder("127.0.0.1:0".parse().unwrap())
        .peek(28, Duration::from_millis(500))
        .condition(deny_condition("127.0.0.9/32".parse().unwrap()))
        .handler(move |conn, ctx| {
            let opts = RelayOptions::default().with_strip_proxy_header(true);
            let _ = ctx.relay(conn, up, opts);
        })
        .build()
        .unwrap();
    let addr = listener.local_addr();

    // Denied by its own address.
    let mut c = connect_from("127.0.0.9", addr);
    c.write_all(b"ping").unwrap();
    assert!(refused(c));
    wait_for("one reject", || {
        listener.stats().total().rejected.total() == 1
    });

    // Denied by the original address its PROXY v2 header names.
    let hdr = proxy_protocol::encode_v2("127.0.0.9:4000".parse().unwrap(), addr);
    assert_eq!(hdr.len(), 28);
    let mut c = connect(addr).unwrap();
    c.write_all(&hdr).unwrap();
    assert!(refused(c));
    wait_for("two rejects", || {
        listener.stats().total().rejected.total() == 2
    });

    // Admitted: a denied address behind a PROXY header naming an allowed
    // one; the relay strips the header, the upstream sees only the payload.
    let hdr = proxy_protocol::encode_v2("127.0.0.1:4000".parse().unwrap(), addr);
    let mut c = connect_from("127.0.0.9", addr);
    c.write_all(&hdr).unwrap();
    c.write_all(b"ping").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    assert_eq!(back, b"ping");

    // Admitted: an allowed address, no header.
    let mut c = connect(addr).unwrap();
    c.write_all(b"plain").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    assert_eq!(back, b"plain");

    wait_for("two relays complete", || relays(&listener).completed == 2);
    let t = listener.stats().total();
    assert_eq!(t.rejected.reset, 2);
    assert_eq!(
        t.relays.started, 2,
        "rejected connections are never relayed"
    );
    assert_eq!(t.relays.bytes_to_upstream, 4 + 5, "headers are not relayed");
}

#[test]
fn refused_upstream_ends_the_client_and_counts_a_failure() {
    let _g = serial();
    let (_hold, closed) = refusing_port();
    let fds = FdTable::now();
    let listener = relay_listener(closed);
    let mut c = connect(listener.local_addr()).unwrap();
    let _ = c.write_all(b"anyone there?");
    let mut b = [0u8; 16];
    assert!(matches!(c.read(&mut b), Ok(0) | Err(_)));
    wait_for("the relay fails", || relays(&listener).failed == 1);
    let r = relays(&listener);
    assert_eq!((r.started, r.completed, r.active), (1, 0, 0));
    drop((c, listener));
    fds.assert_back("both sockets of the failed relay closed");
}

#[test]
fn client_reset_tears_down_both_sides() {
    let _g = serial();
    let up = TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = up.local_addr().unwrap();
    let fds = FdTable::now();
    let listener = relay_listener(up_addr);
    let mut c = connect(listener.local_addr()).unwrap();
    c.write_all(b"x").unwrap();
    let (mut s, _) = up.accept().unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    // RST from the client.
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c);
    // The upstream side ends too (reset, as the client's was).
    let mut rest = [0u8; 16];
    assert!(matches!(s.read(&mut rest), Ok(0) | Err(_)));
    wait_for("the relay fails", || relays(&listener).failed == 1);
    assert_eq!(relays(&listener).active, 0);
    drop((s, listener));
    fds.assert_back("both sockets of the failed relay closed");
}

#[test]
fn shutdown_closes_relays_in_flight_and_leaves_no_fd() {
    let _g = serial();
    let echo = Echo::start();
    let fds = FdTable::now();
    let listener = relay_listener(echo.addr);
    const N: usize = 8;
    let mut clients = Vec::new();
    for i in 0..N {
        let mut c = connect(listener.local_addr()).unwrap();
        let msg = [i as u8; 10];
        c.write_all(&msg).unwrap();
        let mut back = [0u8; 10];
        c.read_exact(&mut back).unwrap();
        assert_eq!(back, msg);
        clients.push(c);
    }
    assert_eq!(relays(&listener).active, N as u64);
    listener.shutdown();
    let r = relays(&listener);
    assert_eq!(
        (r.active, r.closed_at_shutdown, r.reset_at_shutdown),
        (0, N as u64, 0)
    );
    for mut c in clients {
        let mut b = [0u8; 1];
        // Wound down with a half-close each way: end of stream, not a reset.
        assert_eq!(c.read(&mut b).expect("FIN, not RST"), 0);
    }
    drop(listener);
    // The echo server's ends close as their reads see end of stream.
    fds.assert_back("fd table back to baseline");
}

#[test]
fn many_concurrent_relays_each_arrive_intact() {
    let _g = serial();
    let echo = Echo::start();
    let listener = Listener::builder("127.0.0.1:0".parse().unwrap())
        .handler({
            let up = echo.addr;
            // Small buffers: many short sends and receives per relay.
            let opts = RelayOptions::new().with_buffer_size(4096);
            move |conn, ctx| {
                let _ = ctx.relay(conn, up, opts);
            }
        })
        .build()
        .unwrap();
    const CLIENTS: usize = 48;
    const LEN: usize = 256 * 1024;
    let addr = listener.local_addr();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|i| {
            std::thread::spawn(move || -> io::Result<bool> {
                let data = bytes(LEN, i as u64 + 1);
                let mut w = connect(addr)?;
                let mut r = w.try_clone()?;
                let reader = std::thread::spawn(move || -> io::Result<Vec<u8>> {
                    let mut back = Vec::with_capacity(LEN);
                    r.read_to_end(&mut back)?;
                    Ok(back)
                });
                w.write_all(&data)?;
                w.shutdown(Shutdown::Write)?;
                let back = reader
                    .join()
                    .map_err(|_| io::Error::other("reader panicked"))??;
                Ok(back == data)
            })
        })
        .collect();
    for t in threads {
        assert!(t.join().unwrap().unwrap(), "a relay garbled its bytes");
    }
    wait_for("every relay completes", || {
        relays(&listener).completed == CLIENTS as u64
    });
    let r = relays(&listener);
    assert_eq!((r.failed, r.active), (0, 0));
    assert_eq!(r.bytes_to_upstream, (CLIENTS * LEN) as u64);
    assert_eq!(r.bytes_to_client, (CLIENTS * LEN) as u64);
}

#[test]
fn an_upstream_that_never_answers_times_out_and_fails() {
    let _g = serial();
    // A listener whose accept queue (backlog 0: room for one) is full and
    // never drained: further SYNs are dropped, so a connect hangs.
    let up = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    up.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    up.listen(0).unwrap();
    let up_addr = up.local_addr().unwrap().as_socket().unwrap();
    let _filler = TcpStream::connect(up_addr).unwrap();
    let timeout = Duration::from_millis(200);
    let listener = Listener::builder("127.0.0.1:0".parse().unwrap())
        .handler(move |conn, ctx| {
            let opts = RelayOptions::new().with_connect_timeout(timeout);
            let _ = ctx.relay(conn, up_addr, opts);
        })
        .build()
        .unwrap();
    let started = Instant::now();
    let mut c = connect(listener.local_addr()).unwrap();
    let mut b = [0u8; 1];
    assert!(matches!(c.read(&mut b), Ok(0) | Err(_)));
    assert!(
        started.elapsed() >= timeout,
        "the client was let go only once the upstream connect timed out"
    );
    wait_for("the relay fails", || relays(&listener).failed == 1);
    let r = relays(&listener);
    assert_eq!((r.active, r.upstream_timeout), (0, 1));
}

/// A listener relaying to `upstream` with `opts` whose handler first sends
/// a duplicate of each client-side socket (the relay's own socket, dup'ed
/// before the relay takes it) to the returned receiver, so that a test can
/// read its socket options while the relay runs.
fn relay_listener_with_dups(
    upstream: SocketAddr,
    opts: RelayOptions,
) -> (Listener, mpsc::Receiver<TcpStream>) {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let listener = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .pin(false)
        .handler(move |conn, ctx| {
            let dup = conn.as_std().try_clone();
            let _ = ctx.relay(conn, upstream, opts);
            if let Ok(d) = dup {
                let _ = tx.lock().unwrap_or_else(|p| p.into_inner()).send(d);
            }
        })
        .build()
        .unwrap();
    (listener, rx)
}

/// Keep-alive request/response rounds of a few bytes through the relay.
fn ping_pong_rounds(c: &mut TcpStream, rounds: usize) {
    for i in 0..rounds {
        let req = [i as u8; 16];
        c.write_all(&req).unwrap();
        let mut back = [0u8; 16];
        c.read_exact(&mut back).unwrap();
        assert_eq!(back, req, "round {i} came back garbled");
    }
}

#[test]
fn nodelay_is_set_on_the_client_side_socket_too() {
    let _g = serial();
    let echo = Echo::start();
    let (listener, dups) = relay_listener_with_dups(echo.addr, RelayOptions::default());
    let mut c = connect(listener.local_addr()).unwrap();
    let relayed = dups.recv().unwrap();
    assert!(
        relayed.nodelay().unwrap(),
        "RelayOptions::nodelay (default on) applies to the client-side socket"
    );
    ping_pong_rounds(&mut c, 50);
    drop(relayed);
    c.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    wait_for("the relay completes", || relays(&listener).completed == 1);
    drop(listener);

    // Off means off on both sides.
    let (listener, dups) =
        relay_listener_with_dups(echo.addr, RelayOptions::default().with_nodelay(false));
    let mut c = connect(listener.local_addr()).unwrap();
    let relayed = dups.recv().unwrap();
    assert!(!relayed.nodelay().unwrap());
    ping_pong_rounds(&mut c, 5);
    drop((relayed, c));
}

/// A one-shard listener relaying every connection to `upstream` with
/// `opts` through `relay_with`, each outcome going to the returned
/// receiver; `tweak` adjusts the builder (caps).
fn outcome_listener(
    upstream: SocketAddr,
    opts: RelayOptions,
    tweak: impl FnOnce(ListenerBuilder) -> ListenerBuilder,
) -> (Listener, mpsc::Receiver<RelayOutcome>) {
    let (tx, rx) = mpsc::channel();
    let builder = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .pin(false)
        .handler(move |conn, ctx| {
            let tx = tx.clone();
            let _ = ctx.relay_with(conn, upstream, opts, move |o| {
                let _ = tx.send(o);
            });
        });
    (tweak(builder).build().unwrap(), rx)
}

/// The next outcome; the bound only turns a hang into a failure.
fn next_outcome(rx: &mpsc::Receiver<RelayOutcome>) -> RelayOutcome {
    rx.recv_timeout(Duration::from_secs(120))
        .expect("a relay outcome")
}

/// Blocks until the server side ends `c` (FIN or RST); the read timeout
/// only turns a hang into a failure.
fn ended_by_server(c: &mut TcpStream) -> bool {
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut b = [0u8; 64];
    loop {
        match c.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                )
            }
        }
    }
}

#[test]
fn outcome_of_a_completed_relay_names_the_side_that_closed_first_and_the_bytes() {
    let _g = serial();
    let echo = Echo::start();
    let (listener, outcomes) = outcome_listener(echo.addr, RelayOptions::default(), |b| b);
    let data = bytes(10_000, 3);
    let mut c = connect(listener.local_addr()).unwrap();
    c.write_all(&data).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    assert!(back == data);
    let o = next_outcome(&outcomes);
    assert_eq!(o.end, RelayEnd::Completed);
    assert_eq!(
        o.first,
        Some(RelaySide::Client),
        "the client half-closed first"
    );
    assert_eq!((o.bytes_to_upstream, o.bytes_to_client), (10_000, 10_000));
    let r = relays(&listener);
    assert_eq!((r.started, r.completed, r.failed, r.active), (1, 1, 0, 0));
}

#[test]
fn outcome_of_a_refused_upstream_says_refused() {
    let _g = serial();
    let (_hold, closed) = refusing_port();
    let fds = FdTable::now();
    let (listener, outcomes) = outcome_listener(closed, RelayOptions::default(), |b| b);
    let mut c = connect(listener.local_addr()).unwrap();
    assert!(ended_by_server(&mut c));
    let o = next_outcome(&outcomes);
    assert_eq!(o.end, RelayEnd::UpstreamRefused);
    assert_eq!(o.first, Some(RelaySide::Upstream));
    assert_eq!((o.bytes_to_upstream, o.bytes_to_client), (0, 0));
    let r = relays(&listener);
    assert_eq!((r.failed, r.upstream_refused, r.active), (1, 1, 0));
    drop((c, listener));
    fds.assert_back("both sockets closed");
}

#[test]
fn outcome_of_a_client_reset_says_client_reset() {
    let _g = serial();
    let up = TcpListener::bind("127.0.0.1:0").unwrap();
    let (listener, outcomes) =
        outcome_listener(up.local_addr().unwrap(), RelayOptions::default(), |b| b);
    let mut c = connect(listener.local_addr()).unwrap();
    c.write_all(b"abc").unwrap();
    let (mut s, _) = up.accept().unwrap();
    let mut b = [0u8; 3];
    s.read_exact(&mut b).unwrap();
    reset_on_drop(&c);
    drop(c);
    let o = next_outcome(&outcomes);
    assert_eq!(o.end, RelayEnd::ClientReset);
    assert_eq!(o.first, Some(RelaySide::Client));
    assert_eq!((o.bytes_to_upstream, o.bytes_to_client), (3, 0));
    assert!(ended_by_server(&mut s), "the upstream side is ended too");
    let r = relays(&listener);
    assert_eq!((r.failed, r.client_reset, r.upstream_reset), (1, 1, 0));
}

#[test]
fn outcome_of_an_upstream_reset_says_upstream_reset() {
    let _g = serial();
    let up = TcpListener::bind("127.0.0.1:0").unwrap();
    let (listener, outcomes) =
        outcome_listener(up.local_addr().unwrap(), RelayOptions::default(), |b| b);
    let mut c = connect(listener.local_addr()).unwrap();
    c.write_all(b"abc").unwrap();
    let (mut s, _) = up.accept().unwrap();
    let mut b = [0u8; 3];
    s.read_exact(&mut b).unwrap();
    s.write_all(b"hi").unwrap();
    let mut hi = [0u8; 2];
    c.read_exact(&mut hi).unwrap();
    reset_on_drop(&s);
    drop(s);
    assert!(ended_by_server(&mut c), "the client side is ended too");
    let o = next_outcome(&outcomes);
    assert_eq!(o.end, RelayEnd::UpstreamReset);
    assert_eq!(o.first, Some(RelaySide::Upstream));
    assert_eq!((o.bytes_to_upstream, o.bytes_to_client), (3, 2));
    let r = relays(&listener);
    assert_eq!((r.failed, r.client_reset, r.upstream_reset), (1, 0, 1));
}

#[test]
fn a_silent_relay_is_torn_down_at_its_idle_timeout_and_counted() {
    let _g = serial();
    // An upstream that accepts and never says anything.
    let up = TcpListener::bind("127.0.0.1:0").unwrap();
    let fds = FdTable::now();
    let opts = RelayOptions::default().with_idle_timeout(Duration::from_millis(100));
    let (listener, outcomes) = outcome_listener(up.local_addr().unwrap(), opts, |b| b);
    let mut c = connect(listener.local_addr()).unwrap();
    let (mut s, _) = up.accept().unwrap();
    // The event waited on: the engine ends the client's connection (no
    // byte is sent first: the test's own pace must not decide the outcome).
    assert!(ended_by_server(&mut c), "the idle relay ended the client");
    assert!(ended_by_server(&mut s), "and the upstream");
    let o = next_outcome(&outcomes);
    assert_eq!(o.end, RelayEnd::IdleTimeout);
    assert_eq!(o.first, None, "neither side had ended");
    assert_eq!((o.bytes_to_upstream, o.bytes_to_client), (0, 0));
    let r = relays(&listener);
    assert_eq!(
        (r.idle_timeout, r.failed, r.completed, r.active),
        (1, 0, 0, 0)
    );
    drop((c, s, listener));
    fds.assert_back("both sockets closed");
}

#[test]
fn a_panicking_outcome_callback_is_counted_and_the_shard_goes_on() {
    let _g = serial();
    let echo = Echo::start();
    let up = echo.addr;
    let listener = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .pin(false)
        .handler(move |conn, ctx| {
            let _ = ctx.relay_with(conn, up, RelayOptions::default(), |_| {
                panic!("an outcome callback that panics")
            });
        })
        .build()
        .unwrap();
    for round in 1..=2u64 {
        let mut c = connect(listener.local_addr()).unwrap();
        c.write_all(b"ping").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"ping");
        wait_for("the callback ran", || {
            relays(&listener).callback_panics == round
        });
    }
    assert_eq!(relays(&listener).completed, 2);
}

/// Ends a relay cleanly from both sides.
fn finish(mut c: TcpStream, mut s: TcpStream) {
    c.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    drop(s);
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn at_the_relay_cap_a_further_relay_is_refused_counted_and_the_others_go_on() {
    let _g = serial();
    let up = silent_upstream();
    let fds = FdTable::now();
    let (listener, outcomes) =
        outcome_listener(up.local_addr().unwrap(), RelayOptions::default(), |b| {
            b.max_relays_per_shard(2)
        });
    let addr = listener.local_addr();
    let mut c1 = connect(addr).unwrap();
    let mut s1 = accept_from(&up);
    let mut c2 = connect(addr).unwrap();
    let mut s2 = accept_from(&up);
    // The third: refused, reset, reported.
    let mut c3 = connect(addr).unwrap();
    assert!(ended_by_server(&mut c3), "the refused client was closed");
    let o = next_outcome(&outcomes);
    assert_eq!(o.end, RelayEnd::CapRefused);
    assert_eq!((o.first, o.bytes_to_upstream), (None, 0));
    let r = relays(&listener);
    assert_eq!((r.started, r.active, r.refused_cap), (2, 2, 1));
    // The first two still relay, both ways.
    still_relays(&mut c1, &mut s1);
    still_relays(&mut c2, &mut s2);
    finish(c1, s1);
    assert_eq!(next_outcome(&outcomes).end, RelayEnd::Completed);
    // Below the cap again: a new relay is taken.
    let mut c4 = connect(addr).unwrap();
    let mut s4 = accept_from(&up);
    still_relays(&mut c4, &mut s4);
    finish(c2, s2);
    finish(c4, s4);
    assert_eq!(next_outcome(&outcomes).end, RelayEnd::Completed);
    assert_eq!(next_outcome(&outcomes).end, RelayEnd::Completed);
    let r = relays(&listener);
    assert_eq!(
        (r.started, r.completed, r.refused_cap, r.active),
        (3, 3, 1, 0)
    );
    drop((c3, listener));
    fds.assert_back("every socket closed");
}

#[test]
fn the_relay_memory_budget_refuses_a_relay_that_would_exceed_it() {
    let _g = serial();
    let up = silent_upstream();
    // Buffers of 4 KiB: 8 KiB a relay; the budget holds one, not two.
    let opts = RelayOptions::default().with_buffer_size(4096);
    let (listener, outcomes) = outcome_listener(up.local_addr().unwrap(), opts, |b| {
        b.relay_memory_per_shard(2 * 8192 - 1)
    });
    let addr = listener.local_addr();
    let mut c1 = connect(addr).unwrap();
    let mut s1 = accept_from(&up);
    let mut c2 = connect(addr).unwrap();
    assert!(ended_by_server(&mut c2));
    assert_eq!(next_outcome(&outcomes).end, RelayEnd::CapRefused);
    still_relays(&mut c1, &mut s1);
    finish(c1, s1);
    assert_eq!(next_outcome(&outcomes).end, RelayEnd::Completed);
    // The memory came back with the relay.
    let mut c3 = connect(addr).unwrap();
    let mut s3 = accept_from(&up);
    still_relays(&mut c3, &mut s3);
    finish(c3, s3);
    assert_eq!(next_outcome(&outcomes).end, RelayEnd::Completed);
    let r = relays(&listener);
    assert_eq!((r.started, r.completed, r.refused_cap), (2, 2, 1));
}

#[test]
fn bad_relay_caps_are_refused_at_build_naming_the_field() {
    let _g = serial();
    let field = |b: ListenerBuilder| match b.build() {
        Err(Error::Config(e)) => e.field,
        Err(e) => panic!("expected a configuration error, got {e}"),
        Ok(_) => panic!("expected a configuration error, got a listener"),
    };
    let b = || Listener::builder("127.0.0.1:0".parse().unwrap()).shards(1);
    assert_eq!(field(b().max_relays_per_shard(0)), "max_relays_per_shard");
    assert_eq!(
        field(b().max_relays_per_shard(floodgate::MAX_RELAYS_PER_SHARD + 1)),
        "max_relays_per_shard"
    );
    assert_eq!(
        field(b().relay_memory_per_shard(0)),
        "relay_memory_per_shard"
    );
    assert!(b()
        .max_relays_per_shard(1)
        .relay_memory_per_shard(2)
        .build()
        .is_ok());
}

#[test]
fn the_relay_dials_the_upstream_the_condition_chose() {
    let _g = serial();
    // Two upstreams that each answer one connection with their own name;
    // the condition routes by the first byte and hands the chosen address
    // to the handler as the verdict's value, which relays to it without
    // looking at the bytes again.
    let named = |name: u8| {
        let up = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = up.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = up.accept().unwrap();
            let mut first = [0u8; 1];
            c.read_exact(&mut first).unwrap();
            c.write_all(&[name, first[0]]).unwrap();
        });
        (addr, t)
    };
    let ((addr_a, ta), (addr_b, tb)) = (named(b'A'), named(b'B'));
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .condition(
            move |req: &ConnectRequest<'_>| match req.first_bytes.first() {
                None => Verdict::NeedBytes(1),
                Some(b'a') => Verdict::accept_with(floodgate::Value::new(addr_a)),
                Some(_) => Verdict::accept_with(floodgate::Value::new(addr_b)),
            },
        )
        .handler(|conn, ctx| match conn.value::<SocketAddr>().copied() {
            Some(up) => {
                let _ = ctx.relay(conn, up, RelayOptions::new());
            }
            None => drop(conn),
        })
        .build()
        .unwrap();
    for (first, name) in [(b'b', b'B'), (b'a', b'A')] {
        let mut c = connect(l.local_addr()).unwrap();
        c.write_all(&[first]).unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        assert_eq!(
            back,
            [name, first],
            "routed to the upstream the value named"
        );
    }
    ta.join().unwrap();
    tb.join().unwrap();
    l.shutdown();
    assert_eq!(relays(&l).started, 2);
}
