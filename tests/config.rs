//! Configuration: bad values are refused naming the field; a backlog above
//! the ceiling is clamped silently.

use std::net::TcpListener;

use floodgate::{kernel_somaxconn, Error, Listener};
use floodgate_tests::{cores, serial};

fn field_of(r: Result<Listener, Error>) -> &'static str {
    match r {
        Err(Error::Config(e)) => {
            assert!(
                e.to_string().contains(e.field),
                "message names the field: {e}"
            );
            e.field
        }
        Err(e) => panic!("expected a configuration error, got {e}"),
        Ok(_) => panic!("expected a configuration error, got a listener"),
    }
}

#[test]
fn zero_shards_is_refused() {
    let _g = serial();
    assert_eq!(
        field_of(
            Listener::builder("127.0.0.1:0".parse().unwrap())
                .shards(0)
                .build()
        ),
        "shards"
    );
}

#[test]
fn zero_backlog_is_refused() {
    let _g = serial();
    assert_eq!(
        field_of(
            Listener::builder("127.0.0.1:0".parse().unwrap())
                .backlog(0)
                .build()
        ),
        "backlog"
    );
}

#[test]
fn zero_ceiling_is_refused() {
    let _g = serial();
    assert_eq!(
        field_of(
            Listener::builder("127.0.0.1:0".parse().unwrap())
                .ceiling(0)
                .build()
        ),
        "ceiling"
    );
}

#[test]
fn more_shards_than_cores_with_pinning_is_refused() {
    let _g = serial();
    let n = cores().len() + 1;
    let r = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(n)
        .build();
    assert_eq!(field_of(r), "shards");
    // Without pinning it is allowed.
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(n)
        .pin(false)
        .build()
        .unwrap();
    assert_eq!(l.shards(), n);
}

#[test]
fn address_in_use_without_reuseport_names_the_address() {
    let _g = serial();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    match Listener::builder(addr).build() {
        Err(e @ Error::Bind { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("`addr`") && msg.contains(&addr.to_string()),
                "{msg}"
            );
        }
        other => panic!("expected a bind error, got {other:?}"),
    }
}

#[test]
fn backlog_above_the_ceiling_is_clamped_not_refused() {
    let _g = serial();
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .backlog(100_000)
        .ceiling(64)
        .build()
        .unwrap();
    let b = l.backlog();
    assert_eq!((b.requested, b.ceiling, b.effective), (100_000, 64, 64));
    let s = &l.stats().shards[0];
    assert_eq!(s.ring_capacity, 64);
    assert_eq!(
        s.kernel.unwrap().backlog,
        64,
        "listen(2) got the effective length"
    );
}

#[test]
fn default_ceiling_is_somaxconn() {
    let _g = serial();
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .backlog(usize::MAX)
        .build()
        .unwrap();
    let somaxconn = kernel_somaxconn().expect("somaxconn readable");
    assert_eq!(l.backlog().ceiling, somaxconn);
    assert_eq!(l.backlog().effective, somaxconn);
}

#[test]
fn ipv6_loopback_works() {
    let _g = serial();
    let l = Listener::builder("[::1]:0".parse().unwrap())
        .shards(1)
        .build()
        .unwrap();
    let _c = std::net::TcpStream::connect(l.local_addr()).unwrap();
    let conn = l.accept().unwrap();
    assert!(conn.peer_addr().unwrap().is_ipv6());
}

#[test]
fn an_unknown_congestion_control_is_refused_naming_attrs_congestion() {
    let _g = serial();
    let attrs = floodgate::SocketAttrs {
        congestion: Some("no-such-cc".into()),
        ..Default::default()
    };
    match Listener::builder("127.0.0.1:0".parse().unwrap())
        .attrs(attrs)
        .build()
    {
        Err(Error::Config(e)) => {
            assert_eq!(e.field, "attrs.congestion");
            let msg = e.to_string();
            assert!(msg.contains("no-such-cc"), "names the value: {msg}");
            assert!(
                !msg.contains("keepalive"),
                "no dump of every attribute: {msg}"
            );
        }
        Err(e) => panic!("expected a configuration error, got {e}"),
        Ok(_) => panic!("the kernel accepted a congestion control that does not exist"),
    }
}

#[test]
fn a_ceiling_above_somaxconn_reports_the_queue_the_kernel_keeps() {
    let _g = serial();
    let Some(somaxconn) = kernel_somaxconn() else {
        return;
    };
    let l = Listener::builder("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .ceiling(somaxconn * 4)
        .backlog(somaxconn * 2)
        .build()
        .unwrap();
    let b = l.backlog();
    assert_eq!(b.effective, somaxconn * 2, "the ring holds what was asked");
    assert_eq!(b.kernel, somaxconn, "listen(2) caps the kernel's queue");
    let k = l.stats().shards[0].kernel.expect("the kernel's view");
    assert_eq!(
        k.backlog as usize, b.kernel,
        "what the kernel says it enforces"
    );
}
