//! The servers the fair accept-latency measurement compares, one function each.
//!
//! Each [`Start`] function starts a server on a fresh loopback port whose acceptor runs on a
//! thread pinned to [`SERVER_CORE`] and reports every accepted socket to the [`Probe`]
//! ([`Probe::held`]) the moment the application code holds it; it returns a [`Running`] that
//! stops the server, joins its threads and closes its descriptors when dropped. A new peer is
//! one more such function and one more line in [`PEERS`].

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use floodgate::{Backend, Error, Listener};
use io_uring::{cqueue, opcode, types, IoUring};

use super::{allowed_cpus, pin_here, thread_ids, Probe, SERVER_CORE, STEP_TIMEOUT};

/// Starts a peer reporting to the probe.
pub type Start = fn(Arc<Probe>) -> Result<Running, String>;

/// A peer: the name printed in reports, and how to start it.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// Name in reports (criterion's benchmark id).
    pub name: &'static str,
    /// Starts it.
    pub start: Start,
}

/// Every peer, in report order.
pub const PEERS: &[Peer] = &[
    Peer {
        name: "std_blocking",
        start: std_blocking,
    },
    Peer {
        name: "mio_epoll",
        start: mio_epoll,
    },
    Peer {
        name: "tokio_current_thread",
        start: tokio_current_thread,
    },
    Peer {
        name: "raw_io_uring",
        start: raw_io_uring,
    },
    Peer {
        name: "floodgate_handler",
        start: floodgate_handler,
    },
    Peer {
        name: "floodgate_driven",
        start: floodgate_driven,
    },
    Peer {
        name: "floodgate_accept",
        start: floodgate_accept,
    },
    Peer {
        name: "floodgate_epoll_handler",
        start: floodgate_epoll_handler,
    },
];

/// Starts `peer` and checks that every thread it started may run on the server core only;
/// the error names a thread that may run elsewhere.
pub fn start_checked(peer: Peer, probe: Arc<Probe>) -> Result<Running, String> {
    let before = thread_ids().map_err(|e| format!("/proc/self/task: {e}"))?;
    let running = (peer.start)(probe)?;
    let after = thread_ids().map_err(|e| format!("/proc/self/task: {e}"))?;
    let want = SERVER_CORE.to_string();
    for tid in after.into_iter().filter(|t| !before.contains(t)) {
        let Some(allowed) = allowed_cpus(tid) else {
            continue; // exited meanwhile
        };
        let name =
            std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).unwrap_or_default();
        // A test harness runs other tests on threads named after them
        // (`module::tests::…`), which may start meanwhile: not the peer's.
        if name.contains("::") {
            continue;
        }
        if allowed != want {
            return Err(format!(
                "{}: thread {tid} ({}) may run on cpus {allowed}, not only on core {want}",
                peer.name,
                name.trim()
            ));
        }
    }
    Ok(running)
}

/// The peer named `name`.
pub fn find(name: &str) -> Option<Peer> {
    PEERS.iter().copied().find(|p| p.name == name)
}

/// A running peer server. Dropping it stops the server and joins its threads.
pub struct Running {
    addr: SocketAddr,
    stop: Option<Box<dyn FnOnce() + Send>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running").field("addr", &self.addr).finish()
    }
}

impl Running {
    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop();
        }
    }
}

fn loopback() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

fn bind() -> Result<(TcpListener, SocketAddr), String> {
    let l = TcpListener::bind(loopback()).map_err(|e| format!("bind 127.0.0.1:0: {e}"))?;
    let addr = l.local_addr().map_err(|e| format!("getsockname: {e}"))?;
    Ok((l, addr))
}

/// What an acceptor thread's body gets: the stop flag, and where to say that it is set up.
struct Acceptor {
    stop: Arc<AtomicBool>,
    ready: mpsc::SyncSender<Result<(), String>>,
}

impl Acceptor {
    fn ready(&self, r: Result<(), String>) {
        let _ = self.ready.send(r);
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// Runs `body` on a thread pinned to the server core and waits until it says it is set up.
/// Stopping sets the flag, then connects once to `addr` so that an acceptor blocked in its wait
/// wakes up, sees the flag and returns; then joins the thread.
fn spawn_acceptor(
    name: &str,
    addr: SocketAddr,
    body: impl FnOnce(Acceptor) + Send + 'static,
) -> Result<Running, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let (ready, started) = mpsc::sync_channel(1);
    let a = Acceptor {
        stop: stop.clone(),
        ready,
    };
    let thread: JoinHandle<()> = std::thread::Builder::new()
        .name(format!("fair-{name}"))
        .spawn(move || match pin_here(SERVER_CORE) {
            Ok(()) => body(a),
            Err(e) => a.ready(Err(e)),
        })
        .map_err(|e| format!("{name}: spawn: {e}"))?;
    let stop_fn = move || {
        stop.store(true, Ordering::SeqCst);
        // The listener is still open (the thread owns it), so the kernel completes this
        // handshake whatever the acceptor does; the acceptor then wakes.
        let _ = TcpStream::connect(addr);
        let _ = thread.join();
    };
    let running = Running {
        addr,
        stop: Some(Box::new(stop_fn)),
    };
    match started.recv_timeout(STEP_TIMEOUT) {
        Ok(Ok(())) => Ok(running),
        Ok(Err(e)) => Err(format!("{name}: {e}")),
        Err(_) => Err(format!("{name}: not set up within {STEP_TIMEOUT:?}")),
    }
}

/// std: `TcpListener::accept()` in a loop, blocking in `accept(2)`.
pub fn std_blocking(probe: Arc<Probe>) -> Result<Running, String> {
    let (listener, addr) = bind()?;
    spawn_acceptor("std", addr, move |a| {
        a.ready(Ok(()));
        loop {
            match listener.accept() {
                Ok((s, _)) if a.stopping() => return drop(s),
                Ok((s, _)) => probe.held(s),
                Err(_) if a.stopping() => return,
                // Transient (the client reset first, EINTR): the loop goes on.
                Err(_) => {}
            }
        }
    })
}

/// mio: blocking in `epoll_wait`, then `accept4` until `EAGAIN`.
pub fn mio_epoll(probe: Arc<Probe>) -> Result<Running, String> {
    let (listener, addr) = bind()?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("O_NONBLOCK: {e}"))?;
    spawn_acceptor("mio", addr, move |a| {
        const TOKEN: mio::Token = mio::Token(0);
        let mut listener = mio::net::TcpListener::from_std(listener);
        let mut poll = match mio::Poll::new() {
            Ok(p) => p,
            Err(e) => return a.ready(Err(format!("epoll_create: {e}"))),
        };
        if let Err(e) = poll
            .registry()
            .register(&mut listener, TOKEN, mio::Interest::READABLE)
        {
            return a.ready(Err(format!("epoll_ctl: {e}")));
        }
        a.ready(Ok(()));
        let mut events = mio::Events::with_capacity(64);
        loop {
            match poll.poll(&mut events, None) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
            loop {
                match listener.accept() {
                    Ok((s, _)) if a.stopping() => return drop(s),
                    Ok((s, _)) => probe.held(s),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) if a.stopping() => return,
                    Err(_) => {}
                }
            }
        }
    })
}

/// tokio: a `current_thread` runtime on its thread, `listener.accept().await` in a loop.
pub fn tokio_current_thread(probe: Arc<Probe>) -> Result<Running, String> {
    let (listener, addr) = bind()?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("O_NONBLOCK: {e}"))?;
    spawn_acceptor("tokio", addr, move |a| {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => return a.ready(Err(format!("tokio runtime: {e}"))),
        };
        rt.block_on(async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => return a.ready(Err(format!("tokio listener: {e}"))),
            };
            a.ready(Ok(()));
            loop {
                match listener.accept().await {
                    Ok((s, _)) if a.stopping() => return drop(s),
                    Ok((s, _)) => probe.held(s),
                    Err(_) if a.stopping() => return,
                    Err(_) => {}
                }
            }
        });
    })
}

/// Raw io_uring (the `io-uring` crate): one multishot ACCEPT, `submit_and_wait(1)`, the
/// accepted descriptor held as an `OwnedFd`. `SINGLE_ISSUER | DEFER_TASKRUN` where the kernel
/// has them, as Floodgate's shard uses.
pub fn raw_io_uring(probe: Arc<Probe>) -> Result<Running, String> {
    let (listener, addr) = bind()?;
    spawn_acceptor("uring", addr, move |a| {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(64)
            .or_else(|_| IoUring::new(64));
        let mut ring = match ring {
            Ok(r) => r,
            Err(e) => return a.ready(Err(format!("io_uring_setup: {e}"))),
        };
        let accept = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(1);
        let (submitter, mut sq, mut cq) = ring.split();
        // SAFETY: an ACCEPT refers to no memory, only to the listener's descriptor, which
        // this thread owns (`listener`) for as long as the ring exists.
        if unsafe { sq.push(&accept) }.is_err() {
            return a.ready(Err("submission queue full".into()));
        }
        sq.sync();
        a.ready(Ok(()));
        loop {
            match submitter.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                Err(_) => return,
            }
            cq.sync();
            let mut rearm = false;
            for cqe in &mut cq {
                let res = cqe.result();
                if res >= 0 {
                    // SAFETY: a successful ACCEPT's result is a new descriptor that nothing
                    // else in this process knows; the OwnedFd becomes its only owner.
                    let fd = unsafe { OwnedFd::from_raw_fd(res) };
                    if a.stopping() {
                        return drop(fd);
                    }
                    probe.held(fd);
                } else if a.stopping() {
                    return;
                }
                rearm |= !cqueue::more(cqe.flags());
            }
            if rearm {
                // SAFETY: as above.
                if unsafe { sq.push(&accept) }.is_err() {
                    return;
                }
                sq.sync();
            }
        }
    })
}

/// Floodgate, inline handler on the shard thread (io_uring backend): the handler is where the
/// application holds the socket.
pub fn floodgate_handler(probe: Arc<Probe>) -> Result<Running, String> {
    floodgate_inline(probe, Backend::IoUring)
}

/// Floodgate on the epoll backend, inline handler on the shard thread.
pub fn floodgate_epoll_handler(probe: Arc<Probe>) -> Result<Running, String> {
    floodgate_inline(probe, Backend::Epoll)
}

/// Builds a one-shard listener on a thread pinned to the server core, with `pin(false)`, so
/// that the shard thread inherits that core. (The default placement, shard k on the k-th core
/// the building thread may use, would follow the measuring thread to the client core.)
fn floodgate_on_server_core(
    builder: floodgate::ListenerBuilder,
    what: &str,
) -> Result<Listener, String> {
    std::thread::scope(|s| {
        s.spawn(move || {
            pin_here(SERVER_CORE)?;
            builder
                .shards(1)
                .pin(false)
                .build()
                .map_err(|e| format!("{what}: {e}"))
        })
        .join()
        .map_err(|_| format!("{what}: the building thread panicked"))?
    })
}

fn floodgate_inline(probe: Arc<Probe>, backend: Backend) -> Result<Running, String> {
    let listener = floodgate_on_server_core(
        Listener::builder(loopback())
            .backend(backend)
            .handler(move |conn, _ctx| probe.held(conn)),
        &format!("floodgate ({backend:?})"),
    )?;
    let addr = listener.local_addr();
    Ok(Running {
        addr,
        stop: Some(Box::new(move || listener.shutdown())),
    })
}

/// Floodgate, `Listener::accept()` blocking on an application thread pinned to the server
/// core (io_uring backend; the shard is on the same core).
pub fn floodgate_accept(probe: Arc<Probe>) -> Result<Running, String> {
    let listener = Arc::new(floodgate_on_server_core(
        Listener::builder(loopback()).backend(Backend::IoUring),
        "floodgate",
    )?);
    let addr = listener.local_addr();
    let l = listener.clone();
    let (ready, started) = mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name("fair-fg-accept".into())
        .spawn(move || {
            if let Err(e) = pin_here(SERVER_CORE) {
                let _ = ready.send(Err(e));
                return;
            }
            let _ = ready.send(Ok(()));
            loop {
                match l.accept() {
                    Ok(conn) => probe.held(conn),
                    // The shard keeps retrying after reporting an accept error once.
                    Err(Error::Accept { .. }) => {}
                    // Closed at shutdown, or the wait itself failed.
                    Err(_) => return,
                }
            }
        })
        .map_err(|e| format!("floodgate_accept: spawn: {e}"))?;
    let running = Running {
        addr,
        stop: Some(Box::new(move || {
            listener.shutdown();
            let _ = thread.join();
        })),
    };
    match started.recv_timeout(STEP_TIMEOUT) {
        Ok(Ok(())) => Ok(running),
        Ok(Err(e)) => Err(format!("floodgate_accept: {e}")),
        Err(_) => Err(format!(
            "floodgate_accept: not set up within {STEP_TIMEOUT:?}"
        )),
    }
}

/// Floodgate, a driven shard (`ListenerBuilder::build_driven`) on an application thread pinned
/// to the server core: the thread blocks in `poll(2)` on the shard's descriptor
/// (`DrivenShard::wait`), then `drive()` runs the inline handler's path on it. No engine
/// thread: the acceptor is the application's own, as std's is.
pub fn floodgate_driven(probe: Arc<Probe>) -> Result<Running, String> {
    let (listener, mut shards) = Listener::builder(loopback())
        .backend(Backend::IoUring)
        .shards(1)
        .pin(false)
        .build_driven()
        .map_err(|e| format!("floodgate_driven: {e}"))?;
    let Some(mut shard) = shards.pop() else {
        return Err("floodgate_driven: no shard".into());
    };
    let addr = listener.local_addr();
    let (ready, started) = mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name("fair-fg-driven".into())
        .spawn(move || {
            if let Err(e) = pin_here(SERVER_CORE) {
                let _ = ready.send(Err(e));
                return;
            }
            // The first drive() binds the shard to this thread and posts its accept.
            let first = shard.drive(|conn, _ctx| probe.held(conn));
            let _ = ready.send(first.map(|_| ()).map_err(|e| e.to_string()));
            loop {
                // A bounded wait only so that a lost wake-up could not hang the stop; the
                // shutdown's own wake-up makes the descriptor readable.
                if shard.wait(Some(STEP_TIMEOUT)).is_err() {
                    return;
                }
                match shard.drive(|conn, _ctx| probe.held(conn)) {
                    Ok(_) | Err(Error::Accept { .. }) => {}
                    Err(_) => return,
                }
            }
        })
        .map_err(|e| format!("floodgate_driven: spawn: {e}"))?;
    let running = Running {
        addr,
        stop: Some(Box::new(move || {
            listener.shutdown();
            let _ = thread.join();
        })),
    };
    match started.recv_timeout(STEP_TIMEOUT) {
        Ok(Ok(())) => Ok(running),
        Ok(Err(e)) => Err(format!("floodgate_driven: {e}")),
        Err(_) => Err(format!(
            "floodgate_driven: not set up within {STEP_TIMEOUT:?}"
        )),
    }
}
