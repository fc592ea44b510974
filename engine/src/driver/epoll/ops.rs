//! The epoll backend's operations: one non-blocking try of each, and the
//! syscalls under them.
//!
//! The calls made per connection (`accept4`, `send`, `recv`, `close`) go
//! through `syscall(2)` rather than glibc's wrappers of the same names.
//! Those wrappers are thread-cancellation points: in a process with more
//! than one thread (a shard always is one of several) each call switches
//! asynchronous cancellation on and off around the syscall, two atomic
//! read-modify-writes on the thread's state (`__pthread_enable_asynccancel`
//! and `__pthread_disable_asynccancel`: 1.2% of the shard's profile at
//! C=64, PERF.md). The engine never cancels threads, so nothing is lost;
//! a one-thread loop does not pay them either (glibc skips them when the
//! process has a single thread).

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::time::Instant;

use super::{errno, Epoll, Try, ACCEPT_SLICE, ALWAYS, IN, OUT};
use crate::driver::{accept_flags, Cqe, Desc, KeyMap, Op, OpMemory, F_MORE};

/// Runs a libc call that returns -1 and sets errno on failure.
macro_rules! syscall {
    ($e:expr) => {{
        let r = $e;
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }};
}
pub(super) use syscall;

/// Whether an error is EAGAIN (EWOULDBLOCK is the same number on Linux).
fn would_block(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EAGAIN)
}

impl Epoll {
    /// One non-blocking try of operation `op`'s syscall (`ud` its user
    /// data, `restore` the file flags a CONNECT in progress put back after).
    pub(super) fn try_op(
        &mut self,
        op: &Op,
        ud: u64,
        restore: &mut Option<i32>,
        mem: &mut KeyMap<OpMemory>,
    ) -> Try {
        let fixed = Try::Done(-libc::EBADF);
        match *op {
            Op::Accept {
                fd,
                multishot,
                nonblocking,
            } => self.try_accept(fd, multishot, nonblocking, ud),
            Op::Cancel { .. } | Op::LinkTimeout { .. } => Try::Done(-libc::EINVAL),
            Op::ReadWord { fd } => {
                let Some(OpMemory::Word(w)) = mem.get_mut(&ud) else {
                    return Try::Done(-libc::EFAULT);
                };
                let ptr: *mut u64 = &mut **w;
                // SAFETY: `ptr` points at the op's own 8-byte word, alive
                // in the driver's memory until the completion is released.
                match syscall!(unsafe { libc::read(fd, ptr.cast(), 8) }) {
                    Ok(n) => Try::Done(n as i32),
                    Err(e) if would_block(&e) => Try::Wait(fd),
                    Err(e) => Try::Done(-errno(&e)),
                }
            }
            Op::Timeout { after } => Try::Sleep(Instant::now() + after),
            Op::Recv { desc, flags } => {
                let Desc::Fd(fd) = desc else { return fixed };
                if let Some(err) = self.take_pending_err(fd) {
                    return Try::Done(-err);
                }
                let Some(OpMemory::Bytes(b)) = mem.get_mut(&ud) else {
                    return Try::Done(-libc::EFAULT);
                };
                match recv(fd, b, flags | libc::MSG_DONTWAIT) {
                    Ok(n) => Try::Done(n as i32),
                    Err(e) if would_block(&e) => Try::Wait(fd),
                    Err(e) => Try::Done(-errno(&e)),
                }
            }
            Op::Send {
                desc,
                ref range,
                flags,
            } => {
                let Desc::Fd(fd) = desc else { return fixed };
                if let Some(err) = self.take_pending_err(fd) {
                    return Try::Done(-err);
                }
                let Some(bytes) = (match mem.get(&ud) {
                    Some(OpMemory::Bytes(b)) => b.get(range.clone()),
                    _ => None,
                }) else {
                    return Try::Done(-libc::EFAULT);
                };
                match send(fd, bytes, flags | libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) {
                    Ok(n) => Try::Done(n as i32),
                    Err(e) if would_block(&e) => Try::Wait(fd),
                    Err(e) => Try::Done(-errno(&e)),
                }
            }
            Op::Poll { fd, events, .. } => {
                let mut p = libc::pollfd {
                    fd,
                    events: events as i16,
                    revents: 0,
                };
                // SAFETY: one live pollfd, a zero timeout.
                match syscall!(unsafe { libc::poll(&mut p, 1, 0) }) {
                    Ok(1) => {
                        let revents = (p.revents as u16 as u32) & (events | ALWAYS);
                        if revents & (libc::POLLNVAL as u32) != 0 {
                            return Try::Done(-libc::EBADF);
                        }
                        if let Op::Poll {
                            multishot: true, ..
                        } = op
                        {
                            self.cq.push_back(Cqe {
                                user_data: ud,
                                result: revents as i32,
                                flags: F_MORE,
                            });
                            return Try::Wait(fd);
                        }
                        Try::Done(revents as i32)
                    }
                    Ok(_) => Try::Wait(fd),
                    Err(e) => Try::Done(-errno(&e)),
                }
            }
            Op::Close { fd } => {
                // Nothing may wait on a descriptor that goes (io_uring's
                // operations would hold the file; these would hang).
                let stale = self.forget_fd(fd).map(|st| st.waiting);
                for w in stale.into_iter().flatten() {
                    if let Some(n) = self.take_node(w) {
                        self.finish(n, -libc::ECANCELED, 0, mem);
                    }
                }
                // The descriptor is owned by the op's memory; the service
                // forgets it on a result >= 0 (Driver::finish_close).
                match close(fd) {
                    Ok(()) => Try::Done(0),
                    // Linux frees the number even when close fails.
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => Try::Done(0),
                    Err(e) => Try::Done(-errno(&e)),
                }
            }
            Op::CloseDirect { .. } => fixed,
            Op::Connect { desc } => {
                let Desc::Fd(fd) = desc else { return fixed };
                if restore.is_some() {
                    // Woken for writability: the connect has finished.
                    return match take_so_error(fd) {
                        Ok(0) => Try::Done(0),
                        // Connected, then reset before we looked: the
                        // connect succeeded; the reset is the next op's.
                        Ok(err) if err == libc::ECONNRESET || err == libc::EPIPE => {
                            self.set_pending_err(fd, Some(err));
                            Try::Done(0)
                        }
                        Ok(err) => Try::Done(-err),
                        Err(e) => Try::Done(-errno(&e)),
                    };
                }
                let Some(OpMemory::Addr(addr)) = mem.get(&ud) else {
                    return Try::Done(-libc::EFAULT);
                };
                match make_nonblocking(fd) {
                    Ok(old) => *restore = Some(old),
                    Err(e) => return Try::Done(-errno(&e)),
                }
                // SAFETY: `addr` is the op's own address, alive for the call.
                match syscall!(unsafe { libc::connect(fd, addr.as_ptr().cast(), addr.len()) }) {
                    Ok(_) => Try::Done(0),
                    Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Try::Wait(fd),
                    Err(e) => Try::Done(-errno(&e)),
                }
            }
            Op::Disconnect { desc } => {
                let Desc::Fd(fd) = desc else { return fixed };
                let _ = self.take_pending_err(fd);
                let unspec = libc::sockaddr {
                    sa_family: libc::AF_UNSPEC as libc::sa_family_t,
                    sa_data: [0; 14],
                };
                let len = size_of::<libc::sockaddr>() as libc::socklen_t;
                // SAFETY: `unspec` is a live sockaddr for the call.
                match syscall!(unsafe { libc::connect(fd, &unspec, len) }) {
                    Ok(_) => Try::Done(0),
                    Err(e) => Try::Done(-errno(&e)),
                }
            }
            Op::Socket {
                direct: Some(_), ..
            } => Try::Done(-libc::EOPNOTSUPP),
            Op::Socket {
                domain,
                direct: None,
            } => {
                // SAFETY: socket takes no pointers; the descriptor is handed
                // out in the CQE and adopted by the service.
                match syscall!(unsafe {
                    libc::socket(
                        domain,
                        libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                        libc::IPPROTO_TCP,
                    )
                }) {
                    Ok(fd) => Try::Done(fd),
                    Err(e) => Try::Done(-errno(&e)),
                }
            }
            Op::Shutdown { fd, how } => {
                // SAFETY: shutdown takes no pointers.
                match syscall!(unsafe { libc::shutdown(fd, how) }) {
                    Ok(_) => Try::Done(0),
                    Err(e) => Try::Done(-errno(&e)),
                }
            }
        }
    }

    /// A reply SEND of `bytes` on `fd`, then its CLOSE, performed now,
    /// the way an epoll loop replies: the send is tried at once and only a
    /// send that would block waits for epoll. Done now (`Ok`) when nothing
    /// of this driver names `fd` (no operation waits on it or is queued
    /// for it, so doing it now keeps every order the chain would) and the
    /// send did not block; the descriptor is closed whatever the send's
    /// outcome, as the linked chain would close it (a failed SEND cancels
    /// the CLOSE, and the service's drop closes it). Otherwise `fd` comes
    /// back untouched and the caller posts the chain.
    pub(crate) fn send_close_now(
        &mut self,
        fd: OwnedFd,
        bytes: &[u8],
        flags: i32,
    ) -> Result<(), OwnedFd> {
        let raw = fd.as_raw_fd();
        if self.fds.contains_key(&raw) || self.sq.iter().any(|(_, op, _)| names_fd(op, raw)) {
            return Err(fd);
        }
        match send(raw, bytes, flags | libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) {
            Err(e) if would_block(&e) => Err(fd),
            _ => {
                // Linux frees the number even when close fails (EINTR
                // included): nothing to retry.
                let _ = close(fd.into_raw_fd());
                Ok(())
            }
        }
    }

    /// Accepts on listening socket `fd` until EAGAIN; a multishot accept
    /// completes (F_MORE) for each connection, at most
    /// [`ACCEPT_SLICE`] per try (then it is tried again before the next
    /// wait).
    fn try_accept(&mut self, fd: RawFd, multishot: bool, nonblocking: bool, ud: u64) -> Try {
        let st = self.fds.entry(fd).or_default();
        if !st.nonblocking {
            if let Err(e) = set_nonblocking(fd) {
                return Try::Done(-errno(&e));
            }
            st.nonblocking = true;
        }
        let mut taken = 0;
        loop {
            match accept4(fd, nonblocking) {
                Ok(new) if multishot => {
                    self.cq.push_back(Cqe {
                        user_data: ud,
                        result: new,
                        flags: F_MORE,
                    });
                    taken += 1;
                    if taken >= ACCEPT_SLICE {
                        self.ready.push(fd);
                        return Try::Wait(fd);
                    }
                }
                Ok(new) => return Try::Done(new),
                Err(e) if would_block(&e) => {
                    // Took some: the queue may fill again while the shard
                    // replies to them (`retry_accepts`).
                    if multishot && taken > 0 && !self.retry.contains(&fd) {
                        self.retry.push(fd);
                    }
                    return Try::Wait(fd);
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Try::Done(-errno(&e)),
            }
        }
    }
}

/// accept4(2) of a close-on-exec socket, non-blocking with `nonblocking`
/// (SOCK_NONBLOCK: no fcntl after), no peer address asked.
fn accept4(fd: RawFd, nonblocking: bool) -> io::Result<RawFd> {
    let none = std::ptr::null_mut::<libc::c_void>();
    // SAFETY: accept4 with null address pointers writes nothing of ours;
    // every argument is passed as the long syscall(2) reads. The new
    // descriptor is handed out in a CQE and adopted as an OwnedFd by the
    // service.
    let r = syscall!(unsafe {
        libc::syscall(
            libc::SYS_accept4,
            libc::c_long::from(fd),
            none,
            none,
            libc::c_long::from(accept_flags(nonblocking)),
        )
    })?;
    Ok(r as RawFd)
}

/// send(2) of `buf` with `flags` (sendto without an address).
fn send(fd: RawFd, buf: &[u8], flags: i32) -> io::Result<usize> {
    // SAFETY: the kernel reads at most `buf.len()` bytes from `buf`, which
    // is alive for the call; the address pointer is null, its length 0.
    let r = syscall!(unsafe {
        libc::syscall(
            libc::SYS_sendto,
            libc::c_long::from(fd),
            buf.as_ptr(),
            buf.len(),
            libc::c_long::from(flags),
            std::ptr::null::<libc::c_void>(),
            0 as libc::c_long,
        )
    })?;
    Ok(r as usize)
}

/// recv(2) into `buf` with `flags` (recvfrom without an address).
fn recv(fd: RawFd, buf: &mut [u8], flags: i32) -> io::Result<usize> {
    let none = std::ptr::null_mut::<libc::c_void>();
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, which
    // is alive and borrowed mutably for the call; no address is asked.
    let r = syscall!(unsafe {
        libc::syscall(
            libc::SYS_recvfrom,
            libc::c_long::from(fd),
            buf.as_mut_ptr(),
            buf.len(),
            libc::c_long::from(flags),
            none,
            none,
        )
    })?;
    Ok(r as usize)
}

/// close(2) of a descriptor number the caller owns.
fn close(fd: RawFd) -> io::Result<()> {
    // SAFETY: closing a number the caller owns and no one uses after.
    syscall!(unsafe { libc::syscall(libc::SYS_close, libc::c_long::from(fd)) }).map(|_| ())
}

/// Whether operation `op` names descriptor `fd` (waits on it, closes it,
/// or acts on it).
fn names_fd(op: &Op, fd: RawFd) -> bool {
    match op {
        Op::Close { fd: f } | Op::Shutdown { fd: f, .. } => *f == fd,
        Op::Disconnect { desc } => *desc == Desc::Fd(fd),
        _ => wait_fd(op) == Some(fd),
    }
}

/// The descriptor an operation waits on, if any.
pub(super) fn wait_fd(op: &Op) -> Option<RawFd> {
    match op {
        Op::Accept { fd, .. }
        | Op::ReadWord { fd }
        | Op::Poll { fd, .. }
        | Op::Recv {
            desc: Desc::Fd(fd), ..
        }
        | Op::Send {
            desc: Desc::Fd(fd), ..
        }
        | Op::Connect { desc: Desc::Fd(fd) } => Some(*fd),
        _ => None,
    }
}

/// The epoll events that may let a waiting operation progress.
pub(super) fn interest(op: &Op) -> u32 {
    match op {
        Op::Send { .. } | Op::Connect { .. } => OUT,
        Op::Poll { events, .. } => events | ALWAYS,
        _ => IN,
    }
}

/// Sets O_NONBLOCK on `fd`.
fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    make_nonblocking(fd).map(|_| ())
}

/// Sets O_NONBLOCK on `fd`; returns the flags it had.
fn make_nonblocking(fd: RawFd) -> io::Result<i32> {
    // SAFETY: fcntl with integer arguments on a descriptor number.
    let flags = syscall!(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    if flags & libc::O_NONBLOCK == 0 {
        // SAFETY: as above.
        syscall!(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    }
    Ok(flags)
}

/// getsockopt(SO_ERROR): the pending error of a socket (0: none).
fn take_so_error(fd: RawFd) -> io::Result<i32> {
    let mut err: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `err` and `len` are live locals of the sizes given.
    syscall!(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(err)
}
