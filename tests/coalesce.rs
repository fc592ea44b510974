//! Load-adaptive wake-up coalescing: it pauses only after a turn that took
//! a batch of connections, never at light load, and loses nothing.

use std::io::{Read, Write};

use floodgate::{Coalesce, Listener};
use floodgate_tests::{connect, serial, wait_for};

#[test]
fn light_load_never_pauses() {
    let _g = serial();
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .coalesce(Some(Coalesce::default()))
        .handler(|conn, ctx| {
            let _ = ctx.reply_and_close(conn, b"x");
        })
        .build()
        .unwrap();
    for _ in 0..200 {
        let mut c = connect(l.local_addr()).unwrap();
        let mut b = Vec::new();
        c.read_to_end(&mut b).unwrap();
        assert_eq!(b, b"x");
    }
    let t = l.stats().total();
    assert_eq!(t.delivered, 200);
    assert_eq!(
        t.coalesced_pauses, 0,
        "one connection at a time never reaches the threshold"
    );
}

#[test]
fn a_batch_of_connections_makes_the_shard_pause_and_none_is_lost() {
    let _g = serial();
    let (gate, handler) = floodgate_tests::gated_handler();
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .coalesce(Some(Coalesce::default()))
        .handler(handler)
        .build()
        .unwrap();
    if !l.ring_setup().defer_taskrun {
        eprintln!("skipped: the batch is only deterministic with DEFER_TASKRUN (6.1+)");
        return;
    }
    let addr = l.local_addr();
    let mut first = connect(addr).unwrap();
    first.write_all(&0u64.to_le_bytes()).unwrap();
    wait_for("the shard is blocked in the handler", || {
        l.stats().total().delivered == 1
    });
    // While the shard is blocked, 20 connections complete in the kernel;
    // when it waits again, one turn accepts them all.
    let others: Vec<_> = (1..=20u64)
        .map(|id| {
            let mut s = connect(addr).unwrap();
            s.write_all(&id.to_le_bytes()).unwrap();
            s
        })
        .collect();
    wait_for("all 20 in the kernel's queue", || {
        l.stats()
            .total()
            .kernel
            .map(|k| k.accept_queue)
            .unwrap_or(0)
            == 20
    });
    gate.release();
    let mut ids: Vec<u64> = (0..21).map(|_| gate.next()).collect();
    ids.sort();
    assert_eq!(ids, (0..=20).collect::<Vec<_>>());
    // The pause is counted right after the turn that delivered the batch.
    wait_for("a coalescing pause after the batch", || {
        l.stats().total().coalesced_pauses >= 1
    });
    drop(first);
    drop(others);
}
