//! Shutdown: every pending connection is accounted for; no fd is left
//! behind; shutdown is idempotent; Drop alone is clean.

use std::io::Read;
use std::sync::Arc;

use floodgate::{Error, Listener};
use floodgate_tests::{connect, serial, wait_for, FdTable};

#[test]
fn shutdown_with_pending_connections_closes_and_counts_them() {
    let _g = serial();
    let baseline = FdTable::now();
    let listener = Listener::builder("127.0.0.1:0".parse().unwrap())
        .build()
        .unwrap();
    let clients: Vec<_> = (0..50)
        .map(|_| connect(listener.local_addr()).unwrap())
        .collect();
    wait_for("all 50 accepted", || {
        listener.stats().total().accepted == 50
    });
    let delivered = listener.accept().unwrap();
    listener.shutdown();
    listener.shutdown(); // idempotent
    let total = listener.stats().total();
    assert_eq!(total.accepted, 50);
    assert_eq!(total.delivered, 1);
    assert_eq!(total.closed_at_shutdown, 49);
    assert_eq!(total.pending, 0);
    assert!(listener.stats().conserved());
    assert!(total.kernel.is_none(), "listening sockets closed");
    assert!(matches!(listener.try_accept(), Err(Error::Closed)));
    // Every client sees its connection end (the delivered one once the
    // application drops it).
    drop(delivered);
    let mut ended = 0;
    for mut c in clients {
        let mut b = [0u8; 1];
        if let Ok(0) | Err(_) = c.read(&mut b) {
            ended += 1;
        }
    }
    assert_eq!(ended, 50);
    drop(listener);
    baseline.assert_back("fd table back to baseline");
}

#[test]
fn drop_without_shutdown_leaves_no_fd() {
    let _g = serial();
    let baseline = FdTable::now();
    {
        let listener = Listener::builder("127.0.0.1:0".parse().unwrap())
            .build()
            .unwrap();
        let _c: Vec<_> = (0..10)
            .map(|_| connect(listener.local_addr()).unwrap())
            .collect();
        wait_for("accepted", || listener.stats().total().accepted == 10);
    }
    baseline.assert_back("fd table back to baseline");
}

#[test]
fn waiting_accept_returns_closed_at_shutdown() {
    let _g = serial();
    let listener = Arc::new(
        Listener::builder("127.0.0.1:0".parse().unwrap())
            .build()
            .unwrap(),
    );
    let l = listener.clone();
    let waiter = std::thread::spawn(move || l.accept().map(|_| ()));
    listener.shutdown();
    assert!(matches!(waiter.join().unwrap(), Err(Error::Closed)));
}
