//! One connect or sequence in flight on a shard, a [`Slot`]: the
//! operations it has posted and how it is cancelled (what the dialer does
//! with it is in `dialer/connects.rs`).

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::admit::attrs::SocketAttrs;

use super::job::Reply;
use super::load::SequencePlan;

/// Bits of the operations a slot has in flight.
pub(super) const OP_CONNECT: u8 = 1;
pub(super) const OP_TIMEOUT: u8 = 2;
pub(super) const OP_SEND: u8 = 4;
pub(super) const OP_RECV: u8 = 8;
pub(super) const OP_CLOSE: u8 = 16;
pub(super) const OP_SOCKET: u8 = 32;
pub(super) const OP_DISCONNECT: u8 = 64;

/// What a slot does once its io_uring SOCKET completes.
pub(super) enum Opening {
    /// A single connect.
    Connect {
        timeout: Option<Duration>,
        source: Option<IpAddr>,
        attrs: Arc<SocketAttrs>,
    },
    /// A load sequence.
    Sequence {
        plan: Arc<SequencePlan>,
        source: Option<IpAddr>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cancel {
    No,
    Deadline,
    Shutdown,
}

/// One connect or sequence in flight on a shard.
pub(super) struct Slot {
    pub(super) busy: bool,
    pub(super) fd: Option<OwnedFd>,
    pub(super) raw: RawFd,
    pub(super) addr: SocketAddr,
    pub(super) ops: u8,
    pub(super) intended: Instant,
    pub(super) started: Instant,
    pub(super) deadline: Option<Instant>,
    pub(super) cancel: Cancel,
    pub(super) connect_res: Option<i32>,
    pub(super) timeout_fired: bool,
    /// A single connect's job (None for a sequence).
    pub(super) job: Option<(u64, Reply)>,
    // Sequence state.
    pub(super) connect_at: Option<Instant>,
    pub(super) first_byte_at: Option<Instant>,
    pub(super) send_res: Option<i32>,
    pub(super) sent: usize,
    pub(super) received: usize,
    pub(super) expect: usize,
    pub(super) eof: bool,
    pub(super) recv_err: Option<i32>,
    pub(super) close_linked: bool,
    /// Set while the slot's socket is being created by an io_uring SOCKET.
    pub(super) opening: Option<Opening>,
    /// A sequence whose socket lives in this direct slot of the ring.
    pub(super) direct: Option<u32>,
    /// Whether that direct slot holds the slot's socket (created, not yet
    /// closed).
    pub(super) direct_open: bool,
    /// When a sequence's connect is overdue (checked by the scan, so that
    /// no per-connect timer is needed).
    pub(super) connect_deadline: Option<Instant>,
    /// The sequence closes with an RST.
    pub(super) reset: bool,
    /// A disconnect (CONNECT to AF_UNSPEC) was posted for it.
    pub(super) disconnect_tried: bool,
    /// Its disconnect succeeded: the socket stays in the direct slot for
    /// the next sequence.
    pub(super) parkable: bool,
    /// A single connect's attributes (their file flags are set when the
    /// connected socket is handed over).
    pub(super) attrs: Option<Arc<SocketAttrs>>,
}

impl Slot {
    pub(super) fn empty(now: Instant) -> Self {
        Slot {
            busy: false,
            fd: None,
            raw: -1,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            ops: 0,
            intended: now,
            started: now,
            deadline: None,
            cancel: Cancel::No,
            connect_res: None,
            timeout_fired: false,
            job: None,
            connect_at: None,
            first_byte_at: None,
            send_res: None,
            sent: 0,
            received: 0,
            expect: 0,
            eof: false,
            recv_err: None,
            close_linked: false,
            opening: None,
            direct: None,
            direct_open: false,
            connect_deadline: None,
            reset: false,
            disconnect_tried: false,
            parkable: false,
            attrs: None,
        }
    }
}
