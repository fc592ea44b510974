//! Restarts on the same port: a new instance right after a multi-shard one
//! was killed, and two instances overlapping, both with CPU steering.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use floodgate::{Listener, SteeringInForce};
use floodgate_tests::{
    connect, cores, listening_on, pin, reset_on_drop, serial, wait_for, FdTable,
};

const PROBE: &str = env!("CARGO_BIN_EXE_floodgate-probe");

/// Starts `floodgate-probe serve SHARDS`: its port and backend.
fn spawn_server(shards: usize) -> (std::process::Child, u16, String) {
    let mut child = Command::new(PROBE)
        .args(["serve", &shards.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn floodgate-probe");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read the probe's port");
    let mut words = line.split_whitespace();
    assert_eq!(words.next(), Some("PORT"), "probe said {line:?}");
    let port = words.next().and_then(|p| p.parse().ok()).expect("a port");
    assert_eq!(words.next(), Some("BACKEND"), "probe said {line:?}");
    let backend = words.next().unwrap_or_default().to_string();
    (child, port, backend)
}

/// Connects `per_core` clients from each core (the client thread pinned
/// there), each sending its core's number and waiting for the server to
/// close.
fn clients_from_every_core(addr: SocketAddr, per_core: usize) {
    let threads: Vec<_> = cores()
        .into_iter()
        .map(|core| {
            std::thread::spawn(move || {
                assert!(pin(core), "pin the client to core {core}");
                for _ in 0..per_core {
                    let mut s = connect(addr).expect("connect");
                    s.write_all(&[core as u8]).expect("send the core");
                    // Until the server closes (it replies and closes).
                    let _ = s.read(&mut [0u8; 1]);
                    reset_on_drop(&s);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
}

#[test]
fn a_new_instance_binds_at_once_after_a_multi_shard_one_is_killed() {
    let _g = serial();
    let n = cores().len().clamp(1, 2);
    let fds = FdTable::now();
    let mut lingered = 0;
    let mut io_uring = false;
    // Bounded rounds: enough to catch the dead process's sockets still in
    // their teardown at least once (they were in 4 of 5 runs here).
    for round in 0..10 {
        let (mut child, port, backend) = spawn_server(n);
        io_uring |= backend == "io_uring";
        child.kill().expect("SIGKILL the server");
        child.wait().expect("reap it");
        // The dead process's listening sockets may still be open now.
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let listener = Listener::builder(addr)
            .shards(n)
            .build()
            .unwrap_or_else(|e| panic!("round {round}: new instance on {addr}: {e}"));
        // More listeners than ours: the dead one's were still there.
        if listening_on(port) > n {
            lingered += 1;
            // It joined the dying group and steers on SO_INCOMING_CPU.
            assert_eq!(listener.steering(), SteeringInForce::IncomingCpu);
        }
        // Once the old sockets are gone every connection is ours.
        wait_for("the dead instance's sockets to close", || {
            listening_on(port) == n
        });
        let mut s = connect(addr).expect("connect to the new instance");
        let c = listener.accept().expect("accepted by the new instance");
        drop(c);
        let _ = s.read(&mut [0u8; 1]);
        reset_on_drop(&s);
        listener.shutdown();
        assert!(listener.stats().conserved());
        if lingered > 0 && round >= 2 {
            break;
        }
    }
    if io_uring {
        assert!(
            lingered > 0,
            "no round found the killed instance's sockets still open: the test saw nothing"
        );
    }
    fds.assert_back("descriptors left open");
}

/// Accepts on `listener` until `stop`, checking each connection came from
/// the core of the shard that took it; counts them in `taken`.
fn serve_checking_steering(
    listener: Arc<Listener>,
    stop: Arc<AtomicBool>,
    taken: Arc<AtomicU64>,
    wrong: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let cores = cores();
        while !stop.load(Ordering::SeqCst) {
            let Ok(Some(mut c)) = listener.accept_timeout(std::time::Duration::from_millis(20))
            else {
                continue;
            };
            let mut b = [0u8; 1];
            if c.read_exact(&mut b).is_ok() && cores.get(c.shard()) != Some(&(b[0] as usize)) {
                wrong.fetch_add(1, Ordering::SeqCst);
            }
            taken.fetch_add(1, Ordering::SeqCst);
        }
    })
}

#[test]
fn two_overlapping_instances_both_serve_with_steering_intact() {
    let _g = serial();
    let n = cores().len();
    if n < 2 {
        return; // steering needs two cores to show anything
    }
    let fds = FdTable::now();
    let a = Arc::new(
        Listener::builder("127.0.0.1:0".parse().unwrap())
            .shards(n)
            .build()
            .expect("first instance"),
    );
    let addr = a.local_addr();
    let b = Arc::new(
        Listener::builder(addr)
            .shards(n)
            .build()
            .expect("second multi-shard instance on the same port"),
    );
    assert_eq!(a.steering(), SteeringInForce::Program);
    assert_eq!(b.steering(), SteeringInForce::IncomingCpu);
    let stop = Arc::new(AtomicBool::new(false));
    let wrong = Arc::new(AtomicU64::new(0));
    let (ta, tb) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let sa = serve_checking_steering(a.clone(), stop.clone(), ta.clone(), wrong.clone());
    let sb = serve_checking_steering(b.clone(), stop.clone(), tb.clone(), wrong.clone());
    const PER_CORE: usize = 300;
    clients_from_every_core(addr, PER_CORE);
    let total = (PER_CORE * n) as u64;
    wait_for("both instances to take every connection", || {
        ta.load(Ordering::SeqCst) + tb.load(Ordering::SeqCst) == total
    });
    let (from_a, from_b) = (ta.load(Ordering::SeqCst), tb.load(Ordering::SeqCst));
    assert!(
        from_a > 0 && from_b > 0,
        "both serve: a {from_a}, b {from_b}"
    );
    assert_eq!(
        wrong.load(Ordering::SeqCst),
        0,
        "a connection off its core's shard"
    );
    // The first instance leaves; the second serves everything, still
    // steered (the group's order changed as A's sockets left).
    stop.store(true, Ordering::SeqCst);
    sa.join().unwrap();
    sb.join().unwrap();
    a.shutdown();
    assert!(a.stats().conserved());
    drop(a);
    wait_for("the first instance's sockets to close", || {
        listening_on(addr.port()) == n
    });
    stop.store(false, Ordering::SeqCst);
    let sb = serve_checking_steering(b.clone(), stop.clone(), tb.clone(), wrong.clone());
    clients_from_every_core(addr, PER_CORE);
    wait_for("the second instance to take the rest", || {
        tb.load(Ordering::SeqCst) == from_b + total
    });
    assert_eq!(
        wrong.load(Ordering::SeqCst),
        0,
        "a connection off its core's shard"
    );
    stop.store(true, Ordering::SeqCst);
    sb.join().unwrap();
    b.shutdown();
    assert!(b.stats().conserved());
    drop(b);
    fds.assert_back("descriptors left open");
}
