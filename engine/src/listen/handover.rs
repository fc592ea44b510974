//! Hand-over of a running listener's listening sockets to a successor
//! process, over a Unix socket, with no connection lost.
//!
//! The predecessor offers ([`Handover::bind`], [`Handover::offer`]); the
//! successor connects ([`Takeover::connect`]) and receives, on a
//! `SOCK_SEQPACKET` Unix socket, one header message — magic, the address,
//! the steering the group has, the predecessor's shard count and which of
//! its shards accepted on each socket — with the sockets attached
//! (`SCM_RIGHTS`, at most 250 per message, more in continuation messages).
//! The successor builds its listener on them ([`Takeover::builder`]: they
//! are the same open files, in the same reuseport group and the same
//! order), starts accepting, and says so ([`Takeover::ready`]). The
//! predecessor then stops accepting and drains ([`crate::Listener::drain`])
//! and closes the Unix socket when done ([`Successor::release`]), which the
//! successor sees ([`Takeover::wait_released`]) before it may offer the
//! sockets on to its own successor: every listener built on taken-over
//! sockets can be offered again.
//!
//! A successor with more shards adds `SO_REUSEPORT` siblings to the group;
//! with fewer, a shard accepts on several sockets. Either way it attaches
//! its own CPU program (`cpu % shards`), so steering follows its shards.
//!
//! # Why the sockets are kept alive rather than migrated
//!
//! Linux can instead migrate the children of a closing reuseport listener
//! to another listener of the group (`net.ipv4.tcp_migrate_req`, 5.14, or
//! an eBPF `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE` program). That needs a
//! host-wide sysctl (or CAP_BPF for the eBPF program) that an application
//! cannot count on; with a classic-BPF program attached the kernel falls
//! back to its hash for the migrated requests; and a new process still has
//! to bind new sockets into the group first, which is where a crash or an
//! EADDRINUSE bites. Keeping the listening sockets alive is plain POSIX:
//! the successor holds the same open files, so the kernel's accept queues
//! and the requests in SYN_RECV are never attached to a closing listener
//! at all; nothing is migrated because nothing closes. Only when the last
//! process lets go of a socket does it close.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use socket2::{Domain, SockAddr, Socket, Type};

use crate::driver::sys;
use crate::error::Error;
use crate::listen::accept::Listener;
use crate::listen::config::ListenerBuilder;
use crate::listen::group::SteeringInForce;

const MAGIC: &[u8; 8] = b"FLDGHOV1";
const MORE: &[u8; 8] = b"FLDGFDS1";
const READY: &[u8] = b"READY";
/// Largest header: 8 + 4 + 1 + 2 + 2 + address text + 2 per socket.
const MAX_HEADER: usize = 64 * 1024;

fn err<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Handover {
        step,
        path: path.to_path_buf(),
        source,
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// The offering side: a Unix socket a successor connects to.
///
/// ```no_run
/// use floodgate::{Handover, Listener};
///
/// let listener = Listener::builder("127.0.0.1:9000".parse()?).build()?;
/// let offer = Handover::bind("/run/myproxy/handover")?;
/// // ... serve; then, when a successor connects (this blocks until one does):
/// let successor = offer.offer(&listener)?;
/// // It is accepting now: stop, finish what is under way, let go.
/// listener.drain(std::time::Duration::from_secs(30));
/// successor.release();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Handover {
    socket: Socket,
    path: PathBuf,
    taken: std::sync::atomic::AtomicBool,
}

impl Handover {
    /// Listens on the Unix socket `path` (`SOCK_SEQPACKET`). A socket file
    /// left there by a process that is gone (nobody accepts on it) is
    /// replaced; one a live process listens on is an error (EADDRINUSE).
    ///
    /// # Errors
    /// [`Error::Handover`] naming the step and the path.
    pub fn bind(path: impl AsRef<Path>) -> Result<Handover, Error> {
        let path = path.as_ref().to_path_buf();
        let addr = SockAddr::unix(&path).map_err(err("the socket's path", &path))?;
        let socket = Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None)
            .map_err(err("socket", &path))?;
        if let Err(e) = socket.bind(&addr) {
            if e.raw_os_error() != Some(libc::EADDRINUSE) {
                return Err(err("bind", &path)(e));
            }
            // Stale if nobody accepts there.
            let probe = Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None)
                .map_err(err("socket", &path))?;
            if probe.connect(&addr).is_ok() {
                return Err(err("bind", &path)(e));
            }
            std::fs::remove_file(&path).map_err(err("remove a stale socket file", &path))?;
            socket.bind(&addr).map_err(err("bind", &path))?;
        }
        socket.listen(1).map_err(err("listen", &path))?;
        Ok(Handover {
            socket,
            path,
            taken: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The Unix socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A descriptor readable once a successor is connecting, for a caller
    /// that waits for it in its own loop before calling
    /// [`Handover::offer`].
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Waits for a successor, sends it `listener`'s listening sockets and
    /// waits until it says it is accepting on them. The socket file is
    /// removed once the successor is connected (so that it can offer on
    /// the same path in turn). The listener goes on accepting meanwhile:
    /// call [`Listener::drain`] next, then [`Successor::release`].
    ///
    /// # Errors
    /// [`Error::Handover`]; [`Error::Closed`] when the listener has
    /// already let its sockets go (drained or shut down).
    pub fn offer(&self, listener: &Listener) -> Result<Successor, Error> {
        let path = &self.path;
        let (conn, _) = self.socket.accept().map_err(err("accept", path))?;
        if !self.taken.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let _ = std::fs::remove_file(path);
        }
        let sockets: Vec<std::sync::Arc<Socket>> =
            listener.group.lock().map(|g| g.clone()).unwrap_or_default();
        if sockets.is_empty() {
            return Err(Error::Closed);
        }
        let shards = listener.shards().max(1);
        let addr = listener.local_addr().to_string();
        let mut header = Vec::with_capacity(32 + addr.len() + 2 * sockets.len());
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&(sockets.len() as u32).to_le_bytes());
        header.push(match listener.steering() {
            SteeringInForce::Program => 0,
            SteeringInForce::IncomingCpu => 1,
            SteeringInForce::Hash => 2,
        });
        header.extend_from_slice(&(shards as u16).to_le_bytes());
        header.extend_from_slice(&(addr.len() as u16).to_le_bytes());
        header.extend_from_slice(addr.as_bytes());
        for j in 0..sockets.len() {
            header.extend_from_slice(&((j % shards) as u16).to_le_bytes());
        }
        let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(|s| s.as_fd()).collect();
        let mut chunks = fds.chunks(sys::MAX_FDS_PER_MESSAGE);
        let first = chunks.next().unwrap_or(&[]);
        sys::send_with_fds(conn.as_fd(), &header, first).map_err(err("send the sockets", path))?;
        let mut sent = first.len();
        for chunk in chunks {
            let mut more = MORE.to_vec();
            more.extend_from_slice(&(sent as u32).to_le_bytes());
            sys::send_with_fds(conn.as_fd(), &more, chunk)
                .map_err(err("send the sockets", path))?;
            sent += chunk.len();
        }
        let mut buf = [0u8; 16];
        let (n, _) = sys::recv_with_fds(conn.as_fd(), &mut buf)
            .map_err(err("wait for the successor to accept", path))?;
        if &buf[..n] != READY {
            return Err(err("wait for the successor to accept", path)(invalid(
                "the successor closed before it was accepting",
            )));
        }
        Ok(Successor { conn })
    }
}

impl Drop for Handover {
    fn drop(&mut self) {
        // Once a successor connected the file is gone (offer removed it),
        // and the path may be the successor's own offer by now.
        if !self.taken.load(std::sync::atomic::Ordering::SeqCst) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A successor that is accepting on the sockets: drop it (or call
/// [`Successor::release`]) once this process has let go of them (after
/// [`Listener::drain`]), which tells the successor it may offer them on.
#[derive(Debug)]
pub struct Successor {
    conn: Socket,
}

impl Successor {
    /// Tells the successor this process has let go (closes the Unix
    /// socket).
    pub fn release(self) {
        let _ = self.conn.shutdown(std::net::Shutdown::Both);
    }
}

/// The taking side: the sockets received from a predecessor.
#[derive(Debug)]
pub struct Takeover {
    conn: Socket,
    path: PathBuf,
    sockets: Vec<Socket>,
    addr: SocketAddr,
    steering: SteeringInForce,
    predecessor_shards: usize,
}

impl Takeover {
    /// Connects to a predecessor offering on `path` and receives its
    /// listening sockets.
    ///
    /// # Errors
    /// [`Error::Handover`] naming the step (nobody offering there, a
    /// malformed header, descriptors missing).
    pub fn connect(path: impl AsRef<Path>) -> Result<Takeover, Error> {
        let path = path.as_ref().to_path_buf();
        let addr = SockAddr::unix(&path).map_err(err("the socket's path", &path))?;
        let conn = Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None)
            .map_err(err("socket", &path))?;
        conn.connect(&addr).map_err(err("connect", &path))?;
        let mut buf = vec![0u8; MAX_HEADER];
        let (n, mut fds) = sys::recv_with_fds(conn.as_fd(), &mut buf)
            .map_err(err("receive the sockets", &path))?;
        let (count, steering, shards, listen) =
            parse_header(&buf[..n]).map_err(err("read the header", &path))?;
        while fds.len() < count {
            let (n, more) = sys::recv_with_fds(conn.as_fd(), &mut buf)
                .map_err(err("receive the sockets", &path))?;
            if n != 12 || &buf[..8] != MORE || more.is_empty() {
                return Err(err("receive the sockets", &path)(invalid(
                    "a continuation message was expected",
                )));
            }
            fds.extend(more);
        }
        if fds.len() != count {
            return Err(err("receive the sockets", &path)(invalid(
                "the number of descriptors differs from the header's",
            )));
        }
        Ok(Takeover {
            conn,
            path,
            sockets: fds.into_iter().map(Socket::from).collect(),
            addr: listen,
            steering,
            predecessor_shards: shards,
        })
    }

    /// The address the sockets listen on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many sockets were received.
    pub fn sockets(&self) -> usize {
        self.sockets.len()
    }

    /// How many shards the predecessor ran.
    pub fn predecessor_shards(&self) -> usize {
        self.predecessor_shards
    }

    /// A builder for a listener on the received sockets, in their group
    /// order (see [`Listener::adopt`]); configure it as any other. Takes
    /// the sockets: a second call gets a builder with none, which
    /// `build()` refuses.
    pub fn builder(&mut self) -> ListenerBuilder {
        let sockets = std::mem::take(&mut self.sockets);
        ListenerBuilder::adopting(sockets, Some(self.steering))
    }

    /// Tells the predecessor this process is accepting on the sockets: it
    /// stops accepting and drains.
    ///
    /// # Errors
    /// [`Error::Handover`] if the predecessor is gone.
    pub fn ready(&self) -> Result<(), Error> {
        sys::send_with_fds(self.conn.as_fd(), READY, &[])
            .map_err(err("tell the predecessor", &self.path))
    }

    /// Blocks until the predecessor has let go of the sockets (it closed
    /// the Unix socket, after its drain, or died).
    pub fn wait_released(&self) {
        let mut buf = [0u8; 16];
        loop {
            match sys::recv_with_fds(self.conn.as_fd(), &mut buf) {
                Ok((0, _)) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    }
}

/// Parses the header: the socket count, the steering, the predecessor's
/// shard count and the address.
fn parse_header(b: &[u8]) -> io::Result<(usize, SteeringInForce, usize, SocketAddr)> {
    if b.len() < 17 || &b[..8] != MAGIC {
        return Err(invalid("not a Floodgate hand-over header"));
    }
    let count = u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize;
    let steering = match b[12] {
        0 => SteeringInForce::Program,
        1 => SteeringInForce::IncomingCpu,
        2 => SteeringInForce::Hash,
        _ => return Err(invalid("unknown steering")),
    };
    let shards = u16::from_le_bytes([b[13], b[14]]) as usize;
    let len = u16::from_le_bytes([b[15], b[16]]) as usize;
    let text = b
        .get(17..17 + len)
        .and_then(|t| std::str::from_utf8(t).ok())
        .ok_or_else(|| invalid("bad address"))?;
    let addr: SocketAddr = text.parse().map_err(|_| invalid("bad address"))?;
    if count == 0 || b.len() != 17 + len + 2 * count {
        return Err(invalid("bad socket count"));
    }
    Ok((count, steering, shards, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_truncated_or_foreign_header_is_refused() {
        assert!(parse_header(b"FLDGHOV1").is_err());
        assert!(parse_header(b"GARBAGE!\x01\0\0\0\0\x01\0\x0e\x00127.0.0.1:9000\0\0").is_err());
        let ok = b"FLDGHOV1\x01\0\0\0\0\x01\0\x0e\x00127.0.0.1:9000\0\0";
        let (count, steering, shards, addr) = parse_header(ok).expect("a good header");
        assert_eq!((count, steering, shards), (1, SteeringInForce::Program, 1));
        assert_eq!(addr, "127.0.0.1:9000".parse().unwrap());
        // One owner entry short.
        assert!(parse_header(&ok[..ok.len() - 2]).is_err());
    }
}
