//! The driver's direct syscalls, behind safe functions: what the services
//! call themselves, beside the operations they post through
//! [`Driver`](super::Driver) (which owns the memory of those operations
//! until their final completion).
//!
//! Two kinds of thing need `unsafe` here:
//! - raw descriptors from completions, which become [`OwnedFd`] here, before
//!   anything else can fail;
//! - eventfds, `poll(2)`, and the few socket options and calls that socket2
//!   lacks (a reuseport cBPF program, `TCP_INFO` of a listener,
//!   `TCP_SAVED_SYN`).
// Operations for admission (peek, poll, saved SYN) and the connect side are
// used as those land; until then some are not called.
#![allow(dead_code)]

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// Adopts a descriptor the kernel just returned in a CQE.
///
/// `fd` must be non-negative and come from a completion that installed it.
pub(crate) fn adopt_fd(fd: i32) -> OwnedFd {
    debug_assert!(fd >= 0);
    // SAFETY: the kernel installed `fd` in our table for this completion and
    // handed it to us alone; nothing else in the process knows its number, so
    // this is its only owner and it is open.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Creates a non-blocking, close-on-exec eventfd.
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; a negative return is an error.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(adopt_fd(fd))
}

/// Adds 1 to an eventfd's counter (makes it readable).
pub(crate) fn eventfd_signal(fd: BorrowedFd<'_>) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live local; the fd is borrowed, so open.
    // The only possible failure is EAGAIN at counter overflow (2^64-2), where
    // the fd is readable anyway, so the result is deliberately ignored.
    let _ = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// Resets an eventfd's counter to zero (makes it unreadable).
pub(crate) fn eventfd_clear(fd: BorrowedFd<'_>) {
    let mut v: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live local; the fd is non-blocking,
    // so an empty counter returns EAGAIN, which means already clear.
    let _ = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
}

/// Waits until `fd` is readable or `timeout` passes (`None`: forever).
/// Returns whether it is readable. EINTR returns `Ok(false)`.
pub(crate) fn poll_readable(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<bool> {
    let ms: i32 = match timeout {
        None => -1,
        Some(d) => {
            // Round up so a sub-millisecond wait does not become a busy poll.
            let ms = d.as_nanos().div_ceil(1_000_000);
            i32::try_from(ms).unwrap_or(i32::MAX)
        }
    };
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd on the stack, count 1; the fd is borrowed.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(n > 0 && pfd.revents & libc::POLLIN != 0)
}

/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic value; the same on x86 and arm).
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// Attaches a classic-BPF reuseport program that picks socket
/// `cpu % groups` of the reuseport group, `cpu` being the CPU that is
/// processing the incoming SYN (4.5+; see the kernel's
/// `tools/testing/selftests/net/reuseport_bpf_cpu.c`).
pub(crate) fn attach_cpu_steering(fd: BorrowedFd<'_>, groups: u32) -> io::Result<()> {
    const BPF_LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const BPF_ALU_MOD_K: u16 = (libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K) as u16;
    const BPF_RET_A: u16 = (libc::BPF_RET | libc::BPF_A) as u16;
    let mut code = [
        libc::sock_filter {
            code: BPF_LD_W_ABS,
            jt: 0,
            jf: 0,
            k: (libc::SKF_AD_OFF + libc::SKF_AD_CPU) as u32,
        },
        libc::sock_filter {
            code: BPF_ALU_MOD_K,
            jt: 0,
            jf: 0,
            k: groups.max(1),
        },
        libc::sock_filter {
            code: BPF_RET_A,
            jt: 0,
            jf: 0,
            k: 0,
        },
    ];
    let prog = libc::sock_fprog {
        len: code.len() as u16,
        filter: code.as_mut_ptr(),
    };
    // SAFETY: `prog` and the `code` array it points at live across the call;
    // the kernel copies the program during setsockopt.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const libc::sock_fprog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `SO_DETACH_REUSEPORT_BPF` (5.3; asm-generic value).
const SO_DETACH_REUSEPORT_BPF: libc::c_int = 68;

/// Detaches the reuseport program of the group `fd` belongs to (ENOENT
/// when it has none).
pub(crate) fn detach_reuseport_program(fd: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt::<i32>(fd, libc::SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)
}

/// The kernel's view of a listening socket, from `TCP_INFO`: for a socket in
/// LISTEN state Linux reports the accept-queue length in `tcpi_unacked` and
/// the effective backlog in `tcpi_sacked`.
pub(crate) fn listener_queue(fd: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    let mut info = MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the buffer is a zeroed tcp_info of `len` bytes; the kernel
    // writes at most `len` bytes and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised plain-old-data, partly filled by the kernel:
    // every bit pattern is a valid tcp_info.
    let info = unsafe { info.assume_init() };
    Ok((info.tcpi_unacked, info.tcpi_sacked))
}

/// Reads `TCP_SAVED_SYN`: the IP and TCP headers of the SYN that opened this
/// connection (the listener must have set `TCP_SAVE_SYN`; 4.2+). Empty when
/// nothing was saved. The kernel frees the saved copy after the first read.
pub(crate) fn saved_syn(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 512];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: `buf` is a live allocation of `len` bytes; the kernel writes at
    // most `len` bytes and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_SAVED_SYN,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(len as usize);
    Ok(buf)
}

/// `recv(MSG_PEEK | MSG_DONTWAIT)` of up to `len` bytes: what has arrived,
/// without consuming it and without ever blocking.
pub(crate) fn peek_now(fd: BorrowedFd<'_>, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    // SAFETY: `buf` is a live allocation of `len` bytes; recv writes at most
    // `len` bytes into it.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            len,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            buf.clear();
            return Ok(buf);
        }
        return Err(e);
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// Reads and discards whatever has arrived, without blocking (so a close
/// that follows sends FIN, not the RST Linux sends over unread data).
pub(crate) fn discard_now(fd: BorrowedFd<'_>) {
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: a live stack buffer of its exact length.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 {
            return;
        }
    }
}

/// Reads and discards up to `n` bytes that have already arrived, without
/// blocking (`recv(MSG_DONTWAIT)`); returns how many were consumed.
pub(crate) fn consume_now(fd: BorrowedFd<'_>, n: usize) -> io::Result<usize> {
    let mut buf = vec![0u8; n];
    let mut done = 0;
    while done < n {
        // SAFETY: `buf[done..]` is a live allocation of `n - done` bytes;
        // recv writes at most that many into it.
        let got = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf[done..].as_mut_ptr().cast(),
                n - done,
                libc::MSG_DONTWAIT,
            )
        };
        if got < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(done),
                _ => return Err(e),
            }
        }
        if got == 0 {
            return Ok(done);
        }
        done += got as usize;
    }
    Ok(done)
}

/// Whether FD_CLOEXEC is set on `fd` (`fcntl(F_GETFD)`).
pub(crate) fn is_cloexec(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: F_GETFD takes no pointer argument; the fd is borrowed, so open.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(flags & libc::FD_CLOEXEC != 0)
}

/// The calling thread's CPU time (user and system), in nanoseconds
/// (`CLOCK_THREAD_CPUTIME_ID`); 0 if the clock cannot be read.
pub(crate) fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec into a live local; the clock id is a
    // constant every Linux kernel has.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc < 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Sets the calling thread's timer slack (`PR_SET_TIMERSLACK`): how much
/// later than asked the kernel may end its sleeps (50 µs by default, as
/// long as the pauses the engine takes when coalescing wake-ups).
pub(crate) fn set_timer_slack(ns: u64) -> io::Result<()> {
    // SAFETY: prctl with integer arguments only; it affects this thread.
    let rc = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, ns as libc::c_ulong, 0, 0, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Plain integer types a socket option is read or written as: every bit
/// pattern is a valid value, so the kernel may fill one in.
pub(crate) trait OptValue: Copy + Default {}
impl OptValue for i32 {}
impl OptValue for u64 {}

/// Sets a socket option socket2 has no setter for.
pub(crate) fn setsockopt<T: OptValue>(
    fd: BorrowedFd<'_>,
    level: i32,
    name: i32,
    value: T,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a live `T` with its exact size; the fd is
    // borrowed, so open.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads a socket option socket2 has no getter for.
pub(crate) fn getsockopt<T: OptValue>(fd: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<T> {
    let mut value = T::default();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: a live `T` and its size; the kernel writes at most `len`
    // bytes, and any bit pattern is a valid `T` (OptValue).
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut T).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Takes ownership of a descriptor this process inherited by number
/// (systemd's `LISTEN_FDS`: 3, 4, ...), after checking it is open.
pub(crate) fn inherited_fd(fd: i32) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: F_GETFD takes no pointer; it fails with EBADF if `fd` is not
    // open, so nothing below adopts a closed number.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is open and, by the protocol that passed it (LISTEN_FDS,
    // whose variables the caller unsets so that nothing adopts it twice),
    // this process's to own; no other owner exists in this process.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets FD_CLOEXEC on a descriptor this process inherited by number and
/// does not own (EBADF if it is not open).
pub(crate) fn set_cloexec_raw(fd: i32) -> io::Result<()> {
    // SAFETY: fcntl on an integer; a closed number fails with EBADF and
    // nothing is dereferenced.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above, setting only the close-on-exec flag.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The most descriptors one message carries (the kernel's SCM_MAX_FD is 253).
pub(crate) const MAX_FDS_PER_MESSAGE: usize = 250;

/// Sends `bytes` as one message on a Unix socket with `fds` attached
/// (SCM_RIGHTS): the receiver gets new descriptors for the same open files.
pub(crate) fn send_with_fds(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    if fds.len() > MAX_FDS_PER_MESSAGE || bytes.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let data_len = std::mem::size_of_val(raw.as_slice());
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(data_len as u32) } as usize;
    // u64 words keep the control buffer aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8).max(1)];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: zeroed msghdr is a valid empty header; the pointers set below
    // point at `iov` and `control`, which outlive the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer is `space` bytes, enough for one
        // cmsghdr with `data_len` bytes of data (CMSG_SPACE), so
        // CMSG_FIRSTHDR is non-null and CMSG_DATA has room for `raw`.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(data_len as u32) as _;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                data_len,
            );
        }
    }
    loop {
        // SAFETY: `msg` and everything it points at are live; the fds are
        // borrowed, so open for the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            if n as usize != bytes.len() {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "short sendmsg"));
            }
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Receives one message from a Unix socket into `buf`, with the
/// descriptors attached to it (close-on-exec). Returns the length and the
/// descriptors; a truncated message or control part is an error (any
/// descriptors that did arrive are closed).
pub(crate) fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let data_len = MAX_FDS_PER_MESSAGE * size_of::<i32>();
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(data_len as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: zeroed msghdr is a valid empty header; the pointers set below
    // point at `iov` and `control`, which outlive the recvmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let n = loop {
        // SAFETY: `msg` points at live buffers of the sizes it states.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `msg_controllen` bytes of `control` with
    // cmsghdrs; CMSG_FIRSTHDR/CMSG_NXTHDR walk only within it, and each
    // SCM_RIGHTS payload is an array of descriptors newly installed in our
    // table for us alone (adopted once each).
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let header = libc::CMSG_LEN(0) as usize;
                let count = ((*cmsg).cmsg_len as usize).saturating_sub(header) / size_of::<i32>();
                let data = libc::CMSG_DATA(cmsg).cast::<i32>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(data.add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "message or descriptors truncated",
        ));
    }
    Ok((n, fds))
}

/// accept4(2) on listening socket `listener` (non-blocking itself): the
/// next connection of its queue, close-on-exec, and non-blocking with
/// `nonblocking` (SOCK_NONBLOCK in the call: no fcntl after); no peer
/// address asked. EAGAIN when the queue is empty.
pub(crate) fn accept4(listener: BorrowedFd<'_>, nonblocking: bool) -> io::Result<OwnedFd> {
    // SAFETY: null address pointers make the kernel write nothing of ours;
    // the listener is borrowed, so open for the call.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            super::accept_flags(nonblocking),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(adopt_fd(fd))
}

/// How an accept error is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AcceptErrorKind {
    /// Our own cancel.
    Cancelled,
    /// Out of a resource: back off.
    Exhausted,
    /// The connection died before we took it, or a firewall refused it: skip.
    Transient,
    /// Anything else: surface it, back off.
    Other,
}

/// Classifies a negative accept result.
pub(crate) fn classify(errno: i32) -> AcceptErrorKind {
    match errno {
        libc::ECANCELED => AcceptErrorKind::Cancelled,
        libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM => AcceptErrorKind::Exhausted,
        libc::ECONNABORTED
        | libc::EPROTO
        | libc::EPERM
        | libc::EAGAIN
        | libc::EINTR
        | libc::ENETDOWN
        | libc::ENOPROTOOPT
        | libc::EHOSTDOWN
        | libc::ENONET
        | libc::EHOSTUNREACH
        | libc::EOPNOTSUPP
        | libc::ENETUNREACH
        | libc::ETIMEDOUT => AcceptErrorKind::Transient,
        _ => AcceptErrorKind::Other,
    }
}
