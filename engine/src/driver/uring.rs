//! The io_uring backend: each [`Op`] becomes one SQE, queued until the
//! shard's next `io_uring_enter` (one per turn); completions are copied out
//! of the CQ ring.

use std::io;
use std::mem::size_of;

use io_uring::{opcode, squeue, types, IoUring};

use super::{accept_flags, Cqe, Desc, Op, OpMemory, RingSetup};

/// An `AF_UNSPEC` address: CONNECT to it disconnects a TCP socket (an RST
/// if it was connected) and leaves it ready to connect again. A static, so
/// an SQE may point at it without the ring keeping any memory for it.
static UNSPEC: libc::sockaddr = libc::sockaddr {
    sa_family: libc::AF_UNSPEC as libc::sa_family_t,
    sa_data: [0; 14],
};

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

/// `IORING_ENTER_GETEVENTS` (include/uapi/linux/io_uring.h).
const ENTER_GETEVENTS: u32 = 1 << 0;

/// The opcodes the engine posts, for `Auto`'s probe.
const USED: [(u8, &str); 12] = [
    (opcode::Accept::CODE, "ACCEPT"),
    (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    (opcode::Read::CODE, "READ"),
    (opcode::Timeout::CODE, "TIMEOUT"),
    (opcode::LinkTimeout::CODE, "LINK_TIMEOUT"),
    (opcode::Recv::CODE, "RECV"),
    (opcode::Send::CODE, "SEND"),
    (opcode::PollAdd::CODE, "POLL_ADD"),
    (opcode::Close::CODE, "CLOSE"),
    (opcode::Connect::CODE, "CONNECT"),
    (opcode::Shutdown::CODE, "SHUTDOWN"),
    (opcode::Socket::CODE, "SOCKET"),
];

/// One shard's io_uring.
pub(crate) struct Ring {
    ring: IoUring,
    setup: RingSetup,
    /// A driven shard's eventfd, registered with the ring
    /// (IORING_REGISTER_EVENTFD): the descriptor the application waits on.
    /// The ring's own descriptor does not wake a poller for DEFER_TASKRUN's
    /// deferred work (an accept's task work); the eventfd is signalled for
    /// it and for every completion.
    park: Option<std::os::fd::OwnedFd>,
    /// The application waits on `park` edge-triggered (tokio's reactor):
    /// every signal wakes it whatever the counter holds, so a drive does
    /// not read the counter back (see [`Ring::prepare_wait`]; only a
    /// level-triggered wait does, [`Ring::prepare_level_wait`]).
    park_edge: bool,
}

impl Ring {
    /// Sets up a ring with `entries` submission slots, trying the cheapest
    /// task-running mode first: SINGLE_ISSUER + DEFER_TASKRUN (6.1), then
    /// COOP_TASKRUN + TASKRUN_FLAG (5.19), then none. Must be called on the
    /// thread that will submit (SINGLE_ISSUER binds the ring to it).
    ///
    /// A refusal that no flag combination can fix (ENOSYS, EPERM, EACCES) is
    /// returned at once, from the first attempt.
    ///
    /// `disabled` sets IORING_SETUP_R_DISABLED (5.10): the ring takes no
    /// submission until [`Ring::enable`], and SINGLE_ISSUER then binds it to
    /// the enabling thread instead of this one (an application-driven shard
    /// is built on one thread and driven on another).
    pub fn new(entries: u32, disabled: bool) -> io::Result<Self> {
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
            if disabled {
                // TASKRUN_FLAG: `prepare_wait` reads from it whether deferred
                // work is waiting (it does not change what the ring does).
                builder.setup_r_disabled().setup_taskrun_flag();
            }
            apply(&mut builder);
            match builder.build(entries) {
                Ok(ring) => {
                    return Ok(Ring {
                        ring,
                        setup,
                        park: None,
                        park_edge: false,
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

    /// The first opcode the engine uses that this kernel lacks, by name.
    /// SOCKET (5.19) is optional: the connect side falls back to socket(2).
    pub fn missing_opcode(&self) -> Option<&'static str> {
        let mut probe = io_uring::Probe::new();
        if self.ring.submitter().register_probe(&mut probe).is_err() {
            return Some("IORING_REGISTER_PROBE");
        }
        USED.iter()
            .filter(|(code, _)| *code != opcode::Socket::CODE)
            .find(|(code, _)| !probe.is_supported(*code))
            .map(|(_, name)| *name)
    }

    /// Queues an SQE, submitting first if the queue is full.
    ///
    /// # Safety
    /// Any memory `entry` points at must stay valid until its final CQE.
    unsafe fn push_entry(&mut self, entry: squeue::Entry) -> io::Result<()> {
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

    /// Queues `op` with user data `ud`, pointing into `mem` where it reads
    /// or writes; `link` sets IOSQE_IO_LINK.
    pub fn push(
        &mut self,
        op: &Op,
        mem: Option<&mut OpMemory>,
        link: bool,
        ud: u64,
    ) -> io::Result<()> {
        let missing = || io::Error::other("operation posted without its memory");
        let e = match (op, mem) {
            (
                Op::Accept {
                    fd,
                    multishot: true,
                    nonblocking,
                },
                _,
            ) => opcode::AcceptMulti::new(types::Fd(*fd))
                .flags(accept_flags(*nonblocking))
                .build(),
            (
                Op::Accept {
                    fd, nonblocking, ..
                },
                _,
            ) => opcode::Accept::new(types::Fd(*fd), std::ptr::null_mut(), std::ptr::null_mut())
                .flags(accept_flags(*nonblocking))
                .build(),
            (Op::Cancel { target }, _) => opcode::AsyncCancel::new(*target).build(),
            (Op::ReadWord { fd }, Some(OpMemory::Word(w))) => {
                let ptr: *mut u64 = &mut **w;
                opcode::Read::new(types::Fd(*fd), ptr.cast(), 8).build()
            }
            (Op::Timeout { .. }, Some(OpMemory::Timespec(ts))) => {
                opcode::Timeout::new(&**ts as *const types::Timespec).build()
            }
            (Op::LinkTimeout { .. }, Some(OpMemory::Timespec(ts))) => {
                opcode::LinkTimeout::new(&**ts as *const types::Timespec).build()
            }
            (Op::Recv { desc, flags }, Some(OpMemory::Bytes(b))) => {
                let (ptr, len) = (b.as_mut_ptr(), u32::try_from(b.len()).unwrap_or(u32::MAX));
                on_desc!(*desc, |t| opcode::Recv::new(t, ptr, len)
                    .flags(*flags)
                    .build())
            }
            (Op::Send { desc, range, flags }, Some(OpMemory::Bytes(b))) => {
                let bytes = b.get(range.clone()).ok_or_else(missing)?;
                let (ptr, len) = (
                    bytes.as_ptr(),
                    u32::try_from(bytes.len()).unwrap_or(u32::MAX),
                );
                on_desc!(*desc, |t| opcode::Send::new(t, ptr, len)
                    .flags(*flags)
                    .build())
            }
            (
                Op::Poll {
                    fd,
                    events,
                    multishot,
                },
                _,
            ) => opcode::PollAdd::new(types::Fd(*fd), *events)
                .multi(*multishot)
                .build(),
            (Op::Close { fd }, Some(OpMemory::Fd(_))) => opcode::Close::new(types::Fd(*fd)).build(),
            (Op::CloseDirect { slot }, _) => opcode::Close::new(types::Fixed(*slot)).build(),
            (Op::Connect { desc }, Some(OpMemory::Addr(a))) => {
                let (ptr, len) = (a.as_ptr().cast(), a.len());
                on_desc!(*desc, |t| opcode::Connect::new(t, ptr, len).build())
            }
            (Op::Disconnect { desc }, _) => {
                let addr: *const libc::sockaddr = &UNSPEC;
                let len = size_of::<libc::sockaddr>() as libc::socklen_t;
                on_desc!(*desc, |t| opcode::Connect::new(t, addr, len).build())
            }
            (
                Op::Socket {
                    domain,
                    direct: None,
                },
                _,
            ) => opcode::Socket::new(
                *domain,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                libc::IPPROTO_TCP,
            )
            .build(),
            (
                Op::Socket {
                    domain,
                    direct: Some(slot),
                },
                _,
            ) => {
                let dest = types::DestinationSlot::try_from_slot_target(*slot).map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidInput, "direct slot out of range")
                })?;
                // SOCK_CLOEXEC is refused for a direct descriptor (it has no fd).
                opcode::Socket::new(*domain, libc::SOCK_STREAM, libc::IPPROTO_TCP)
                    .file_index(Some(dest))
                    .build()
            }
            (Op::Shutdown { fd, how }, _) => opcode::Shutdown::new(types::Fd(*fd), *how).build(),
            _ => return Err(missing()),
        };
        let mut e = e.user_data(ud);
        if link {
            e = e.flags(squeue::Flags::IO_LINK);
        }
        // SAFETY: every pointer in `e` points into `mem`, a heap allocation
        // the driver keeps by user data until this operation's final CQE
        // (`Driver::release`) or leaks if the ring is dropped first; or at
        // UNSPEC, a static. A CLOSE's descriptor is owned by `mem` too, so
        // its number cannot be reused before the completion.
        unsafe { self.push_entry(e) }
    }

    /// Makes room for `n` adjacent SQEs, submitting what is queued if needed.
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

    /// Submits queued SQEs without waiting; with none queued it makes no
    /// syscall (an enter without GETEVENTS and nothing to submit does
    /// nothing).
    pub fn submit(&mut self) -> io::Result<usize> {
        if self.ring.submission().is_empty() {
            return Ok(0);
        }
        loop {
            match self.ring.submit() {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                other => return other,
            }
        }
    }

    /// Submits queued SQEs and waits for at least `want` completions: one
    /// `io_uring_enter`. EINTR returns Ok; EBUSY (completion queue overflow)
    /// returns Ok so the caller drains.
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

    /// Enables a ring set up disabled, binding it to the calling thread.
    pub fn enable(&mut self) -> io::Result<()> {
        self.ring.submitter().register_enable_rings()
    }

    /// Submits queued SQEs and reaps what is ready without waiting: one
    /// `io_uring_enter` with GETEVENTS and no minimum, which also runs the
    /// deferred task work (DEFER_TASKRUN runs it only in such an enter).
    pub fn reap(&mut self) -> io::Result<()> {
        let to_submit = u32::try_from(self.ring.submission().len()).unwrap_or(u32::MAX);
        // SAFETY: no argument struct is passed (null, size 0); every SQE
        // queued points at memory the driver keeps until its final CQE
        // (`push_entry`'s contract).
        let r = unsafe {
            self.ring
                .submitter()
                .enter::<libc::sigset_t>(to_submit, 0, ENTER_GETEVENTS, None)
        };
        match r {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// For a driven shard: registers the eventfd the application waits on.
    pub fn enable_parking(&mut self) -> io::Result<()> {
        let fd = super::sys::eventfd()?;
        self.ring
            .submitter()
            .register_eventfd(std::os::fd::AsRawFd::as_raw_fd(&fd))?;
        self.park = Some(fd);
        Ok(())
    }

    /// For a driven shard whose application waits on its eventfd
    /// edge-triggered: [`Ring::prepare_wait`] leaves the counter as it is.
    #[cfg(feature = "tokio")]
    pub fn park_edge_triggered(&mut self) {
        self.park_edge = true;
    }

    /// Whether SQEs wait to be submitted.
    pub fn has_queued(&mut self) -> bool {
        !self.ring.submission().is_empty()
    }

    /// Completions to drain, deferred work to run (TASKRUN_FLAG), or SQEs
    /// to submit.
    pub fn has_work(&mut self) -> bool {
        let completions = {
            let mut cq = self.ring.completion();
            cq.sync();
            !cq.is_empty()
        };
        let sq = self.ring.submission();
        completions || sq.taskrun() || !sq.is_empty()
    }

    /// Before the application waits on the eventfd: clears it, then sets it
    /// again if work is already there (completions not reaped, or deferred
    /// work, which TASKRUN_FLAG shows): work that comes after the clear
    /// signals it by itself, so no wake-up is lost and none is spurious.
    /// An edge-triggered waiter ([`Ring::park_edge_triggered`]) is woken
    /// by each signal whatever the counter holds: the read that clears it
    /// (a syscall per wait) is left out for it.
    pub fn prepare_wait(&mut self, ready: bool) {
        self.settle_park(ready, !self.park_edge);
    }

    /// Before a level-triggered wait (`poll(2)`) on an eventfd that an
    /// edge-triggered waiter has left set: clears it as
    /// [`Ring::prepare_wait`] does for level-triggered waiters.
    pub fn prepare_level_wait(&mut self) {
        if self.park_edge {
            self.settle_park(false, true);
        }
    }

    fn settle_park(&mut self, ready: bool, clear: bool) {
        use std::os::fd::{AsRawFd, BorrowedFd};
        let Some(fd) = self.park.as_ref().map(|p| p.as_raw_fd()) else {
            return;
        };
        // SAFETY: `park` is owned by `self` and stays open for this call.
        let park = unsafe { BorrowedFd::borrow_raw(fd) };
        if clear {
            super::sys::eventfd_clear(park);
        }
        if ready || self.has_work() {
            super::sys::eventfd_signal(park);
        }
    }

    /// The descriptor a driven shard's application waits on: the registered
    /// eventfd, or else the ring's own.
    pub fn fd(&self) -> std::os::fd::RawFd {
        match &self.park {
            Some(p) => std::os::fd::AsRawFd::as_raw_fd(p),
            None => std::os::fd::AsRawFd::as_raw_fd(&self.ring),
        }
    }

    /// Registers an empty (sparse) direct-descriptor table of `slots` entries.
    pub fn register_direct_table(&mut self, slots: u32) -> io::Result<()> {
        self.ring.submitter().register_files_sparse(slots)
    }
}
