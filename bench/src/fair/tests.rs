use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::peers::PEERS;
use super::*;

/// The tests that count descriptors or look at every thread's state hold this lock, so that
/// no other test of this binary opens descriptors or runs meanwhile.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Waits (bounded: 10 s) until `cond` holds; panics naming `what` otherwise.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn state_is_the_field_after_the_last_parenthesis() {
    assert_eq!(parse_state("4242 (fair-std) S 1 2 3"), Some('S'));
    assert_eq!(parse_state("4242 (a) R (b)) R 1 2 3"), Some('R'));
    assert_eq!(parse_state("4242 (x)"), None);
    assert_eq!(parse_state("no parenthesis"), None);
}

#[test]
fn every_peer_reports_each_accept_and_leaves_no_descriptor() {
    let _serial = serial();
    // Best effort: on a machine with one core the measurement runs unpinned.
    let _ = pin_here(CLIENT_CORE);
    for peer in PEERS {
        let before = open_fds();
        let probe = Arc::new(Probe::default());
        let running = super::peers::start_checked(*peer, probe.clone())
            .unwrap_or_else(|e| panic!("{}: cannot start: {e}", peer.name));
        for i in 0..20 {
            let took = measure_one(&probe, running.addr())
                .unwrap_or_else(|e| panic!("{} connection {i}: {e}", peer.name));
            assert!(took > Duration::ZERO, "{}: a zero latency", peer.name);
        }
        drop(running);
        // Stopping wakes the thread peers with one connection they close without reporting.
        assert_eq!(probe.discard(), 0, "{}: stamps after stop", peer.name);
        // At most as many as before: the other tests of this binary (the /proc readers of
        // `measure`, `peer`'s bind) run in parallel and may hold one for a moment when
        // `before` is counted, and then the table never comes back up to that count.
        wait_for(&format!("{}'s descriptors to close", peer.name), || {
            open_fds() <= before
        });
    }
}

#[test]
fn a_thread_that_is_not_asleep_is_named_and_waited_for() {
    let _serial = serial();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let spinner = std::thread::Builder::new()
        .name("fair-spinner".into())
        .spawn(move || {
            // Bounded: told to stop, or 30 s.
            let deadline = Instant::now() + Duration::from_secs(30);
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                std::hint::spin_loop();
            }
        })
        .expect("spawn");
    // The spinner never sleeps while the flag is clear, whatever the timeout.
    let err = wait_quiet(Duration::from_millis(50)).expect_err("a spinning thread is awake");
    assert!(err.contains("fair-spinner"), "{err}");
    stop.store(true, Ordering::Relaxed);
    spinner.join().expect("spinner");
    wait_quiet(STEP_TIMEOUT).expect("quiet once the spinner ended");
}

#[test]
fn a_stamp_without_a_measured_connection_is_refused() {
    let _serial = serial();
    let probe = Probe::default();
    probe.held(());
    // Nothing listens there; the stray stamp is found before any connect.
    let addr = SocketAddr::from(([127, 0, 0, 1], 9));
    let err = measure_one(&probe, addr).expect_err("stray stamp");
    assert!(err.contains("1 stamp"), "{err}");
}
