//! Shards the application drives (`ListenerBuilder::build_driven`): no
//! engine thread; each `DrivenShard` runs on a thread the test owns.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use floodgate::{DrivenShard, Error, Listener};
use floodgate_tests::{
    connect, cores, each_id_once, one_driven_shard, pin, read_id, serial, tagged_client,
    tagged_clients_from_cores, wait_for, FdTable,
};

fn addr() -> SocketAddr {
    "127.0.0.1:0".parse().expect("loopback")
}

/// Drives `shard` on this thread until `stop` is set and the listener has
/// shut it down: each connection's id is read and sent to `ids`, then the
/// connection is closed.
fn serve(mut shard: DrivenShard, ids: mpsc::Sender<(usize, u64)>, stop: Arc<AtomicBool>) {
    let index = shard.index();
    loop {
        match shard.drive(|mut conn, _ctx| {
            let _ = conn
                .as_std()
                .set_read_timeout(Some(Duration::from_secs(60)));
            if let Ok(id) = read_id(&mut conn) {
                let _ = ids.send((index, id));
            }
        }) {
            Ok(_) => {}
            Err(Error::Closed) => return,
            Err(e) => panic!("shard {index}: {e}"),
        }
        if stop.load(Ordering::SeqCst) && shard.is_finished() {
            return;
        }
        // No timeout: the listener's shutdown must make the descriptor
        // readable by itself.
        shard.wait(None).expect("wait on the shard");
    }
}

#[test]
fn driven_shards_on_their_own_threads_deliver_every_connection_once() {
    let _serial = serial();
    let fds = FdTable::now();
    let cores = cores();
    let n = cores.len().clamp(1, 4);
    let (listener, shards) = Listener::builder(addr())
        .shards(n)
        .build_driven()
        .expect("build driven");
    assert_eq!(shards.len(), n);
    let (tx, rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for shard in shards {
        let (tx, stop) = (tx.clone(), stop.clone());
        let core = cores.get(shard.index()).copied();
        threads.push(std::thread::spawn(move || {
            if let Some(c) = core {
                pin(c);
            }
            serve(shard, tx, stop)
        }));
    }
    drop(tx);
    // Clients from every core, so that steering sends some to every shard.
    let per_core = 200u64;
    let local = listener.local_addr();
    tagged_clients_from_cores(local, &cores, n, per_core);
    let total = n as u64 * per_core;
    let by_shard = each_id_once(&rx, total, n);
    if n > 1 {
        assert!(
            by_shard.iter().all(|&c| c > 0),
            "every shard accepts under CPU steering: {by_shard:?}"
        );
    }
    stop.store(true, Ordering::SeqCst);
    listener.shutdown();
    for t in threads {
        t.join().expect("shard thread");
    }
    let stats = listener.stats();
    assert!(stats.conserved(), "{stats:?}");
    assert_eq!(stats.total().accepted, total);
    assert_eq!(stats.total().delivered, total);
    drop(listener);
    fds.assert_back("fd table back to baseline");
}

#[test]
fn a_shard_that_is_not_driven_takes_nothing_from_the_kernel() {
    let _serial = serial();
    let fds = FdTable::now();
    let (listener, mut shard) = one_driven_shard();
    // Started (its accept posted), then left alone.
    assert_eq!(shard.drive(|_, _| panic!("nothing yet")).expect("drive"), 0);
    let k = 20;
    let mut clients = Vec::new();
    for i in 0..k {
        let mut c = connect(listener.local_addr()).expect("connect");
        c.write_all(&(i as u64).to_le_bytes()).expect("send id");
        clients.push(c);
    }
    // The kernel completed every handshake and holds them in its queue;
    // the shard took none.
    wait_for("the kernel's accept queue holds the clients", || {
        listener.stats().shards[0]
            .kernel
            .is_some_and(|q| q.accept_queue as usize == k)
    });
    assert_eq!(listener.stats().total().accepted, 0);
    // Driven again, it takes all of them.
    let mut got = Vec::new();
    while got.len() < k {
        shard
            .drive(|mut conn, _| got.push(read_id(&mut conn).expect("id")))
            .expect("drive");
        if got.len() < k {
            shard.wait(None).expect("wait");
        }
    }
    got.sort_unstable();
    assert_eq!(got, (0..k as u64).collect::<Vec<_>>());
    drop(clients);
    drop(shard);
    listener.shutdown();
    assert!(listener.stats().conserved());
    drop(listener);
    fds.assert_back("fd table back to baseline");
}

#[test]
fn shutdown_closes_and_counts_what_a_driven_shard_holds() {
    let _serial = serial();
    let fds = FdTable::now();
    let (listener, mut shard) = one_driven_shard();
    shard.drive(|_, _| {}).expect("start");
    let clients: Vec<_> = (0..10)
        .map(|_| connect(listener.local_addr()).expect("connect"))
        .collect();
    wait_for("clients queued", || {
        listener.stats().shards[0]
            .kernel
            .is_some_and(|q| q.accept_queue == 10)
    });
    listener.shutdown();
    // The shard sees the stop at its next drive and finishes.
    let mut handed = 0;
    loop {
        match shard.drive(|_, _| handed += 1) {
            Ok(_) => {
                shard.wait(None).expect("wait");
            }
            Err(Error::Closed) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(shard.is_finished());
    let stats = listener.stats();
    assert!(stats.conserved(), "{stats:?}");
    assert_eq!(
        stats.total().delivered + stats.total().closed_at_shutdown,
        stats.total().accepted
    );
    assert_eq!(stats.total().delivered, handed);
    drop(shard);
    drop(clients);
    drop(listener);
    fds.assert_back("fd table back to baseline");
}

#[test]
fn dropping_driven_shards_stops_them_and_counts_what_they_held() {
    let _serial = serial();
    let fds = FdTable::now();
    let (listener, mut shard) = one_driven_shard();
    shard.drive(|_, _| {}).expect("start");
    let _clients: Vec<_> = (0..5)
        .map(|_| connect(listener.local_addr()).expect("connect"))
        .collect();
    drop(shard);
    let stats = listener.stats();
    assert!(stats.conserved(), "{stats:?}");
    listener.shutdown();
    drop(listener);
    drop(_clients);
    fds.assert_back("fd table back to baseline");
}

#[test]
fn a_driven_shard_is_bound_to_the_thread_that_first_drove_it() {
    let _serial = serial();
    let (listener, mut shard) = one_driven_shard();
    shard.drive(|_, _| {}).expect("first drive binds it here");
    let shard = std::thread::spawn(move || {
        let mut shard = shard;
        let r = shard.drive(|_, _| {});
        assert!(
            matches!(r, Err(Error::WrongThread { shard: 0 })),
            "another thread is refused: {r:?}"
        );
        shard
    })
    .join()
    .expect("thread");
    // Back on its own thread it still works.
    let mut shard = shard;
    shard.drive(|_, _| {}).expect("its own thread");
    drop(shard);
    listener.shutdown();
}

#[test]
fn a_driven_listener_refuses_accept_and_an_inline_handler() {
    let _serial = serial();
    let (listener, _shards) = Listener::builder(addr())
        .shards(1)
        .build_driven()
        .expect("build driven");
    assert!(matches!(listener.try_accept(), Err(Error::DrivenDelivery)));
    let e = Listener::builder(addr())
        .shards(1)
        .handler(|_, _| {})
        .build_driven()
        .expect_err("handler and driven");
    match e {
        Error::Config(c) => assert_eq!(c.field, "handler"),
        other => panic!("{other}"),
    }
}

#[test]
fn a_driven_shard_replies_on_its_own_ring() {
    let _serial = serial();
    use std::io::Read;
    let (listener, mut shard) = one_driven_shard();
    let local = listener.local_addr();
    let client = std::thread::spawn(move || {
        let mut got = Vec::new();
        connect(local)
            .expect("connect")
            .read_to_end(&mut got)
            .expect("read");
        got
    });
    // Driven whenever its descriptor is readable until the client has its
    // reply and the end of the connection.
    let mut served = 0;
    while !client.is_finished() {
        served += shard
            .drive(|conn, ctx| {
                ctx.reply_and_close(conn, b"driven").expect("reply");
            })
            .expect("drive");
        shard.wait(Some(Duration::from_millis(100))).expect("wait");
    }
    assert_eq!(served, 1);
    assert_eq!(client.join().expect("client"), b"driven");
    drop(shard);
    listener.shutdown();
    assert!(listener.stats().conserved());
}

/// `DrivenShard::accept`: a blocking accept loop on the application's own
/// thread, each connection once; a zero timeout with nothing waiting says
/// so; shutdown ends the loop with `Closed`; everything is counted.
#[test]
fn a_blocking_accept_loop_on_a_driven_shard_takes_each_connection_once() {
    let _serial = serial();
    let fds = FdTable::now();
    {
        let (listener, mut shard) = one_driven_shard();
        let target = listener.local_addr();
        const N: u64 = 500;
        let (started_tx, started) = mpsc::channel();
        let server = std::thread::spawn(move || {
            // Nothing has connected yet: a zero wait finds nothing (and
            // binds the shard to this thread).
            let none = shard.accept_timeout(Some(Duration::ZERO)).expect("accept");
            let _ = started_tx.send(none.is_none());
            let mut ids = Vec::new();
            loop {
                match shard.accept() {
                    Ok(mut conn) => {
                        let _ = conn
                            .as_std()
                            .set_read_timeout(Some(Duration::from_secs(60)));
                        ids.push(read_id(&mut conn).expect("id"));
                    }
                    Err(Error::Closed) => return ids,
                    Err(e) => panic!("accept: {e}"),
                }
            }
        });
        assert!(
            started.recv().expect("server started"),
            "a connection from nowhere"
        );
        for id in 0..N {
            tagged_client(target, id).expect("client");
        }
        wait_for("every connection delivered", || {
            listener.stats().total().delivered == N
        });
        listener.shutdown();
        let mut ids = server.join().expect("server thread");
        ids.sort_unstable();
        assert_eq!(ids, (0..N).collect::<Vec<_>>(), "each once");
        let t = listener.stats().total();
        assert!(listener.stats().conserved(), "{t:?}");
        assert_eq!((t.accepted, t.delivered, t.closed_at_shutdown), (N, N, 0));
    }
    fds.assert_back("fd table back to baseline");
}

/// `DrivenShard::reply_and_close` after `accept()`: the reply goes on the
/// shard's ring with the next `accept()`'s wait (no flush in the loop),
/// every client reads it and a FIN, and shutdown ends the loop with
/// everything counted and the fd table back to baseline.
#[test]
fn an_accept_loop_on_a_driven_shard_replies_on_its_ring() {
    let _serial = serial();
    use std::io::Read;
    let fds = FdTable::now();
    {
        let (listener, mut shard) = one_driven_shard();
        let target = listener.local_addr();
        const N: u64 = 300;
        let server = std::thread::spawn(move || {
            let mut served = 0u64;
            loop {
                match shard.accept() {
                    Ok(conn) => {
                        shard.reply_and_close(conn, b"ring").expect("reply");
                        served += 1;
                    }
                    Err(Error::Closed) => return served,
                    Err(e) => panic!("accept: {e}"),
                }
            }
        });
        for _ in 0..N {
            let mut c = connect(target).expect("connect");
            c.set_read_timeout(Some(Duration::from_secs(60)))
                .expect("timeout");
            let mut got = Vec::new();
            c.read_to_end(&mut got).expect("a FIN, not a reset");
            assert_eq!(got, b"ring");
        }
        listener.shutdown();
        assert_eq!(server.join().expect("server thread"), N);
        let t = listener.stats().total();
        assert!(listener.stats().conserved(), "{t:?}");
        assert_eq!((t.accepted, t.delivered, t.closed_at_shutdown), (N, N, 0));
    }
    fds.assert_back("fd table back to baseline");
}

/// A reply queued on a driven shard's ring from outside `drive()` leaves
/// with `flush()` while the thread does something else, and with `wait()`
/// when the thread waits on the descriptor next; the shard's context is
/// refused on another thread.
#[test]
fn a_reply_queued_outside_drive_leaves_with_flush_or_wait() {
    let _serial = serial();
    use std::io::Read;
    let (listener, mut shard) = one_driven_shard();
    let target = listener.local_addr();
    let (go_tx, go) = mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        for flush in [true, false] {
            let conn = shard.accept().expect("accept");
            shard.reply_and_close(conn, b"queued").expect("reply");
            if flush {
                shard.flush().expect("flush");
                // Not in the ring: only the flush can have sent it.
                go.recv().expect("the client read it");
            } else {
                shard.wait(None).expect("wait");
            }
        }
        shard
    });
    for _ in 0..2 {
        let mut c = connect(target).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let mut got = Vec::new();
        c.read_to_end(&mut got).expect("read");
        assert_eq!(got, b"queued");
        let _ = go_tx.send(());
    }
    // The reply was read while the server sat in wait(); a reply the
    // backend made at once (epoll) leaves no completion to end that wait:
    // a new connection does (closed and counted at shutdown).
    let _wake = connect(target).expect("connect");
    let mut shard = server.join().expect("server thread");
    assert!(matches!(shard.context(), Err(Error::WrongThread { .. })));
    drop(shard);
    listener.shutdown();
    assert!(listener.stats().conserved());
}
