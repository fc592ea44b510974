//! Accept limits: a maximum of open connections whose excess waits in the
//! kernel's accept queue, a per-turn accept budget, an accept rate; none
//! rejects a connection and nothing is lost. Each test runs on whichever
//! backend `Backend::Auto` picks (CI runs the suite on io_uring and again
//! with `FLOODGATE_BACKEND=epoll`).

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;

use floodgate::{Admitted, Error, Interest, Listener, ListenerStats, RelayOptions, Steering};
use floodgate_tests::{connect, read_id, reset_on_drop, serial, wait_for, FdTable};

/// `accept()`, bounded: a connection that never comes fails the test
/// instead of hanging it (the bound is not a timing assertion).
fn accept(listener: &Listener) -> Admitted {
    listener
        .accept_timeout(std::time::Duration::from_secs(120))
        .unwrap()
        .expect("a connection within the bound")
}

fn kernel_queue(s: &ListenerStats) -> u64 {
    s.total().kernel.map_or(0, |k| k.accept_queue as u64)
}

fn open_now(s: &ListenerStats) -> u64 {
    s.open.map_or(u64::MAX, |o| o.open)
}

/// Clients that each send their id and then wait.
fn clients(addr: std::net::SocketAddr, ids: std::ops::Range<u64>) -> Vec<TcpStream> {
    ids.map(|id| {
        let mut s = connect(addr).unwrap();
        s.write_all(&id.to_le_bytes()).unwrap();
        s
    })
    .collect()
}

/// Limit L, L + K clients, the application holds L: L open, K in the
/// kernel's queue, nothing more accepted; once the L are dropped the K are
/// accepted; every id arrives once; the fd table is back to its baseline.
fn max_connections_hold_and_release(shards: usize) {
    const L: usize = 4;
    const K: usize = 3;
    let _g = serial();
    let fds = FdTable::now();
    let listener = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(shards)
        .pin(false)
        .steering(Steering::Hash)
        .max_connections(L)
        .build()
        .unwrap();
    let addr = listener.local_addr();
    let clients = clients(addr, 0..(L + K) as u64);
    let mut seen = HashSet::new();
    let mut held: Vec<Admitted> = (0..L)
        .map(|_| {
            let mut c = accept(&listener);
            assert!(seen.insert(read_id(&mut c).unwrap()));
            c
        })
        .collect();
    wait_for("L open and K in the kernel's queue", || {
        let s = listener.stats();
        open_now(&s) == L as u64 && kernel_queue(&s) == K as u64
    });
    let s = listener.stats();
    let t = s.total();
    assert_eq!(t.accepted, L as u64, "{t:?}");
    assert!(t.limit_pauses >= 1, "{t:?}");
    assert_eq!(s.open.unwrap().limit, L as u64);
    assert!(listener.try_accept().unwrap().is_none());

    // Closing the held ones lets the K in.
    held.clear();
    for _ in 0..K {
        let mut c = accept(&listener);
        assert!(seen.insert(read_id(&mut c).unwrap()));
        held.push(c);
    }
    assert_eq!(seen.len(), L + K);
    held.clear();
    wait_for("every connection closed", || {
        open_now(&listener.stats()) == 0
    });
    let s = listener.stats();
    let t = s.total();
    assert_eq!(t.accepted, (L + K) as u64, "{t:?}");
    assert_eq!(t.delivered, (L + K) as u64, "{t:?}");
    assert_eq!(t.rejected.total(), 0);
    assert!(s.conserved(), "{s:?}");
    let o = s.open.unwrap();
    assert!(o.high_water <= L as u64 && o.high_water >= 1, "{o:?}");
    for c in &clients {
        reset_on_drop(c);
    }
    drop(clients);
    drop(listener);
    fds.assert_back("fd table back to baseline");
}

#[test]
fn max_connections_leaves_the_excess_in_the_kernel_queue_and_loses_nothing() {
    max_connections_hold_and_release(1);
}

#[test]
fn max_connections_counts_over_all_shards_and_a_close_wakes_them() {
    max_connections_hold_and_release(2);
}

/// An upstream that reads each connection to its end, then closes it.
fn echo_to_end_upstream() -> (std::net::SocketAddr, std::thread::JoinHandle<()>, Arc<()>) {
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = upstream.local_addr().unwrap();
    upstream.set_nonblocking(true).unwrap();
    let alive = Arc::new(());
    let weak = Arc::downgrade(&alive);
    let t = std::thread::spawn(move || {
        let mut conns = Vec::new();
        // Ends once the test drops `alive`; bounded by it, not by a clock.
        while weak.strong_count() > 0 {
            match upstream.accept() {
                Ok((s, _)) => conns.push(std::thread::spawn(move || {
                    let mut s = s;
                    s.set_nonblocking(false).unwrap();
                    let mut rest = Vec::new();
                    let _ = s.read_to_end(&mut rest);
                })),
                Err(_) => std::thread::park_timeout(std::time::Duration::from_millis(1)),
            }
        }
        for c in conns {
            let _ = c.join();
        }
    });
    (addr, t, alive)
}

#[test]
fn max_connections_counts_relayed_connections_until_the_relay_closes() {
    const L: usize = 3;
    const K: usize = 2;
    let _g = serial();
    let fds = FdTable::now();
    let (up, upstream, alive) = echo_to_end_upstream();
    let listener = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .pin(false)
        .max_connections(L)
        .handler(move |conn, ctx| {
            let _ = ctx.relay(conn, up, RelayOptions::default());
        })
        .build()
        .unwrap();
    let addr = listener.local_addr();
    let mut clients: Vec<TcpStream> = (0..L + K).map(|_| connect(addr).unwrap()).collect();
    wait_for("L relayed and K in the kernel's queue", || {
        let s = listener.stats();
        open_now(&s) == L as u64
            && kernel_queue(&s) == K as u64
            && s.total().relays.active == L as u64
    });
    assert_eq!(listener.stats().total().accepted, L as u64);

    // One client ends: its relay ends, both sockets close, one more is in.
    let first = clients.remove(0);
    first.shutdown(Shutdown::Write).unwrap();
    wait_for("one relay over and one more accepted", || {
        let s = listener.stats();
        let t = s.total();
        t.accepted == (L + 1) as u64
            && t.relays.completed == 1
            && open_now(&s) == L as u64
            && kernel_queue(&s) == (K - 1) as u64
    });
    drop(first);
    for c in &clients {
        c.shutdown(Shutdown::Write).unwrap();
    }
    wait_for("every relay over", || {
        let s = listener.stats();
        let t = s.total();
        t.relays.completed == (L + K) as u64 && open_now(&s) == 0
    });
    let s = listener.stats();
    assert!(s.conserved(), "{s:?}");
    assert_eq!(s.total().accepted, (L + K) as u64);
    assert_eq!(s.open.unwrap().high_water, L as u64);
    drop(clients);
    drop(listener);
    drop(alive);
    upstream.join().unwrap();
    fds.assert_back("fd table back to baseline");
}

#[test]
fn max_connections_counts_registered_connections_until_the_handler_closes_them() {
    const L: usize = 3;
    const K: usize = 2;
    let _g = serial();
    let fds = FdTable::now();
    let listener = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .pin(false)
        .max_connections(L)
        .register(Interest::READABLE, |conn, _events| {
            let mut buf = [0u8; 64];
            loop {
                match conn.read(&mut buf) {
                    Ok(0) => return conn.close(),
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                    Err(_) => return conn.close(),
                }
            }
        })
        .build()
        .unwrap();
    let addr = listener.local_addr();
    let mut clients: Vec<TcpStream> = (0..L + K).map(|_| connect(addr).unwrap()).collect();
    wait_for("L registered and K in the kernel's queue", || {
        let s = listener.stats();
        open_now(&s) == L as u64 && kernel_queue(&s) == K as u64 && s.total().registered == L as u64
    });
    drop(clients.remove(0)); // EOF: the handler closes it
    wait_for("one closed and one more registered", || {
        let s = listener.stats();
        let t = s.total();
        t.accepted == (L + 1) as u64
            && t.registered == L as u64
            && open_now(&s) == L as u64
            && kernel_queue(&s) == (K - 1) as u64
    });
    drop(clients);
    wait_for("all closed", || {
        let s = listener.stats();
        let t = s.total();
        t.accepted == (L + K) as u64 && t.registered == 0 && open_now(&s) == 0
    });
    let s = listener.stats();
    assert!(s.conserved(), "{s:?}");
    drop(listener);
    fds.assert_back("fd table back to baseline");
}

#[test]
fn max_connections_counts_a_reply_until_its_close_and_serves_everyone() {
    const N: usize = 20;
    let _g = serial();
    let fds = FdTable::now();
    let listener = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .pin(false)
        .max_connections(1)
        .handler(|conn, ctx| {
            let _ = ctx.drain_reply_and_close(conn, b"x");
        })
        .build()
        .unwrap();
    let addr = listener.local_addr();
    let clients: Vec<TcpStream> = (0..N).map(|_| connect(addr).unwrap()).collect();
    for mut c in clients {
        // Bounds a hang (a slot never released) to a failure.
        c.set_read_timeout(Some(std::time::Duration::from_secs(120)))
            .unwrap();
        let mut reply = Vec::new();
        c.read_to_end(&mut reply).unwrap();
        assert_eq!(reply, b"x");
    }
    wait_for("every reply closed", || {
        let s = listener.stats();
        open_now(&s) == 0 && s.total().accepted == N as u64
    });
    let s = listener.stats();
    assert_eq!(s.open.unwrap().high_water, 1, "{s:?}");
    assert!(s.conserved());
    drop(listener);
    fds.assert_back("fd table back to baseline");
}

#[test]
fn a_slot_taken_out_with_the_socket_keeps_it_counted() {
    let _g = serial();
    let listener = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .pin(false)
        .max_connections(1)
        .build()
        .unwrap();
    let addr = listener.local_addr();
    let _a = connect(addr).unwrap();
    let _b = connect(addr).unwrap();
    let (stream, slot) = accept(&listener).into_std_with_slot();
    assert!(slot.is_counted());
    wait_for("the second waits in the kernel", || {
        kernel_queue(&listener.stats()) == 1
    });
    drop(stream); // closed, but its slot is kept: still counted
    assert!(listener.try_accept().unwrap().is_none());
    assert_eq!(open_now(&listener.stats()), 1);
    drop(slot);
    let second = accept(&listener);
    // Taken out without its slot: it stops counting.
    let _stream = second.into_std();
    wait_for("nothing counted", || open_now(&listener.stats()) == 0);
}

/// A handler blocked on the first connection while `BURST` more queue in
/// the kernel; once released, no turn takes more than the budget.
fn budget_bounds_every_turn(budget: usize) {
    const BURST: u64 = 20;
    let _g = serial();
    let fds = FdTable::now();
    let (gate, handler) = floodgate_tests::gated_handler();
    let listener = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .pin(false)
        .accept_budget(budget)
        .handler(handler)
        .build()
        .unwrap();
    let addr = listener.local_addr();
    let first = clients(addr, 0..1);
    wait_for("the first delivered", || {
        listener.stats().total().delivered == 1
    });
    let others = clients(addr, 1..BURST + 1);
    wait_for("the burst waits in the kernel's queue", || {
        kernel_queue(&listener.stats()) == BURST
    });
    gate.release();
    let mut ids: Vec<u64> = (0..=BURST).map(|_| gate.next()).collect();
    ids.sort();
    assert_eq!(ids, (0..=BURST).collect::<Vec<_>>());
    let s = listener.stats();
    let t = s.total();
    assert_eq!(
        t.max_accepted_per_turn, budget as u64,
        "no turn takes more than the budget, and the first after the burst takes all of it: {t:?}"
    );
    assert!(t.budget_stops >= 1, "{t:?}");
    assert_eq!(t.accepted, BURST + 1);
    assert!(s.conserved(), "{s:?}");
    for c in first.iter().chain(&others) {
        reset_on_drop(c);
    }
    drop(first);
    drop(others);
    drop(listener);
    fds.assert_back("fd table back to baseline");
}

#[test]
fn accept_budget_of_one_takes_one_connection_per_turn() {
    budget_bounds_every_turn(1);
}

#[test]
fn accept_budget_bounds_what_a_turn_takes_from_a_burst() {
    budget_bounds_every_turn(4);
}

#[test]
fn accept_rate_leaves_connections_in_the_kernel_queue_and_rejects_none() {
    const N: u64 = 4;
    let _g = serial();
    let fds = FdTable::now();
    // One token, then one every 500 ms: the burst of N waits in the kernel.
    let listener = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .pin(false)
        .accept_rate(2, 1)
        .build()
        .unwrap();
    let addr = listener.local_addr();
    let clients = clients(addr, 0..N);
    wait_for("connections waiting in the kernel's queue", || {
        kernel_queue(&listener.stats()) > 0
    });
    let mut seen = HashSet::new();
    for _ in 0..N {
        let mut c = accept(&listener);
        assert!(seen.insert(read_id(&mut c).unwrap()));
    }
    let s = listener.stats();
    let t = s.total();
    assert_eq!(t.accepted, N);
    assert_eq!(t.delivered, N);
    assert_eq!(t.rejected.total(), 0);
    assert!(t.rate_pauses >= 1, "{t:?}");
    assert!(s.conserved(), "{s:?}");
    for c in &clients {
        reset_on_drop(c);
    }
    drop(clients);
    drop(listener);
    fds.assert_back("fd table back to baseline");
}

#[test]
fn nonsensical_limits_are_refused_naming_the_field() {
    let _g = serial();
    let addr = "127.0.0.1:0".parse().unwrap();
    let field = |r: Result<Listener, Error>| match r {
        Err(Error::Config(e)) => e.field,
        Err(e) => panic!("not a config error: {e}"),
        Ok(_) => panic!("accepted"),
    };
    assert_eq!(
        field(Listener::builder(addr).max_connections(0).build()),
        "max_connections"
    );
    assert_eq!(
        field(Listener::builder(addr).accept_budget(0).build()),
        "accept_budget"
    );
    assert_eq!(
        field(
            Listener::builder(addr)
                .accept_budget(floodgate::MAX_ACCEPT_BUDGET + 1)
                .build()
        ),
        "accept_budget"
    );
    assert_eq!(
        field(Listener::builder(addr).accept_rate(0, 1).build()),
        "accept_rate.per_second"
    );
    assert_eq!(
        field(Listener::builder(addr).accept_rate(1, 0).build()),
        "accept_rate.burst"
    );
}

#[test]
fn a_listener_without_limits_counts_no_open_connections() {
    let _g = serial();
    let listener = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .pin(false)
        .build()
        .unwrap();
    let _c = connect(listener.local_addr()).unwrap();
    let conn = accept(&listener);
    let (_stream, slot) = conn.into_std_with_slot();
    assert!(!slot.is_counted());
    let s = listener.stats();
    assert_eq!(s.open, None);
}
