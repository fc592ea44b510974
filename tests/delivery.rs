//! Delivery: blocking accept, try/timeout, the accept event, the inline
//! handler, all on real loopback sockets.

use std::collections::HashSet;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use floodgate::{Error, Listener};
use floodgate_tests::{connect, read_id, serial, tagged_client, wait_for, FdTable};

const CONNECTIONS: u64 = 20_000;
const CLIENT_THREADS: u64 = 4;
const CONSUMERS: usize = 2;

#[test]
fn every_connection_is_delivered_exactly_once() {
    let _g = serial();
    let fds = FdTable::now();
    let listener = Arc::new(
        Listener::builder("127.0.0.1:0".parse().unwrap())
            .build()
            .expect("build"),
    );
    let addr = listener.local_addr();
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let received = Arc::new(AtomicU64::new(0));

    let consumers: Vec<_> = (0..CONSUMERS)
        .map(|_| {
            let (l, seen, received) = (listener.clone(), seen.clone(), received.clone());
            std::thread::spawn(move || loop {
                match l.accept() {
                    Ok(mut c) => {
                        let id = read_id(&mut c).expect("client id");
                        assert!(
                            seen.lock().unwrap().insert(id),
                            "connection {id} delivered twice"
                        );
                        received.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(Error::Closed) => return,
                    Err(e) => panic!("accept: {e}"),
                }
            })
        })
        .collect();
    let clients: Vec<_> = (0..CLIENT_THREADS)
        .map(|t| {
            std::thread::spawn(move || {
                let mut id = t;
                while id < CONNECTIONS {
                    tagged_client(addr, id).expect("client");
                    id += CLIENT_THREADS;
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client thread");
    }
    wait_for("all ids received", || {
        received.load(Ordering::SeqCst) == CONNECTIONS
    });
    listener.shutdown();
    for c in consumers {
        c.join().expect("consumer thread");
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len() as u64, CONNECTIONS);
    assert!((0..CONNECTIONS).all(|id| seen.contains(&id)));
    let stats = listener.stats();
    let total = stats.total();
    assert_eq!(total.accepted, CONNECTIONS);
    assert_eq!(total.delivered, CONNECTIONS);
    assert_eq!(total.closed_at_shutdown, 0);
    assert_eq!(total.pending, 0);
    assert!(stats.conserved(), "{stats:?}");
    drop(seen);
    drop(listener);
    fds.assert_back("fd table back to its baseline");
}

#[test]
fn accept_timeout_returns_none_when_nothing_is_pending() {
    let _g = serial();
    let listener = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .build()
        .unwrap();
    assert!(listener
        .accept_timeout(Duration::from_millis(5))
        .unwrap()
        .is_none());
    assert!(listener.try_accept().unwrap().is_none());
    let _client = connect(listener.local_addr()).unwrap();
    let got = listener.accept_timeout(Duration::from_secs(120)).unwrap();
    assert!(got.is_some());
}

fn readable(fd: std::os::fd::BorrowedFd<'_>, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd on the stack; the fd is borrowed from a live listener.
    let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    n > 0 && p.revents & libc::POLLIN != 0
}

#[test]
fn accept_event_is_readable_while_connections_are_pending_and_not_before() {
    let _g = serial();
    let listener = Listener::builder("127.0.0.1:0".parse().unwrap())
        .build()
        .unwrap();
    let event = listener.accept_event();
    assert!(!readable(event, 0), "readable before any connection");
    let _a = connect(listener.local_addr()).unwrap();
    let _b = connect(listener.local_addr()).unwrap();
    assert!(readable(event, 120_000), "a connection is pending");
    wait_for("both accepted", || listener.stats().total().accepted == 2);
    assert!(readable(event, 0));
    assert!(listener.try_accept().unwrap().is_some());
    assert!(readable(event, 0), "one still pending");
    assert!(listener.try_accept().unwrap().is_some());
    assert!(!readable(event, 0), "nothing pending after the last accept");
    assert!(listener.try_accept().unwrap().is_none());
    assert!(!readable(event, 0));
}

#[test]
fn inline_handler_gets_every_connection_on_its_shard() {
    let _g = serial();
    let fds = FdTable::now();
    let listener = Listener::builder("127.0.0.1:0".parse().unwrap())
        .handler(|conn, ctx| {
            let shard = ctx.shard() as u8;
            assert_eq!(conn.shard(), ctx.shard());
            ctx.reply_and_close(conn, &[b'x', shard]).expect("reply");
        })
        .build()
        .unwrap();
    for _ in 0..500 {
        let mut c = connect(listener.local_addr()).unwrap();
        let mut reply = Vec::new();
        c.read_to_end(&mut reply).unwrap();
        assert_eq!(reply.len(), 2);
        assert_eq!(reply[0], b'x');
        assert!((reply[1] as usize) < listener.shards());
    }
    assert!(matches!(listener.try_accept(), Err(Error::InlineDelivery)));
    listener.shutdown();
    let total = listener.stats().total();
    assert_eq!(total.accepted, 500);
    assert_eq!(total.delivered, 500);
    assert!(listener.stats().conserved());
    drop(listener);
    fds.assert_back("fd table back to baseline");
}

#[test]
fn a_panicking_handler_does_not_take_the_shard_down() {
    let _g = serial();
    let listener = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .handler(|mut conn, ctx| {
            // Read (not peek) the byte: closing with unread data would reset.
            let mut first = [0u8; 1];
            let _ = conn.read_exact(&mut first);
            if first[0] == b'p' {
                panic!("handler panics on purpose");
            }
            ctx.reply_and_close(conn, b"ok").expect("reply");
        })
        .build()
        .unwrap();
    use std::io::Write;
    let mut bad = connect(listener.local_addr()).unwrap();
    bad.write_all(b"p").unwrap();
    let mut rest = Vec::new();
    let _ = bad.read_to_end(&mut rest);
    let mut good = connect(listener.local_addr()).unwrap();
    good.write_all(b"g").unwrap();
    let mut reply = Vec::new();
    good.read_to_end(&mut reply).unwrap();
    assert_eq!(reply, b"ok");
    assert_eq!(listener.stats().total().handler_panics, 1);
}

/// Segments the client side of `s` has received (TCP_INFO `tcpi_segs_in`).
fn segments_in(s: &std::net::TcpStream) -> u32 {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: TCP_INFO writes at most `len` bytes into `info`, which is that
    // large, zeroed and owned by this frame; `len` is updated in place.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    // SAFETY: getsockopt succeeded and the struct was zeroed before.
    unsafe { info.assume_init() }.tcpi_segs_in
}

#[test]
fn replies_leave_with_the_fin_by_default_and_at_once_when_asked() {
    let _g = serial();
    let fds = FdTable::now();
    for at_once in [false, true] {
        let listener = Listener::builder("127.0.0.1:0".parse().unwrap())
            .shards(1)
            .replies_at_once(at_once)
            .handler(|conn, ctx| {
                ctx.reply_and_close(conn, b"x").expect("reply");
            })
            .build()
            .unwrap();
        for _ in 0..50 {
            let mut c = connect(listener.local_addr()).unwrap();
            let mut reply = Vec::new();
            c.read_to_end(&mut reply).unwrap();
            assert_eq!(reply, b"x");
            // SYN-ACK, then the reply and the FIN: in one segment (MSG_MORE)
            // or, sent at once, in two.
            let expected = if at_once { 3 } else { 2 };
            assert_eq!(segments_in(&c), expected, "replies_at_once({at_once})");
        }
        listener.shutdown();
        assert!(listener.stats().conserved());
    }
    fds.assert_back("fd table back to baseline");
}

/// `Admitted::reply_and_close` on the application's thread: every client
/// gets the reply and a FIN (not a reset), and the reply leaves with the FIN
/// in one segment where a plain write then drop takes two.
#[test]
fn an_accepted_connection_replies_with_the_fin_from_the_applications_thread() {
    let _g = serial();
    let fds = FdTable::now();
    {
        let listener = Listener::builder("127.0.0.1:0".parse().unwrap())
            .shards(1)
            .build()
            .unwrap();
        for with_fin in [true, false] {
            for _ in 0..50 {
                let mut c = connect(listener.local_addr()).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                let conn = listener.accept().expect("accept");
                if with_fin {
                    conn.reply_and_close(b"bye").expect("reply");
                } else {
                    let mut s = conn.into_std();
                    std::io::Write::write_all(&mut s, b"bye").expect("write");
                }
                let mut reply = Vec::new();
                c.read_to_end(&mut reply).expect("a FIN, not a reset");
                assert_eq!(reply, b"bye");
                // SYN-ACK, then the reply and the FIN in one segment, or in
                // two after a plain write.
                let expected = if with_fin { 2 } else { 3 };
                assert_eq!(segments_in(&c), expected, "reply_and_close: {with_fin}");
            }
        }
        listener.shutdown();
        let t = listener.stats().total();
        assert!(listener.stats().conserved(), "{t:?}");
        assert_eq!((t.accepted, t.delivered), (100, 100));
    }
    fds.assert_back("fd table back to baseline");
}

#[test]
fn accept_many_returns_each_connection_once_across_competing_threads() {
    let _g = serial();
    let fds = FdTable::now();
    let listener = Arc::new(
        Listener::builder("127.0.0.1:0".parse().unwrap())
            .build()
            .expect("build"),
    );
    let addr = listener.local_addr();
    const N: u64 = 6_000;
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let received = Arc::new(AtomicU64::new(0));
    let batches = Arc::new(AtomicU64::new(0));
    let consumers: Vec<_> = (0..3)
        .map(|_| {
            let (l, seen, received, batches) = (
                listener.clone(),
                seen.clone(),
                received.clone(),
                batches.clone(),
            );
            std::thread::spawn(move || {
                let mut conns = Vec::new();
                loop {
                    match l.accept_many(&mut conns, 16) {
                        Ok(0) => match l.accept_timeout(Duration::from_millis(50)) {
                            Ok(Some(c)) => conns.push(c),
                            Ok(None) => continue,
                            Err(Error::Closed) => return,
                            Err(e) => panic!("accept_timeout: {e}"),
                        },
                        Ok(_) => {
                            batches.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(Error::Closed) => return,
                        Err(e) => panic!("accept_many: {e}"),
                    }
                    for mut c in conns.drain(..) {
                        let id = read_id(&mut c).expect("client id");
                        assert!(seen.lock().unwrap().insert(id), "{id} delivered twice");
                        received.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    let clients: Vec<_> = (0..4u64)
        .map(|t| {
            std::thread::spawn(move || {
                let mut id = t;
                while id < N {
                    tagged_client(addr, id).expect("client");
                    id += 4;
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client thread");
    }
    wait_for("all ids received", || received.load(Ordering::SeqCst) == N);
    listener.shutdown();
    for c in consumers {
        c.join().expect("consumer thread");
    }
    assert_eq!(seen.lock().unwrap().len() as u64, N);
    assert!(batches.load(Ordering::Relaxed) > 0, "accept_many took some");
    let stats = listener.stats();
    assert_eq!(stats.total().delivered, N);
    assert!(stats.conserved(), "{stats:?}");
    drop(listener);
    fds.assert_back("fd table back to baseline");
}

#[test]
fn the_accept_event_asked_for_late_reports_what_is_already_pending() {
    let _g = serial();
    let listener = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .build()
        .unwrap();
    let _a = connect(listener.local_addr()).unwrap();
    wait_for("accepted into the ring", || {
        listener.stats().total().accepted == 1
    });
    // Nobody asked for the event while the connection was pushed: asking
    // now must still report it.
    assert!(readable(listener.accept_event(), 0));
    assert!(listener.try_accept().unwrap().is_some());
    assert!(!readable(listener.accept_event(), 0));
}

/// Whether O_NONBLOCK is set on the admitted socket (`fcntl(F_GETFL)`).
fn is_nonblocking(conn: &floodgate::Admitted) -> bool {
    socket2::SockRef::from(conn.as_std())
        .nonblocking()
        .expect("F_GETFL")
}

#[test]
fn nonblocking_accept_gives_o_nonblock_sockets_on_every_accept_path() {
    let _g = serial();
    let fds = FdTable::now();
    // The multishot ACCEPT (epoll: accept4), the limits' poll + accept4,
    // and a driven shard's accept, each with and without the option.
    for nonblocking in [false, true] {
        for limited in [false, true] {
            let mut b = Listener::builder("127.0.0.1:0".parse().unwrap())
                .shards(1)
                .nonblocking(nonblocking);
            if limited {
                b = b.accept_budget(4);
            }
            let listener = b.build().expect("build");
            let _client = connect(listener.local_addr()).expect("connect");
            let conn = listener.accept().expect("accept");
            assert_eq!(
                is_nonblocking(&conn),
                nonblocking,
                "limited {limited}, on {}",
                listener.backend()
            );
            drop(conn);
            listener.shutdown();
            assert!(listener.stats().conserved());
        }
        let (listener, mut shards) = Listener::builder("127.0.0.1:0".parse().unwrap())
            .shards(1)
            .nonblocking(nonblocking)
            .build_driven()
            .expect("build driven");
        let mut shard = shards.pop().expect("one shard");
        let _client = connect(listener.local_addr()).expect("connect");
        let mut got = None;
        while got.is_none() {
            shard
                .drive(|conn, _| got = Some(is_nonblocking(&conn)))
                .expect("drive");
            if got.is_none() {
                shard.wait(Some(Duration::from_secs(1))).expect("wait");
            }
        }
        assert_eq!(got, Some(nonblocking), "driven, on {}", listener.backend());
        drop(shard);
        listener.shutdown();
        assert!(listener.stats().conserved());
    }
    fds.assert_back("fd table back to baseline");
}

/// An inline handler's connections reach it without passing through the
/// ring while it has room (one at a time: the ring is never used); a burst
/// larger than the ring, queued while the handler is busy, still arrives
/// exactly once and in the kernel's order; the stats conserve throughout.
#[test]
fn an_inline_handler_takes_its_connections_in_order_past_the_ring() {
    use std::io::Write;
    const RING: usize = 4;
    // The kernel queues one more than the backlog it was given.
    const BURST: u64 = RING as u64 + 1;
    let _g = serial();
    let fds = FdTable::now();
    let (gate, handler) = floodgate_tests::gated_handler();
    let listener = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .pin(false)
        .backlog(RING)
        .handler(handler)
        .build()
        .unwrap();
    let addr = listener.local_addr();
    let client = |id: u64| {
        let mut s = connect(addr).unwrap();
        s.write_all(&id.to_le_bytes()).unwrap();
        s
    };
    let mut kept = Vec::new();
    for id in 100..103 {
        kept.push(client(id));
        assert_eq!(gate.next(), id);
    }
    let s = listener.stats();
    assert_eq!(
        s.total().ring_high_water,
        0,
        "one at a time, the ring is not used: {s:?}"
    );
    kept.push(client(0));
    wait_for("the first of the burst is with the handler", || {
        listener.stats().total().delivered == 4
    });
    kept.extend((1..=BURST).map(client));
    if listener.ring_setup().defer_taskrun
        || listener.backend().backend == floodgate::Backend::Epoll
    {
        // The burst is the kernel's until the shard runs again (without
        // DEFER_TASKRUN an io_uring accept may take it meanwhile).
        wait_for("the burst waits in the kernel's queue", || {
            listener
                .stats()
                .total()
                .kernel
                .map_or(0, |k| k.accept_queue as u64)
                == BURST
        });
    }
    gate.release();
    let ids: Vec<u64> = (0..=BURST).map(|_| gate.next()).collect();
    assert_eq!(ids, (0..=BURST).collect::<Vec<_>>(), "in order, once each");
    wait_for("all delivered and conserved", || {
        let s = listener.stats();
        s.total().delivered == BURST + 4 && s.conserved()
    });
    for c in &kept {
        floodgate_tests::reset_on_drop(c);
    }
    drop(kept);
    drop(listener);
    fds.assert_back("fd table back to baseline");
}
