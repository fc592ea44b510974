//! Ready-made conditions on real loopback connections: CIDR filter, rate
//! limit, PROXY protocol and SNI routing.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use floodgate::conditions::{CidrFilter, Proxied, ProxyProtocol, RateLimit, Refusal, Sni};
use floodgate::{proxy_protocol, sni, Condition, ConnectRequest, Listener, RejectHow, Verdict};
use floodgate_tests::{connect, serial, wait_for};

const WAIT: Duration = Duration::from_secs(60);

/// Connects from the loopback source address `src`.
fn connect_from(src: &str, addr: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let from: SocketAddr = format!("{src}:0").parse().unwrap();
    s.bind(&from.into()).unwrap();
    s.connect(&addr.into()).unwrap();
    s.into()
}

/// Reads until EOF or an error; returns what came and whether it was a reset.
fn read_end(s: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => (got, false),
        Err(e) => (got, e.kind() == ErrorKind::ConnectionReset),
    }
}

#[test]
fn cidr_deny_rejects_denied_source_and_admits_others() {
    let _g = serial();
    let filter = CidrFilter::new()
        .deny("127.0.0.9/32".parse().unwrap())
        .refuse(Refusal::reply("denied\n"));
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .condition(filter)
        .build()
        .unwrap();
    let addr = l.local_addr();

    let mut denied = connect_from("127.0.0.9", addr);
    let (got, _) = read_end(&mut denied);
    assert_eq!(got, b"denied\n");

    let _ok = connect_from("127.0.0.1", addr);
    let conn = l.accept().unwrap();
    assert_eq!(
        conn.peer_addr().unwrap().ip(),
        "127.0.0.1".parse::<std::net::IpAddr>().unwrap()
    );
    wait_for("one rejection", || l.stats().total().rejected.close == 1);
    drop(conn);
    l.shutdown();
    let t = l.stats().total();
    assert_eq!(t.accepted, 2);
    assert_eq!(t.delivered, 1);
    assert!(l.stats().conserved());
}

#[test]
fn rate_limit_rejects_the_fourth_connection_from_a_source() {
    let _g = serial();
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .condition(RateLimit::new(1, 0.000_1, 3, 1000).unwrap())
        .build()
        .unwrap();
    let addr = l.local_addr();
    let mut admitted = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(connect(addr).unwrap());
        admitted.push(l.accept().unwrap());
    }
    let mut fourth = connect(addr).unwrap();
    let (got, reset) = read_end(&mut fourth);
    assert!(got.is_empty());
    assert!(reset, "over the limit: reset by default");
    wait_for("one reset", || l.stats().total().rejected.reset == 1);
    // Another source is not limited.
    let _other = connect_from("127.0.0.2", addr);
    admitted.push(l.accept().unwrap());
    l.shutdown();
    let t = l.stats().total();
    assert_eq!((t.accepted, t.delivered, t.rejected.reset), (5, 4, 1));
}

#[test]
fn proxy_v2_in_two_writes_is_deferred_then_admitted_with_original_address() {
    let _g = serial();
    let seen: Arc<Mutex<Option<(SocketAddr, SocketAddr, usize)>>> = Arc::default();
    let s = seen.clone();
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .peek(232, Duration::from_millis(5))
        .condition(ProxyProtocol::new(move |p: &Proxied<'_>| {
            if let Ok(mut g) = s.lock() {
                *g = Some((p.request.peer, p.proxy, p.header_len()));
            }
            Verdict::accept()
        }))
        .build()
        .unwrap();
    let addr = l.local_addr();
    let original: SocketAddr = "192.0.2.44:5151".parse().unwrap();
    let header = proxy_protocol::encode_v2(original, addr);

    let mut client = connect(addr).unwrap();
    client.write_all(&header[..10]).unwrap();
    wait_for("a defer on the partial header", || {
        l.stats().total().deferred >= 1
    });
    assert!(seen.lock().unwrap().is_none());
    client.write_all(&header[10..]).unwrap();
    client.write_all(b"ping").unwrap();

    let mut conn = l.accept().unwrap();
    let (peer, proxy, hlen) = seen.lock().unwrap().expect("inner called");
    assert_eq!(peer, original);
    assert_eq!(proxy, client.local_addr().unwrap());
    assert_eq!(hlen, header.len());
    // The header is still in the stream: skip header_len bytes.
    let mut buf = vec![0u8; hlen + 4];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf[..hlen], &header[..]);
    assert_eq!(&buf[hlen..], b"ping");
    l.shutdown();
    assert!(l.stats().conserved());
}

#[test]
fn tls_client_hello_is_routed_by_sni() {
    let _g = serial();
    let route = Sni::new(|_r: &ConnectRequest<'_>, name: Option<&str>| match name {
        Some(n) if n.ends_with(".test") => Verdict::Accept {
            qos: None,
            reply: Some(format!("routed:{n}\n").into_bytes()),
            value: None,
        },
        _ => Verdict::Reject {
            how: RejectHow::Close,
            reply: Some(b"unknown\n".to_vec()),
        },
    });
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .peek(512, Duration::from_millis(5))
        .pending_timeout(WAIT)
        .condition(route)
        .build()
        .unwrap();
    let addr = l.local_addr();

    let mut c = connect(addr).unwrap();
    c.write_all(&sni::client_hello("example.test")).unwrap();
    let mut reply = [0u8; 20];
    c.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"routed:example.test\n");
    let conn = l.accept().unwrap();

    let mut other = connect(addr).unwrap();
    other.write_all(&sni::client_hello("example.org")).unwrap();
    let (got, _) = read_end(&mut other);
    assert_eq!(got, b"unknown\n");
    drop(conn);
    l.shutdown();
    let t = l.stats().total();
    assert_eq!((t.delivered, t.rejected.close), (1, 1));
}

/// A listener that routes TLS by SNI with the default settings (no peek):
/// it answers `routed:<name>\n` before the application gets the stream.
fn sni_router() -> Listener {
    Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .pending_timeout(WAIT)
        .condition(Sni::new(|_r, name| match name {
            Some(n) => Verdict::accept().with_reply(format!("routed:{n}\n")),
            None => Verdict::close(),
        }))
        .build()
        .unwrap()
}

#[test]
fn sni_with_default_settings_takes_an_openssl_sized_hello() {
    let _g = serial();
    let l = sni_router();
    // OpenSSL pads its ClientHello to 517 bytes; post-quantum key shares
    // make hellos of 1.2 KiB and more.
    for size in [517usize, 1400, 3000] {
        let hello = sni::client_hello_padded("pad.test", size);
        assert_eq!(hello.len(), size);
        let mut c = connect(l.local_addr()).unwrap();
        c.write_all(&hello).unwrap();
        let mut reply = [0u8; 16];
        c.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"routed:pad.test\n", "hello of {size} bytes");
        drop(l.accept().unwrap());
    }
    // Sent in pieces, it is decided once the last piece arrives.
    let hello = sni::client_hello_padded("slow.test", 517);
    let mut c = connect(l.local_addr()).unwrap();
    for piece in hello.chunks(100) {
        c.write_all(piece).unwrap();
    }
    let mut reply = [0u8; 17];
    c.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"routed:slow.test\n");
    drop(l.accept().unwrap());
    l.shutdown();
    let t = l.stats().total();
    assert_eq!((t.delivered, t.withdrawn.total()), (4, 0), "{t:?}");
}

#[test]
fn sni_with_a_short_peek_still_completes_a_longer_hello() {
    let _g = serial();
    // The documented peek(512) against OpenSSL's 517-byte hello: the
    // condition sees peek_full and asks for the rest.
    let full_seen = Arc::new(Mutex::new(Vec::new()));
    let f = full_seen.clone();
    let route = Sni::new(|_r, name| match name {
        Some(n) => Verdict::accept().with_reply(format!("routed:{n}\n")),
        None => Verdict::close(),
    });
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .peek(512, WAIT)
        .pending_timeout(WAIT)
        .condition(move |req: &ConnectRequest<'_>| {
            f.lock()
                .unwrap()
                .push((req.first_bytes.len(), req.peek_full));
            route.decide(req)
        })
        .build()
        .unwrap();
    let mut c = connect(l.local_addr()).unwrap();
    c.write_all(&sni::client_hello_padded("pad.test", 517))
        .unwrap();
    let mut reply = [0u8; 16];
    c.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"routed:pad.test\n");
    let seen = full_seen.lock().unwrap().clone();
    assert_eq!(seen, vec![(512, true), (517, true)]);
    l.shutdown();
}

#[test]
fn proxy_v2_with_long_tlvs_needs_no_peek_setting() {
    let _g = serial();
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .pending_timeout(WAIT)
        .condition(ProxyProtocol::new(|p: &Proxied<'_>| {
            Verdict::accept().with_reply(format!("{}\n", p.request.peer))
        }))
        .build()
        .unwrap();
    // A v2 header with 600 bytes of TLVs (NOOP), longer than any fixed peek
    // that used to be documented.
    let mut h = proxy_protocol::encode_v2(
        "192.0.2.44:4444".parse().unwrap(),
        "198.51.100.1:443".parse().unwrap(),
    );
    let tlv_len = 600u16;
    let len = u16::from_be_bytes([h[14], h[15]]) + 3 + tlv_len;
    h[14..16].copy_from_slice(&len.to_be_bytes());
    h.push(0x04);
    h.extend_from_slice(&tlv_len.to_be_bytes());
    h.extend(std::iter::repeat(0u8).take(tlv_len as usize));
    let mut c = connect(l.local_addr()).unwrap();
    c.write_all(&h).unwrap();
    let mut reply = [0u8; 16];
    c.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"192.0.2.44:4444\n");
    l.shutdown();
}

#[test]
fn rate_limit_charges_a_slow_tls_client_once() {
    let _g = serial();
    // Burst 3 at a negligible refill: exactly three connections may pass.
    let asked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let a = asked.clone();
    let chain = floodgate::conditions::Chain::new(RateLimit::new(1, 0.000_001, 3, 100).unwrap())
        .then(move |_: &ConnectRequest<'_>| {
            a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Verdict::accept()
        })
        .then(Sni::new(|_r, name| match name {
            Some(n) => Verdict::accept().with_reply(format!("routed:{n}\n")),
            None => Verdict::close(),
        }));
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .pending_timeout(WAIT)
        .condition(chain)
        .build()
        .unwrap();
    let hello = sni::client_hello_padded("slow.test", 517);
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = connect(l.local_addr()).unwrap();
        // The record header first, and a wait until the chain has seen it;
        // then the rest: at least two evaluations of each connection.
        let before = asked.load(std::sync::atomic::Ordering::SeqCst);
        c.write_all(&hello[..100]).unwrap();
        wait_for("asked on the first piece", || {
            asked.load(std::sync::atomic::Ordering::SeqCst) > before
        });
        c.write_all(&hello[100..]).unwrap();
        clients.push(c);
    }
    for mut c in clients {
        let mut reply = [0u8; 17];
        c.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"routed:slow.test\n");
        drop(l.accept().unwrap());
    }
    // The fourth from the same source is over the limit.
    let mut c = connect(l.local_addr()).unwrap();
    let _ = c.write_all(&hello);
    let (got, _) = read_end(&mut c);
    assert!(got.is_empty());
    l.shutdown();
    let t = l.stats().total();
    assert_eq!((t.delivered, t.rejected.reset), (3, 1), "{t:?}");
}

#[test]
fn an_address_decision_needs_no_byte() {
    let _g = serial();
    // Deny 127.0.0.2 first; then PROXY headers, optional, for the rest.
    let chain =
        floodgate::conditions::Chain::new(CidrFilter::new().deny("127.0.0.2/32".parse().unwrap()))
            .then(
                ProxyProtocol::new(|p: &Proxied<'_>| {
                    Verdict::accept().with_reply(format!("hello {}\n", p.request.peer.ip()))
                })
                .optional(true),
            );
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .pending_timeout(WAIT)
        .condition(chain)
        .build()
        .unwrap();
    // A denied caller that sends nothing is refused at once, not at a
    // peek's deadline or its pending timeout.
    let mut denied = connect_from("127.0.0.2", l.local_addr());
    let (got, _) = read_end(&mut denied);
    assert!(got.is_empty());
    // A plain request shorter than any PROXY header is passed on as soon
    // as its bytes show it is not one.
    let mut plain = connect(l.local_addr()).unwrap();
    plain.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut reply = [0u8; 16];
    plain.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"hello 127.0.0.1\n");
    drop(l.accept().unwrap());
    l.shutdown();
    let t = l.stats().total();
    assert_eq!(
        (t.rejected.close, t.delivered, t.withdrawn.total()),
        (1, 1, 0),
        "{t:?}"
    );
}
