//! The connect side: blocking, try/poll, completion event and inline
//! delivery; typed errors (refused, timed out); explicit source addresses;
//! shutdown with connects in flight; sequences on the shards' rings; no
//! descriptor left behind. Real loopback sockets throughout.

use std::collections::HashMap;
use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use floodgate::{
    CloseMode, ConnectErrorKind, Connector, Dial, Error, Listener, SequenceOutcome, SequencePlan,
};
use floodgate_tests::{
    banner_listener, refusing_port, ring_held_sockets, serial, wait_for, FdTable,
};
use socket2::{Domain, Protocol, Socket, Type};

/// Bounds only turn a hang into a failure; the tests wait on events.
const LONG: Duration = Duration::from_secs(60);

fn connector(shards: usize) -> Connector {
    Connector::builder()
        .shards(shards)
        .pin(false)
        .build()
        .expect("build connector")
}

/// A listener with backlog 1 that never accepts, and the connections that
/// fill its accept queue: a further SYN is dropped by the kernel.
fn full_listener() -> (Socket, SocketAddr, Vec<TcpStream>) {
    let l = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    l.bind(&any.into()).expect("bind");
    l.listen(1).expect("listen");
    let addr = l.local_addr().unwrap().as_socket().unwrap();
    let mut fill = Vec::new();
    for _ in 0..16 {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(s) => fill.push(s),
            Err(_) => return (l, addr, fill),
        }
    }
    panic!("the accept queue of a backlog-1 listener never filled");
}

#[test]
fn connects_to_a_live_listener() {
    let _g = serial();
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    let c = connector(1);
    let conn = c.connect(addr).expect("connect");
    let (accepted, peer) = server.accept().unwrap();
    assert_eq!(peer, conn.local_addr().unwrap());
    assert_eq!(conn.peer_addr(), addr);
    assert_eq!(conn.shard(), 0);
    drop((conn, accepted));
    c.shutdown();
    let t = c.stats().total();
    assert_eq!((t.submitted, t.connected, t.in_flight), (1, 1, 0));
    assert!(c.stats().conserved());
}

#[test]
fn closed_port_is_refused_with_a_typed_error() {
    let _g = serial();
    let (_hold, addr) = refusing_port();
    let c = connector(1);
    let err = c.connect(addr).expect_err("nobody listens");
    match &err {
        Error::Connect { kind, addr: a, .. } => {
            assert_eq!(*kind, ConnectErrorKind::Refused);
            assert_eq!(*a, addr);
        }
        other => panic!("expected a refused connect, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains(&addr.to_string()), "{text}");
    assert!(text.contains("refused"), "{text}");
    c.shutdown();
    let t = c.stats().total();
    assert_eq!((t.submitted, t.refused, t.connected), (1, 1, 0));
    assert!(c.stats().conserved());
}

#[test]
fn full_accept_queue_times_out_with_a_typed_error() {
    let _g = serial();
    let (_l, addr, _fill) = full_listener();
    let c = connector(1);
    let err = c
        .connect_with(Dial::new(addr).timeout(Duration::from_millis(200)))
        .expect_err("the accept queue is full");
    match &err {
        Error::Connect { kind, addr: a, .. } => {
            assert_eq!(*kind, ConnectErrorKind::TimedOut, "{err}");
            assert_eq!(*a, addr);
        }
        other => panic!("expected a timed-out connect, got {other:?}"),
    }
    assert!(err.to_string().contains("timed out"), "{err}");
    c.shutdown();
    assert_eq!(c.stats().total().timed_out, 1);
    assert!(c.stats().conserved());
}

#[test]
fn explicit_source_addresses_are_what_the_server_sees() {
    let _g = serial();
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    let sources: Vec<IpAddr> = vec!["127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap()];
    let c = Connector::builder()
        .shards(2)
        .pin(false)
        .sources(sources.clone())
        .build()
        .unwrap();
    let mut seen: HashMap<IpAddr, usize> = HashMap::new();
    let mut keep = Vec::new();
    for _ in 0..4 {
        let conn = c.connect(addr).expect("connect");
        let (s, peer) = server.accept().unwrap();
        assert_eq!(conn.local_addr().unwrap(), peer);
        *seen.entry(peer.ip()).or_default() += 1;
        keep.push((conn, s));
    }
    assert_eq!(seen.get(&sources[0]), Some(&2), "{seen:?}");
    assert_eq!(seen.get(&sources[1]), Some(&2), "{seen:?}");
    // A per-connect source overrides the connector's.
    let four: IpAddr = "127.0.0.4".parse().unwrap();
    let conn = c.connect_with(Dial::new(addr).source(four)).unwrap();
    let (_s, peer) = server.accept().unwrap();
    assert_eq!(peer.ip(), four);
    assert_eq!(conn.local_addr().unwrap().ip(), four);
}

#[test]
fn submit_then_try_complete_and_completion_event() {
    let _g = serial();
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    let c = connector(2);
    assert!(c.try_complete().unwrap().is_none());

    // Wait for the event with mio, as an application's loop would.
    let mut poll = mio::Poll::new().unwrap();
    let raw = c.completion_event().as_raw_fd();
    poll.registry()
        .register(
            &mut mio::unix::SourceFd(&raw),
            mio::Token(0),
            mio::Interest::READABLE,
        )
        .unwrap();
    let mut events = mio::Events::with_capacity(4);
    let mut tickets: Vec<_> = (0..3).map(|_| c.submit(addr).unwrap()).collect();
    let (_hold, refused) = refusing_port();
    tickets.push(c.submit(refused).unwrap());
    let mut got = Vec::new();
    while got.len() < tickets.len() {
        poll.poll(&mut events, Some(LONG)).unwrap();
        assert!(!events.is_empty(), "the completion event never fired");
        while let Some(done) = c.try_complete().unwrap() {
            got.push(done);
        }
    }
    got.sort_by_key(|d| d.ticket);
    let ids: Vec<_> = got.iter().map(|d| d.ticket).collect();
    assert_eq!(ids, tickets);
    for d in &got[..3] {
        assert!(d.result.is_ok(), "{:?}", d.result);
    }
    assert!(matches!(
        got[3].result,
        Err(Error::Connect {
            kind: ConnectErrorKind::Refused,
            ..
        })
    ));
    // Drained: the event is clear again.
    assert!(c.try_complete().unwrap().is_none());
    poll.poll(&mut events, Some(Duration::ZERO)).unwrap();
    assert!(events.is_empty(), "the event stayed readable when drained");
    drop(got);
    c.shutdown();
    assert!(matches!(c.try_complete(), Err(Error::Closed)));
}

#[test]
fn inline_handler_gets_every_completion() {
    let _g = serial();
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let c = Connector::builder()
        .shards(1)
        .pin(false)
        .handler(move |done| {
            let _ = tx.lock().unwrap().send((
                done.ticket,
                std::thread::current().name().map(String::from),
                done.result.is_ok(),
            ));
        })
        .build()
        .unwrap();
    assert!(matches!(c.try_complete(), Err(Error::InlineDelivery)));
    let t = c.submit(addr).unwrap();
    let (ticket, thread, ok) = rx.recv_timeout(LONG).expect("handler called");
    assert_eq!(ticket, t);
    assert!(ok);
    assert!(
        thread
            .as_deref()
            .unwrap_or("")
            .starts_with("floodgate-connect"),
        "handler ran on {thread:?}"
    );
}

#[test]
fn shutdown_cancels_in_flight_connects_and_closes_every_socket() {
    let _g = serial();
    let baseline = FdTable::now();
    {
        let (_l, addr, _fill) = full_listener();
        let c = Arc::new(
            Connector::builder()
                .shards(2)
                .pin(false)
                .timeout(None)
                .build()
                .unwrap(),
        );
        for _ in 0..10 {
            c.submit(addr).unwrap();
        }
        let blocked = {
            let c = c.clone();
            std::thread::spawn(move || c.connect(addr))
        };
        wait_for("11 connects in flight", || {
            c.stats().total().submitted == 11
        });
        wait_for("the sockets to be created", || {
            c.stats().total().open_sockets == 11
        });
        c.shutdown();
        assert!(matches!(blocked.join().unwrap(), Err(Error::Closed)));
        let t = c.stats().total();
        assert_eq!(
            (t.submitted, t.cancelled, t.in_flight),
            (11, 11, 0),
            "{t:?}"
        );
        assert_eq!(t.open_sockets, 0);
        assert!(c.stats().conserved());
        let mut cancelled = 0;
        while let Ok(Some(done)) = c.try_complete() {
            assert!(matches!(done.result, Err(Error::Closed)));
            cancelled += 1;
        }
        assert_eq!(cancelled, 10);
        assert!(c.submit(addr).is_err());
    }
    baseline.assert_back("descriptors leaked");
}

#[test]
fn fd_table_is_back_to_baseline_after_drop() {
    let _g = serial();
    let baseline = FdTable::now();
    {
        let listener = banner_listener();
        let addr = listener.local_addr();
        let c = connector(2);
        for _ in 0..50 {
            let mut conn = c.connect(addr).expect("connect");
            let mut b = Vec::new();
            conn.read_to_end(&mut b).unwrap();
            assert_eq!(b, b"x");
        }
        let (_hold, refused) = refusing_port();
        for _ in 0..20 {
            assert!(c.connect(refused).is_err());
        }
        let plan = SequencePlan::new(addr).concurrency(8).count(500);
        let summary = c
            .run(&plan, |_| |_: &floodgate::SequenceRecord| {})
            .unwrap();
        assert_eq!(summary.outcomes.get(SequenceOutcome::Ok), 500);
        drop(c);
        listener.shutdown();
    }
    baseline.assert_back("descriptors leaked");
}

#[test]
fn closed_loop_sequences_are_all_accounted_for() {
    let _g = serial();
    const N: u64 = 3_000;
    let listener = banner_listener();
    let addr = listener.local_addr();
    let c = connector(2);
    let records = Arc::new(AtomicU64::new(0));
    let first_bytes = Arc::new(AtomicU64::new(0));
    let plan = SequencePlan::new(addr)
        .expect(1)
        .close(CloseMode::Reset)
        .concurrency(32)
        .count(N)
        .duration(LONG);
    let summary = c
        .run(&plan, |_| {
            let (records, first_bytes) = (records.clone(), first_bytes.clone());
            move |r: &floodgate::SequenceRecord| {
                records.fetch_add(1, Ordering::Relaxed);
                if r.outcome == SequenceOutcome::Ok {
                    assert!(r.connect.is_some() && r.first_byte >= r.connect);
                    assert_eq!((r.sent, r.received), (0, 1));
                    first_bytes.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .unwrap();
    assert_eq!(summary.started, N);
    assert_eq!(summary.outcomes.total(), N);
    assert_eq!(summary.outcomes.get(SequenceOutcome::Ok), N, "{summary:?}");
    assert_eq!(records.load(Ordering::Relaxed), N);
    assert_eq!(first_bytes.load(Ordering::Relaxed), N);
    wait_for("the server to deliver every connection", || {
        listener.stats().total().delivered == N
    });
    let t = c.stats().total();
    assert_eq!((t.sequences_started, t.connected, t.in_flight), (N, N, 0));
    assert_eq!(t.bytes_received, N);
    assert_eq!(t.open_sockets, 0);
    assert!(c.stats().conserved());
}

#[test]
fn sequences_send_then_receive_until_n_bytes_with_fin_close() {
    let _g = serial();
    const N: usize = 200;
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    // Reads the 5-byte request, answers 3000 bytes in three writes, closes.
    let srv = std::thread::spawn(move || {
        let mut requests = Vec::new();
        for _ in 0..N {
            let (mut s, _) = server.accept().unwrap();
            let mut req = [0u8; 5];
            s.read_exact(&mut req).unwrap();
            requests.push(req);
            for _ in 0..3 {
                std::io::Write::write_all(&mut s, &[b'y'; 1000]).unwrap();
            }
        }
        requests
    });
    let c = connector(2);
    let plan = SequencePlan::new(addr)
        .payload(b"hello".to_vec())
        .expect(3000)
        .close(CloseMode::Fin)
        .concurrency(4)
        .count(N as u64);
    let summary = c
        .run(&plan, |_| {
            |r: &floodgate::SequenceRecord| {
                assert_eq!(r.outcome, SequenceOutcome::Ok, "{r:?}");
                assert_eq!((r.sent, r.received), (5, 3000));
            }
        })
        .unwrap();
    assert_eq!(summary.outcomes.get(SequenceOutcome::Ok), N as u64);
    let requests = srv.join().unwrap();
    assert!(requests.iter().all(|r| r == b"hello"));
    let t = c.stats().total();
    assert_eq!(
        (t.bytes_sent, t.bytes_received),
        (5 * N as u64, 3000 * N as u64)
    );
}

#[test]
fn open_loop_and_errors_by_kind() {
    let _g = serial();
    let c = connector(2);
    // Refused, at a fixed rate.
    let (_hold, refused) = refusing_port();
    let plan = SequencePlan::new(refused).rate(2_000.0, 64).count(200);
    let summary = c
        .run(&plan, |_| |_: &floodgate::SequenceRecord| {})
        .unwrap();
    assert_eq!(
        summary
            .outcomes
            .get(SequenceOutcome::Connect(ConnectErrorKind::Refused)),
        200,
        "{summary:?}"
    );
    assert!(summary.elapsed >= Duration::from_millis(90), "{summary:?}");
    assert_eq!(c.stats().total().refused, 200);
    // A server that accepts and never answers: the I/O timeout.
    let (l, addr) = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        (l, a)
    };
    let plan = SequencePlan::new(addr)
        .io_timeout(Duration::from_millis(100))
        .concurrency(4)
        .count(8);
    let summary = c
        .run(&plan, |_| |_: &floodgate::SequenceRecord| {})
        .unwrap();
    assert_eq!(
        summary.outcomes.get(SequenceOutcome::TimedOut),
        8,
        "{summary:?}"
    );
    drop(l);
    c.shutdown();
    assert_eq!(c.stats().total().open_sockets, 0);
    assert!(c.stats().conserved());
}

#[test]
fn bad_plans_are_refused_naming_the_field() {
    let _g = serial();
    let c = connector(1);
    let (_hold, addr) = refusing_port();
    for (plan, field) in [
        (SequencePlan::new(addr), "count/duration"),
        (
            SequencePlan::new(addr).count(1).concurrency(0),
            "concurrency",
        ),
        (SequencePlan::new(addr).count(1).rate(0.0, 1), "rate"),
        (SequencePlan::new(addr).duration(Duration::ZERO), "duration"),
    ] {
        match c.run(&plan, |_| |_: &floodgate::SequenceRecord| {}) {
            Err(Error::Config(e)) => assert_eq!(e.field, field),
            other => panic!("expected a config error on {field}, got {other:?}"),
        }
    }
}

#[test]
fn sockets_come_from_io_uring_socket_where_the_kernel_has_it() {
    let _g = serial();
    let baseline = FdTable::now();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let c = connector(1);
    // This kernel (6.x) has IORING_OP_SOCKET (5.19+): the shard uses it.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(|ch: char| !ch.is_ascii_digit());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    // On epoll, sockets come from socket(2).
    let on_uring = c.backend().backend == floodgate::Backend::IoUring;
    let expected = (major, minor) >= (5, 19) && on_uring;
    assert_eq!(c.stats().total().uring_socket, expected, "kernel {release}");
    // Dials made that way connect, and their sockets are close-on-exec.
    for _ in 0..50 {
        let conn = c.connect(listener.local_addr().unwrap()).expect("connect");
        let (_server_side, peer) = listener.accept().expect("accept");
        assert_eq!(peer, conn.local_addr().unwrap());
        // SAFETY: F_GETFD takes no pointer; the fd is borrowed from a live socket.
        let flags = unsafe { libc::fcntl(conn.as_raw_fd(), libc::F_GETFD) };
        assert!(flags >= 0 && flags & libc::FD_CLOEXEC != 0, "close-on-exec");
    }
    drop(c);
    drop(listener);
    baseline.assert_back("fd table back to baseline");
}

/// Whether this kernel runs io_uring SOCKET into direct slots (5.19+), the
/// condition for sequences on direct sockets.
fn kernel_has_direct_sockets() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(|ch: char| !ch.is_ascii_digit());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor) >= (5, 19)
}

#[test]
fn rst_sequences_reuse_their_sockets_and_every_server_side_sees_an_rst() {
    // Direct sockets (where the kernel has them).
    rst_reuse_case(None);
}

#[test]
fn rst_sequences_with_attributes_reuse_plain_sockets_too() {
    // Attributes make the shard use plain descriptors.
    rst_reuse_case(Some(floodgate::SocketAttrs {
        nodelay: Some(true),
        ..Default::default()
    }));
}

fn rst_reuse_case(attrs: Option<floodgate::SocketAttrs>) {
    let _g = serial();
    const N: u64 = 2_000;
    const C: usize = 8;
    let baseline = FdTable::now();
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    // Every 4th connection the server resets at once (the client's receive
    // fails: a sequence that ends in an error, whose socket must still be
    // disconnected and reused); the others get a byte, then the server
    // reads to see how the client closed.
    let serving = std::thread::spawn(move || {
        let (mut resets_seen, mut fins_seen, mut reset_by_server) = (0u64, 0u64, 0u64);
        for k in 0..N {
            let (mut s, _) = server.accept().expect("accept");
            if k % 4 == 3 {
                socket2::SockRef::from(&s)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                reset_by_server += 1;
                continue;
            }
            s.set_read_timeout(Some(LONG)).unwrap();
            use std::io::Write;
            s.write_all(b"x").expect("write the byte");
            let mut buf = [0u8; 1];
            match s.read(&mut buf) {
                Ok(0) => fins_seen += 1,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => resets_seen += 1,
                other => panic!("unexpected read after the byte: {other:?}"),
            }
        }
        (resets_seen, fins_seen, reset_by_server)
    });
    let mut builder = Connector::builder().shards(1).pin(false);
    if let Some(a) = attrs {
        builder = builder.attrs(a);
    }
    let c = builder.build().expect("build connector");
    let plan = SequencePlan::new(addr)
        .expect(1)
        .close(CloseMode::Reset)
        .concurrency(C)
        .count(N)
        .duration(LONG);
    let summary = c
        .run(&plan, |_| |_: &floodgate::SequenceRecord| {})
        .unwrap();
    let (resets_seen, fins_seen, reset_by_server) = serving.join().unwrap();
    assert_eq!(summary.outcomes.total(), N, "{summary:?}");
    assert_eq!(
        summary.outcomes.get(SequenceOutcome::Ok),
        N - reset_by_server,
        "{summary:?}"
    );
    assert_eq!(
        summary.outcomes.get(SequenceOutcome::Reset),
        reset_by_server,
        "{summary:?}"
    );
    // RST close held on every connection that got its byte.
    assert_eq!((resets_seen, fins_seen), (N - reset_by_server, 0));
    let t = c.stats().total();
    // Direct descriptors are io_uring's; epoll reuses plain sockets.
    let on_uring = c.backend().backend == floodgate::Backend::IoUring;
    assert_eq!(t.direct_sockets, kernel_has_direct_sockets() && on_uring);
    // One socket per slot in flight, reused across sequences, also after
    // the server reset it.
    assert!(
        t.sockets_created <= C as u64,
        "{} sockets for {N} sequences",
        t.sockets_created
    );
    // The run leaves nothing behind: by the engine's count, and by the
    // kernel's list of the rings' direct tables.
    assert_eq!(t.open_sockets, 0);
    assert_eq!(ring_held_sockets(), 0);
    assert!(c.stats().conserved());
    drop(c);
    baseline.assert_back("descriptors leaked");
}

#[test]
fn sequence_connect_timeout_is_typed_without_a_timer_per_connect() {
    let _g = serial();
    let (_l, addr, _fill) = full_listener();
    let c = connector(1);
    let plan = SequencePlan::new(addr)
        .connect_timeout(Some(Duration::from_millis(200)))
        .io_timeout(LONG)
        .concurrency(4)
        .count(8);
    let summary = c
        .run(&plan, |_| |_: &floodgate::SequenceRecord| {})
        .unwrap();
    assert_eq!(
        summary
            .outcomes
            .get(SequenceOutcome::Connect(ConnectErrorKind::TimedOut)),
        8,
        "{summary:?}"
    );
    let t = c.stats().total();
    assert_eq!((t.timed_out, t.open_sockets), (8, 0));
    assert!(c.stats().conserved());
}

#[test]
fn shutdown_in_the_middle_of_a_run_closes_kept_and_in_flight_sockets() {
    let _g = serial();
    let baseline = FdTable::now();
    {
        let listener = banner_listener();
        let c = Arc::new(connector(2));
        // Bounded by count and time; shut down long before either.
        let plan = SequencePlan::new(listener.local_addr())
            .expect(1)
            .close(CloseMode::Reset)
            .concurrency(16)
            .count(10_000_000)
            .duration(LONG);
        let running = {
            let c = c.clone();
            std::thread::spawn(move || c.run(&plan, |_| |_: &floodgate::SequenceRecord| {}))
        };
        // Enough sequences that sockets are being reused and some are kept.
        wait_for("2,000 sequences", || {
            c.stats().total().sequences.total() >= 2_000
        });
        if c.stats().total().direct_sockets {
            wait_for("the kernel to list sockets in the ring's table", || {
                ring_held_sockets() > 0
            });
        }
        c.shutdown();
        let summary = running
            .join()
            .unwrap()
            .expect("the run ends with the shutdown");
        assert_eq!(summary.outcomes.total(), summary.started, "{summary:?}");
        let t = c.stats().total();
        assert_eq!((t.in_flight, t.open_sockets), (0, 0), "{t:?}");
        assert_eq!(ring_held_sockets(), 0);
        assert!(c.stats().conserved());
        drop(c);
        listener.shutdown();
    }
    baseline.assert_back("descriptors leaked");
}

#[test]
fn connected_sockets_carry_the_connectors_attributes_or_the_dials() {
    let _g = serial();
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    let attrs = floodgate::SocketAttrs {
        nodelay: Some(true),
        recv_buffer: Some(64 * 1024),
        linger: Some(Duration::from_secs(3)),
        nonblocking: true,
        ..Default::default()
    };
    let c = Connector::builder()
        .shards(1)
        .pin(false)
        .attrs(attrs.clone())
        .build()
        .unwrap();
    let conn = c.connect(addr).expect("connect");
    let (_peer, _) = server.accept().unwrap();
    assert_eq!(attrs.verify(conn.as_std(), false).unwrap(), vec![]);
    // The file flag is set on the handed-over socket: a read with nothing
    // sent would block, so it says so.
    let mut buf = [0u8; 1];
    let err = (&mut conn.as_std()).read(&mut buf).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
    // A dial's own attributes replace the connector's.
    let own = floodgate::SocketAttrs {
        nodelay: Some(false),
        ..Default::default()
    };
    let conn = c
        .connect_with(Dial::new(addr).attrs(own.clone()))
        .expect("connect");
    let (_peer, _) = server.accept().unwrap();
    assert_eq!(own.verify(conn.as_std(), false).unwrap(), vec![]);
    assert!(conn.as_std().nodelay().map(|on| !on).unwrap());
}

#[test]
fn sequences_carry_the_attributes_to_the_wire() {
    let _g = serial();
    const N: u64 = 200;
    let dscp = Arc::new(Mutex::new(HashMap::<u8, u64>::new()));
    let seen = dscp.clone();
    let listener = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .pin(false)
        .save_syn(true)
        .condition(move |req: &floodgate::ConnectRequest<'_>| {
            let d = req.syn.map_or(255, |s| s.dscp);
            *seen.lock().unwrap().entry(d).or_default() += 1;
            floodgate::Verdict::accept()
        })
        .handler(|conn, ctx| {
            let _ = ctx.reply_and_close(conn, b"x");
        })
        .build()
        .unwrap();
    let c = Connector::builder()
        .shards(1)
        .pin(false)
        .attrs(floodgate::SocketAttrs {
            qos: floodgate::Qos {
                tos: Some(46 << 2),
                ..Default::default()
            },
            ..Default::default()
        })
        .build()
        .unwrap();
    let plan = SequencePlan::new(listener.local_addr())
        .expect(1)
        .concurrency(8)
        .count(N)
        .duration(LONG);
    let summary = c
        .run(&plan, |_| |_: &floodgate::SequenceRecord| {})
        .unwrap();
    assert_eq!(summary.outcomes.get(SequenceOutcome::Ok), N, "{summary:?}");
    wait_for("every connection admitted", || {
        listener.stats().total().delivered == N
    });
    // Every SYN carried DSCP 46 (EF).
    assert_eq!(dscp.lock().unwrap().clone(), HashMap::from([(46u8, N)]));
    assert_eq!(c.stats().total().open_sockets, 0);
}

#[test]
fn attributes_the_kernel_refuses_are_refused_at_build_naming_the_field() {
    let bad = floodgate::SocketAttrs {
        congestion: Some("no-such-cc".into()),
        ..Default::default()
    };
    let err = Connector::builder()
        .shards(1)
        .pin(false)
        .attrs(bad)
        .build()
        .expect_err("an unknown congestion control is refused");
    let text = err.to_string();
    assert!(text.contains("attrs"), "{text}");
}
