//! The seam between the engine and the kernel: services post operations —
//! accept, cancel, read, timeout, recv (peek), send, poll, close, connect,
//! disconnect, socket, shutdown — and receive completions, keyed by the
//! user data they posted them with. No service knows which backend runs it.
//!
//! - [`uring`]: the operations become io_uring SQEs, submitted once per
//!   turn of the shard's loop;
//! - [`epoll`]: the same operations performed with non-blocking syscalls
//!   when epoll reports their descriptor ready, completed with the same
//!   results, flags and order guarantees (a linked SEND then its CLOSE; a
//!   CONNECT and its LINK_TIMEOUT; cancellation), the way monoio's legacy
//!   driver and Seastar's epoll backend work. It runs where io_uring is
//!   denied (container seccomp profiles, `kernel.io_uring_disabled`);
//! - [`sys`]: the few direct syscalls the services make themselves
//!   (eventfds, `poll(2)`, socket options socket2 lacks, adopting a
//!   descriptor a completion returned);
//! - `runtime` (feature `tokio`): a descriptor registered with tokio's
//!   reactor (`AsyncFd`, whose constructors are `unsafe` since tokio 1.54).
//!
//! This folder is the engine's one thin unsafe layer: the crate root allows
//! `unsafe_code` here and nowhere else.
//!
//! [`Driver`] owns the memory every in-flight operation points at (buffers,
//! addresses, the descriptor a CLOSE is closing), keyed by user data, and
//! frees it only after the operation's final completion ([`Driver::release`]).

use std::collections::HashMap;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

pub(crate) mod epoll;
#[cfg(feature = "tokio")]
pub(crate) mod runtime;
pub(crate) mod sys;
pub(crate) mod uring;

/// A hasher for the driver's u64 keys (user data, node ids): one multiply
/// (Fibonacci hashing) instead of SipHash, on maps touched several times
/// per connection. Keys are the engine's own, not an attacker's.
#[derive(Default, Clone, Copy)]
pub(crate) struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (n ^ (n >> 29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A map keyed by u64 with [`KeyHasher`].
pub(crate) type KeyMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<KeyHasher>>;

/// `IORING_CQE_F_MORE`: more completions follow for a multishot operation.
/// The epoll backend sets the same bit.
pub(crate) const F_MORE: u32 = 1 << 1;

/// How the ring was set up: which of the optional setup flags the kernel took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct RingSetup {
    /// `IORING_SETUP_SINGLE_ISSUER` (6.0).
    pub single_issuer: bool,
    /// `IORING_SETUP_DEFER_TASKRUN` (6.1): completions run only when the
    /// shard waits, never interrupting it.
    pub defer_taskrun: bool,
    /// `IORING_SETUP_COOP_TASKRUN` (5.19), the fallback when DEFER is refused.
    pub coop_taskrun: bool,
}

/// Which backend runs a listener's or connector's shards.
///
/// ```
/// use floodgate::{Backend, Listener};
///
/// let listener = Listener::builder("127.0.0.1:0".parse()?)
///     .shards(1)
///     .backend(Backend::Epoll)
///     .build()?;
/// assert_eq!(listener.backend().backend, Backend::Epoll);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Backend {
    /// io_uring when a ring can be set up and the kernel has every opcode
    /// the engine uses; epoll when io_uring is denied (EPERM from a seccomp
    /// profile or `kernel.io_uring_disabled`, ENOSYS) or an opcode is
    /// missing. Any other failure (ENOMEM, EMFILE, RLIMIT_MEMLOCK) stays an
    /// error. The environment variable [`BACKEND_ENV`] overrides `Auto`.
    #[default]
    Auto,
    /// io_uring only: where it cannot be set up, `build()` returns
    /// [`Error::UringUnavailable`](crate::Error::UringUnavailable) naming the cause.
    IoUring,
    /// epoll, whatever the kernel offers.
    Epoll,
}

/// The environment variable an operator sets to force the backend that
/// [`Backend::Auto`] picks: `io_uring` or `epoll` (anything else is ignored).
/// An explicit `IoUring` or `Epoll` in the code is not overridden.
pub const BACKEND_ENV: &str = "FLOODGATE_BACKEND";

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Auto => "auto",
            Backend::IoUring => "io_uring",
            Backend::Epoll => "epoll",
        })
    }
}

/// The backend that runs, and why it was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct BackendChoice {
    /// `IoUring` or `Epoll` (never `Auto`).
    pub backend: Backend,
    /// Why: "asked for", "io_uring available", or the refusal that made
    /// `Auto` fall back, e.g. "io_uring_setup denied (EPERM): a seccomp
    /// profile or kernel.io_uring_disabled".
    pub reason: String,
}

impl BackendChoice {
    /// What a listener or connector reports when no shard started.
    pub(crate) fn none_started() -> Self {
        BackendChoice {
            backend: Backend::IoUring,
            reason: "no shard started".into(),
        }
    }
}

impl std::fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.backend, self.reason)
    }
}

/// One completion.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cqe {
    pub user_data: u64,
    pub result: i32,
    pub flags: u32,
}

impl Cqe {
    /// Whether more completions will follow for this (multishot) operation.
    pub fn more(&self) -> bool {
        self.flags & F_MORE != 0
    }
}

/// The descriptor an operation names: a plain one, or a slot of the ring's
/// registered (direct) file table, which never enters the process's fd
/// table (io_uring only).
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

/// An operation, as a service posts it.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    /// ACCEPT on a listening socket; multishot keeps completing (F_MORE).
    /// Accepted sockets are close-on-exec, and non-blocking with
    /// `nonblocking` (SOCK_NONBLOCK in the accept itself: no fcntl after).
    Accept {
        fd: RawFd,
        multishot: bool,
        nonblocking: bool,
    },
    /// Cancel the operation posted with user data `target`.
    Cancel { target: u64 },
    /// Read an eventfd's 8-byte counter into the op's `Word` memory.
    ReadWord { fd: RawFd },
    /// Complete with -ETIME after `after`.
    Timeout { after: Duration },
    /// Bounds the operation before it in a link chain: it is cancelled if
    /// this fires first (then -ETIME here, -ECANCELED there).
    LinkTimeout { after: Duration },
    /// recv into the op's `Bytes` memory, whole, with `flags` (MSG_PEEK…).
    Recv { desc: Desc, flags: i32 },
    /// send of `range` of the op's `Bytes` memory with `flags`.
    Send {
        desc: Desc,
        range: Range<usize>,
        flags: i32,
    },
    /// Poll for `events` (poll(2) bits); the result is the revents.
    Poll {
        fd: RawFd,
        events: u32,
        multishot: bool,
    },
    /// Close the descriptor held in the op's `Fd` memory.
    Close { fd: RawFd },
    /// Close direct slot `slot` (io_uring only).
    CloseDirect { slot: u32 },
    /// connect to the address in the op's `Addr` memory.
    Connect { desc: Desc },
    /// connect to AF_UNSPEC: an RST if connected, the socket kept.
    Disconnect { desc: Desc },
    /// A new TCP socket of `domain` (close-on-exec), or into direct slot
    /// `direct` (io_uring only).
    Socket { domain: i32, direct: Option<u32> },
    /// shutdown(2) with `how`.
    Shutdown { fd: RawFd, how: i32 },
}

/// Memory an in-flight operation points at.
#[derive(Debug)]
pub(crate) enum OpMemory {
    Word(Box<u64>),
    Timespec(Box<io_uring::types::Timespec>),
    Bytes(Box<[u8]>),
    Addr(Box<socket2::SockAddr>),
    /// A descriptor a CLOSE operation is closing: kept until its completion
    /// says whether it was closed (0) or never ran (-ECANCELED after a
    /// failed linked SEND), in which case dropping it closes it.
    Fd(OwnedFd),
}

/// What an operation's memory held when it was released.
#[derive(Debug)]
pub(crate) enum Released {
    /// Nothing to return (a timeout, an address, or no memory at all).
    Nothing,
    /// An 8-byte counter (eventfd read).
    #[allow(dead_code)] // the shard only needs to know the read completed
    Word(u64),
    /// A byte buffer (recv, peek, send).
    Bytes(Box<[u8]>),
}

enum Imp {
    Uring(uring::Ring),
    Epoll(epoll::Epoll),
}

/// A shard's driver: its backend, and the memory in-flight operations use.
pub(crate) struct Driver {
    imp: Imp,
    /// Memory referenced by in-flight operations, by user data. An entry is
    /// removed only by [`Driver::release`] after the operation's final CQE.
    memory: KeyMap<OpMemory>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("backend", &self.backend())
            .field("ops_with_memory", &self.memory.len())
            .finish()
    }
}

/// The flags of every accept the engine makes (io_uring ACCEPT, epoll's
/// and the limits' `accept4`): close-on-exec always, SOCK_NONBLOCK when the
/// listener asked for non-blocking sockets, so that the accepted socket has
/// its file flags from birth and costs no fcntl.
pub(crate) fn accept_flags(nonblocking: bool) -> i32 {
    if nonblocking {
        libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK
    } else {
        libc::SOCK_CLOEXEC
    }
}

/// Why io_uring cannot serve here, if the error says it is denied or
/// missing (the cases `Auto` falls back on).
pub(crate) fn denied(e: &io::Error) -> Option<&'static str> {
    let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .map(|v| v.trim().to_string())
        .unwrap_or_default();
    match e.raw_os_error() {
        Some(libc::EPERM) if sysctl == "2" => {
            Some("io_uring_setup denied (EPERM): kernel.io_uring_disabled=2")
        }
        Some(libc::EPERM) if sysctl == "1" => Some(
            "io_uring_setup denied (EPERM): kernel.io_uring_disabled=1 and not in io_uring_group",
        ),
        Some(libc::EPERM) => Some(
            "io_uring_setup denied (EPERM): a seccomp profile (Docker, containerd) or kernel.io_uring_disabled",
        ),
        Some(libc::EACCES) => Some("io_uring_setup denied (EACCES): an LSM policy"),
        Some(libc::ENOSYS) => Some(
            "io_uring_setup missing (ENOSYS): a kernel without io_uring or a seccomp profile (Podman, CRI-O)",
        ),
        _ => None,
    }
}

impl Driver {
    /// Sets up the backend `want` asks for on the calling thread (the one
    /// that will submit), with `entries` submission slots for io_uring.
    ///
    /// # Errors
    /// io_uring setup failures, except the denials `Auto` falls back on;
    /// epoll_create1 failures.
    pub fn new(entries: u32, want: Backend) -> io::Result<(Self, BackendChoice)> {
        Self::new_as(entries, want, false)
    }

    /// As [`Driver::new`], for a shard the application drives: the driver
    /// is set up here (so that setup errors come back from `build()`) and
    /// bound to the thread that calls [`Driver::enable`] (io_uring's
    /// SINGLE_ISSUER: the ring is set up disabled until then). Its
    /// [`Driver::wait_fd`] is readable while it has work.
    pub fn new_driven(entries: u32, want: Backend) -> io::Result<(Self, BackendChoice)> {
        let (mut d, choice) = Self::new_as(entries, want, true)?;
        match &mut d.imp {
            Imp::Uring(r) => r.enable_parking()?,
            Imp::Epoll(e) => e.enable_parking()?,
        }
        Ok((d, choice))
    }

    fn new_as(entries: u32, want: Backend, disabled: bool) -> io::Result<(Self, BackendChoice)> {
        let want = match (want, std::env::var(BACKEND_ENV).as_deref()) {
            (Backend::Auto, Ok("epoll")) => return Self::epoll(format!("{BACKEND_ENV}=epoll")),
            (Backend::Auto, Ok("io_uring")) => Backend::IoUring,
            (w, _) => w,
        };
        match want {
            Backend::Epoll => Self::epoll("asked for".into()),
            Backend::IoUring => {
                let ring = uring::Ring::new(entries, disabled)?;
                Ok((
                    Self::with(Imp::Uring(ring)),
                    BackendChoice {
                        backend: Backend::IoUring,
                        reason: "asked for".into(),
                    },
                ))
            }
            Backend::Auto => match uring::Ring::new(entries, disabled) {
                Ok(ring) => match ring.missing_opcode() {
                    None => Ok((
                        Self::with(Imp::Uring(ring)),
                        BackendChoice {
                            backend: Backend::IoUring,
                            reason: "io_uring available".into(),
                        },
                    )),
                    Some(name) => {
                        drop(ring);
                        Self::epoll(format!("io_uring lacks {name}"))
                    }
                },
                Err(e) => match denied(&e) {
                    Some(why) => Self::epoll(why.into()),
                    None => Err(e),
                },
            },
        }
    }

    fn epoll(reason: String) -> io::Result<(Self, BackendChoice)> {
        let e = epoll::Epoll::new()?;
        Ok((
            Self::with(Imp::Epoll(e)),
            BackendChoice {
                backend: Backend::Epoll,
                reason,
            },
        ))
    }

    fn with(imp: Imp) -> Self {
        Driver {
            imp,
            memory: KeyMap::default(),
        }
    }

    /// The backend that runs.
    pub fn backend(&self) -> Backend {
        match self.imp {
            Imp::Uring(_) => Backend::IoUring,
            Imp::Epoll(_) => Backend::Epoll,
        }
    }

    /// How the ring was set up (all false on epoll).
    pub fn setup(&self) -> RingSetup {
        match &self.imp {
            Imp::Uring(r) => r.setup(),
            Imp::Epoll(_) => RingSetup::default(),
        }
    }

    /// Whether the backend performs IORING_OP `opcode` (see [`op`]).
    pub fn supports(&self, opcode: u8) -> bool {
        match &self.imp {
            Imp::Uring(r) => r.supports(opcode),
            // The epoll backend creates sockets with socket(2) in the
            // caller's place and has no SOCKET operation of its own.
            Imp::Epoll(_) => opcode != op::SOCKET,
        }
    }

    /// Posts `op`: its memory first (so that the backend can point into it
    /// where it stays), then the operation. `link` makes the next posted
    /// operation wait for this one's success (IOSQE_IO_LINK).
    fn post(&mut self, op: Op, mem: Option<OpMemory>, link: bool, ud: u64) -> io::Result<()> {
        if let Some(m) = mem {
            self.memory.insert(ud, m);
        }
        let r = match &mut self.imp {
            Imp::Uring(r) => r.push(&op, self.memory.get_mut(&ud), link, ud),
            Imp::Epoll(e) => e.push(op, link, ud),
        };
        if r.is_err() {
            // Never posted: nothing points at it (a CLOSE's descriptor is
            // closed by dropping it, as if the close had run).
            self.memory.remove(&ud);
        }
        r
    }

    /// Makes room for `n` adjacent operations (a link chain must not be
    /// split across two io_uring submissions).
    pub fn reserve(&mut self, n: usize) -> io::Result<()> {
        match &mut self.imp {
            Imp::Uring(r) => r.reserve(n),
            Imp::Epoll(_) => Ok(()),
        }
    }

    /// Posts a SOCKET (5.19): a new close-on-exec TCP socket of `domain`,
    /// its descriptor in the completion's result.
    pub fn socket(&mut self, domain: i32, user_data: u64) -> io::Result<()> {
        self.post(
            Op::Socket {
                domain,
                direct: None,
            },
            None,
            false,
            user_data,
        )
    }

    /// Posts a multishot ACCEPT (5.19) on listening socket `fd`; the
    /// sockets it accepts are non-blocking with `nonblocking`.
    pub fn accept_multi(&mut self, fd: RawFd, nonblocking: bool, user_data: u64) -> io::Result<()> {
        self.post(
            Op::Accept {
                fd,
                multishot: true,
                nonblocking,
            },
            None,
            false,
            user_data,
        )
    }

    /// Posts a single-shot ACCEPT (5.5), for kernels without multishot.
    pub fn accept_once(&mut self, fd: RawFd, nonblocking: bool, user_data: u64) -> io::Result<()> {
        self.post(
            Op::Accept {
                fd,
                multishot: false,
                nonblocking,
            },
            None,
            false,
            user_data,
        )
    }

    /// Asks for the operation posted with `target` to be cancelled.
    pub fn cancel(&mut self, target: u64, user_data: u64) -> io::Result<()> {
        self.post(Op::Cancel { target }, None, false, user_data)
    }

    /// Reads the 8-byte counter of an eventfd; the value is in [`Driver::release`]'s result.
    pub fn read_counter(&mut self, fd: RawFd, user_data: u64) -> io::Result<()> {
        let mem = OpMemory::Word(Box::new(0));
        self.post(Op::ReadWord { fd }, Some(mem), false, user_data)
    }

    /// Posts a relative timeout that completes with -ETIME after `after`.
    pub fn timeout(&mut self, after: Duration, user_data: u64) -> io::Result<()> {
        let mem = OpMemory::Timespec(Box::new(after.into()));
        self.post(Op::Timeout { after }, Some(mem), false, user_data)
    }

    /// Single-shot (or multishot) POLL_ADD for `events` (poll(2) bits) on `fd`.
    pub fn poll(
        &mut self,
        fd: RawFd,
        events: u32,
        multishot: bool,
        user_data: u64,
    ) -> io::Result<()> {
        self.post(
            Op::Poll {
                fd,
                events,
                multishot,
            },
            None,
            false,
            user_data,
        )
    }

    /// SEND of `bytes` on `fd` with `flags` (e.g. MSG_MORE, MSG_NOSIGNAL);
    /// `link` chains the next operation to it.
    pub fn send(
        &mut self,
        fd: impl Into<Desc>,
        bytes: Box<[u8]>,
        flags: i32,
        link: bool,
        user_data: u64,
    ) -> io::Result<()> {
        let range = 0..bytes.len();
        let op = Op::Send {
            desc: fd.into(),
            range,
            flags,
        };
        self.post(op, Some(OpMemory::Bytes(bytes)), link, user_data)
    }

    /// A reply: SEND of `reply` on `fd` with `flags`, then the CLOSE of
    /// `fd` linked behind it (user data `send_ud` and `close_ud`). Returns
    /// `true` when both are already done and no completion will come: the
    /// epoll backend tries them at once when nothing of the shard names
    /// `fd` and the send does not block (the way an epoll loop replies; a
    /// reply's first send into an empty buffer does not). Otherwise (and
    /// always on io_uring) they are posted and complete as [`Driver::send`]'s
    /// and [`Driver::close`]'s do.
    pub fn send_then_close(
        &mut self,
        fd: OwnedFd,
        reply: &[u8],
        flags: i32,
        send_ud: u64,
        close_ud: u64,
    ) -> io::Result<bool> {
        let fd = match &mut self.imp {
            Imp::Epoll(e) => match e.send_close_now(fd, reply, flags) {
                Ok(()) => return Ok(true),
                Err(fd) => fd,
            },
            Imp::Uring(_) => fd,
        };
        self.reserve(2)?;
        self.send(fd.as_raw_fd(), reply.into(), flags, true, send_ud)?;
        self.close(fd, close_ud)?;
        Ok(false)
    }

    /// CLOSE of a descriptor the caller gives up. Its completion must be
    /// passed to [`Driver::finish_close`], which closes the descriptor itself
    /// if the close did not run (a cancelled link), so it is closed exactly once.
    pub fn close(&mut self, fd: OwnedFd, user_data: u64) -> io::Result<()> {
        let raw = fd.as_raw_fd();
        self.post(
            Op::Close { fd: raw },
            Some(OpMemory::Fd(fd)),
            false,
            user_data,
        )
    }

    /// Completes a CLOSE posted by [`Driver::close`].
    pub fn finish_close(&mut self, user_data: u64, result: i32) {
        if let Some(OpMemory::Fd(fd)) = self.memory.remove(&user_data) {
            if result >= 0 {
                // Closed: forget the number without closing again (it may
                // already belong to another descriptor).
                std::mem::forget(fd);
            } else {
                // The close never ran (e.g. -ECANCELED after a failed link):
                // dropping the OwnedFd closes it now.
                drop(fd);
            }
        }
    }

    /// CONNECT of `fd` to `addr` (5.5); with `timeout`, a LINK_TIMEOUT is
    /// linked to it with user data `timeout.1`.
    pub fn connect(
        &mut self,
        fd: RawFd,
        addr: socket2::SockAddr,
        timeout: Option<(Duration, u64)>,
        user_data: u64,
    ) -> io::Result<()> {
        if timeout.is_some() {
            // Both operations must be in the same submission, adjacent.
            self.reserve(2)?;
        }
        self.connect_chain(fd, addr, timeout, false, user_data)
    }

    /// Frees the memory of an operation whose final completion has been
    /// reaped and returns what it read: the eventfd counter or the bytes.
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

    /// Submits what was posted without waiting.
    pub fn submit(&mut self) -> io::Result<usize> {
        match &mut self.imp {
            Imp::Uring(r) => r.submit(),
            Imp::Epoll(e) => e.submit(&mut self.memory),
        }
    }

    /// Submits what was posted and waits for at least `want` completions
    /// (one `io_uring_enter`, or one `epoll_pwait2`, per call). EINTR
    /// returns Ok (the caller loops anyway).
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        match &mut self.imp {
            Imp::Uring(r) => r.submit_and_wait(want),
            Imp::Epoll(e) => e.submit_and_wait(want, &mut self.memory),
        }
    }

    /// Binds a driver made by [`Driver::new_driven`] to the calling thread
    /// and lets it take submissions.
    pub fn enable(&mut self) -> io::Result<()> {
        match &mut self.imp {
            Imp::Uring(r) => r.enable(),
            Imp::Epoll(_) => Ok(()),
        }
    }

    /// Submits what was posted and collects what is ready, without waiting.
    pub fn reap(&mut self) -> io::Result<()> {
        match &mut self.imp {
            Imp::Uring(r) => r.reap(),
            Imp::Epoll(e) => e.reap(&mut self.memory),
        }
    }

    /// Whether operations were posted and not yet submitted.
    #[cfg(feature = "tokio")]
    pub fn has_queued(&mut self) -> bool {
        match &mut self.imp {
            Imp::Uring(r) => r.has_queued(),
            Imp::Epoll(e) => e.has_queued(),
        }
    }

    /// Submits what was posted and runs what the submission set off at
    /// once, without waiting: on io_uring one enter with GETEVENTS when
    /// SQEs are queued (a CLOSE linked after a SEND that completed at
    /// submission is deferred task work, which only such an enter runs; its
    /// completions stay in the queue), on epoll the operations themselves.
    pub fn submit_settled(&mut self) -> io::Result<()> {
        match &mut self.imp {
            Imp::Uring(r) => {
                if r.has_queued() {
                    r.reap()
                } else {
                    Ok(())
                }
            }
            Imp::Epoll(e) => e.submit(&mut self.memory).map(|_| ()),
        }
    }

    /// Before the caller waits on [`Driver::wait_fd`] (a driven shard): makes
    /// the descriptor readable at the next thing due. On io_uring it clears
    /// the registered eventfd and sets it again if work already waits; the
    /// epoll backend arms its timer descriptor for its earliest deadline, or
    /// at once when completions are already queued. `ready`: make it
    /// readable at once anyway (the caller has news that no completion
    /// will announce: a driven shard that finished).
    pub fn prepare_wait(&mut self, ready: bool) -> io::Result<()> {
        match &mut self.imp {
            Imp::Uring(r) => {
                r.prepare_wait(ready);
                Ok(())
            }
            Imp::Epoll(e) => e.prepare_wait(ready),
        }
    }

    /// For a driven shard whose application waits on [`Driver::wait_fd`]
    /// edge-triggered (tokio's reactor: woken by each signal, whatever the
    /// descriptor's level): [`Driver::prepare_wait`] then makes it readable
    /// when work waits without first clearing it (on io_uring: no read of
    /// the eventfd per wait). The epoll backend's descriptor needs no
    /// clearing either way.
    #[cfg(feature = "tokio")]
    pub fn wait_edge_triggered(&mut self) {
        if let Imp::Uring(r) = &mut self.imp {
            r.park_edge_triggered();
        }
    }

    /// Before a level-triggered wait (`poll(2)`) on [`Driver::wait_fd`] of
    /// a driver set [`Driver::wait_edge_triggered`]: clears the descriptor
    /// unless work waits (nothing to do otherwise).
    pub fn prepare_level_wait(&mut self) {
        if let Imp::Uring(r) = &mut self.imp {
            r.prepare_level_wait();
        }
    }

    /// Whether work is already there without waiting: completions not yet
    /// drained, or (io_uring) deferred task work, or (epoll) listeners with
    /// accepts left over; and whether operations wait to be submitted.
    pub fn has_work(&mut self) -> bool {
        match &mut self.imp {
            Imp::Uring(r) => r.has_work(),
            Imp::Epoll(e) => e.has_work(),
        }
    }

    /// The descriptor a driven shard's application waits on: the ring's
    /// registered eventfd, or the epoll instance.
    pub fn wait_fd(&self) -> RawFd {
        match &self.imp {
            Imp::Uring(r) => r.fd(),
            Imp::Epoll(e) => e.fd(),
        }
    }

    /// [`Driver::wait_fd`], borrowed for as long as the driver lives.
    pub fn wait_fd_borrowed(&self) -> std::os::fd::BorrowedFd<'_> {
        // SAFETY: the descriptor is the ring's or the epoll instance's, owned
        // by `self.imp` and closed only when the driver drops, which the
        // borrow's lifetime (tied to `&self`) cannot outlive.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(self.wait_fd()) }
    }

    /// Moves every available completion into `out`.
    pub fn drain(&mut self, out: &mut Vec<Cqe>) {
        match &mut self.imp {
            Imp::Uring(r) => r.drain(out),
            Imp::Epoll(e) => e.drain(out),
        }
    }

    /// CONNECT of `fd` to `addr` at the head of a link chain: with
    /// `timeout`, a LINK_TIMEOUT with user data `timeout.1` follows it;
    /// `link_next` links the next operation posted, which is then cancelled
    /// if the connect fails or times out. The caller reserves room for the
    /// whole chain first ([`Driver::reserve`]).
    pub fn connect_chain(
        &mut self,
        fd: impl Into<Desc>,
        addr: socket2::SockAddr,
        timeout: Option<(Duration, u64)>,
        link_next: bool,
        user_data: u64,
    ) -> io::Result<()> {
        let desc = fd.into();
        let mem = OpMemory::Addr(Box::new(addr));
        self.post(
            Op::Connect { desc },
            Some(mem),
            timeout.is_some() || link_next,
            user_data,
        )?;
        if let Some((after, tud)) = timeout {
            let mem = OpMemory::Timespec(Box::new(after.into()));
            self.post(Op::LinkTimeout { after }, Some(mem), link_next, tud)?;
        }
        Ok(())
    }

    /// RECV of up to `len` bytes with `flags` into a fresh buffer, returned
    /// by [`Driver::release`]; `link` chains the next operation.
    pub fn recv_linked(
        &mut self,
        fd: impl Into<Desc>,
        len: usize,
        flags: i32,
        link: bool,
        user_data: u64,
    ) -> io::Result<()> {
        let buf = vec![0u8; len].into_boxed_slice();
        let op = Op::Recv {
            desc: fd.into(),
            flags,
        };
        self.post(op, Some(OpMemory::Bytes(buf)), link, user_data)
    }

    /// Registers an empty (sparse) direct-descriptor table of `slots`
    /// entries (io_uring 5.19); the kernel refuses more than RLIMIT_NOFILE.
    ///
    /// # Errors
    /// `Unsupported` on epoll.
    pub fn register_direct_table(&mut self, slots: u32) -> io::Result<()> {
        match &mut self.imp {
            Imp::Uring(r) => r.register_direct_table(slots),
            Imp::Epoll(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "direct descriptors are io_uring's",
            )),
        }
    }

    /// Posts a SOCKET (5.19) whose TCP socket of `domain` goes into direct
    /// slot `slot` instead of the fd table; the result is 0 on success.
    pub fn socket_direct(
        &mut self,
        domain: i32,
        slot: u32,
        link: bool,
        user_data: u64,
    ) -> io::Result<()> {
        let op = Op::Socket {
            domain,
            direct: Some(slot),
        };
        self.post(op, None, link, user_data)
    }

    /// CONNECT of `fd` to `AF_UNSPEC` (5.5): the kernel's `tcp_disconnect`
    /// sends an RST if the socket is connected (whatever SO_LINGER says),
    /// frees its port and leaves the socket ready for another CONNECT. The
    /// result is 0 on success.
    pub fn disconnect(&mut self, fd: impl Into<Desc>, user_data: u64) -> io::Result<()> {
        self.disconnect_linked(fd, false, user_data)
    }

    /// [`Driver::disconnect`], with `link` chaining the next operation.
    pub fn disconnect_linked(
        &mut self,
        fd: impl Into<Desc>,
        link: bool,
        user_data: u64,
    ) -> io::Result<()> {
        self.post(Op::Disconnect { desc: fd.into() }, None, link, user_data)
    }

    /// CLOSE of direct slot `slot` (5.15).
    pub fn close_direct(&mut self, slot: u32, user_data: u64) -> io::Result<()> {
        self.post(Op::CloseDirect { slot }, None, false, user_data)
    }

    /// Checks, on a ring with nothing else in flight, that this kernel
    /// creates sockets in direct slots, disconnects them and closes them
    /// (SOCKET into slot 0 → CONNECT to AF_UNSPEC → CLOSE, linked, waited
    /// for). Leaves slot 0 empty. Needs the direct table registered.
    pub fn probe_direct_sockets(&mut self) -> io::Result<()> {
        const PROBE: u64 = u64::MAX - 2;
        self.reserve(3)?;
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

    /// RECV of up to `buf.len()` bytes into `buf`, which the driver keeps
    /// until the completion and hands back from [`Driver::release`] (so one
    /// buffer serves a whole stream of receives without reallocation).
    pub fn recv_into(&mut self, fd: RawFd, buf: Box<[u8]>, user_data: u64) -> io::Result<()> {
        let op = Op::Recv {
            desc: Desc::Fd(fd),
            flags: 0,
        };
        self.post(op, Some(OpMemory::Bytes(buf)), false, user_data)
    }

    /// SEND of `buf[range]` on `fd` with `flags`; the driver keeps `buf`
    /// until the completion and hands it back from [`Driver::release`].
    ///
    /// # Errors
    /// `InvalidInput` if `range` is not inside `buf` (nothing is posted;
    /// `buf` is dropped); otherwise as the submission.
    pub fn send_range(
        &mut self,
        fd: RawFd,
        buf: Box<[u8]>,
        range: Range<usize>,
        flags: i32,
        user_data: u64,
    ) -> io::Result<()> {
        if buf.get(range.clone()).is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "send range outside its buffer",
            ));
        }
        let op = Op::Send {
            desc: Desc::Fd(fd),
            range,
            flags,
        };
        self.post(op, Some(OpMemory::Bytes(buf)), false, user_data)
    }

    /// SHUTDOWN of `fd` (5.11): `how` is `libc::SHUT_WR`, `SHUT_RD` or
    /// `SHUT_RDWR`.
    pub fn shutdown(&mut self, fd: RawFd, how: i32, user_data: u64) -> io::Result<()> {
        self.post(Op::Shutdown { fd, how }, None, false, user_data)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Imp::Uring(_) = self.imp {
            // Memory still registered belongs to operations whose final CQE
            // was never reaped; the kernel may still write into it while it
            // tears the ring down, so it is leaked rather than freed.
            for (_, mem) in self.memory.drain() {
                std::mem::forget(mem);
            }
        }
        // On epoll nothing outside this process points at it: it is freed.
    }
}

/// `IORING_OP_*` numbers the engine probes for.
pub(crate) mod op {
    /// IORING_OP_CONNECT.
    pub const CONNECT: u8 = io_uring::opcode::Connect::CODE;
    /// IORING_OP_SOCKET.
    pub const SOCKET: u8 = io_uring::opcode::Socket::CODE;
}
