//! Event registrations: admitted connections registered on their shard's
//! io_uring for the listener's declared interest, events to its handler.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex};

use floodgate::{Admitted, Events, Interest, Listener, Registered};
use floodgate_tests::{connect, reset_on_drop, serial, wait_for, FdTable};

/// Reads what is there and echoes it; closes on EOF or error.
fn echo(conn: &mut Registered<'_>, _ev: Events) {
    let mut buf = [0u8; 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return conn.close(),
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return conn.close();
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(_) => return conn.close(),
        }
    }
}

#[test]
fn handler_is_called_when_the_client_writes_and_can_echo() {
    let _g = serial();
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .register(Interest::READABLE, echo)
        .build()
        .unwrap();
    let mut c = connect(l.local_addr()).unwrap();
    wait_for("registered", || l.stats().total().registered == 1);
    assert!(l.stats().conserved(), "{:?}", l.stats().total());
    for msg in [&b"hello"[..], b"again"] {
        c.write_all(msg).unwrap();
        let mut back = [0u8; 5];
        c.read_exact(&mut back).unwrap();
        assert_eq!(&back, msg);
    }
    let t = l.stats().total();
    // Counted before the handler runs, so already in by the echo. At least
    // one: the handler reads until WouldBlock, so the second message can
    // arrive (the client sends it on reading the first echo) while the
    // handler's first call is still reading, and be echoed in that call.
    assert!(t.register_events >= 1, "{t:?}");
    assert_eq!((t.accepted, t.delivered, t.registered), (1, 0, 1));
    drop(c);
    wait_for("closed by the handler on EOF", || {
        l.stats().total().registered == 0
    });
    l.shutdown();
    let t = l.stats().total();
    assert_eq!((t.delivered, t.closed_at_shutdown), (1, 0));
    assert!(l.stats().conserved());
}

#[test]
fn hangup_is_delivered_and_the_handler_closes() {
    let _g = serial();
    let seen: Arc<Mutex<Vec<Events>>> = Arc::default();
    let s = seen.clone();
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .register(Interest::HANGUP, move |conn, ev| {
            s.lock().unwrap().push(ev);
            if ev.is_hangup() {
                conn.close();
            }
        })
        .build()
        .unwrap();
    let mut c = connect(l.local_addr()).unwrap();
    wait_for("registered", || l.stats().total().registered == 1);
    c.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap(); // EOF: the handler closed it
    assert!(rest.is_empty());
    wait_for("counted", || l.stats().total().registered == 0);
    let events = seen.lock().unwrap().clone();
    assert!(events.iter().any(|e| e.is_hangup()), "{events:?}");
    l.shutdown();
    let t = l.stats().total();
    assert_eq!((t.accepted, t.delivered, t.closed_at_shutdown), (1, 1, 0));
    assert!(l.stats().conserved());
}

#[test]
fn take_hands_the_connection_to_accept() {
    let _g = serial();
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .register(Interest::READABLE, |conn, ev| {
            if ev.is_readable() {
                conn.take(); // without reading: the bytes stay for accept()
            }
        })
        .build()
        .unwrap();
    let mut c = connect(l.local_addr()).unwrap();
    c.write_all(b"taken").unwrap();
    let mut conn = l.accept().unwrap();
    let mut got = [0u8; 5];
    conn.read_exact(&mut got).unwrap(); // blocking again
    assert_eq!(&got, b"taken");
    conn.write_all(b"ok").unwrap();
    let mut ok = [0u8; 2];
    c.read_exact(&mut ok).unwrap();
    assert_eq!(&ok, b"ok");
    let t = l.stats().total();
    assert_eq!((t.accepted, t.delivered, t.registered), (1, 1, 0));
    drop(conn);
    l.shutdown();
    assert!(l.stats().conserved());
}

#[test]
fn release_hands_the_admitted_connection_back() {
    let _g = serial();
    let out: Arc<Mutex<Option<Admitted>>> = Arc::default();
    let o = out.clone();
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .register(Interest::READABLE, move |conn, _ev| {
            *o.lock().unwrap() = conn.release();
        })
        .build()
        .unwrap();
    let mut c = connect(l.local_addr()).unwrap();
    c.write_all(b"r").unwrap();
    wait_for("released", || out.lock().unwrap().is_some());
    let mut conn = out.lock().unwrap().take().unwrap();
    let mut b = [0u8; 1];
    conn.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"r");
    let t = l.stats().total();
    assert_eq!((t.delivered, t.registered), (1, 0));
    drop(conn);
    l.shutdown();
    assert!(l.stats().conserved());
}

#[test]
fn shutdown_closes_and_counts_every_registered_connection() {
    let _g = serial();
    let fds = FdTable::now();
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .register(Interest::READABLE | Interest::HANGUP, echo)
        .build()
        .unwrap();
    const N: u64 = 8;
    let mut clients: Vec<TcpStream> = (0..N).map(|_| connect(l.local_addr()).unwrap()).collect();
    wait_for("all registered", || l.stats().total().registered == N);
    // Each is live: one round trip.
    for c in &mut clients {
        c.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).unwrap();
    }
    l.shutdown();
    let t = l.stats().total();
    assert_eq!(
        (t.accepted, t.closed_at_shutdown, t.registered, t.delivered),
        (N, N, 0, 0)
    );
    assert!(l.stats().conserved());
    for c in &mut clients {
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest); // EOF: closed by the shard
        reset_on_drop(c);
    }
    drop(clients);
    drop(l);
    fds.assert_back("fd table back to baseline");
}
