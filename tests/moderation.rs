//! Wake-up moderation (`ListenerBuilder::moderation`, on by default): under
//! load a shard pauses between turns, and still every connection is
//! delivered exactly once, every reply leaves, and shutdown and drain end
//! with everything counted. Run on both backends (CI runs the suite again
//! with `FLOODGATE_BACKEND=epoll`).

use std::collections::HashSet;
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use floodgate::{Coalesce, Connector, DrivenShard, Error, Listener, Moderation};
use floodgate_tests::{connect, read_id, serial, tagged_client, wait_for, FdTable};

const CLIENT_THREADS: u64 = 4;
const PER_THREAD: u64 = 1_500;

fn addr() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().expect("loopback")
}

/// `threads` client threads of `per` connections each: connect, send the
/// id, read the reply to its end, which must be `b"ok"`.
fn clients(addr: std::net::SocketAddr, threads: u64, per: u64) -> Vec<std::thread::JoinHandle<()>> {
    (0..threads)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..per {
                    let id = t * per + i;
                    let mut s = connect(addr).expect("connect");
                    std::io::Write::write_all(&mut s, &id.to_le_bytes()).expect("send id");
                    s.set_read_timeout(Some(Duration::from_secs(30)))
                        .expect("timeout");
                    let mut b = Vec::new();
                    s.read_to_end(&mut b).expect("reply");
                    assert_eq!(b, b"ok", "connection {id}: the reply left whole");
                }
            })
        })
        .collect()
}

/// A listener whose inline handler reads each connection's id, records it
/// and replies-and-closes.
fn replying(moderation: Moderation) -> (Listener, Arc<Mutex<HashSet<u64>>>, Arc<AtomicU64>) {
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let twice = Arc::new(AtomicU64::new(0));
    let (s, t) = (seen.clone(), twice.clone());
    let l = Listener::builder(addr())
        .shards(1)
        .moderation(moderation)
        .handler(move |mut conn, ctx| {
            let _ = conn
                .as_std()
                .set_read_timeout(Some(Duration::from_secs(30)));
            if let Ok(id) = read_id(&mut conn) {
                if !s.lock().unwrap().insert(id) {
                    t.fetch_add(1, Ordering::SeqCst);
                }
            }
            let _ = ctx.reply_and_close(conn, b"ok");
        })
        .build()
        .expect("build");
    (l, seen, twice)
}

#[test]
fn moderation_is_adaptive_by_default() {
    assert_eq!(
        Moderation::default(),
        Moderation::Adaptive {
            max_pause: floodgate::DEFAULT_MAX_PAUSE
        }
    );
}

#[test]
fn under_load_every_connection_is_delivered_once_and_every_reply_leaves() {
    let _g = serial();
    let fds = FdTable::now();
    let (l, seen, twice) = replying(Moderation::default());
    for c in clients(l.local_addr(), CLIENT_THREADS, PER_THREAD) {
        c.join().expect("client");
    }
    let total = CLIENT_THREADS * PER_THREAD;
    wait_for("every connection handled", || {
        l.stats().total().delivered == total
    });
    assert_eq!(twice.load(Ordering::SeqCst), 0, "none delivered twice");
    assert_eq!(seen.lock().unwrap().len() as u64, total);
    l.shutdown();
    let stats = l.stats();
    assert!(stats.conserved(), "{stats:?}");
    let t = stats.total();
    assert_eq!(t.accepted, total);
    assert_eq!(t.moderation.pauses, t.coalesced_pauses);
    assert!(t.moderation.empty_pauses <= t.moderation.pauses);
    drop(l);
    fds.assert_back("fd table back to baseline");
}

#[test]
fn off_never_pauses() {
    let _g = serial();
    for m in [
        Moderation::Off,
        Moderation::Adaptive {
            max_pause: Duration::ZERO,
        },
    ] {
        let (l, _, twice) = replying(m);
        for c in clients(l.local_addr(), CLIENT_THREADS, 300) {
            c.join().expect("client");
        }
        wait_for("every connection handled", || {
            l.stats().total().delivered == CLIENT_THREADS * 300
        });
        assert_eq!(twice.load(Ordering::SeqCst), 0);
        let t = l.stats().total();
        assert_eq!(t.moderation.pauses, 0, "{m:?}");
        assert_eq!(t.moderation.level_us, 0, "{m:?}");
        l.shutdown();
    }
}

#[test]
fn the_fixed_mode_delivers_every_connection_once() {
    let _g = serial();
    let (l, seen, twice) = replying(Moderation::Fixed(Coalesce::default()));
    for c in clients(l.local_addr(), CLIENT_THREADS, 300) {
        c.join().expect("client");
    }
    wait_for("every connection handled", || {
        l.stats().total().delivered == CLIENT_THREADS * 300
    });
    assert_eq!(twice.load(Ordering::SeqCst), 0);
    assert_eq!(seen.lock().unwrap().len() as u64, CLIENT_THREADS * 300);
    let t = l.stats().total();
    assert_eq!(t.moderation.level_us, 0, "no adaptive controller");
    l.shutdown();
    assert!(l.stats().conserved());
}

#[test]
fn shutdown_under_load_ends_with_everything_counted() {
    let _g = serial();
    let fds = FdTable::now();
    let l = Arc::new(Listener::builder(addr()).shards(1).build().expect("build"));
    let stop = Arc::new(AtomicBool::new(false));
    let a = l.local_addr();
    let load: Vec<_> = (0..CLIENT_THREADS)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut id = t;
                // Bounded: at most this many, fewer once shutdown is asked.
                while id < 200_000 && !stop.load(Ordering::SeqCst) {
                    if tagged_client(a, id).is_err() {
                        return;
                    }
                    id += CLIENT_THREADS;
                }
            })
        })
        .collect();
    let consumer = {
        let l = l.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            loop {
                match l.accept() {
                    Ok(mut c) => {
                        // Read the id first: a close with unread data
                        // would reset the client instead of ending it.
                        let _ = read_id(&mut c);
                        n += 1
                    }
                    Err(Error::Closed) => return n,
                    Err(e) => panic!("accept: {e}"),
                }
            }
        })
    };
    wait_for("the shard is under load", || {
        l.stats().total().delivered >= 3_000
    });
    // Shutdown joins the shard thread: it returns once the shard saw the
    // stop, whatever it was doing (a pause ends within max_pause).
    l.shutdown();
    stop.store(true, Ordering::SeqCst);
    for c in load {
        c.join().expect("client");
    }
    let delivered = consumer.join().expect("consumer");
    let stats = l.stats();
    assert!(stats.conserved(), "{stats:?}");
    let t = stats.total();
    assert_eq!(t.accepted, t.delivered + t.closed_at_shutdown);
    assert!(delivered <= t.delivered);
    drop(l);
    fds.assert_back("fd table back to baseline");
}

#[test]
fn drain_under_load_finishes_what_it_let_run() {
    let _g = serial();
    let fds = FdTable::now();
    let (l, seen, twice) = replying(Moderation::default());
    let a = l.local_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..CLIENT_THREADS)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut id = t;
                while id < 200_000 && !stop.load(Ordering::SeqCst) {
                    let Ok(mut s) = connect(a) else { return };
                    if std::io::Write::write_all(&mut s, &id.to_le_bytes()).is_err() {
                        return;
                    }
                    let mut b = Vec::new();
                    let _ = s.read_to_end(&mut b);
                    id += CLIENT_THREADS;
                }
            })
        })
        .collect();
    wait_for("the shard is under load", || {
        l.stats().total().delivered >= 3_000
    });
    let d = l.drain(Duration::from_secs(60));
    stop.store(true, Ordering::SeqCst);
    for c in load {
        c.join().expect("client");
    }
    assert!(d.finished, "{d:?}");
    assert_eq!(d.closed_at_deadline, 0);
    assert_eq!(twice.load(Ordering::SeqCst), 0);
    let stats = l.stats();
    assert!(stats.conserved(), "{stats:?}");
    assert_eq!(stats.total().delivered, seen.lock().unwrap().len() as u64);
    drop(l);
    fds.assert_back("fd table back to baseline");
}

/// Drives `shard` until the listener shut it down; ids go to `ids`.
fn serve(mut shard: DrivenShard, ids: mpsc::Sender<u64>) {
    loop {
        match shard.drive(|mut conn, ctx| {
            let _ = conn
                .as_std()
                .set_read_timeout(Some(Duration::from_secs(30)));
            if let Ok(id) = read_id(&mut conn) {
                let _ = ids.send(id);
            }
            let _ = ctx.reply_and_close(conn, b"ok");
        }) {
            Ok(_) => {}
            Err(Error::Closed) => return,
            Err(e) => panic!("drive: {e}"),
        }
        shard
            .wait(Some(Duration::from_millis(100)))
            .expect("wait on the shard");
    }
}

#[test]
fn a_driven_shard_under_load_delivers_every_connection_once() {
    let _g = serial();
    let fds = FdTable::now();
    let (l, mut shards) = Listener::builder(addr())
        .shards(1)
        .build_driven()
        .expect("build driven");
    let shard = shards.pop().expect("one shard");
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || serve(shard, tx));
    for c in clients(l.local_addr(), CLIENT_THREADS, PER_THREAD) {
        c.join().expect("client");
    }
    let total = CLIENT_THREADS * PER_THREAD;
    let mut seen = HashSet::new();
    for _ in 0..total {
        let id = rx.recv().expect("every connection is delivered");
        assert!(seen.insert(id), "id {id} delivered twice");
    }
    l.shutdown();
    t.join().expect("shard thread");
    let stats = l.stats();
    assert!(stats.conserved(), "{stats:?}");
    assert_eq!(stats.total().delivered, total);
    drop(l);
    fds.assert_back("fd table back to baseline");
}

#[test]
fn a_connector_with_moderation_completes_every_connect_once() {
    let _g = serial();
    let fds = FdTable::now();
    let server = std::net::TcpListener::bind(addr()).expect("bind");
    let target = server.local_addr().expect("addr");
    let accepted = Arc::new(AtomicU64::new(0));
    let acc = accepted.clone();
    let srv = std::thread::spawn(move || {
        for _ in 0..2_000 {
            match server.accept() {
                Ok(_) => {
                    acc.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    });
    let c = Connector::builder()
        .shards(1)
        .pin(false)
        .moderation(Moderation::default())
        .build()
        .expect("connector");
    // Batches of 100, within the server's accept backlog.
    for _ in 0..20 {
        let mut tickets = HashSet::new();
        for _ in 0..100 {
            tickets.insert(c.submit(target).expect("submit"));
        }
        while !tickets.is_empty() {
            if let Some(x) = c
                .complete_timeout(Duration::from_secs(30))
                .expect("complete")
            {
                assert!(tickets.remove(&x.ticket), "a ticket completed twice");
                assert!(x.result.is_ok(), "{:?}", x.result.err());
            }
        }
    }
    srv.join().expect("server");
    assert_eq!(accepted.load(Ordering::SeqCst), 2_000);
    c.shutdown();
    let s = c.stats();
    assert!(s.conserved(), "{s:?}");
    assert_eq!(s.total().connected, 2_000);
    drop(c);
    fds.assert_back("fd table back to baseline");
}
