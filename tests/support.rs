//! Shared helpers for Floodgate's loopback integration tests.
//!
//! The tests live in this separate crate (not in `engine/tests`) so that they
//! use the engine only through its public API, as an application does, and
//! so that helper binaries (`floodgate-probe`, run in child processes for
//! the fd-exhaustion and no-io_uring cases) can be built beside them.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Tests in one binary share the process's fd table; the ones that check
/// descriptors hold this lock so that no other test opens any meanwhile.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// The process's fd table at one moment: each open descriptor with what it
/// points at (`socket:[inode]`, `anon_inode:[eventpoll]`, a path).
///
/// A test compares the table at its end with the one at its start by
/// content, not by count: a descriptor of an earlier test that is closed
/// late (by a thread that outlived its test, as a runtime's workers can
/// outlive the runtime's drop) makes the count drop, while a descriptor this
/// test leaked is always new, even where its number was reused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdTable(std::collections::BTreeSet<(String, String)>);

impl FdTable {
    /// The table now.
    pub fn now() -> Self {
        let mut set = std::collections::BTreeSet::new();
        // The listing's own descriptor, whatever number it gets.
        let listing = format!("/proc/{}/fd", std::process::id());
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            for entry in dir.flatten() {
                if let Ok(target) = std::fs::read_link(entry.path()) {
                    if target.as_os_str() == listing.as_str() {
                        continue;
                    }
                    set.insert((
                        entry.file_name().to_string_lossy().into_owned(),
                        target.to_string_lossy().into_owned(),
                    ));
                }
            }
        }
        FdTable(set)
    }

    /// Descriptors open now that were not in this table.
    pub fn opened_since(&self) -> Vec<String> {
        FdTable::now()
            .0
            .difference(&self.0)
            .map(|(fd, target)| format!("{fd} -> {target}"))
            .collect()
    }

    /// Waits until every descriptor opened since this table is closed (a
    /// runtime's threads close theirs after its drop returns), as
    /// [`wait_for`] does; panics naming those still open if they stay.
    pub fn assert_back(&self, what: &str) {
        let give_up = Instant::now() + Duration::from_secs(120);
        loop {
            let new = self.opened_since();
            if new.is_empty() {
                return;
            }
            assert!(
                Instant::now() < give_up,
                "{what}: descriptors left open: {new:?}"
            );
            std::thread::park_timeout(Duration::from_millis(1));
        }
    }
}

/// Sockets held in the direct-descriptor tables of this process's io_uring
/// instances, as the kernel lists them (`/proc/self/fdinfo/<ring>`: one
/// `N: socket:[inode]` line per occupied slot). Direct sockets are not in
/// the fd table, so [`FdTable`] cannot see them; this can.
pub fn ring_held_sockets() -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    let mut held = 0;
    for entry in dir.flatten() {
        let is_ring = std::fs::read_link(entry.path())
            .map(|l| l.to_string_lossy().contains("io_uring"))
            .unwrap_or(false);
        if !is_ring {
            continue;
        }
        let info = format!("/proc/self/fdinfo/{}", entry.file_name().to_string_lossy());
        if let Ok(text) = std::fs::read_to_string(info) {
            held += text
                .lines()
                .filter(|l| {
                    let l = l.trim_start();
                    l.split_once(':').is_some_and(|(n, rest)| {
                        n.chars().all(|c| c.is_ascii_digit())
                            && rest.trim_start().starts_with("socket:")
                    })
                })
                .count();
        }
    }
    held
}

/// A one-shard, unpinned Floodgate listener on a free loopback port whose
/// inline handler replies `x` and closes each connection: the server most
/// connect-side tests load.
pub fn banner_listener() -> floodgate::Listener {
    floodgate::Listener::builder("127.0.0.1:0".parse().expect("a loopback address"))
        .shards(1)
        .pin(false)
        .handler(|conn, ctx| {
            // The client may already have reset; the engine closes the
            // socket either way.
            let _ = ctx.reply_and_close(conn, b"x");
        })
        .build()
        .expect("start a listener")
}

/// Waits until `cond` holds, re-checking whenever the engine may have moved.
/// It waits on a count, not on a clock: the 120 s bound only turns a hang
/// into a failure that names `what`.
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let give_up = Instant::now() + Duration::from_secs(120);
    while !cond() {
        assert!(Instant::now() < give_up, "gave up waiting for: {what}");
        std::thread::park_timeout(Duration::from_millis(1));
    }
}

/// A listener on a loopback port with one driven shard, and that shard.
pub fn one_driven_shard() -> (floodgate::Listener, floodgate::DrivenShard) {
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let (listener, mut shards) = floodgate::Listener::builder(loopback)
        .shards(1)
        .build_driven()
        .expect("build driven");
    let shard = shards.pop().expect("one shard");
    (listener, shard)
}

/// Connects to `addr`, retrying while the kernel answers with a transient
/// refusal (a full SYN queue can make connect fail with EAGAIN on loopback).
pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let mut tries = 0;
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => return Ok(s),
            Err(e) if tries < 100 && e.raw_os_error() == Some(libc::EAGAIN) => tries += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Connects to `addr` from the loopback address `src` (any port).
pub fn connect_from(src: std::net::IpAddr, addr: SocketAddr) -> io::Result<TcpStream> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.bind(&SocketAddr::new(src, 0).into())?;
    s.connect(&addr.into())?;
    Ok(s.into())
}

/// A client from `src` that the server ends (closes or resets) and that
/// then resets: whether it was ended by the server. A server that resets
/// at once (a reset verdict decided on the address alone) may do so
/// before the client's blocking `connect()` has looked at its socket
/// again: the connect then fails with ECONNRESET, which is the same
/// outcome seen earlier, not a failure of the connect.
pub fn ended_by_server_from(src: std::net::IpAddr, addr: SocketAddr) -> io::Result<bool> {
    match connect_from(src, addr) {
        Ok(mut c) => {
            let ended = ended_by_server(&mut c);
            reset_on_drop(&c);
            Ok(ended)
        }
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(true),
        Err(e) => Err(e),
    }
}

/// Sets SO_LINGER 0 so that dropping `s` sends an RST and leaves no
/// TIME_WAIT behind (tests make tens of thousands of connections).
pub fn reset_on_drop(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// A client that sends `id` (8 bytes), waits for the server to close, then
/// resets.
pub fn tagged_client(addr: SocketAddr, id: u64) -> io::Result<()> {
    let mut s = connect(addr)?;
    s.write_all(&id.to_le_bytes())?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)?;
    reset_on_drop(&s);
    Ok(())
}

/// Reads the 8-byte id a [`tagged_client`] sent.
pub fn read_id(s: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// The other end of [`gated_handler`]: lets the held connection go, and
/// reads the ids in the order the handler got them.
pub struct Gate {
    release: std::sync::mpsc::Sender<()>,
    seen: std::sync::mpsc::Receiver<u64>,
}

impl Gate {
    /// Lets the handler go on past the connection with id 0.
    pub fn release(&self) {
        self.release.send(()).expect("the handler is alive");
    }

    /// The next id the handler got.
    pub fn next(&self) -> u64 {
        self.seen.recv().expect("the handler is alive")
    }
}

/// An inline handler for ordering tests: it reads each connection's id
/// (as a [`tagged_client`] sends it), holds the shard on id 0 until
/// [`Gate::release`], and reports every id to the [`Gate`].
pub fn gated_handler() -> (
    Gate,
    impl Fn(floodgate::Admitted, &mut floodgate::ShardContext<'_>) + Send + Sync + 'static,
) {
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    let (seen_tx, seen) = std::sync::mpsc::channel::<u64>();
    let (release_rx, seen_tx) = (Mutex::new(release_rx), Mutex::new(seen_tx));
    let handler = move |mut conn: floodgate::Admitted, _: &mut floodgate::ShardContext<'_>| {
        let id = read_id(&mut conn).expect("the client sends its id");
        if id == 0 {
            // Holds the shard until the test releases it.
            let _ = release_rx.lock().expect("not poisoned").recv();
        }
        let _ = seen_tx.lock().expect("not poisoned").send(id);
    };
    (Gate { release, seen }, handler)
}

/// Pins the calling thread to `core`, if it exists.
pub fn pin(core: usize) -> bool {
    core_affinity::get_core_ids()
        .and_then(|ids| ids.into_iter().find(|c| c.id == core))
        .map(core_affinity::set_for_current)
        .unwrap_or(false)
}

/// The cores this process may run on.
pub fn cores() -> Vec<usize> {
    core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect()
}

/// Reads from `s` until the server ends the connection: true on EOF or a
/// reset, false if nothing ended it within the 120 s bound (which only turns
/// a hang into a failure; the tests wait on the event).
pub fn ended_by_server(s: &mut TcpStream) -> bool {
    let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
}

/// Whether the kernel still has a TCP socket (IPv4, any state) whose local
/// port is `local` and remote port `remote`, from `/proc/net/tcp`: the way to
/// see the server's end of a connection the engine holds but has not
/// handed out.
pub fn tcp_socket_exists(local: u16, remote: u16) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let port = |field: &str| {
        field
            .rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
    };
    text.lines().skip(1).any(|l| {
        let mut f = l.split_whitespace().skip(1);
        let (Some(loc), Some(rem)) = (f.next(), f.next()) else {
            return false;
        };
        port(loc) == Some(local) && port(rem) == Some(remote)
    })
}

/// The rows of `/proc/net/tcp` and `/proc/net/tcp6` of the sockets in
/// LISTEN state on local `port`, whoever holds them, split into fields.
fn listening_rows(port: u16) -> Vec<Vec<String>> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        })
        .filter(|f| {
            let local = f.get(1).and_then(|a| a.rsplit_once(':'));
            local.and_then(|(_, p)| u16::from_str_radix(p, 16).ok()) == Some(port)
                && f.get(3).map(String::as_str) == Some("0A")
        })
        .collect()
}

/// How many sockets in LISTEN state the kernel has on local `port`, over
/// `/proc/net/tcp` and `/proc/net/tcp6`, whoever holds them: a process
/// that died keeps its listening sockets until its io_uring is torn down.
pub fn listening_on(port: u16) -> usize {
    listening_rows(port).len()
}

/// How many connections wait in the accept queues of the listening sockets
/// on local `port` (`/proc/net/tcp`'s `rx_queue` of a LISTEN socket is its
/// accept queue's length), over IPv4 and IPv6.
pub fn accept_queue(port: u16) -> usize {
    listening_rows(port)
        .iter()
        .filter_map(|f| f.get(4)?.split_once(':'))
        .filter_map(|(_, rx)| usize::from_str_radix(rx, 16).ok())
        .sum()
}

/// A tracing subscriber that keeps every event as a line of text,
/// `level=.. target=.. field=value ...` (feature `tracing`).
#[cfg(feature = "tracing")]
pub mod capture {
    use std::fmt::Write;
    use std::sync::{Arc, Mutex};

    use tracing::field::{Field, Visit};
    use tracing::{Event, Subscriber};
    use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

    /// The events captured, oldest first.
    pub type Events = Arc<Mutex<Vec<String>>>;

    struct Capture(Events);

    struct Line(String);

    impl Visit for Line {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            let _ = write!(self.0, " {}={:?}", field.name(), value);
        }
    }

    impl<S: Subscriber> Layer<S> for Capture {
        fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
            let m = event.metadata();
            let mut line = Line(format!("level={} target={}", m.level(), m.target()));
            event.record(&mut line);
            if let Ok(mut v) = self.0.lock() {
                v.push(line.0);
            }
        }
    }

    /// Installs the capture as the global subscriber.
    pub fn install() -> Events {
        let events = Events::default();
        let subscriber = tracing_subscriber::registry().with(Capture(events.clone()));
        if tracing::subscriber::set_global_default(subscriber).is_err() {
            eprintln!("a global tracing subscriber was already set");
        }
        events
    }

    /// The events captured so far.
    pub fn take(events: &Events) -> Vec<String> {
        events
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }
}

/// An upstream listener; the test accepts from it ([`accept_from`]) and
/// keeps the sockets silent until it means to use them.
pub fn silent_upstream() -> TcpListener {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    l
}

/// The next connection the relay dialled to `up`; the bound only turns a
/// dial that never comes into a failure.
pub fn accept_from(up: &TcpListener) -> TcpStream {
    let give_up = Instant::now() + Duration::from_secs(120);
    loop {
        match up.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return s;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < give_up, "the relay never dialled");
                std::thread::park_timeout(Duration::from_millis(1));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// One byte each way through a relay whose upstream end is `s`.
pub fn still_relays(c: &mut TcpStream, s: &mut TcpStream) {
    let mut b = [0u8; 1];
    c.write_all(b"a").unwrap();
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"a");
    s.write_all(b"b").unwrap();
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"b");
}

/// A loopback port that refuses connections and stays so for as long as
/// the returned socket lives: bound, never listening. (A port bound and
/// closed again can be taken meanwhile by any other program's listener or
/// client on the machine.)
pub fn refusing_port() -> (socket2::Socket, SocketAddr) {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("loopback");
    s.bind(&any.into()).expect("bind");
    let addr = s
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("bound address");
    (s, addr)
}

/// A listener whose inline handler relays every connection to `upstream`
/// (default options, default shards).
pub fn relay_listener(upstream: SocketAddr) -> floodgate::Listener {
    floodgate::Listener::builder("127.0.0.1:0".parse().expect("loopback"))
        .handler(move |conn, ctx| {
            let _ = ctx.relay(conn, upstream, floodgate::RelayOptions::default());
        })
        .build()
        .expect("relay listener")
}

/// The listener's relay counters, summed over its shards.
pub fn relays(l: &floodgate::Listener) -> floodgate::RelayStats {
    l.stats().total().relays
}

/// Connects `per_core` tagged clients ([`tagged_client`]) from each of the
/// first `n` of `cores` (ids `k * per_core + i`), so that CPU steering
/// sends some to every shard; returns once all have connected and sent.
pub fn tagged_clients_from_cores(target: SocketAddr, cores: &[usize], n: usize, per_core: u64) {
    let clients: Vec<_> = (0..n)
        .map(|k| {
            let core = cores.get(k).copied();
            std::thread::spawn(move || {
                if let Some(c) = core {
                    pin(c);
                }
                for i in 0..per_core {
                    tagged_client(target, k as u64 * per_core + i).expect("client");
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client thread");
    }
}

/// Receives `total` `(shard, id)` reports, asserting that no id comes
/// twice; returns how many each of `shards` reported.
pub fn each_id_once(
    rx: &std::sync::mpsc::Receiver<(usize, u64)>,
    total: u64,
    shards: usize,
) -> Vec<u64> {
    let mut seen = std::collections::HashSet::new();
    let mut by_shard = vec![0u64; shards];
    for _ in 0..total {
        let (shard, id) = rx.recv().expect("every connection is delivered");
        assert!(seen.insert(id), "id {id} delivered twice");
        by_shard[shard] += 1;
    }
    assert_eq!(seen.len() as u64, total);
    by_shard
}
