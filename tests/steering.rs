//! Steering: with CPU steering every shard accepts, each the connections
//! received on its own core (on loopback, the client's core).

use std::io::{Read, Write};
use std::sync::Arc;

use floodgate::{Listener, Steering};
use floodgate_tests::{connect, cores, pin, reset_on_drop, serial};

const PER_CORE: u64 = 300;

#[test]
fn every_shard_accepts_the_connections_of_its_own_core() {
    let _g = serial();
    let cores = cores();
    let n = cores.len();
    let listener = Arc::new(
        Listener::builder("127.0.0.1:0".parse().unwrap())
            .shards(n)
            .steering(Steering::Cpu)
            .build()
            .unwrap(),
    );
    let addr = listener.local_addr();
    let clients: Vec<_> = cores
        .iter()
        .map(|&core| {
            std::thread::spawn(move || {
                assert!(pin(core), "pin client to core {core}");
                for _ in 0..PER_CORE {
                    let mut s = connect(addr).unwrap();
                    s.write_all(&[core as u8]).unwrap();
                    // Held until the server closes: a connection reset while
                    // it waits in the ring is withdrawn, not delivered.
                    let _ = s.read(&mut [0u8; 1]);
                    reset_on_drop(&s);
                }
            })
        })
        .collect();
    let mut per_shard = vec![0u64; n];
    let mut mismatched = 0;
    for _ in 0..(PER_CORE * n as u64) {
        let c = listener.accept().unwrap();
        let mut b = [0u8; 1];
        let _ = c.as_std().peek(&mut b);
        per_shard[c.shard()] += 1;
        if cores.get(c.shard()).copied() != Some(b[0] as usize) {
            mismatched += 1;
        }
    }
    for t in clients {
        t.join().unwrap();
    }
    assert!(
        per_shard.iter().all(|&k| k > 0),
        "every shard accepted: {per_shard:?}"
    );
    assert_eq!(
        mismatched, 0,
        "each connection went to the shard of the core it came from: {per_shard:?}"
    );
    assert_eq!(per_shard, vec![PER_CORE; n]);
}

#[test]
fn hash_steering_also_reaches_every_shard() {
    let _g = serial();
    let n = cores().len();
    if n < 2 {
        return;
    }
    let listener = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(n)
        .steering(Steering::Hash)
        .build()
        .unwrap();
    let mut per_shard = vec![0u64; n];
    for _ in 0..400 {
        let s = connect(listener.local_addr()).unwrap();
        let c = listener.accept().unwrap();
        reset_on_drop(&s);
        per_shard[c.shard()] += 1;
    }
    assert!(per_shard.iter().all(|&k| k > 0), "{per_shard:?}");
}
