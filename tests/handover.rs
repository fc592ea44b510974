//! Hand-over within one process: connections that queue on the shared
//! socket while the predecessor stops accepting reach a client.
//!
//! An io_uring ACCEPT waits as an exclusive waiter, and the predecessor's,
//! posted first, takes every wake-up. When the predecessor's cancel comes
//! before its shard ran the accepts it was woken for, those wake-ups are
//! gone: the connections stay queued while the successor's accept sleeps,
//! until another connection comes. The test makes that order certain: the
//! predecessor's shard is held inside its condition (between two waits on
//! its ring) while connections queue and the drain is asked for, so the
//! cancel is submitted before the woken accept runs. With nobody else
//! connecting, only a predecessor that empties the queue once its accept is
//! gone gets them answered; without that, their reads run into the bound.

use std::io::Read;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use floodgate::{Handover, Listener, Takeover, Verdict};
use floodgate_tests::{accept_queue, connect, serial, wait_for, FdTable};

/// Connections that queue while the predecessor is held.
const QUEUED: usize = 8;

/// Reads a whole reply; `None` if the 120 s bound came first (the hang this
/// test is about).
fn reply(s: &mut TcpStream) -> Option<Vec<u8>> {
    s.set_read_timeout(Some(Duration::from_secs(120))).ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    Some(out)
}

#[test]
fn connections_queued_while_the_predecessor_stops_accepting_are_answered() {
    let _serial = serial();
    let fds = FdTable::now();
    let path = std::env::temp_dir().join(format!("floodgate-handover-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);

    let (inside_tx, inside_rx) = mpsc::channel::<()>();
    let (gate_tx, gate_rx) = mpsc::channel::<()>();
    let inside = Mutex::new(inside_tx);
    let gate = Mutex::new(gate_rx);
    let first = AtomicBool::new(true);
    let old = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .pin(false)
        // The first connection's condition holds the shard until the gate
        // opens: it runs on a completion, before the shard looks at a
        // drain and submits again.
        .condition(move |_: &floodgate::ConnectRequest<'_>| {
            if first.swap(false, Ordering::SeqCst) {
                if let Ok(t) = inside.lock() {
                    let _ = t.send(());
                }
                if let Ok(g) = gate.lock() {
                    let _ = g.recv();
                }
            }
            Verdict::accept()
        })
        .handler(|conn, ctx| {
            let _ = ctx.reply_and_close(conn, b"old");
        })
        .build()
        .expect("the predecessor");
    let addr = old.local_addr();
    let mut held = connect(addr).expect("connect");
    inside_rx
        .recv_timeout(Duration::from_secs(120))
        .expect("the predecessor's condition ran");

    let offer = Handover::bind(&path).expect("offer");
    std::thread::scope(|scope| {
        let offering = scope.spawn(|| offer.offer(&old));
        let mut take = Takeover::connect(&path).expect("take over");
        let new = take
            .builder()
            .shards(1)
            .pin(false)
            .handler(|conn, ctx| {
                let _ = ctx.reply_and_close(conn, b"new");
            })
            .build()
            .expect("the successor");
        take.ready().expect("tell the predecessor");
        let successor = offering
            .join()
            .expect("the offering thread")
            .expect("offered");

        // They queue on the shared socket: the predecessor's accept is
        // woken for them but cannot run; on epoll (no exclusive waiters)
        // the successor takes them at once.
        let mut queued: Vec<TcpStream> = (0..QUEUED)
            .map(|_| connect(addr).expect("connect"))
            .collect();
        wait_for("the connections queued or taken", || {
            accept_queue(addr.port()) + new.stats().total().accepted as usize >= QUEUED
        });
        let draining = scope.spawn(|| old.drain(Duration::from_secs(120)));
        wait_for("the drain asked for", || old.is_draining());
        gate_tx.send(()).expect("open the gate");

        for (i, s) in queued.iter_mut().enumerate() {
            let r = reply(s).unwrap_or_else(|| {
                panic!(
                    "queued connection {i} was never answered: {} still in the \
                     accept queue; successor took {}",
                    accept_queue(addr.port()),
                    new.stats().total().accepted
                )
            });
            assert!(r == b"old" || r == b"new", "reply {r:?}");
        }
        assert_eq!(reply(&mut held).as_deref(), Some(&b"old"[..]));

        let drained = draining.join().expect("the drain thread");
        assert!(drained.finished, "{drained:?}");
        successor.release();
        take.wait_released();
        new.shutdown();
        let (o, n) = (old.stats(), new.stats());
        assert!(o.conserved() && n.conserved(), "{o:?} {n:?}");
        let (o, n) = (o.total(), n.total());
        assert_eq!(
            (o.accepted + n.accepted, o.delivered + n.delivered),
            (QUEUED as u64 + 1, QUEUED as u64 + 1),
            "every connection accepted once and delivered: {o:?} {n:?}"
        );
    });
    drop((old, offer, held));
    let _ = std::fs::remove_file(&path);
    fds.assert_back("after the hand-over");
}
