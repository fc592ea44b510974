//! Adopting listening sockets: the application's own, and systemd's
//! (socket activation, set up in a child exactly as systemd does).

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

use floodgate::{Error, Listener, SteeringInForce};
use floodgate_tests::{connect, cores, reset_on_drop, serial, FdTable};
use socket2::{Domain, Protocol, Socket, Type};

const PROBE: &str = env!("CARGO_BIN_EXE_floodgate-probe");

fn banner(conn: floodgate::Admitted, ctx: &mut floodgate::ShardContext<'_>) {
    let _ = ctx.reply_and_close(conn, b"x");
}

fn read_banner(mut s: TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    reset_on_drop(&s);
    got
}

fn reuseport_listener(addr: SocketAddr) -> Socket {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    s.set_reuse_port(true).unwrap();
    s.bind(&addr.into()).unwrap();
    s.listen(128).unwrap();
    s
}

#[test]
fn an_owned_std_listener_is_adopted_with_the_connections_already_in_its_queue() {
    let _g = serial();
    let fds = FdTable::now();
    let std_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = std_listener.local_addr().unwrap();
    // Waiting in the kernel's queue before the engine exists.
    let queued: Vec<TcpStream> = (0..5).map(|_| connect(addr).unwrap()).collect();
    let listener = Listener::adopt([std_listener])
        .shards(1)
        .pin(false)
        .handler(banner)
        .build()
        .expect("adopt a std listener");
    assert_eq!(listener.local_addr(), addr);
    for s in queued {
        assert_eq!(read_banner(s), b"x", "a queued connection was served");
    }
    assert_eq!(read_banner(connect(addr).unwrap()), b"x");
    listener.shutdown();
    let t = listener.stats().total();
    assert_eq!(t.accepted, 6);
    assert!(listener.stats().conserved());
    drop(listener);
    fds.assert_back("the adopted socket is closed with the listener");
}

#[test]
fn sockets_that_are_not_listening_tcp_are_refused_naming_the_field() {
    let _g = serial();
    let fds = FdTable::now();
    let bound = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    bound
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for (what, r) in [
        (
            "bound, not listening",
            Listener::adopt([bound]).shards(1).build(),
        ),
        ("UDP", Listener::adopt([udp]).shards(1).build()),
        (
            "none",
            Listener::adopt(Vec::<TcpListener>::new()).shards(1).build(),
        ),
    ] {
        match r {
            Err(Error::Config(e)) => assert_eq!(e.field, "sockets", "{what}: {e}"),
            other => panic!("{what}: {other:?}"),
        }
    }
    // Without SO_REUSEPORT no sibling can join: more shards are refused.
    if cores().len() >= 2 {
        let plain = TcpListener::bind("127.0.0.1:0").unwrap();
        match Listener::adopt([plain]).shards(2).build() {
            Err(Error::Config(e)) => assert_eq!(e.field, "shards", "{e}"),
            other => panic!("2 shards on a plain socket: {other:?}"),
        }
    }
    fds.assert_back("refused sockets are closed");
}

#[test]
fn fewer_sockets_get_siblings_and_more_are_shared_out_with_every_one_served() {
    let _g = serial();
    let n = cores().len().min(2);
    let fds = FdTable::now();
    // One reuseport socket, n shards: siblings join, steering attached.
    let one = reuseport_listener("127.0.0.1:0".parse().unwrap());
    let addr = one.local_addr().unwrap().as_socket().unwrap();
    let listener = Listener::adopt([one])
        .shards(n)
        .handler(banner)
        .build()
        .unwrap();
    assert_eq!(listener.steering(), SteeringInForce::Program);
    for _ in 0..200 {
        assert_eq!(read_banner(connect(addr).unwrap()), b"x");
    }
    listener.shutdown();
    assert_eq!(listener.stats().total().accepted, 200);
    drop(listener);
    // Three sockets, one shard: connections queued on each are all served.
    let first = reuseport_listener("127.0.0.1:0".parse().unwrap());
    let addr = first.local_addr().unwrap().as_socket().unwrap();
    let three = vec![first, reuseport_listener(addr), reuseport_listener(addr)];
    let queued: Vec<TcpStream> = (0..60).map(|_| connect(addr).unwrap()).collect();
    let listener = Listener::adopt(three)
        .shards(1)
        .pin(false)
        .handler(banner)
        .build()
        .unwrap();
    for s in queued {
        assert_eq!(read_banner(s), b"x");
    }
    listener.shutdown();
    assert_eq!(listener.stats().total().accepted, 60);
    assert!(listener.stats().conserved());
    drop(listener);
    fds.assert_back("fd table back to baseline");
}

/// Starts the probe as systemd starts a socket-activated service: the
/// socket at fd 3, `LISTEN_FDS=1`, `LISTEN_FDNAMES=web`, and `LISTEN_PID`
/// the child's own pid (`$$` of the shell that then execs in place).
fn activated(socket: &Socket, pid: &str, shards: usize) -> (std::process::Child, String) {
    socket.set_cloexec(false).unwrap();
    let script = format!(
        "exec 3<&{fd}; [ {fd} -ne 3 ] && exec {fd}<&-; \
         exec env LISTEN_PID={pid} LISTEN_FDS=1 LISTEN_FDNAMES=web \"$0\" systemd web {shards}",
        fd = socket.as_raw_fd(),
    );
    let mut child = Command::new("sh")
        .args(["-c", &script, PROBE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the probe");
    socket.set_cloexec(true).unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line)
}

#[test]
fn systemd_socket_activation_is_adopted_in_a_child_as_systemd_sets_it_up() {
    let _g = serial();
    let n = cores().len().min(2);
    let socket = reuseport_listener("127.0.0.1:0".parse().unwrap());
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    // Waiting before the service even started.
    let early: Vec<TcpStream> = (0..3).map(|_| connect(addr).unwrap()).collect();
    let (mut child, line) = activated(&socket, "$$", n);
    assert_eq!(
        line.trim(),
        format!("OK addr={addr} shards={n} unset=true cloexec=true"),
        "the probe's report"
    );
    // The parent lets go of its copy: the child's keeps the queue.
    drop(socket);
    for s in early {
        assert_eq!(read_banner(s), b"x", "a connection from before activation");
    }
    for _ in 0..100 {
        assert_eq!(read_banner(connect(addr).unwrap()), b"x");
    }
    drop(child.stdin.take());
    assert!(
        child.wait().unwrap().success(),
        "the probe's stats conserved"
    );
}

#[test]
fn descriptors_meant_for_another_pid_are_refused() {
    let _g = serial();
    let socket = reuseport_listener("127.0.0.1:0".parse().unwrap());
    let (mut child, line) = activated(&socket, "1", 1);
    assert_eq!(line.trim(), "REFUSED LISTEN_PID");
    drop(child.stdin.take());
    let _ = child.wait();
}
