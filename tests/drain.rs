//! Drain and shutdown with live relays (issue 11): a drain lets a download
//! in progress finish, every byte, ended by FIN; a relay still running when
//! the drain's deadline comes is wound down with a half-close each way,
//! not a reset; a peer that takes nothing cannot hold shutdown past the
//! grace, and whatever happened is counted.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use floodgate::Listener;
use floodgate_tests::{
    accept_from, connect, relay_listener, relays, serial, silent_upstream, still_relays, wait_for,
    FdTable,
};

/// A one-shard relay listener with one relay running, idle: the client's
/// end and the upstream's end, one byte moved each way.
fn live_relay() -> (Listener, TcpStream, TcpStream) {
    let up = silent_upstream();
    let listener = relay_listener(up.local_addr().unwrap());
    let mut c = connect(listener.local_addr()).unwrap();
    let mut s = accept_from(&up);
    still_relays(&mut c, &mut s);
    (listener, c, s)
}

/// A deterministic byte pattern.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn drain_lets_a_live_download_finish_every_byte_then_fin() {
    let _g = serial();
    let fds = FdTable::now();
    {
        let (listener, mut c, mut s) = live_relay();
        let listener = Arc::new(listener);

        let drainer = {
            let l = Arc::clone(&listener);
            // The deadline only bounds a broken run; a passing one ends
            // when the relay does.
            std::thread::spawn(move || l.drain(Duration::from_secs(120)))
        };
        wait_for("the shard stopped accepting", || {
            listener.stats().shards.iter().all(|s| s.kernel.is_none())
        });
        // A new client is not served any more (the listening socket is
        // closed: refused).
        assert!(TcpStream::connect(listener.local_addr()).is_err());

        // The download starts after the drain began, and is 4 MiB.
        const LEN: usize = 4 << 20;
        let body = pattern(LEN);
        let writer = std::thread::spawn(move || {
            s.write_all(&body).unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            // The client's last words, then its FIN.
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).unwrap();
            rest
        });
        let mut got = Vec::with_capacity(LEN);
        // Ok: ended by FIN (a reset would be ECONNRESET).
        c.read_to_end(&mut got).expect("ended by FIN");
        assert!(
            got == pattern(LEN),
            "{} bytes of {LEN}, or altered",
            got.len()
        );
        c.write_all(b"bye").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(writer.join().unwrap(), b"bye");

        let drained = drainer.join().unwrap();
        assert!(drained.finished, "{drained:?}");
        assert_eq!((drained.closed_at_deadline, drained.relays_cut), (0, 0));
        let r = relays(&listener);
        assert_eq!(
            (r.completed, r.closed_at_shutdown, r.failed),
            (1, 0, 0),
            "{r:?}"
        );
        assert_eq!(r.bytes_to_client, LEN as u64 + 1);
        assert!(listener.stats().conserved());
    }
    fds.assert_back("fd table back to baseline");
}

#[test]
fn at_the_drain_deadline_a_live_relay_ends_with_fin_each_way_not_rst() {
    let _g = serial();
    let fds = FdTable::now();
    {
        let (listener, mut c, mut s) = live_relay();

        // Neither side has anything in flight: the deadline comes at once.
        let drained = listener.drain(Duration::ZERO);
        assert_eq!(drained.relays_cut, 1, "{drained:?}");
        let mut b = [0u8; 16];
        // Both peers see end of stream (a reset would be ECONNRESET).
        assert_eq!(c.read(&mut b).expect("client: FIN, not RST"), 0);
        assert_eq!(s.read(&mut b).expect("upstream: FIN, not RST"), 0);
        let r = relays(&listener);
        assert_eq!(
            (
                r.closed_at_shutdown,
                r.reset_at_shutdown,
                r.failed,
                r.active
            ),
            (1, 0, 0, 0),
            "{r:?}"
        );
    }
    fds.assert_back("fd table back to baseline");
}

#[test]
fn shutdown_winds_relays_down_with_fin_and_every_byte_received_is_passed_on() {
    let _g = serial();
    let fds = FdTable::now();
    {
        let up = silent_upstream();
        let listener = relay_listener(up.local_addr().unwrap());
        const N: usize = 6;
        let mut pairs = Vec::new();
        for _ in 0..N {
            let mut c = connect(listener.local_addr()).unwrap();
            let mut s = accept_from(&up);
            still_relays(&mut c, &mut s);
            pairs.push((c, s));
        }
        // Bytes the relays have read and passed on before the shutdown
        // reach the client before its FIN.
        for (i, (_, s)) in pairs.iter_mut().enumerate() {
            s.write_all(&[i as u8; 100]).unwrap();
        }
        wait_for("the relays passed the bytes on", || {
            relays(&listener).bytes_to_client == (N * 101) as u64
        });
        listener.shutdown();
        for (i, (mut c, mut s)) in pairs.into_iter().enumerate() {
            let mut got = Vec::new();
            c.read_to_end(&mut got).expect("client: FIN, not RST");
            assert_eq!(got, vec![i as u8; 100]);
            assert_eq!(s.read(&mut [0u8; 4]).expect("upstream: FIN, not RST"), 0);
        }
        let r = relays(&listener);
        assert_eq!(
            (r.closed_at_shutdown, r.reset_at_shutdown, r.active),
            (N as u64, 0, 0),
            "{r:?}"
        );
    }
    fds.assert_back("fd table back to baseline");
}

#[test]
fn a_client_that_reads_nothing_cannot_hold_shutdown_and_its_end_is_counted() {
    let _g = serial();
    let fds = FdTable::now();
    {
        let (listener, mut c, mut s) = live_relay();
        // The upstream pours 64 MiB at a client that reads none of it: the
        // relay's send to the client fills its buffers and waits.
        let writer = std::thread::spawn(move || {
            let chunk = vec![7u8; 1 << 20];
            let mut sent = 0u64;
            for _ in 0..64 {
                match s.write(&chunk) {
                    Ok(n) => sent += n as u64,
                    Err(_) => break,
                }
            }
            sent
        });
        wait_for("the relay moved bytes", || {
            relays(&listener).bytes_to_client > 1
        });
        // Returns within the grace whatever the client does.
        listener.shutdown();
        let r = relays(&listener);
        assert_eq!((r.closed_at_shutdown, r.active), (1, 0), "{r:?}");
        // What the client sees agrees with the count: the bytes then FIN
        // (wound down), or a reset (the grace ran out).
        let mut got = Vec::new();
        match c.read_to_end(&mut got) {
            Ok(_) => assert_eq!(r.reset_at_shutdown, 0, "{r:?}"),
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
                assert_eq!(r.reset_at_shutdown, 1, "{r:?}");
            }
        }
        drop(c);
        writer.join().unwrap();
    }
    fds.assert_back("fd table back to baseline");
}
