//! Backpressure: a full ring pauses accepting; nothing is lost; the kernel's
//! backlog holds the rest; everything is delivered once the ring drains.

use std::collections::HashSet;
use std::net::TcpStream;

use floodgate::Listener;
use floodgate_tests::{connect, read_id, reset_on_drop, serial, wait_for, FdTable};

#[test]
fn full_ring_pauses_accepting_and_loses_nothing() {
    let _g = serial();
    let baseline = FdTable::now();
    const RING: usize = 16;
    const CLIENTS: u64 = 30; // ring (16) + kernel accept queue (backlog + 1 = 17) holds 33
    let listener = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .backlog(RING)
        .build()
        .unwrap();
    assert_eq!(listener.backlog().effective, RING);
    let addr = listener.local_addr();
    let clients: Vec<TcpStream> = (0..CLIENTS)
        .map(|id| {
            use std::io::Write;
            let mut s = connect(addr).unwrap();
            s.write_all(&id.to_le_bytes()).unwrap();
            s
        })
        .collect();

    // The application takes nothing yet: the ring fills, the shard pauses,
    // and the kernel's accept queue holds the rest.
    wait_for("ring full and the rest in the kernel queue", || {
        let s = &listener.stats().shards[0];
        let in_kernel = s.kernel.map(|k| k.accept_queue as u64).unwrap_or(0);
        s.ring_depth == RING && s.accepted + in_kernel == CLIENTS
    });
    let s = listener.stats().shards[0].clone();
    assert!(s.ring_full_pauses >= 1, "{s:?}");
    // The shard stopped at the ring's capacity; completions already on
    // their way when it cancelled the accept are held, not dropped.
    assert!(s.accepted >= RING as u64 && s.accepted < CLIENTS, "{s:?}");
    assert_eq!(
        s.pending, s.accepted,
        "every accepted connection is pending: {s:?}"
    );
    assert!(
        s.kernel.unwrap().accept_queue >= 1,
        "the kernel holds the rest: {s:?}"
    );
    assert_eq!(s.ring_high_water, RING);

    // Drain: every connection arrives, exactly once.
    let mut seen = HashSet::new();
    for _ in 0..CLIENTS {
        let mut c = listener.accept().unwrap();
        assert!(seen.insert(read_id(&mut c).unwrap()));
    }
    assert_eq!(seen.len() as u64, CLIENTS);
    let s = listener.stats().shards[0].clone();
    assert!(s.resumes >= 1, "{s:?}");
    assert_eq!(s.accepted, CLIENTS);
    assert_eq!(s.delivered, CLIENTS);
    assert!(s.conserved());
    for c in &clients {
        reset_on_drop(c);
    }
    drop(clients);
    drop(listener);
    baseline.assert_back("fd table back to baseline");
}

#[test]
fn blocked_handler_leaves_connections_in_the_kernel_and_loses_none() {
    let _g = serial();
    let (gate, handler) = floodgate_tests::gated_handler();
    let listener = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .backlog(4)
        .handler(handler)
        .build()
        .unwrap();
    let addr = listener.local_addr();
    use std::io::Write;
    let mut first = connect(addr).unwrap();
    first.write_all(&0u64.to_le_bytes()).unwrap();
    wait_for("first delivered", || {
        listener.stats().total().delivered == 1
    });
    let others: Vec<TcpStream> = (1..5u64)
        .map(|id| {
            let mut s = connect(addr).unwrap();
            s.write_all(&id.to_le_bytes()).unwrap();
            s
        })
        .collect();
    if listener.ring_setup().defer_taskrun {
        // With DEFER_TASKRUN, accept completions run only when the shard
        // waits in io_uring_enter: a blocked shard leaves them to the kernel.
        wait_for("the others wait in the kernel", || {
            listener
                .stats()
                .total()
                .kernel
                .map(|k| k.accept_queue)
                .unwrap_or(0)
                == 4
        });
    }
    gate.release();
    let mut ids: Vec<u64> = (0..5).map(|_| gate.next()).collect();
    ids.sort();
    assert_eq!(ids, vec![0, 1, 2, 3, 4]);
    drop(first);
    drop(others);
}
