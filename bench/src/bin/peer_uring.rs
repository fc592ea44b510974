//! Benchmark peer: a raw io_uring loop (the `io-uring` crate, no engine) on one thread.
//!
//! One multishot ACCEPT is armed on the listener. For each accepted fd a SEND of one static byte
//! is queued, linked (`IO_LINK`) to a CLOSE of the fd. Each loop turn is one `submit_and_wait(1)`
//! followed by a drain of the completion queue; the multishot accept is re-armed whenever one of
//! its completions lacks `IORING_CQE_F_MORE`. The ring is set up with `SINGLE_ISSUER |
//! DEFER_TASKRUN`, falling back to a plain ring if the kernel refuses.
//!
//! SEND and CLOSE carry `IOSQE_CQE_SKIP_SUCCESS` where the kernel supports it, so only accepts
//! and failures produce completions. If a SEND fails (the client already reset), the kernel
//! cancels the linked CLOSE (`-ECANCELED`, whose CQE it skips when the SEND had
//! SKIP_SUCCESS); the SEND's user_data carries the fd, which is then closed here, so no fd
//! leaks.
//!
//! Levers (see PERF-NOTES.md):
//! - `--msg-more`: send with `MSG_MORE`, so the byte leaves in the same segment as the FIN.
//! - `--adaptive-pause`: when the last drain held at least 8 completions, submit what is queued,
//!   then sleep 50 µs before waiting again; no pause under lighter load.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use clap::Parser;
use floodgate_bench::peer::{self, PeerArgs, REPLY};
use io_uring::{cqueue, opcode, squeue, types, IoUring, SubmissionQueue, Submitter};

const NAME: &str = "peer_uring";

/// Submission queue entries.
const SQ_ENTRIES: u32 = 1024;
/// Completion queue entries (bursts of accepts land here before one drain).
const CQ_ENTRIES: u32 = 4096;
/// Drains with at least this many completions trigger the adaptive pause.
const PAUSE_THRESHOLD: usize = 8;
/// Length of the adaptive pause.
const PAUSE: Duration = Duration::from_micros(50);

/// user_data kinds (high 32 bits); the low 32 bits hold the connection's fd.
const UD_ACCEPT: u64 = 1 << 32;
const UD_SEND: u64 = 2 << 32;
const UD_CLOSE: u64 = 3 << 32;
const UD_KIND_MASK: u64 = !0xffff_ffff;

/// The byte sent on every connection; static, so its address stays valid for any SEND.
static REPLY_BYTE: [u8; 1] = *REPLY;

/// One-thread raw io_uring accept loop: multishot accept, linked send + close.
#[derive(Parser, Debug)]
#[command(name = NAME, version, about)]
struct Cli {
    #[command(flatten)]
    peer: PeerArgs,

    /// Send the byte with MSG_MORE so it leaves together with the FIN.
    #[arg(long)]
    msg_more: bool,

    /// After a drain of >= 8 completions, submit queued work then sleep 50 µs before waiting.
    #[arg(long)]
    adaptive_pause: bool,
}

fn main() {
    let cli = Cli::parse();
    let listener = peer::start(NAME, &cli.peer);
    let mut ring = build_ring();
    let skip_success = ring.params().is_feature_skip_cqe_on_success();
    let listen_fd = types::Fd(listener.as_raw_fd());

    let send_flags = libc::MSG_NOSIGNAL | if cli.msg_more { libc::MSG_MORE } else { 0 };
    let (link_flags, close_flags) = if skip_success {
        (
            squeue::Flags::IO_LINK | squeue::Flags::SKIP_SUCCESS,
            squeue::Flags::SKIP_SUCCESS,
        )
    } else {
        (squeue::Flags::IO_LINK, squeue::Flags::empty())
    };
    let accept = opcode::AcceptMulti::new(listen_fd)
        .flags(libc::SOCK_CLOEXEC)
        .build()
        .user_data(UD_ACCEPT);

    let (submitter, mut sq, mut cq) = ring.split();
    push(&submitter, &mut sq, std::slice::from_ref(&accept));

    loop {
        sq.sync();
        if let Err(e) = submitter.submit_and_wait(1) {
            match e.raw_os_error() {
                // Interrupted, or completions pending in the overflow list: drain and go on.
                Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN) => {}
                _ => peer::fatal(NAME, format_args!("io_uring_enter failed: {e}")),
            }
        }
        cq.sync();
        let mut drained = 0usize;
        for cqe in &mut cq {
            drained += 1;
            let ud = cqe.user_data();
            let res = cqe.result();
            match ud & UD_KIND_MASK {
                UD_ACCEPT => {
                    if res >= 0 {
                        let fd = types::Fd(res);
                        let send = opcode::Send::new(fd, REPLY_BYTE.as_ptr(), 1)
                            .flags(send_flags)
                            .build()
                            .flags(link_flags)
                            .user_data(UD_SEND | res as u64);
                        let close = opcode::Close::new(fd)
                            .build()
                            .flags(close_flags)
                            .user_data(UD_CLOSE | res as u64);
                        push(&submitter, &mut sq, &[send, close]);
                    } else if !is_transient_accept_error(-res) {
                        peer::fatal(
                            NAME,
                            format_args!(
                                "multishot accept failed: {} (needs Linux 5.19 or later)",
                                io::Error::from_raw_os_error(-res)
                            ),
                        );
                    }
                    if !cqueue::more(cqe.flags()) {
                        push(&submitter, &mut sq, std::slice::from_ref(&accept));
                    }
                }
                UD_SEND if res < 0 => {
                    // The SEND failed, so its linked CLOSE is cancelled and never runs: close
                    // the fd here. (The kernel posts the failed SEND's CQE even with
                    // SKIP_SUCCESS, and then skips the cancelled CLOSE's CQE; without
                    // SKIP_SUCCESS the CLOSE's -ECANCELED CQE arrives too and is ignored.)
                    let fd = (ud & 0xffff_ffff) as i32;
                    // SAFETY: fd came from our accept and was not closed (its CLOSE was
                    // cancelled); nothing else in this process holds or uses it.
                    unsafe { libc::close(fd) };
                }
                // A successful SEND or CLOSE where SKIP_SUCCESS is unsupported, a cancelled
                // CLOSE (handled with its SEND above) or a CLOSE error: nothing to do.
                _ => {}
            }
        }
        cq.sync();
        if cli.adaptive_pause && drained >= PAUSE_THRESHOLD {
            // Submit first: a linked CLOSE left queued would wait out the pause.
            sq.sync();
            if let Err(e) = submitter.submit() {
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN)
                ) {
                    peer::fatal(NAME, format_args!("io_uring_enter failed: {e}"));
                }
            }
            std::thread::sleep(PAUSE);
        }
    }
}

/// Builds the ring with `SINGLE_ISSUER | DEFER_TASKRUN`, or a plain ring if that is refused.
fn build_ring() -> IoUring {
    let tuned = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_cqsize(CQ_ENTRIES)
        .build(SQ_ENTRIES);
    match tuned {
        Ok(ring) => ring,
        Err(e) => {
            eprintln!(
                "{NAME}: SINGLE_ISSUER|DEFER_TASKRUN refused ({e}; needs Linux 6.1), \
                 using a plain ring"
            );
            match IoUring::builder()
                .setup_cqsize(CQ_ENTRIES)
                .build(SQ_ENTRIES)
            {
                Ok(ring) => ring,
                Err(e) => peer::fatal(
                    NAME,
                    format_args!("io_uring_setup failed: {e} (is io_uring disabled?)"),
                ),
            }
        }
    }
}

/// Queues `entries` contiguously (a linked pair must not straddle a submit), submitting what is
/// already queued first if there is not enough room.
fn push(submitter: &Submitter<'_>, sq: &mut SubmissionQueue<'_>, entries: &[squeue::Entry]) {
    loop {
        // SAFETY: the entries reference no memory other than the static REPLY_BYTE (SEND);
        // ACCEPT and CLOSE take only fds.
        if unsafe { sq.push_multiple(entries) }.is_ok() {
            return;
        }
        sq.sync();
        if let Err(e) = submitter.submit() {
            if !matches!(
                e.raw_os_error(),
                Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN)
            ) {
                peer::fatal(NAME, format_args!("io_uring_enter failed: {e}"));
            }
        }
        sq.sync();
    }
}

/// Accept errors that concern one connection only; the loop goes on after them.
fn is_transient_accept_error(errno: i32) -> bool {
    matches!(
        errno,
        libc::ECONNABORTED | libc::EINTR | libc::EAGAIN | libc::EPROTO | libc::EPERM
    )
}
