//! Withdrawal: a pending connection that cannot be decided or delivered —
//! a silent or deferred client past its pending timeout, a malformed header
//! that never completes, a peer that reset while waiting in the ring — is
//! closed and counted, never held, and never holds up shutdown.

use std::io::Write;
use std::net::TcpStream;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use floodgate::conditions::{ProxyProtocol, Sni};
use floodgate::{proxy_protocol, sni, ConnectRequest, Listener, Verdict};
use floodgate_tests::{connect, ended_by_server, serial, tcp_socket_exists, wait_for, FdTable};

/// Shuts `l` down on another thread and waits (bounded) for it to return.
fn shutdown_returns(l: Arc<Listener>) -> bool {
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || {
        l.shutdown();
        let _ = tx.send(());
    });
    // Joined once it returned, so its handle on the listener is gone too.
    rx.recv_timeout(Duration::from_secs(120)).is_ok() && t.join().is_ok()
}

#[test]
fn deferred_silent_clients_are_closed_at_their_timeout_and_do_not_block_shutdown() {
    let _g = serial();
    let fds = FdTable::now();
    const N: usize = 50;
    let l = Arc::new(
        Listener::builder("127.0.0.1:0".parse().unwrap())
            .shards(1)
            .peek(16, Duration::from_millis(5))
            .defer_interval(Duration::from_millis(5))
            .pending_timeout(Duration::from_millis(300))
            .condition(|_: &ConnectRequest<'_>| Verdict::Defer)
            .build()
            .unwrap(),
    );
    let mut clients: Vec<TcpStream> = (0..N).map(|_| connect(l.local_addr()).unwrap()).collect();
    wait_for("every silent client withdrawn", || {
        l.stats().total().withdrawn.timeout == N as u64
    });
    for (i, c) in clients.iter_mut().enumerate() {
        assert!(ended_by_server(c), "client {i} was never closed");
    }
    // Clients still open: shutdown must not wait for them.
    assert!(shutdown_returns(l.clone()), "shutdown blocked");
    let t = l.stats().total();
    assert_eq!(t.accepted, N as u64);
    assert!(l.stats().conserved(), "{t:?}");
    drop(clients);
    drop(l);
    fds.assert_back("the fd table is back to baseline");
}

#[test]
fn shutdown_does_not_wait_for_deferred_clients() {
    let _g = serial();
    let fds = FdTable::now();
    let l = Arc::new(
        Listener::builder("127.0.0.1:0".parse().unwrap())
            .shards(1)
            .peek(16, Duration::from_millis(5))
            .defer_interval(Duration::from_millis(2))
            .pending_timeout(Duration::from_secs(600))
            .condition(|_: &ConnectRequest<'_>| Verdict::Defer)
            .build()
            .unwrap(),
    );
    let mut clients: Vec<TcpStream> = (0..20).map(|_| connect(l.local_addr()).unwrap()).collect();
    // Several rounds of re-parking each (the path that lost track of polls).
    wait_for("clients deferred a few times each", || {
        l.stats().total().deferred >= 20 * 5
    });
    assert!(
        shutdown_returns(l.clone()),
        "shutdown blocked by silent clients"
    );
    for (i, c) in clients.iter_mut().enumerate() {
        assert!(ended_by_server(c), "client {i} was not closed at shutdown");
    }
    let t = l.stats().total();
    assert_eq!(t.closed_at_shutdown, 20, "{t:?}");
    assert!(l.stats().conserved(), "{t:?}");
    drop(clients);
    drop(l);
    fds.assert_back("fd table back to baseline");
}

#[test]
fn a_deferring_condition_is_asked_once_per_interval() {
    let _g = serial();
    const INTERVAL: Duration = Duration::from_millis(40);
    let calls: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let c2 = calls.clone();
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .peek(16, Duration::from_millis(1))
        .defer_interval(INTERVAL)
        .pending_timeout(Duration::from_secs(600))
        .condition(move |_: &ConnectRequest<'_>| {
            c2.lock().unwrap().push(Instant::now());
            Verdict::Defer
        })
        .build()
        .unwrap();
    let _silent = connect(l.local_addr()).unwrap();
    wait_for("eight evaluations", || calls.lock().unwrap().len() >= 8);
    l.shutdown();
    // A lower bound only: a loaded machine makes gaps longer, never
    // shorter. Before the fix, calls came in pairs 0 ms apart.
    let calls = calls.lock().unwrap();
    for w in calls.windows(2).skip(1) {
        let gap = w[1] - w[0];
        assert!(gap >= INTERVAL / 2, "asked again after {gap:?}: {calls:?}");
    }
    assert_eq!(l.stats().total().deferred as usize, calls.len());
}

#[test]
fn malformed_and_incomplete_headers_are_all_closed() {
    let _g = serial();
    let fds = FdTable::now();
    let proxy = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .pending_timeout(Duration::from_millis(300))
        .condition(ProxyProtocol::new(|_| Verdict::accept()))
        .build()
        .unwrap();
    let tls = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .pending_timeout(Duration::from_millis(300))
        .condition(Sni::new(|_, _| Verdict::accept()))
        .build()
        .unwrap();
    let v2 = proxy_protocol::encode_v2(
        "192.0.2.1:1000".parse().unwrap(),
        "198.51.100.1:443".parse().unwrap(),
    );
    let v1 = proxy_protocol::encode_v1(
        "192.0.2.1:1000".parse().unwrap(),
        "198.51.100.1:443".parse().unwrap(),
    );
    let hello = sni::client_hello("example.test");
    let mut clients = Vec::new();
    let mut sent = (0u64, 0u64);
    // Every strict prefix of a v1 and a v2 header, and of a ClientHello,
    // then silence.
    for cut in 1..v2.len() {
        let mut c = connect(proxy.local_addr()).unwrap();
        c.write_all(&v2[..cut]).unwrap();
        clients.push(c);
        sent.0 += 1;
    }
    for cut in (1..v1.len()).step_by(3) {
        let mut c = connect(proxy.local_addr()).unwrap();
        c.write_all(&v1[..cut]).unwrap();
        clients.push(c);
        sent.0 += 1;
    }
    for cut in (1..hello.len()).step_by(4) {
        let mut c = connect(tls.local_addr()).unwrap();
        c.write_all(&hello[..cut]).unwrap();
        clients.push(c);
        sent.1 += 1;
    }
    wait_for("every incomplete header withdrawn", || {
        proxy.stats().total().withdrawn.timeout == sent.0
            && tls.stats().total().withdrawn.timeout == sent.1
    });
    for (i, c) in clients.iter_mut().enumerate() {
        assert!(ended_by_server(c), "connection {i} was never closed");
    }
    let (p, t) = (Arc::new(proxy), Arc::new(tls));
    assert!(shutdown_returns(p.clone()) && shutdown_returns(t.clone()));
    assert!(p.stats().conserved() && t.stats().conserved());
    drop((clients, p, t));
    fds.assert_back("fd table back to baseline");
}

#[test]
fn a_peer_that_resets_in_the_ring_is_withdrawn_not_delivered() {
    let _g = serial();
    let fds = FdTable::now();
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .build()
        .unwrap();
    let port = l.local_addr().port();
    const ROUNDS: u64 = 20;
    for round in 0..ROUNDS {
        let c = connect(l.local_addr()).unwrap();
        let cport = c.local_addr().unwrap().port();
        wait_for("the shard took it into its ring", || {
            l.stats().total().accepted == 2 * round + 1
        });
        let seen = Instant::now();
        floodgate_tests::reset_on_drop(&c);
        drop(c); // RST
        wait_for("the server end saw the reset", || {
            !tcp_socket_exists(port, cport)
        });
        // The engine checks connections that sat in the ring at least 1 ms
        // (a reset sooner is no different from one just after delivery):
        // a lower bound on the wait, which load only lengthens.
        wait_for("it sat in the ring", || {
            seen.elapsed() >= Duration::from_millis(2)
        });
        if let Some(conn) = l.try_accept().unwrap() {
            panic!("delivered dead: peer {:?}", conn.peer_addr());
        }
        // A live one behind it is still delivered.
        let live = connect(l.local_addr()).unwrap();
        let conn = l.accept().unwrap();
        assert_eq!(conn.peer_addr().unwrap(), live.local_addr().unwrap());
        assert_eq!(l.stats().total().withdrawn.peer_gone, round + 1);
    }
    l.shutdown();
    let t = l.stats().total();
    assert_eq!((t.delivered, t.withdrawn.peer_gone), (ROUNDS, ROUNDS));
    assert!(l.stats().conserved(), "{t:?}");
    drop(l);
    fds.assert_back("fd table back to baseline");
}
