//! Admission: condition functions over address, first bytes and SYN QoS;
//! accept / reject / defer seen from the client; withdrawal; attributes.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use floodgate::{ConnectRequest, Keepalive, Listener, Qos, RejectHow, SocketAttrs, Verdict};
use floodgate_tests::{connect, reset_on_drop, serial, wait_for, FdTable};

const WAIT: Duration = Duration::from_secs(60);

fn by_first_byte(req: &ConnectRequest<'_>) -> Verdict {
    match req.first_bytes.first() {
        Some(b'a') => Verdict::Accept {
            qos: None,
            reply: Some(b"hi".to_vec()),
            value: None,
        },
        Some(b'c') => Verdict::Reject {
            how: RejectHow::Close,
            reply: Some(b"no\n".to_vec()),
        },
        Some(b'r') => Verdict::reset(),
        Some(b'd') if req.deferrals == 0 => Verdict::Defer,
        Some(b'd') => Verdict::accept(),
        _ => Verdict::close(),
    }
}

fn client(addr: std::net::SocketAddr, first: &[u8]) -> TcpStream {
    let mut s = connect(addr).unwrap();
    s.write_all(first).unwrap();
    s
}

#[test]
fn each_verdict_is_seen_from_the_client() {
    let _g = serial();
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .peek(1, WAIT)
        .condition(by_first_byte)
        .build()
        .unwrap();
    let addr = l.local_addr();

    // Accept with a reply: the client reads it; the application gets it.
    let mut a = client(addr, b"a");
    let mut app = l.accept().unwrap();
    let mut hi = [0u8; 2];
    a.read_exact(&mut hi).unwrap();
    assert_eq!(&hi, b"hi");
    let mut first = [0u8; 1];
    app.read_exact(&mut first).unwrap();
    assert_eq!(
        &first, b"a",
        "the peeked byte is still there for the application"
    );

    // Reject with close: the reply, then EOF.
    let mut c = client(addr, b"c");
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"no\n");

    // Reject with reset: ECONNRESET.
    let mut r = client(addr, b"r");
    let mut buf = [0u8; 8];
    let err = r.read(&mut buf).expect_err("reset");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);

    // Defer, then accept.
    let _d = client(addr, b"d");
    let mut app_d = l.accept().unwrap();
    app_d.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"d");

    let t = l.stats().total();
    assert_eq!(
        (t.rejected.close, t.rejected.reset, t.deferred),
        (1, 1, 1),
        "{t:?}"
    );
    assert_eq!(t.delivered, 2);
    assert!(l.stats().conserved(), "{t:?}");
}

#[test]
fn the_condition_sees_the_exact_first_bytes_and_they_stay_readable() {
    let _g = serial();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .peek(16, WAIT)
        .condition(move |req: &ConnectRequest<'_>| {
            *s2.lock().unwrap() = req.first_bytes.to_vec();
            Verdict::accept()
        })
        .build()
        .unwrap();
    let msg = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n";
    let mut c = connect(l.local_addr()).unwrap();
    // Two writes: the condition must wait for all 16 bytes.
    c.write_all(&msg[..5]).unwrap();
    c.write_all(&msg[5..]).unwrap();
    let mut app = l.accept().unwrap();
    assert_eq!(seen.lock().unwrap().as_slice(), &msg[..16]);
    let mut all = vec![0u8; msg.len()];
    app.read_exact(&mut all).unwrap();
    assert_eq!(all, msg, "peeking consumed nothing");
}

#[test]
fn the_condition_sees_the_clients_dscp_and_mss() {
    let _g = serial();
    let seen = Arc::new(Mutex::new(None));
    let s2 = seen.clone();
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .save_syn(true)
        .condition(move |req: &ConnectRequest<'_>| {
            *s2.lock().unwrap() = req.syn;
            Verdict::accept()
        })
        .build()
        .unwrap();
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_tos(46 << 2).unwrap(); // DSCP EF
    sock.connect(&l.local_addr().into()).unwrap();
    let _app = l.accept().unwrap();
    let syn = seen.lock().unwrap().expect("the SYN was saved and parsed");
    assert_eq!(syn.dscp, 46);
    let mss = syn.mss.expect("loopback SYNs carry an MSS");
    assert!(mss > 1000, "{mss}");
}

#[test]
fn a_silent_client_is_withdrawn_at_the_timeout_without_holding_up_others() {
    let _g = serial();
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .peek(4, WAIT)
        .pending_timeout(Duration::from_millis(300))
        .condition(|req: &ConnectRequest<'_>| {
            if req.first_bytes.len() == 4 {
                Verdict::accept()
            } else {
                Verdict::Defer
            }
        })
        .build()
        .unwrap();
    let silent = connect(l.local_addr()).unwrap();
    wait_for("the silent client waits in admission", || {
        l.stats().total().admitting == 1
    });
    let _talker = client(l.local_addr(), b"ping");
    let app = l.accept().unwrap();
    assert_eq!(app.shard(), 0);
    assert_eq!(
        l.stats().total().admitting,
        1,
        "admitted while the silent one still waits"
    );
    wait_for("the silent client is withdrawn", || {
        l.stats().total().withdrawn.timeout == 1
    });
    let mut b = [0u8; 1];
    let mut silent = silent;
    assert!(
        matches!(silent.read(&mut b), Ok(0) | Err(_)),
        "its connection ended"
    );
    assert!(l.stats().conserved());
}

#[test]
fn a_client_that_resets_while_pending_is_withdrawn() {
    let _g = serial();
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .peek(4, WAIT)
        .condition(|_: &ConnectRequest<'_>| Verdict::accept())
        .build()
        .unwrap();
    let c = connect(l.local_addr()).unwrap();
    wait_for("waiting in admission", || l.stats().total().admitting == 1);
    reset_on_drop(&c);
    drop(c);
    wait_for("withdrawn, peer gone", || {
        l.stats().total().withdrawn.peer_gone == 1
    });
    assert_eq!(l.stats().total().admitting, 0);
    assert!(l.stats().conserved());
}

#[test]
fn a_panicking_condition_resets_and_the_shard_goes_on() {
    let _g = serial();
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .peek(1, WAIT)
        .condition(|req: &ConnectRequest<'_>| {
            if req.first_bytes == b"p" {
                panic!("condition panics on purpose");
            }
            Verdict::accept()
        })
        .build()
        .unwrap();
    let mut bad = client(l.local_addr(), b"p");
    let mut b = [0u8; 1];
    assert_eq!(
        bad.read(&mut b).expect_err("reset").kind(),
        ErrorKind::ConnectionReset
    );
    let _good = client(l.local_addr(), b"g");
    let _app = l.accept().unwrap();
    let t = l.stats().total();
    assert_eq!(
        (t.condition_panics, t.rejected.reset, t.delivered),
        (1, 1, 1)
    );
}

#[test]
fn admitted_sockets_carry_every_declared_attribute_and_the_verdicts_qos() {
    let _g = serial();
    let attrs = SocketAttrs {
        nodelay: Some(true),
        keepalive: Some(Keepalive {
            idle: Duration::from_secs(31),
            interval: Duration::from_secs(7),
            count: 4,
        }),
        recv_buffer: Some(96 * 1024),
        send_buffer: Some(80 * 1024),
        linger: Some(Duration::from_secs(3)),
        qos: Qos {
            tos: Some(10 << 2),
            priority: Some(2),
            mark: Some(0x2a),
            max_pacing_rate: Some(1_000_000),
        },
        user_timeout: Some(Duration::from_millis(12_000)),
        congestion: Some("reno".into()),
        nonblocking: true,
        close_on_exec: true,
    };
    let verdict_qos = Qos {
        tos: Some(46 << 2),
        priority: Some(5),
        mark: None,
        max_pacing_rate: None,
    };
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .attrs(attrs.clone())
        .condition(move |req: &ConnectRequest<'_>| {
            if req.peer.port() % 2 == 0 {
                Verdict::Accept {
                    qos: Some(verdict_qos),
                    reply: None,
                    value: None,
                }
            } else {
                Verdict::accept()
            }
        })
        .build()
        .unwrap();
    for _ in 0..8 {
        let c = connect(l.local_addr()).unwrap();
        let app = l.accept().unwrap();
        let mut want = attrs.clone();
        if c.local_addr().unwrap().port() % 2 == 0 {
            want.qos.tos = verdict_qos.tos;
            want.qos.priority = verdict_qos.priority;
        }
        let bad = want.verify(&app, false).unwrap();
        assert!(bad.is_empty(), "attributes not as declared: {bad:?}");
    }
}

#[test]
fn conservation_holds_after_thousands_of_random_verdicts() {
    let _g = serial();
    let baseline = FdTable::now();
    const N: u64 = 3000;
    let l = Arc::new(
        Listener::builder("127.0.0.1:0".parse().unwrap())
            .peek(1, WAIT)
            .condition(|req: &ConnectRequest<'_>| match req.peer.port() % 5 {
                0 => Verdict::close(),
                1 => Verdict::reset(),
                2 if req.deferrals == 0 => Verdict::Defer,
                3 => Verdict::Reject {
                    how: RejectHow::Close,
                    reply: Some(b"busy\n".to_vec()),
                },
                _ => Verdict::accept(),
            })
            .build()
            .unwrap(),
    );
    let delivered = Arc::new(AtomicU64::new(0));
    let (l2, d2) = (l.clone(), delivered.clone());
    let app = std::thread::spawn(move || loop {
        match l2.accept() {
            Ok(c) => {
                drop(c);
                d2.fetch_add(1, Ordering::SeqCst);
            }
            Err(_) => return,
        }
    });
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let addr = l.local_addr();
            std::thread::spawn(move || {
                for _ in 0..N / 2 {
                    let mut s = connect(addr).unwrap();
                    let _ = s.write_all(b"x");
                    let mut rest = Vec::new();
                    let _ = s.read_to_end(&mut rest); // EOF, reply+EOF, or reset
                    reset_on_drop(&s);
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    wait_for("every connection decided", || {
        let t = l.stats().total();
        t.accepted == N && t.pending == 0 && t.delivered == delivered.load(Ordering::SeqCst)
    });
    l.shutdown();
    app.join().unwrap();
    let stats = l.stats();
    let t = stats.total();
    assert!(stats.conserved(), "{t:?}");
    assert!(
        t.rejected.close > 0 && t.rejected.reset > 0 && t.deferred > 0 && t.delivered > 0,
        "{t:?}"
    );
    drop(l);
    baseline.assert_back("fd table back to baseline");
}

#[test]
fn connections_left_in_the_ring_past_the_pending_timeout_are_withdrawn_at_accept() {
    let _g = serial();
    let baseline = FdTable::now();
    let timeout = Duration::from_millis(50);
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .pending_timeout(timeout)
        .build()
        .unwrap();
    let clients: Vec<_> = (0..2).map(|_| connect(l.local_addr()).unwrap()).collect();
    wait_for("both accepted into the ring", || {
        l.stats().total().ring_depth == 2
    });
    let queued = std::time::Instant::now();
    // Let them age past the timeout (a wait on elapsed time, not an
    // assertion on it): nothing takes them meanwhile.
    wait_for("older than the pending timeout", || {
        queued.elapsed() > timeout
    });
    assert!(
        l.try_accept().unwrap().is_none(),
        "stale connections are not delivered"
    );
    let t = l.stats().total();
    assert_eq!(
        (t.withdrawn.timeout, t.delivered, t.pending),
        (2, 0, 0),
        "{t:?}"
    );
    assert!(l.stats().conserved());
    // A fresh one is delivered.
    let fresh = connect(l.local_addr()).unwrap();
    assert!(l.accept_timeout(WAIT).unwrap().is_some());
    drop(fresh);
    drop(clients);
    drop(l);
    baseline.assert_back("fd table back to baseline");
}

#[test]
fn the_condition_sees_both_addresses() {
    let _g = serial();
    let seen = Arc::new(Mutex::new(None));
    let s2 = seen.clone();
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .condition(move |req: &ConnectRequest<'_>| {
            *s2.lock().unwrap() = Some((req.peer, req.local));
            Verdict::accept()
        })
        .build()
        .unwrap();
    let c = connect(l.local_addr()).unwrap();
    let _app = l.accept().unwrap();
    let (peer, local) = seen.lock().unwrap().expect("the condition ran");
    assert_eq!(peer, c.local_addr().unwrap());
    assert_eq!(local, l.local_addr());
}

#[test]
fn a_verdict_tos_keeps_the_declared_priority() {
    let _g = serial();
    // Linux resets SO_PRIORITY when IP_TOS changes: a verdict that sets
    // only TOS must not take the listener's priority with it.
    let attrs = SocketAttrs {
        qos: Qos {
            priority: Some(5),
            ..Qos::default()
        },
        ..SocketAttrs::default()
    };
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .attrs(attrs)
        .condition(|_: &ConnectRequest<'_>| {
            Verdict::accept().with_qos(Qos::default().with_dscp(46))
        })
        .build()
        .unwrap();
    let _c = connect(l.local_addr()).unwrap();
    let app = l.accept().unwrap();
    let want = SocketAttrs {
        qos: Qos {
            priority: Some(5),
            tos: Some(46 << 2),
            ..Qos::default()
        },
        ..SocketAttrs::default()
    };
    let bad = want.verify(&app, false).unwrap();
    assert!(bad.is_empty(), "attributes not as declared: {bad:?}");
}

#[test]
fn the_verdict_value_reaches_accept_the_handler_and_registrations() {
    use floodgate::{Events, Interest, Registered, Value};
    let _g = serial();
    let route = |req: &ConnectRequest<'_>| {
        Verdict::accept_with(Value::new(format!("route-{}", req.peer.port())))
    };
    // accept()
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .condition(route)
        .build()
        .unwrap();
    let c = connect(l.local_addr()).unwrap();
    let app = l.accept().unwrap();
    let want = format!("route-{}", c.local_addr().unwrap().port());
    assert_eq!(app.value::<String>(), Some(&want));
    assert_eq!(app.value::<u32>(), None, "typed: a String is not a u32");
    drop((app, l));
    // The inline handler.
    let (tx, rx) = std::sync::mpsc::channel::<Option<String>>();
    let tx = Mutex::new(tx);
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .condition(route)
        .handler(move |conn, _ctx| {
            let _ = tx.lock().unwrap().send(conn.value::<String>().cloned());
        })
        .build()
        .unwrap();
    let c = connect(l.local_addr()).unwrap();
    let want = format!("route-{}", c.local_addr().unwrap().port());
    assert_eq!(rx.recv().unwrap(), Some(want));
    drop(l);
    // A registration's handler, and after take(), accept().
    let seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let s2 = seen.clone();
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .condition(route)
        .register(
            Interest::READABLE,
            move |r: &mut Registered<'_>, _e: Events| {
                s2.lock().unwrap().push(r.value::<String>().cloned());
                r.take();
            },
        )
        .build()
        .unwrap();
    let mut c = connect(l.local_addr()).unwrap();
    let want = format!("route-{}", c.local_addr().unwrap().port());
    c.write_all(b"x").unwrap();
    let app = l.accept().unwrap();
    assert_eq!(seen.lock().unwrap().as_slice(), &[Some(want.clone())]);
    assert_eq!(app.value::<String>(), Some(&want), "kept through take()");
}

#[test]
fn a_peek_without_a_condition_waits_for_the_bytes() {
    let _g = serial();
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .peek(4, WAIT)
        .pending_timeout(WAIT)
        .build()
        .unwrap();
    // The silent one is accepted by the shard first...
    let _silent = connect(l.local_addr()).unwrap();
    wait_for("the shard took the silent one", || {
        l.stats().total().accepted == 1
    });
    // ...but the one that sends its 4 bytes is delivered first.
    let mut talker = connect(l.local_addr()).unwrap();
    talker.write_all(b"ping").unwrap();
    let mut app = l.accept().unwrap();
    assert_eq!(app.peer_addr().unwrap(), talker.local_addr().unwrap());
    let mut b = [0u8; 4];
    app.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    assert_eq!(l.stats().total().admitting, 1, "the silent one still waits");
}
