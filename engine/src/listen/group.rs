//! The shards' `SO_REUSEPORT` group: binding it, joining one that is
//! already there, and steering it.
//!
//! # Why a second instance used to get EADDRINUSE
//!
//! CPU steering is a classic-BPF reuseport program. Attached to a socket
//! that is bound but not yet listening, `SO_ATTACH_REUSEPORT_CBPF` gives
//! that socket a reuseport group of its own (`reuseport_attach_prog` ->
//! `reuseport_alloc`). At `listen(2)` the kernel checks the port again
//! (`inet_csk_get_port` -> `inet_csk_bind_conflict`), and a socket that
//! already has a group of its own conflicts with every other listening
//! reuseport socket on the port (`reuseport_cb_ok` is false: one group may
//! not merge into another). So `listen` failed with EADDRINUSE whenever the
//! port had listeners of the same user:
//!
//! - a second multi-shard instance (overlapping restarts);
//! - a new instance right after a crash: the dead process's listening
//!   sockets stay open, in LISTEN, until its io_uring is torn down — the
//!   ring's exit work runs later in a kernel workqueue, cancelling the
//!   multishot ACCEPTs that hold references to the sockets' files — which
//!   took 30–100 ms here after `waitpid` had already returned.
//!
//! `bind(2)` itself succeeded (same user, `SO_REUSEPORT` on both sides);
//! one-shard instances attached no program and were never refused.
//!
//! # What is done instead
//!
//! The first socket still gets the program before `listen`: on a port with
//! no other listener that makes a fresh group, steered by the program
//! (socket `k` of the group is shard `k`, so CPU `c` goes to shard
//! `c % n`). When that `listen` is refused with EADDRINUSE, the port has
//! listeners of ours already: the socket is replaced by one without a
//! program, which joins their group, and the group's program is detached.
//! The group is then steered by the kernel's own choice on
//! `SO_INCOMING_CPU` (6.2+), which every shard socket carries (its core):
//! the kernel picks, among all the group's sockets, one whose incoming CPU
//! is the receiving CPU. That does not depend on the order of the group's
//! sockets, which changes as members leave (the last one moves into the
//! leaver's slot), so it stays right while instances come and go; both
//! instances serve, each connection on the shard of its CPU. Before 6.2
//! the kernel ignores `SO_INCOMING_CPU` there and spreads by hash.

use std::net::SocketAddr;
use std::os::fd::AsFd;

use socket2::{Domain, Protocol, Socket, Type};

use crate::admit::attrs::SocketAttrs;
use crate::driver::sys;
use crate::error::{ConfigError, Error};

/// How the kernel picks the shard for a new connection among the shards'
/// `SO_REUSEPORT` sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Steering {
    /// To the shard whose index is the receiving CPU modulo the shard
    /// count, by a classic-BPF reuseport program on `SKF_AD_CPU` (4.5+).
    /// With shards pinned to cores 0..N, each connection stays on the core
    /// that received it. (On loopback that is the client's CPU.)
    #[default]
    Cpu,
    /// The kernel's default: a hash of the connection's 4-tuple.
    Hash,
}

/// How the kernel picks a socket of the group for a new connection, as it
/// ended up once the group was bound, joined or adopted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum SteeringInForce {
    /// The CPU program: socket `cpu % n` of the group, in group order,
    /// which is shard order (a group this listener created, or received
    /// whole in a hand-over).
    Program,
    /// The kernel's choice on each socket's `SO_INCOMING_CPU` (6.2+): the
    /// group was joined (another instance, or the sockets of one that died
    /// and are still being torn down, were there first).
    IncomingCpu,
    /// The kernel's hash of the 4-tuple ([`Steering::Hash`]).
    Hash,
}

/// How every shard socket is set up.
pub(crate) struct SocketSpec<'a> {
    pub backlog: usize,
    pub attrs: &'a SocketAttrs,
    pub save_syn: bool,
}

/// The group's sockets, in group order (socket `k` is index `k` of the
/// kernel's reuseport group when `steering` is `Program`).
pub(crate) struct Group {
    pub sockets: Vec<Socket>,
    pub local_addr: SocketAddr,
    pub steering: SteeringInForce,
}

/// A TCP socket for `addr` with `SO_REUSEADDR`, `SO_REUSEPORT`, the
/// declared attributes and `TCP_SAVE_SYN` if asked, not yet bound.
pub(crate) fn new_socket(addr: SocketAddr, spec: &SocketSpec<'_>) -> Result<Socket, Error> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )
    .map_err(|e| Error::setup("socket", e))?;
    socket
        .set_reuse_address(true)
        .map_err(|e| Error::setup("setsockopt(SO_REUSEADDR)", e))?;
    socket
        .set_reuse_port(true)
        .map_err(|e| Error::setup("setsockopt(SO_REUSEPORT)", e))?;
    apply_spec(&socket, addr.is_ipv6(), spec)?;
    Ok(socket)
}

/// Puts the declared attributes (Linux copies most of them into every
/// accepted socket, see `attrs::INHERITED`) and `TCP_SAVE_SYN` on a
/// listening socket.
pub(crate) fn apply_spec(socket: &Socket, ipv6: bool, spec: &SocketSpec<'_>) -> Result<(), Error> {
    spec.attrs
        .apply_named(socket, ipv6, false)
        .map_err(|(a, e)| {
            let (field, value) = spec.attrs.field(a);
            Error::Config(ConfigError::new(
                field,
                value,
                format!("the kernel refused it: {e}"),
            ))
        })?;
    if spec.save_syn {
        sys::setsockopt::<i32>(socket.as_fd(), libc::IPPROTO_TCP, libc::TCP_SAVE_SYN, 1)
            .map_err(|e| Error::setup("setsockopt(TCP_SAVE_SYN)", e))?;
    }
    Ok(())
}

fn listen(socket: &Socket, addr: SocketAddr, backlog: usize) -> Result<(), Error> {
    let len = i32::try_from(backlog).unwrap_or(i32::MAX);
    socket
        .listen(len)
        .map_err(|e| Error::Bind { addr, source: e })
}

/// Marks `socket` as the one for connections received on `cpu`
/// (`SO_INCOMING_CPU`); a refusal only costs locality.
fn incoming_cpu(socket: &Socket, cpu: usize) {
    let _ = socket.set_cpu_affinity(cpu);
}

/// Binds `n` sockets to `addr` with `SO_REUSEPORT` and puts them in
/// listening mode, in order, as a fresh group steered by the CPU program,
/// or (when the port has listeners of ours already) as members of their
/// group (see the module docs). `cpus[k]` is shard `k`'s CPU.
pub(crate) fn bind_group(
    addr: SocketAddr,
    n: usize,
    spec: &SocketSpec<'_>,
    steering: Steering,
    cpus: &[usize],
) -> Result<Group, Error> {
    let cpu = |k: usize| cpus.get(k).copied().unwrap_or(k);
    let mut sockets: Vec<Socket> = Vec::with_capacity(n);
    let mut bind_addr = addr;
    let mut in_force = match steering {
        Steering::Cpu => SteeringInForce::Program,
        Steering::Hash => SteeringInForce::Hash,
    };
    for k in 0..n {
        let socket = new_socket(addr, spec)?;
        if steering == Steering::Cpu {
            incoming_cpu(&socket, cpu(k));
        }
        socket.bind(&bind_addr.into()).map_err(|e| Error::Bind {
            addr: bind_addr,
            source: e,
        })?;
        if k == 0 {
            // Port 0: every other shard binds the port the first one got.
            if let Some(a) = socket.local_addr().ok().and_then(|a| a.as_socket()) {
                bind_addr = a;
            }
        }
        if k == 0 && steering == Steering::Cpu {
            sys::attach_cpu_steering(socket.as_fd(), n as u32)
                .map_err(|e| Error::setup("setsockopt(SO_ATTACH_REUSEPORT_CBPF)", e))?;
            let len = i32::try_from(spec.backlog).unwrap_or(i32::MAX);
            match socket.listen(len) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {
                    // Listeners of ours are on the port: join their group
                    // with a socket that has none of its own.
                    drop(socket);
                    let socket = new_socket(addr, spec)?;
                    incoming_cpu(&socket, cpu(0));
                    socket.bind(&bind_addr.into()).map_err(|e| Error::Bind {
                        addr: bind_addr,
                        source: e,
                    })?;
                    listen(&socket, bind_addr, spec.backlog)?;
                    match sys::detach_reuseport_program(socket.as_fd()) {
                        Ok(()) => {}
                        // No program on the group: nothing to detach.
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                        Err(e) => {
                            return Err(Error::setup("setsockopt(SO_DETACH_REUSEPORT_BPF)", e))
                        }
                    }
                    in_force = SteeringInForce::IncomingCpu;
                    sockets.push(socket);
                    continue;
                }
                Err(e) => {
                    return Err(Error::Bind {
                        addr: bind_addr,
                        source: e,
                    })
                }
            }
            sockets.push(socket);
            continue;
        }
        listen(&socket, bind_addr, spec.backlog)?;
        sockets.push(socket);
    }
    Ok(Group {
        sockets,
        local_addr: bind_addr,
        steering: in_force,
    })
}

/// What an adopted socket was refused for, in the `sockets` field.
fn refused(i: usize, socket: &Socket, reason: impl Into<String>) -> Error {
    use std::os::fd::AsRawFd;
    Error::Config(ConfigError::new(
        "sockets",
        format!("sockets[{i}] (fd {})", socket.as_raw_fd()),
        reason,
    ))
}

/// Checks that `socket` is a listening TCP socket (`SO_ACCEPTCONN`,
/// `SO_TYPE`, `SO_DOMAIN`, `SO_PROTOCOL`) and returns its address.
fn check_listening(i: usize, socket: &Socket) -> Result<SocketAddr, Error> {
    let domain = socket
        .domain()
        .map_err(|e| refused(i, socket, format!("not a socket (SO_DOMAIN: {e})")))?;
    if domain != Domain::IPV4 && domain != Domain::IPV6 {
        return Err(refused(i, socket, "not an IPv4 or IPv6 socket (SO_DOMAIN)"));
    }
    let ty = socket
        .r#type()
        .map_err(|e| refused(i, socket, format!("SO_TYPE: {e}")))?;
    if ty != Type::STREAM {
        return Err(refused(i, socket, "not a stream socket (SO_TYPE)"));
    }
    if !matches!(socket.protocol(), Ok(Some(p)) if p == Protocol::TCP) {
        return Err(refused(i, socket, "not a TCP socket (SO_PROTOCOL)"));
    }
    if !socket
        .is_listener()
        .map_err(|e| refused(i, socket, format!("SO_ACCEPTCONN: {e}")))?
    {
        return Err(refused(
            i,
            socket,
            "not listening (SO_ACCEPTCONN is 0): call listen() first",
        ));
    }
    socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or_else(|| refused(i, socket, "it has no local address"))
}

/// The address every socket of an adopted group listens on, checking each
/// is a listening TCP socket on that one address. Nothing is changed.
pub(crate) fn adopted_addr(sockets: &[Socket]) -> Result<SocketAddr, Error> {
    let Some(first) = sockets.first() else {
        return Err(Error::Config(ConfigError::new(
            "sockets",
            "none",
            "at least one listening socket is needed",
        )));
    };
    let addr = check_listening(0, first)?;
    for (i, s) in sockets.iter().enumerate().skip(1) {
        let a = check_listening(i, s)?;
        if a != addr {
            return Err(refused(
                i,
                s,
                format!("it listens on {a}, sockets[0] on {addr}: one listener per address"),
            ));
        }
    }
    Ok(addr)
}

/// Makes a group of the sockets an application adopted (or a successor
/// took over), in the order given, which is taken as the group's order:
/// close-on-exec, the declared attributes, `SO_REUSEPORT` siblings on the
/// same address up to `n` (where the sockets allow it) and the steering.
/// `known` is the steering the group had (a hand-over says it); without
/// it the sockets are taken to be a group of their own.
pub(crate) fn adopt_group(
    mut sockets: Vec<Socket>,
    n: usize,
    spec: &SocketSpec<'_>,
    steering: Steering,
    cpus: &[usize],
    known: Option<SteeringInForce>,
) -> Result<Group, Error> {
    let addr = adopted_addr(&sockets)?;
    let reuseport = sockets.iter().all(|s| s.reuse_port().unwrap_or(false));
    for (i, s) in sockets.iter().enumerate() {
        // LISTEN_FDS descriptors come without FD_CLOEXEC (sd_listen_fds
        // sets it); so may a parent's.
        s.set_cloexec(true)
            .map_err(|e| refused(i, s, format!("fcntl(FD_CLOEXEC): {e}")))?;
        apply_spec(s, addr.is_ipv6(), spec)?;
    }
    if sockets.len() < n {
        if !reuseport {
            return Err(Error::Config(ConfigError::new(
                "shards",
                n,
                format!(
                    "{} adopted socket(s) without SO_REUSEPORT: no sibling can share \
                     {addr}; use at most {} shard(s), or set SO_REUSEPORT on them",
                    sockets.len(),
                    sockets.len()
                ),
            )));
        }
        // Siblings join the group at listen (same user, SO_REUSEPORT) and
        // take the next places in its order.
        while sockets.len() < n {
            let s = new_socket(addr, spec)?;
            s.bind(&addr.into())
                .map_err(|e| Error::Bind { addr, source: e })?;
            listen(&s, addr, spec.backlog)?;
            sockets.push(s);
        }
    }
    let cpu = |k: usize| cpus.get(k % n.max(1)).copied().unwrap_or(k % n.max(1));
    let in_force = match steering {
        Steering::Hash => {
            // A program the group kept from before would still steer.
            if reuseport {
                let _ = sys::detach_reuseport_program(sockets[0].as_fd());
            }
            SteeringInForce::Hash
        }
        Steering::Cpu if !reuseport => SteeringInForce::Hash,
        Steering::Cpu => {
            // Socket j belongs to shard j % n.
            for (j, s) in sockets.iter().enumerate() {
                incoming_cpu(s, cpu(j));
            }
            match known {
                // A joined group stays steered by the kernel's choice.
                Some(SteeringInForce::IncomingCpu) => SteeringInForce::IncomingCpu,
                _ => {
                    // Socket cpu % n of the group: shard cpu % n; sockets
                    // past n (a shard's second, third...) keep what is in
                    // their queues and get no new connection.
                    sys::attach_cpu_steering(sockets[0].as_fd(), n as u32)
                        .map_err(|e| Error::setup("setsockopt(SO_ATTACH_REUSEPORT_CBPF)", e))?;
                    SteeringInForce::Program
                }
            }
        }
    };
    Ok(Group {
        sockets,
        local_addr: addr,
        steering: in_force,
    })
}
