//! The tokio listeners (feature `tokio`): `floodgate::tokio::TcpListener`
//! over the engine's shard threads on multi-thread and `current_thread`
//! runtimes, and `DrivenListener`, a driven shard per `current_thread`
//! runtime. Every connection once, non-blocking streams, cancel safety,
//! shutdown accounting, the fd table back to baseline.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use floodgate::tokio::{DrivenListener, TcpListener};
use floodgate::Listener;
use floodgate_tests::{
    connect, cores, each_id_once, one_driven_shard, pin, reset_on_drop, serial, tagged_client,
    tagged_clients_from_cores, wait_for, FdTable,
};
use tokio::io::AsyncReadExt;
use tokio::runtime::{Builder, Runtime};

/// Turns a hang into a failure; the tests wait on events, not on this.
const BOUND: Duration = Duration::from_secs(120);

fn addr() -> SocketAddr {
    "127.0.0.1:0".parse().expect("loopback")
}

fn multi_thread() -> Runtime {
    Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn current_thread() -> Runtime {
    Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A tokio listener over one unpinned shard (inside a runtime).
fn one_shard_listener() -> TcpListener {
    TcpListener::from_builder(Listener::builder(addr()).shards(1).pin(false)).expect("listener")
}

fn is_nonblocking(s: &tokio::net::TcpStream) -> bool {
    socket2::SockRef::from(s).nonblocking().expect("F_GETFL")
}

/// Connects to `to` and reads until the server's FIN.
fn read_reply(to: SocketAddr) -> std::io::Result<Vec<u8>> {
    let mut c = connect(to)?;
    c.set_read_timeout(Some(BOUND))?;
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut c, &mut got)?;
    Ok(got)
}

/// Reads the 8-byte id a `tagged_client` sent.
async fn read_id(s: &mut tokio::net::TcpStream) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b).await?;
    Ok(u64::from_le_bytes(b))
}

/// `acceptors` tasks accept on one listener while client threads make
/// `total` tagged connections; every id arrives once, every stream is
/// non-blocking, and the counts add up after shutdown.
fn every_connection_once(runtime: fn() -> Runtime, acceptors: usize) {
    let _serial = serial();
    let fds = FdTable::now();
    let rt = runtime();
    let total = 2_000u64;
    let client_threads = 4u64;
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let received = Arc::new(AtomicU64::new(0));
    let stats = rt.block_on(async {
        let listener = Arc::new(
            TcpListener::from_builder(Listener::builder(addr()).shards(2).pin(false))
                .expect("listener"),
        );
        let local = listener.local_addr();
        let tasks: Vec<_> = (0..acceptors)
            .map(|_| {
                let (l, seen, received) = (listener.clone(), seen.clone(), received.clone());
                tokio::spawn(async move {
                    loop {
                        let (mut s, meta) = match l.accept().await {
                            Ok(got) => got,
                            Err(e) => {
                                assert_eq!(e.kind(), std::io::ErrorKind::NotConnected, "{e}");
                                return;
                            }
                        };
                        assert!(is_nonblocking(&s), "the stream is non-blocking");
                        assert!(meta.shard < 2);
                        assert_eq!(meta.peer_addr, s.peer_addr().expect("peer"));
                        let id = read_id(&mut s).await.expect("id");
                        assert!(seen.lock().unwrap().insert(id), "id {id} delivered twice");
                        received.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        let clients: Vec<_> = (0..client_threads)
            .map(|t| {
                std::thread::spawn(move || {
                    let per = total / client_threads;
                    for i in 0..per {
                        tagged_client(local, t * per + i).expect("client");
                    }
                })
            })
            .collect();
        let r = received.clone();
        tokio::task::spawn_blocking(move || {
            wait_for("every connection received", || {
                r.load(Ordering::SeqCst) == total
            })
        })
        .await
        .expect("waiter");
        for c in clients {
            c.join().expect("client thread");
        }
        listener.shutdown();
        for t in tasks {
            t.await.expect("acceptor task");
        }
        listener.stats()
    });
    drop(rt);
    assert_eq!(seen.lock().unwrap().len() as u64, total);
    assert!(stats.conserved(), "{stats:?}");
    assert_eq!(stats.total().accepted, total);
    assert_eq!(stats.total().delivered, total);
    fds.assert_back("fd table back to baseline");
}

#[test]
fn async_accept_delivers_every_connection_once_on_a_multi_thread_runtime() {
    every_connection_once(multi_thread, 4);
}

#[test]
fn async_accept_delivers_every_connection_once_on_a_current_thread_runtime() {
    every_connection_once(current_thread, 2);
}

#[test]
fn dropped_accept_futures_lose_no_connection() {
    let _serial = serial();
    let fds = FdTable::now();
    let rt = current_thread();
    let total = 300usize;
    rt.block_on(async {
        let listener = one_shard_listener();
        let local = listener.local_addr();
        // Polled once with nothing pending, then dropped: certainly cancelled.
        for _ in 0..10 {
            let r = tokio::time::timeout(Duration::ZERO, listener.accept()).await;
            assert!(r.is_err(), "nothing is pending yet");
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let clients = std::thread::spawn(move || {
            let mut held = Vec::new();
            for _ in 0..total {
                held.push(connect(local).expect("connect"));
                let _ = tx.send(());
            }
            held
        });
        let mut got = Vec::new();
        let mut cancelled = 0u64;
        let mut connected = 0usize;
        // While clients arrive: every accept either completes or is
        // dropped after one poll, or loses a select! to the channel.
        while connected < total || got.len() < total {
            tokio::select! {
                r = listener.accept() => got.push(r.expect("accept").0),
                Some(()) = rx.recv(), if connected < total => {
                    connected += 1;
                    cancelled += 1;
                    match tokio::time::timeout(Duration::ZERO, listener.accept()).await {
                        Ok(r) => got.push(r.expect("accept").0),
                        Err(_) => cancelled += 1,
                    }
                }
            }
            let stats = listener.stats();
            let t = stats.total();
            assert_eq!(
                t.delivered as usize,
                got.len() + listener.queued(),
                "what was delivered the application holds, or it waits registered in the listener"
            );
        }
        assert!(cancelled > 0);
        let held = clients.join().expect("clients");
        let mut peers = HashSet::new();
        for s in &got {
            assert!(
                peers.insert(s.peer_addr().expect("peer")),
                "delivered twice"
            );
        }
        let client_addrs: HashSet<_> = held.iter().map(|c| c.local_addr().expect("addr")).collect();
        assert_eq!(peers, client_addrs, "every client's connection, once");
        listener.shutdown();
        let stats = listener.stats();
        assert!(stats.conserved(), "{stats:?}");
        assert_eq!(stats.total().accepted as usize, total);
        assert_eq!(stats.total().delivered as usize, total);
        drop(got);
        drop(held);
    });
    drop(rt);
    fds.assert_back("fd table back to baseline");
}

#[test]
fn shutdown_accounts_for_what_was_not_taken_and_wakes_waiting_accepts() {
    let _serial = serial();
    let fds = FdTable::now();
    let rt = multi_thread();
    rt.block_on(async {
        let listener = Arc::new(one_shard_listener());
        let clients: Vec<_> = (0..10)
            .map(|_| connect(listener.local_addr()).expect("connect"))
            .collect();
        let mut taken = Vec::new();
        for _ in 0..3 {
            taken.push(listener.accept().await.expect("accept"));
        }
        let l = listener.clone();
        tokio::task::spawn_blocking(move || {
            wait_for("the rest accepted into the ring", || {
                l.stats().total().accepted == 10
            })
        })
        .await
        .expect("waiter");
        // Drain the ring, then park an accept that shutdown must wake.
        while let Some(c) = listener.try_accept().expect("try_accept") {
            taken.push(c);
        }
        assert_eq!(taken.len(), 10);
        let l = listener.clone();
        let waiting = tokio::spawn(async move { l.accept().await.map(|_| ()) });
        tokio::task::yield_now().await;
        listener.shutdown();
        let r = tokio::time::timeout(BOUND, waiting)
            .await
            .expect("the waiting accept wakes")
            .expect("task");
        assert_eq!(
            r.expect_err("closed").kind(),
            std::io::ErrorKind::NotConnected
        );
        let t = listener.stats().total();
        assert!(listener.stats().conserved());
        assert_eq!((t.accepted, t.delivered), (10, 10));
        drop(taken);
        drop(clients);
    });
    drop(rt);
    fds.assert_back("fd table back to baseline");

    // Not taken at all: closed and counted at shutdown.
    let rt = current_thread();
    rt.block_on(async {
        let listener = one_shard_listener();
        let _clients: Vec<_> = (0..5)
            .map(|_| connect(listener.local_addr()).expect("connect"))
            .collect();
        let _one = listener.accept().await.expect("accept");
        let l = listener.listener().clone();
        tokio::task::spawn_blocking(move || {
            wait_for("all five accepted", || l.stats().total().accepted == 5)
        })
        .await
        .expect("waiter");
        listener.shutdown();
        let t = listener.stats().total();
        assert!(listener.stats().conserved());
        // The first accept may have taken (and registered) more of its batch.
        let queued = listener.queued() as u64;
        assert_eq!(
            (t.delivered, t.closed_at_shutdown),
            (1 + queued, 4 - queued)
        );
        // Those are still handed out after shutdown; then it is closed.
        for _ in 0..queued {
            listener.accept().await.expect("a queued connection");
        }
        let e = listener.accept().await.expect_err("closed");
        assert_eq!(e.kind(), std::io::ErrorKind::NotConnected);
    });
    drop(rt);
    fds.assert_back("fd table back to baseline");
}

#[test]
fn a_builder_with_an_inline_handler_is_refused() {
    let _serial = serial();
    let rt = current_thread();
    let r = rt.block_on(async {
        TcpListener::from_builder(Listener::builder(addr()).shards(1).handler(|_, _| {}))
    });
    assert_eq!(
        r.expect_err("refused").kind(),
        std::io::ErrorKind::Unsupported
    );
    // Outside a runtime: an error, not tokio's panic.
    let r = TcpListener::from_builder(Listener::builder(addr()).shards(1));
    assert!(r.is_err());
}

#[test]
fn driven_listeners_on_current_thread_runtimes_all_accept_and_shut_down_clean() {
    let _serial = serial();
    let fds = FdTable::now();
    let cores = cores();
    let n = cores.len().clamp(1, 4);
    let (listener, shards) = Listener::builder(addr())
        .shards(n)
        .nonblocking(true)
        .build_driven()
        .expect("build driven");
    let (tx, rx) = mpsc::channel::<(usize, u64)>();
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = shards
        .into_iter()
        .map(|shard| {
            let (tx, stop) = (tx.clone(), stop.clone());
            let core = cores.get(shard.index()).copied();
            std::thread::spawn(move || {
                if let Some(c) = core {
                    pin(c);
                }
                let rt = current_thread();
                rt.block_on(async move {
                    let mut driven = DrivenListener::new(shard).expect("driven listener");
                    let index = driven.index();
                    loop {
                        let r = tokio::time::timeout(BOUND, driven.accept()).await;
                        let (mut s, meta) = match r.expect("accept or shutdown within the bound") {
                            Ok(got) => got,
                            Err(e) => {
                                assert_eq!(e.kind(), std::io::ErrorKind::NotConnected, "{e}");
                                assert!(stop.load(Ordering::SeqCst));
                                assert!(driven.shard().is_finished());
                                return;
                            }
                        };
                        assert_eq!(meta.shard, index);
                        assert!(is_nonblocking(&s));
                        let id = read_id(&mut s).await.expect("id");
                        tx.send((index, id)).expect("report");
                    }
                });
            })
        })
        .collect();
    drop(tx);
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
fn a_dropped_driven_accept_loses_nothing() {
    let _serial = serial();
    let fds = FdTable::now();
    let (listener, mut shards) = Listener::builder(addr())
        .shards(1)
        .nonblocking(true)
        .build_driven()
        .expect("build driven");
    let shard = shards.pop().expect("one shard");
    let local = listener.local_addr();
    let total = 100usize;
    let rt = current_thread();
    rt.block_on(async move {
        let mut driven = DrivenListener::new(shard).expect("driven");
        for _ in 0..5 {
            let r = tokio::time::timeout(Duration::ZERO, driven.accept()).await;
            assert!(r.is_err(), "nothing is pending yet");
        }
        let clients = std::thread::spawn(move || {
            (0..total)
                .map(|_| connect(local).expect("connect"))
                .collect::<Vec<_>>()
        });
        let mut got = Vec::new();
        while got.len() < total {
            match tokio::time::timeout(Duration::ZERO, driven.accept()).await {
                Ok(r) => got.push(r.expect("accept").0),
                Err(_) => {
                    // What a cancelled drive took waits in the queue.
                    tokio::time::timeout(BOUND, driven.accept())
                        .await
                        .map(|r| got.push(r.expect("accept").0))
                        .expect("within the bound");
                }
            }
        }
        let held = clients.join().expect("clients");
        let peers: HashSet<_> = got.iter().map(|s| s.peer_addr().expect("peer")).collect();
        let mine: HashSet<_> = held.iter().map(|c| c.local_addr().expect("addr")).collect();
        assert_eq!(peers.len(), total);
        assert_eq!(peers, mine);
        assert_eq!(driven.queued(), 0);
    });
    drop(rt);
    listener.shutdown();
    let t = listener.stats().total();
    assert!(listener.stats().conserved());
    assert_eq!((t.accepted, t.delivered), (total as u64, total as u64));
    drop(listener);
    fds.assert_back("fd table back to baseline");
}

/// `DrivenListener::accept_admitted` and `reply_and_close` on a
/// `current_thread` runtime: every client reads the reply and a FIN, the
/// replies go with the next drive (no flush in the loop), and shutdown
/// ends the loop with everything counted and the fd table back to
/// baseline.
#[test]
fn a_driven_listener_answers_on_the_shards_ring() {
    let _serial = serial();
    let fds = FdTable::now();
    let (listener, shard) = one_driven_shard();
    let local = listener.local_addr();
    const N: usize = 200;
    let clients = std::thread::spawn(move || {
        for _ in 0..N {
            let got = read_reply(local).expect("a reply and a FIN, not a reset");
            assert_eq!(got, b"ring");
        }
    });
    let rt = current_thread();
    let (done_tx, done) = mpsc::channel();
    let server = std::thread::spawn(move || {
        rt.block_on(async move {
            let mut driven = DrivenListener::new(shard).expect("driven");
            let mut served = 0;
            loop {
                match driven.accept_admitted().await {
                    Ok(conn) => {
                        driven.reply_and_close(conn, b"ring").expect("reply");
                        served += 1;
                        if served == N {
                            let _ = done_tx.send(());
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotConnected => return served,
                    Err(e) => panic!("accept: {e}"),
                }
            }
        })
    });
    clients.join().expect("clients");
    done.recv_timeout(BOUND).expect("every connection served");
    listener.shutdown();
    assert_eq!(server.join().expect("server"), N);
    let t = listener.stats().total();
    assert!(listener.stats().conserved(), "{t:?}");
    assert_eq!(
        (t.accepted, t.delivered, t.closed_at_shutdown),
        (N as u64, N as u64, 0)
    );
    drop(listener);
    fds.assert_back("fd table back to baseline");
}

/// `DrivenListener::flush` sends what `reply_and_close` queued at once:
/// the client reads its reply and a FIN while the listener, still alive, is
/// neither accepting nor driven again (without the flush the reply would
/// wait for the next accept's drive, and the client's read time out).
#[test]
fn a_flushed_driven_reply_leaves_without_another_accept() {
    let _serial = serial();
    let fds = FdTable::now();
    let (listener, shard) = one_driven_shard();
    let local = listener.local_addr();
    let client = std::thread::spawn(move || read_reply(local));
    let rt = current_thread();
    rt.block_on(async {
        let mut driven = DrivenListener::new(shard).expect("driven");
        let conn = driven.accept_admitted().await.expect("accept");
        driven.reply_and_close(conn, b"now").expect("reply");
        driven.flush().expect("flush");
        // Not accepted from nor dropped until the client has its answer.
        let got = tokio::task::spawn_blocking(move || client.join())
            .await
            .expect("join task")
            .expect("client thread")
            .expect("a reply and a FIN");
        assert_eq!(got, b"now");
        drop(driven);
    });
    listener.shutdown();
    let t = listener.stats().total();
    assert!(listener.stats().conserved(), "{t:?}");
    assert_eq!((t.accepted, t.delivered), (1, 1));
    drop(rt);
    drop(listener);
    fds.assert_back("fd table back to baseline");
}

/// Clients that reset while their connections wait in the ring are
/// withdrawn (counted `withdrawn.peer_gone`), never handed to the application
/// as streams; the one that stays is.
#[test]
fn connections_reset_in_the_ring_are_withdrawn_not_handed_over() {
    let _serial = serial();
    let fds = FdTable::now();
    let rt = multi_thread();
    rt.block_on(async {
        let listener = Arc::new(one_shard_listener());
        const GONE: u64 = 8;
        for _ in 0..GONE {
            let c = connect(listener.local_addr()).expect("connect");
            // SO_LINGER 0: the close sends an RST, which loopback hands to
            // the server's socket before close() returns.
            reset_on_drop(&c);
        }
        let l = listener.clone();
        tokio::task::spawn_blocking(move || {
            wait_for("the reset ones accepted into the ring", || {
                l.stats().total().accepted == GONE
            })
        })
        .await
        .expect("waiter");
        let stays = connect(listener.local_addr()).expect("connect");
        let (s, meta) = tokio::time::timeout(BOUND, listener.accept())
            .await
            .expect("accept in time")
            .expect("accept");
        assert_eq!(meta.peer_addr, stays.local_addr().expect("client address"));
        assert_eq!(
            s.peer_addr().expect("stream's peer"),
            stays.local_addr().expect("client address")
        );
        let t = listener.stats().total();
        assert_eq!(
            (t.accepted, t.delivered, t.withdrawn.peer_gone),
            (GONE + 1, 1, GONE)
        );
        assert!(listener.stats().conserved());
        drop(s);
        drop(stays);
        listener.shutdown();
    });
    drop(rt);
    fds.assert_back("fd table back to baseline");
}

/// A DrivenListener leaves its shard's descriptor as it is between waits
/// (tokio waits edge-triggered); a level-triggered `wait()` on that shard
/// still reports it readable only when there is work.
#[test]
fn a_driven_listeners_shard_waits_level_triggered_for_work_only() {
    let _serial = serial();
    let fds = FdTable::now();
    let (listener, shard) = one_driven_shard();
    let local = listener.local_addr();
    let rt = current_thread();
    rt.block_on(async {
        let mut driven = DrivenListener::new(shard).expect("driven");
        let client = connect(local).expect("connect");
        // Its completion signalled the descriptor; the drive reaped it.
        drop(driven.accept_admitted().await.expect("accept"));
        drop(client);
        let shard = driven.shard_mut();
        assert!(
            !shard.wait(Some(Duration::ZERO)).expect("wait"),
            "readable with nothing to do"
        );
        let _second = connect(local).expect("connect");
        assert!(
            shard.wait(None).expect("wait"),
            "a new connection makes it readable"
        );
        drop(driven);
    });
    listener.shutdown();
    assert!(listener.stats().conserved());
    drop(rt);
    drop(listener);
    fds.assert_back("fd table back to baseline");
}
