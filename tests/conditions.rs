//! Ready-made conditions on real loopback connections: CIDR filter, rate
//! limit, PROXY protocol and SNI routing.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use floodgate::conditions::{CidrFilter, Proxied, ProxyProtocol, RateLimit, Refusal, Sni};
use floodgate::{proxy_protocol, sni, ConnectRequest, Listener, RejectHow, Verdict};
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
