//! Every `unsafe` operation of the engine lives here, behind safe functions.
//!
//! Three kinds of thing need it:
//! - the io_uring submission queue: an SQE may point at memory the kernel
//!   reads or writes until the operation completes. [`Uring`] owns every such
//!   buffer, keyed by the operation's user data, and frees it only when the
//!   final completion of that operation has been reaped (or leaks it if the
//!   ring is dropped with the operation still in flight);
//! - raw descriptors from completions, which become [`OwnedFd`] here, before
//!   anything else can fail;
//! - the few socket options and calls that socket2 lacks (a reuseport cBPF
//!   program, `TCP_INFO` of a listener, `TCP_SAVED_SYN`, `poll(2)`).
#![allow(unsafe_code)]
// Operations for admission (peek, poll, saved SYN) and the connect side are
// used as those land; until then some are not called.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

/// How the ring was set up: which of the optional setup flags the kernel took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RingSetup {
    /// `IORING_SETUP_SINGLE_ISSUER` (6.0).
    pub single_issuer: bool,
    /// `IORING_SETUP_DEFER_TASKRUN` (6.1): completions run only when the
    /// shard waits, never interrupting it.
    pub defer_taskrun: bool,
    /// `IORING_SETUP_COOP_TASKRUN` (5.19), the fallback when DEFER is refused.
    pub coop_taskrun: bool,
}

/// One completion, copied out of the completion queue.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cqe {
    pub user_data: u64,
    pub result: i32,
    pub flags: u32,
}

impl Cqe {
    /// Whether more completions will follow for this (multishot) operation.
    pub fn more(&self) -> bool {
        cqueue::more(self.flags)
    }
}

/// The descriptor an operation names: a plain one, or a slot of the ring's
/// registered (direct) file table, which never enters the process's fd
/// table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Desc {
    /// A plain file descriptor.
    Fd(RawFd),
    /// A direct descriptor: slot `n` of the ring's file table.
    Fixed(u32),
}

impl From<RawFd> for Desc {
    fn from(fd: RawFd) -> Self {
        Desc::Fd(fd)
    }
}

/// Builds an opcode on either kind of [`Desc`] (the crate takes `types::Fd`
/// or `types::Fixed` through a sealed trait; this picks one).
macro_rules! on_desc {
    ($desc:expr, |$t:ident| $build:expr) => {
        match $desc {
            Desc::Fd(fd) => {
                let $t = types::Fd(fd);
                $build
            }
            Desc::Fixed(n) => {
                let $t = types::Fixed(n);
                $build
            }
        }
    };
}

/// An `AF_UNSPEC` address: CONNECT to it disconnects a TCP socket (an RST
/// if it was connected) and leaves it ready to connect again. A static, for
/// the same reason: an SQE may point at it without the ring keeping any memory
/// for the operation.
static UNSPEC: libc::sockaddr = libc::sockaddr {
    sa_family: libc::AF_UNSPEC as libc::sa_family_t,
    sa_data: [0; 14],
};

/// Memory an in-flight operation points at.
#[derive(Debug)]
enum OpMemory {
    Word(Box<u64>),
    Timespec(Box<types::Timespec>),
    Bytes(Box<[u8]>),
    Addr(Box<socket2::SockAddr>),
    /// A descriptor a CLOSE operation is closing: kept until its CQE says
    /// whether the kernel closed it (0) or never ran the close (-ECANCELED
    /// after a failed linked SEND), in which case dropping it closes it.
    Fd(OwnedFd),
}

/// A shard's io_uring: its submission side with the memory that in-flight
/// operations reference, and a safe drain of its completion side.
pub(crate) struct Uring {
    ring: IoUring,
    setup: RingSetup,
    /// Memory referenced by in-flight operations, by user data. An entry is
    /// removed only by [`Uring::release`] after the operation's final CQE.
    memory: HashMap<u64, OpMemory>,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("fd", &self.ring.as_raw_fd())
            .field("setup", &self.setup)
            .field("ops_with_memory", &self.memory.len())
            .finish()
    }
}

impl Uring {
    /// Sets up a ring with `entries` submission slots, trying the cheapest
    /// task-running mode first: SINGLE_ISSUER + DEFER_TASKRUN (6.1), then
    /// COOP_TASKRUN + TASKRUN_FLAG (5.19), then none. Must be called on the
    /// thread that will submit (SINGLE_ISSUER binds the ring to it).
    ///
    /// A refusal that no flag combination can fix (ENOSYS, EPERM, EACCES) is
    /// returned at once, from the first attempt.
    pub fn new(entries: u32) -> io::Result<Self> {
        let cq = entries.saturating_mul(16).max(4096);
        type Apply = fn(&mut io_uring::Builder);
        let attempts: [(RingSetup, Apply); 3] = [
            (
                RingSetup {
                    single_issuer: true,
                    defer_taskrun: true,
                    coop_taskrun: false,
                },
                |b| {
                    b.setup_single_issuer().setup_defer_taskrun();
                },
            ),
            (
                RingSetup {
                    single_issuer: false,
                    defer_taskrun: false,
                    coop_taskrun: true,
                },
                |b| {
                    b.setup_coop_taskrun().setup_taskrun_flag();
                },
            ),
            (RingSetup::default(), |_| {}),
        ];
        let mut last = io::Error::from_raw_os_error(libc::EINVAL);
        for (setup, apply) in attempts {
            let mut builder = IoUring::builder();
            builder.setup_cqsize(cq);
            apply(&mut builder);
            match builder.build(entries) {
                Ok(ring) => {
                    return Ok(Uring {
                        ring,
                        setup,
                        memory: HashMap::new(),
                    })
                }
                Err(e) => {
                    let fatal = matches!(
                        e.raw_os_error(),
                        Some(libc::ENOSYS) | Some(libc::EPERM) | Some(libc::EACCES)
                    );
                    if fatal {
                        return Err(e);
                    }
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// The setup flags the kernel took.
    pub fn setup(&self) -> RingSetup {
        self.setup
    }

    /// Whether the kernel supports `opcode` (IORING_REGISTER_PROBE, 5.6).
    pub fn supports(&self, opcode: u8) -> bool {
        let mut probe = io_uring::Probe::new();
        match self.ring.submitter().register_probe(&mut probe) {
            Ok(()) => probe.is_supported(opcode),
            Err(_) => false,
        }
    }

    /// Queues an SQE, submitting first if the queue is full.
    ///
    /// # Safety
    /// Any memory `entry` points at must stay valid until its final CQE.
    unsafe fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: forwarded from the caller: memory referenced by `entry`
            // is valid until the operation's final completion.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                return Ok(());
            }
            self.submit()?;
        }
    }

    fn push_plain(&mut self, entry: squeue::Entry) -> io::Result<()> {
        // SAFETY: callers of push_plain pass entries that reference no user
        // memory (only descriptors and inline integers), so nothing can dangle.
        unsafe { self.push(entry) }
    }

    fn push_with(&mut self, entry: squeue::Entry, user_data: u64, mem: OpMemory) -> io::Result<()> {
        // SAFETY: `mem` is the memory `entry` points into; it is a heap
        // allocation that moves into `self.memory` (the box's address does not
        // change) and is released only after the operation's final CQE (see
        // `release`), or leaked in Drop while still in flight.
        let res = unsafe { self.push(entry) };
        if res.is_ok() {
            self.memory.insert(user_data, mem);
        }
        res
    }

    /// Makes room for `n` adjacent SQEs (a link chain must not be split
    /// across two submissions), submitting what is queued if needed.
    pub fn reserve(&mut self, n: usize) -> io::Result<()> {
        let (cap, len) = {
            let sq = self.ring.submission();
            (sq.capacity(), sq.len())
        };
        if cap - len < n {
            self.submit()?;
        }
        Ok(())
    }

    /// Posts a SOCKET (5.19): a new close-on-exec TCP socket of `domain`,
    /// its descriptor in the completion's result.
    pub fn socket(&mut self, domain: i32, user_data: u64) -> io::Result<()> {
        let e = opcode::Socket::new(
            domain,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            libc::IPPROTO_TCP,
        )
        .build()
        .user_data(user_data);
        self.push_plain(e)
    }

    /// Posts a multishot ACCEPT (5.19) on listening socket `fd`.
    pub fn accept_multi(&mut self, fd: RawFd, user_data: u64) -> io::Result<()> {
        let e = opcode::AcceptMulti::new(types::Fd(fd))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data);
        self.push_plain(e)
    }

    /// Posts a single-shot ACCEPT (5.5), for kernels without multishot.
    pub fn accept_once(&mut self, fd: RawFd, user_data: u64) -> io::Result<()> {
        let e = opcode::Accept::new(types::Fd(fd), std::ptr::null_mut(), std::ptr::null_mut())
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data);
        self.push_plain(e)
    }

    /// Asks the kernel to cancel the operation posted with `target`.
    pub fn cancel(&mut self, target: u64, user_data: u64) -> io::Result<()> {
        self.push_plain(
            opcode::AsyncCancel::new(target)
                .build()
                .user_data(user_data),
        )
    }

    /// Reads the 8-byte counter of an eventfd; the value is in [`Uring::release`]'s result.
    pub fn read_counter(&mut self, fd: RawFd, user_data: u64) -> io::Result<()> {
        let mut word = Box::new(0u64);
        let ptr: *mut u64 = &mut *word;
        let e = opcode::Read::new(types::Fd(fd), ptr.cast(), 8)
            .build()
            .user_data(user_data);
        self.push_with(e, user_data, OpMemory::Word(word))
    }

    /// Posts a relative timeout that completes with -ETIME after `after`.
    pub fn timeout(&mut self, after: Duration, user_data: u64) -> io::Result<()> {
        let ts = Box::new(types::Timespec::from(after));
        let ptr: *const types::Timespec = &*ts;
        let e = opcode::Timeout::new(ptr).build().user_data(user_data);
        self.push_with(e, user_data, OpMemory::Timespec(ts))
    }

    /// RECV with MSG_PEEK of up to `len` bytes from a connected socket; the
    /// bytes come back from [`Uring::release`].
    pub fn peek(&mut self, fd: RawFd, len: usize, user_data: u64) -> io::Result<()> {
        let mut buf = vec![0u8; len].into_boxed_slice();
        let e = opcode::Recv::new(types::Fd(fd), buf.as_mut_ptr(), len as u32)
            .flags(libc::MSG_PEEK)
            .build()
            .user_data(user_data);
        self.push_with(e, user_data, OpMemory::Bytes(buf))
    }

    /// Single-shot POLL_ADD for `events` (poll(2) bits) on `fd`.
    pub fn poll(
        &mut self,
        fd: RawFd,
        events: u32,
        multishot: bool,
        user_data: u64,
    ) -> io::Result<()> {
        let e = opcode::PollAdd::new(types::Fd(fd), events)
            .multi(multishot)
            .build()
            .user_data(user_data);
        self.push_plain(e)
    }

    /// SEND of `bytes` on `fd` with `flags` (e.g. MSG_MORE, MSG_NOSIGNAL);
    /// `link` chains the next SQE to it (IOSQE_IO_LINK).
    pub fn send(
        &mut self,
        fd: impl Into<Desc>,
        bytes: Box<[u8]>,
        flags: i32,
        link: bool,
        user_data: u64,
    ) -> io::Result<()> {
        let (ptr, len) = (bytes.as_ptr(), bytes.len() as u32);
        let mut e = on_desc!(fd.into(), |t| opcode::Send::new(t, ptr, len)
            .flags(flags)
            .build())
        .user_data(user_data);
        if link {
            e = e.flags(squeue::Flags::IO_LINK);
        }
        self.push_with(e, user_data, OpMemory::Bytes(bytes))
    }

    /// RECV into a fresh buffer of `len` bytes, returned by [`Uring::release`].
    pub fn recv(&mut self, fd: RawFd, len: usize, user_data: u64) -> io::Result<()> {
        let mut buf = vec![0u8; len].into_boxed_slice();
        let e = opcode::Recv::new(types::Fd(fd), buf.as_mut_ptr(), len as u32)
            .build()
            .user_data(user_data);
        self.push_with(e, user_data, OpMemory::Bytes(buf))
    }

    /// CLOSE of a descriptor the caller gives up. Its completion must be
    /// passed to [`Uring::finish_close`], which closes the descriptor itself
    /// if the kernel did not (a cancelled link), so it is closed exactly once.
    pub fn close(&mut self, fd: OwnedFd, user_data: u64) -> io::Result<()> {
        let raw = fd.as_raw_fd();
        let e = opcode::Close::new(types::Fd(raw))
            .build()
            .user_data(user_data);
        // SAFETY: the entry references no memory; the descriptor is kept open
        // (owned by `self.memory`) until the CQE, and its number cannot be
        // reused before then.
        unsafe { self.push(e)? };
        self.memory.insert(user_data, OpMemory::Fd(fd));
        Ok(())
    }

    /// Completes a CLOSE posted by [`Uring::close`].
    pub fn finish_close(&mut self, user_data: u64, result: i32) {
        if let Some(OpMemory::Fd(fd)) = self.memory.remove(&user_data) {
            if result >= 0 {
                // The kernel closed it: forget the number without closing
                // again (it may already belong to another descriptor).
                std::mem::forget(fd);
            } else {
                // The close never ran (e.g. -ECANCELED after a failed link):
                // dropping the OwnedFd closes it now.
                drop(fd);
            }
        }
    }

    /// CONNECT of `fd` to `addr` (5.5); with `timeout`, a LINK_TIMEOUT is
    /// linked to it with user data `timeout_user_data`.
    pub fn connect(
        &mut self,
        fd: RawFd,
        addr: socket2::SockAddr,
        timeout: Option<(Duration, u64)>,
        user_data: u64,
    ) -> io::Result<()> {
        let addr = Box::new(addr);
        let mut e = opcode::Connect::new(types::Fd(fd), addr.as_ptr().cast(), addr.len())
            .build()
            .user_data(user_data);
        match timeout {
            None => self.push_with(e, user_data, OpMemory::Addr(addr)),
            Some((after, tud)) => {
                // Both SQEs must be in the same submission batch, adjacent.
                self.reserve(2)?;
                e = e.flags(squeue::Flags::IO_LINK);
                self.push_with(e, user_data, OpMemory::Addr(addr))?;
                let ts = Box::new(types::Timespec::from(after));
                let ptr: *const types::Timespec = &*ts;
                let t = opcode::LinkTimeout::new(ptr).build().user_data(tud);
                self.push_with(t, tud, OpMemory::Timespec(ts))
            }
        }
    }

    /// Frees the memory of an operation whose final CQE has been reaped and
    /// returns what it read: the eventfd counter or the received bytes.
    pub fn release(&mut self, user_data: u64) -> Released {
        match self.memory.remove(&user_data) {
            Some(OpMemory::Word(w)) => Released::Word(*w),
            Some(OpMemory::Bytes(b)) => Released::Bytes(b),
            Some(OpMemory::Fd(fd)) => {
                // Not a close completion: keep the descriptor owned.
                self.memory.insert(user_data, OpMemory::Fd(fd));
                Released::Nothing
            }
            Some(OpMemory::Timespec(_)) | Some(OpMemory::Addr(_)) | None => Released::Nothing,
        }
    }

    /// Submits queued SQEs without waiting.
    pub fn submit(&mut self) -> io::Result<usize> {
        loop {
            match self.ring.submit() {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                other => return other,
            }
        }
    }

    /// Submits queued SQEs and waits for at least `want` completions: one
    /// `io_uring_enter` per call. EINTR returns Ok (the caller loops anyway);
    /// EBUSY (completion queue overflow) returns Ok so the caller drains.
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        match self.ring.submit_and_wait(want) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Moves every available completion into `out`.
    pub fn drain(&mut self, out: &mut Vec<Cqe>) {
        let mut cq = self.ring.completion();
        cq.sync();
        for e in &mut cq {
            out.push(Cqe {
                user_data: e.user_data(),
                result: e.result(),
                flags: e.flags(),
            });
        }
    }

    /// CONNECT of `fd` to `addr` (5.5) at the head of a link chain: with
    /// `timeout`, a LINK_TIMEOUT with user data `timeout_user_data` follows
    /// it; `link_next` links the next SQE pushed (IOSQE_IO_LINK), which the
    /// kernel then cancels if the connect fails or times out. The caller
    /// reserves room for the whole chain first ([`Uring::reserve`]).
    pub fn connect_chain(
        &mut self,
        fd: impl Into<Desc>,
        addr: socket2::SockAddr,
        timeout: Option<(Duration, u64)>,
        link_next: bool,
        user_data: u64,
    ) -> io::Result<()> {
        let addr = Box::new(addr);
        let (ptr, len) = (addr.as_ptr().cast(), addr.len());
        let mut e =
            on_desc!(fd.into(), |t| opcode::Connect::new(t, ptr, len).build()).user_data(user_data);
        if timeout.is_some() || link_next {
            e = e.flags(squeue::Flags::IO_LINK);
        }
        self.push_with(e, user_data, OpMemory::Addr(addr))?;
        if let Some((after, tud)) = timeout {
            let ts = Box::new(types::Timespec::from(after));
            let ptr: *const types::Timespec = &*ts;
            let mut t = opcode::LinkTimeout::new(ptr).build().user_data(tud);
            if link_next {
                t = t.flags(squeue::Flags::IO_LINK);
            }
            self.push_with(t, tud, OpMemory::Timespec(ts))?;
        }
        Ok(())
    }

    /// RECV of up to `len` bytes with `flags` into a fresh buffer, returned
    /// by [`Uring::release`]; `link` chains the next SQE (IOSQE_IO_LINK).
    pub fn recv_linked(
        &mut self,
        fd: impl Into<Desc>,
        len: usize,
        flags: i32,
        link: bool,
        user_data: u64,
    ) -> io::Result<()> {
        let mut buf = vec![0u8; len].into_boxed_slice();
        let ptr = buf.as_mut_ptr();
        let mut e = on_desc!(fd.into(), |t| opcode::Recv::new(t, ptr, len as u32)
            .flags(flags)
            .build())
        .user_data(user_data);
        if link {
            e = e.flags(squeue::Flags::IO_LINK);
        }
        self.push_with(e, user_data, OpMemory::Bytes(buf))
    }

    /// Registers an empty (sparse) direct-descriptor table of `slots`
    /// entries (5.19); the kernel refuses more than RLIMIT_NOFILE.
    pub fn register_direct_table(&mut self, slots: u32) -> io::Result<()> {
        self.ring.submitter().register_files_sparse(slots)
    }

    /// Posts a SOCKET (5.19) whose TCP socket of `domain` goes into direct
    /// slot `slot` (replacing whatever was there) instead of the fd table;
    /// the completion's result is 0 on success. `link` chains the next SQE.
    pub fn socket_direct(
        &mut self,
        domain: i32,
        slot: u32,
        link: bool,
        user_data: u64,
    ) -> io::Result<()> {
        let dest = types::DestinationSlot::try_from_slot_target(slot)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "direct slot out of range"))?;
        // SOCK_CLOEXEC is refused for a direct descriptor (it has no fd).
        let mut e = opcode::Socket::new(domain, libc::SOCK_STREAM, libc::IPPROTO_TCP)
            .file_index(Some(dest))
            .build()
            .user_data(user_data);
        if link {
            e = e.flags(squeue::Flags::IO_LINK);
        }
        self.push_plain(e)
    }

    /// CONNECT of `fd` to `AF_UNSPEC` (5.5): the kernel's `tcp_disconnect`
    /// sends an RST if the socket is connected (whatever SO_LINGER says),
    /// frees its port and leaves the socket ready for another CONNECT, so
    /// a load generator can reuse it instead of closing it and creating a
    /// new one. The result is 0 on success.
    pub fn disconnect(&mut self, fd: impl Into<Desc>, user_data: u64) -> io::Result<()> {
        self.disconnect_linked(fd, false, user_data)
    }

    /// [`Uring::disconnect`], with `link` chaining the next SQE.
    fn disconnect_linked(
        &mut self,
        fd: impl Into<Desc>,
        link: bool,
        user_data: u64,
    ) -> io::Result<()> {
        let addr: *const libc::sockaddr = &UNSPEC;
        let len = size_of::<libc::sockaddr>() as libc::socklen_t;
        let mut e = on_desc!(fd.into(), |t| opcode::Connect::new(t, addr, len).build())
            .user_data(user_data);
        if link {
            e = e.flags(squeue::Flags::IO_LINK);
        }
        // SAFETY: the entry points only at UNSPEC, a static.
        unsafe { self.push(e) }
    }

    /// CLOSE of direct slot `slot` (5.15): the ring's file table lets the
    /// socket go. Nothing of the caller's needs to live until the CQE.
    pub fn close_direct(&mut self, slot: u32, user_data: u64) -> io::Result<()> {
        let e = opcode::Close::new(types::Fixed(slot))
            .build()
            .user_data(user_data);
        self.push_plain(e)
    }

    /// Checks, on a ring with nothing else in flight, that this kernel
    /// creates sockets in direct slots, disconnects them and closes them
    /// (SOCKET into slot 0 → CONNECT to AF_UNSPEC → CLOSE, linked, waited
    /// for). Leaves slot 0 empty. Needs the direct table registered.
    pub fn probe_direct_sockets(&mut self) -> io::Result<()> {
        const PROBE: u64 = u64::MAX - 2;
        self.socket_direct(libc::AF_INET, 0, true, PROBE)?;
        self.disconnect_linked(Desc::Fixed(0), true, PROBE + 1)?;
        self.close_direct(0, PROBE + 2)?;
        let mut results = [None; 3];
        let mut got = Vec::new();
        while results.iter().any(Option::is_none) {
            self.submit_and_wait(1)?;
            got.clear();
            self.drain(&mut got);
            for c in &got {
                match c.user_data.checked_sub(PROBE) {
                    Some(k @ 0..=2) => results[k as usize] = Some(c.result),
                    _ => {
                        return Err(io::Error::other(
                            "direct-socket probe: the ring had other operations in flight",
                        ))
                    }
                }
            }
        }
        let failed = results.iter().flatten().find(|r| **r < 0);
        if let Some(r) = failed {
            if results[2] == Some(-libc::ECANCELED) {
                // The chain broke before the close: empty the slot anyway.
                self.close_direct(0, PROBE + 2)?;
                self.submit_and_wait(1)?;
                got.clear();
                self.drain(&mut got);
            }
            return Err(io::Error::from_raw_os_error(-r));
        }
        Ok(())
    }
}

impl Uring {
    /// RECV of up to `buf.len()` bytes into `buf`, which the ring keeps
    /// until the completion and hands back from [`Uring::release`] (so one
    /// buffer serves a whole stream of receives without reallocation).
    pub fn recv_into(&mut self, fd: RawFd, mut buf: Box<[u8]>, user_data: u64) -> io::Result<()> {
        let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
        let e = opcode::Recv::new(types::Fd(fd), buf.as_mut_ptr(), len)
            .build()
            .user_data(user_data);
        self.push_with(e, user_data, OpMemory::Bytes(buf))
    }

    /// SEND of `buf[range]` on `fd` with `flags`; the ring keeps `buf` until
    /// the completion and hands it back from [`Uring::release`], so a short
    /// send can be resumed from the same buffer without copying.
    ///
    /// # Errors
    /// `InvalidInput` if `range` is not inside `buf` (nothing is posted;
    /// `buf` is dropped); otherwise as the submission.
    pub fn send_range(
        &mut self,
        fd: RawFd,
        buf: Box<[u8]>,
        range: std::ops::Range<usize>,
        flags: i32,
        user_data: u64,
    ) -> io::Result<()> {
        let Some(bytes) = buf.get(range.clone()) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "send range outside its buffer",
            ));
        };
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        let e = opcode::Send::new(types::Fd(fd), bytes.as_ptr(), len)
            .flags(flags)
            .build()
            .user_data(user_data);
        self.push_with(e, user_data, OpMemory::Bytes(buf))
    }

    /// SHUTDOWN of `fd` (5.11): `how` is `libc::SHUT_WR`, `SHUT_RD` or
    /// `SHUT_RDWR`.
    pub fn shutdown(&mut self, fd: RawFd, how: i32, user_data: u64) -> io::Result<()> {
        let e = opcode::Shutdown::new(types::Fd(fd), how)
            .build()
            .user_data(user_data);
        self.push_plain(e)
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        // Memory still registered belongs to operations whose final CQE was
        // never reaped; the kernel may still write into it while it tears the
        // ring down, so it is leaked rather than freed.
        for (_, mem) in self.memory.drain() {
            std::mem::forget(mem);
        }
    }
}

/// What an operation's memory held when it was released.
#[derive(Debug)]
pub(crate) enum Released {
    /// Nothing to return (a timeout, an address, or no memory at all).
    Nothing,
    /// An 8-byte counter (eventfd read).
    Word(u64),
    /// A byte buffer (recv, peek, send).
    Bytes(Box<[u8]>),
}

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

/// `IORING_OP_*` numbers the engine probes for.
pub(crate) mod op {
    /// IORING_OP_ACCEPT.
    pub const ACCEPT: u8 = io_uring::opcode::Accept::CODE;
    /// IORING_OP_CONNECT.
    pub const CONNECT: u8 = io_uring::opcode::Connect::CODE;
    /// IORING_OP_SOCKET.
    pub const SOCKET: u8 = io_uring::opcode::Socket::CODE;
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
