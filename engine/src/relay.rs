//! Relays: an admitted connection spliced to an upstream, entirely on the
//! shard's own io_uring (the used-by case of an L4 proxy).
//!
//! [`crate::ShardContext::relay`] creates the upstream socket (socket2) and
//! posts its CONNECT with a linked timeout on the ring of the shard that
//! accepted the client. Once connected, two directions run independently,
//! client → upstream and upstream → client, each as a loop over one owned
//! buffer: RECV into it, SEND exactly the bytes received (resumed from the
//! same buffer after a short send), RECV again. The buffer moves into the
//! ring with each operation and comes back with its completion
//! ([`Uring::release`]): no copy, no reallocation.
//!
//! Ends:
//! - end of stream on one side (FIN) shuts the other side's write half
//!   (SHUTDOWN, 5.11) after every byte before it was sent; once both
//!   directions have ended, both sockets are closed (FIN): *completed*;
//! - an error on either side (RST, a failed send, the upstream refusing or
//!   timing out) cancels what is in flight and closes both sockets with
//!   SO_LINGER 0, so both peers see a reset: *failed*;
//! - listener shutdown tears every relay down the same way.
//!
//! Each relay lives in a slab slot; every operation's user data carries the
//! slot, the slot's generation and the side, so a completion can never be
//! taken for another relay's. A slot is freed only when no operation of its
//! relay is in flight and both sockets are closed (each exactly once: by a
//! CLOSE operation, or by dropping its `OwnedFd` when the CLOSE could not be
//! posted).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};

use crate::shard::{user_data, Tag};
use crate::stats::{Counters, RelayCounters};
use crate::sys::{self, Cqe, Released, Uring};

/// Default size of each direction's buffer: 64 KiB.
pub const DEFAULT_RELAY_BUFFER: usize = 64 * 1024;
/// Largest buffer a relay direction uses (larger requests are clamped).
pub const MAX_RELAY_BUFFER: usize = 16 * 1024 * 1024;
/// Default bound on the upstream CONNECT: 5 s.
pub const DEFAULT_RELAY_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How [`crate::ShardContext::relay`] relays a connection.
///
/// ```
/// use std::time::Duration;
/// use floodgate::RelayOptions;
///
/// let opts = RelayOptions::new()
///     .with_buffer_size(16 * 1024)
///     .with_connect_timeout(Duration::from_secs(1));
/// assert_eq!(opts.buffer_size(), 16 * 1024);
/// assert_eq!(RelayOptions::default().buffer_size(), floodgate::DEFAULT_RELAY_BUFFER);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayOptions {
    buffer_size: usize,
    connect_timeout: Duration,
    nodelay: bool,
    strip_proxy_header: bool,
}

impl RelayOptions {
    /// 64 KiB per direction, a 5 s connect timeout, TCP_NODELAY on both
    /// sockets.
    pub const fn new() -> Self {
        RelayOptions {
            buffer_size: DEFAULT_RELAY_BUFFER,
            connect_timeout: DEFAULT_RELAY_CONNECT_TIMEOUT,
            nodelay: true,
            strip_proxy_header: false,
        }
    }

    /// Size of each direction's buffer (one per direction per relay), the
    /// most one RECV takes; clamped to `1..=`[`MAX_RELAY_BUFFER`].
    pub const fn with_buffer_size(mut self, bytes: usize) -> Self {
        self.buffer_size = bytes;
        self
    }

    /// Bound on the upstream CONNECT (a LINK_TIMEOUT linked to it);
    /// `Duration::ZERO` leaves it to the kernel's SYN retries.
    pub const fn with_connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Whether both sockets of the relay, the client's and the upstream's,
    /// get TCP_NODELAY (default on: a relay forwards what it received at
    /// once; batching is the endpoints' choice). Off leaves both as they
    /// are (the client's socket as accepted, the upstream's as created).
    pub const fn with_nodelay(mut self, on: bool) -> Self {
        self.nodelay = on;
        self
    }

    /// Whether a PROXY header (v1 or v2) at the start of the client's
    /// stream is consumed instead of relayed (default off: the upstream
    /// gets the stream as the client sent it). Only a header that has fully
    /// arrived when the relay starts is stripped; a listener that peeks
    /// enough bytes for its condition has made sure of that.
    pub const fn with_strip_proxy_header(mut self, on: bool) -> Self {
        self.strip_proxy_header = on;
        self
    }

    /// Whether a complete leading PROXY header is stripped.
    pub const fn strip_proxy_header(&self) -> bool {
        self.strip_proxy_header
    }

    /// The buffer size each direction will use (after clamping).
    pub const fn buffer_size(&self) -> usize {
        if self.buffer_size == 0 {
            1
        } else if self.buffer_size > MAX_RELAY_BUFFER {
            MAX_RELAY_BUFFER
        } else {
            self.buffer_size
        }
    }

    /// The upstream connect timeout (`ZERO`: none).
    pub const fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// Whether both sockets get TCP_NODELAY.
    pub const fn nodelay(&self) -> bool {
        self.nodelay
    }
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions::new()
    }
}

/// Side 0 is the client, side 1 the upstream; direction `d` reads from side
/// `d` and writes to side `1 - d`.
const CLIENT: usize = 0;
const UPSTREAM: usize = 1;

/// Slots addressable in 24 bits of user data.
const SLOT_BITS: u32 = 24;
const SLOT_MASK: u64 = (1 << SLOT_BITS) - 1;
const GEN_MASK: u64 = (1 << 31) - 1;

fn pack(slot: usize, gen: u32, side: usize) -> u64 {
    (slot as u64 & SLOT_MASK) | ((side as u64 & 1) << SLOT_BITS) | ((gen as u64 & GEN_MASK) << 25)
}

fn decode(payload: u64) -> (usize, u32, usize) {
    (
        (payload & SLOT_MASK) as usize,
        ((payload >> 25) & GEN_MASK) as u32,
        ((payload >> SLOT_BITS) & 1) as usize,
    )
}

/// What one direction has in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Nothing (not started, or torn down).
    Idle,
    /// A RECV from its source.
    Recv,
    /// A SEND of `buf[start..end]` to its sink.
    Send { start: usize, end: usize },
    /// The SHUTDOWN(SHUT_WR) of its sink after end of stream.
    Shutdown,
    /// Finished cleanly.
    Done,
}

impl Step {
    fn in_flight(self) -> Option<Tag> {
        match self {
            Step::Recv => Some(Tag::RelayRecv),
            Step::Send { .. } => Some(Tag::RelaySend),
            Step::Shutdown => Some(Tag::RelayShutdown),
            Step::Idle | Step::Done => None,
        }
    }
}

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Completed,
    Failed,
    Shutdown,
}

#[derive(Debug)]
struct Relay {
    /// The client's and the upstream's sockets, until their CLOSE is posted.
    fds: [Option<OwnedFd>; 2],
    /// Raw numbers of the same sockets (valid while the relay has them).
    raw: [i32; 2],
    steps: [Step; 2],
    /// Each direction's buffer while no operation holds it.
    bufs: [Option<Box<[u8]>>; 2],
    buffer_size: usize,
    /// The CONNECT is in flight.
    connecting: bool,
    /// Completions still to come (CONNECT, its timeout, RECV, SEND, SHUTDOWN).
    ops: u32,
    /// CLOSE completions still to come.
    closes: u32,
    /// Set once the relay is ending; nothing new is posted after.
    end: Option<End>,
}

#[derive(Debug, Default)]
struct Slot {
    gen: u32,
    relay: Option<Relay>,
}

/// The relays of one shard.
pub(crate) struct Relays {
    slots: Vec<Slot>,
    free: Vec<usize>,
    live: usize,
    stopping: bool,
    counters: Arc<RelayCounters>,
}

impl fmt::Debug for Relays {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relays")
            .field("live", &self.live)
            .field("slots", &self.slots.len())
            .field("stopping", &self.stopping)
            .finish()
    }
}

impl Relays {
    pub(crate) fn new(counters: Arc<RelayCounters>) -> Self {
        Relays {
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            stopping: false,
            counters,
        }
    }

    /// Starts relaying `client` to `upstream`: creates the upstream socket
    /// and posts its CONNECT (with a linked timeout). On error nothing is in
    /// flight and `client` is closed.
    pub(crate) fn start(
        &mut self,
        ring: &mut Uring,
        client: OwnedFd,
        upstream: SocketAddr,
        opts: RelayOptions,
    ) -> io::Result<()> {
        if self.stopping {
            return Err(io::Error::other("the shard is shutting down"));
        }
        if opts.strip_proxy_header() {
            strip_proxy_header(&client)?;
        }
        if opts.nodelay() {
            // Both sockets: a relay forwards each piece as it arrives, and
            // Nagle on the client side would hold a response's second
            // segment until the client's delayed ACK (tens of ms).
            SockRef::from(&client).set_nodelay(true)?;
        }
        let socket = Socket::new(
            Domain::for_address(upstream),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        if opts.nodelay() {
            socket.set_nodelay(true)?;
        }
        let up: OwnedFd = socket.into();
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                if self.slots.len() as u64 > SLOT_MASK {
                    return Err(io::Error::other("too many relays on this shard"));
                }
                self.slots.push(Slot::default());
                self.slots.len() - 1
            }
        };
        let gen = self.slots[idx].gen.wrapping_add(1) & GEN_MASK as u32;
        self.slots[idx].gen = gen;
        let raw = [client.as_raw_fd(), up.as_raw_fd()];
        let timeout = (!opts.connect_timeout().is_zero()).then(|| {
            (
                opts.connect_timeout(),
                user_data(Tag::RelayConnectTimeout, pack(idx, gen, UPSTREAM)),
            )
        });
        let posted = ring.connect(
            raw[UPSTREAM],
            SockAddr::from(upstream),
            timeout,
            user_data(Tag::RelayConnect, pack(idx, gen, UPSTREAM)),
        );
        if let Err(e) = posted {
            // Nothing was posted: both sockets close here.
            self.free.push(idx);
            return Err(e);
        }
        self.slots[idx].relay = Some(Relay {
            fds: [Some(client), Some(up)],
            raw,
            steps: [Step::Idle, Step::Idle],
            bufs: [None, None],
            buffer_size: opts.buffer_size(),
            connecting: true,
            ops: 1 + u32::from(timeout.is_some()),
            closes: 0,
            end: None,
        });
        self.live += 1;
        Counters::add(&self.counters.started, 1);
        Counters::add(&self.counters.active, 1);
        Ok(())
    }

    /// One completion of a relay operation.
    pub(crate) fn complete(&mut self, ring: &mut Uring, tag: Tag, payload: u64, cqe: Cqe) {
        let (idx, gen, side) = decode(payload);
        let released = if tag == Tag::RelayClose {
            ring.finish_close(cqe.user_data, cqe.result);
            Released::Nothing
        } else {
            ring.release(cqe.user_data)
        };
        let counters = &self.counters;
        let Some(slot) = self.slots.get_mut(idx) else {
            return;
        };
        if slot.gen != gen {
            return;
        }
        let Some(r) = slot.relay.as_mut() else {
            return;
        };
        if tag == Tag::RelayClose {
            r.closes = r.closes.saturating_sub(1);
        } else {
            r.ops = r.ops.saturating_sub(1);
        }
        let result = cqe.result;
        match tag {
            Tag::RelayConnectTimeout | Tag::RelayClose => {}
            Tag::RelayConnect => {
                r.connecting = false;
                if r.end.is_none() {
                    if result < 0 {
                        r.fail(ring, idx, gen, End::Failed);
                    } else {
                        for d in [CLIENT, UPSTREAM] {
                            let buf = vec![0u8; r.buffer_size].into_boxed_slice();
                            r.recv(ring, idx, gen, d, buf);
                        }
                    }
                }
            }
            Tag::RelayRecv => {
                let d = side;
                r.steps[d] = Step::Idle;
                let Released::Bytes(buf) = released else {
                    r.fail(ring, idx, gen, End::Failed);
                    return self.settle(ring, idx);
                };
                if r.end.is_some() {
                    r.bufs[d] = Some(buf);
                } else if result > 0 {
                    let n = (result as usize).min(buf.len());
                    r.send(ring, idx, gen, d, buf, 0, n);
                } else if result == 0 {
                    // End of stream from side d: shut the sink's write half;
                    // every byte before the FIN has already been sent.
                    r.bufs[d] = Some(buf);
                    let ud = user_data(Tag::RelayShutdown, pack(idx, gen, d));
                    match ring.shutdown(r.raw[1 - d], libc::SHUT_WR, ud) {
                        Ok(()) => {
                            r.steps[d] = Step::Shutdown;
                            r.ops += 1;
                        }
                        Err(_) => r.fail(ring, idx, gen, End::Failed),
                    }
                } else {
                    r.bufs[d] = Some(buf);
                    r.fail(ring, idx, gen, End::Failed);
                }
            }
            Tag::RelaySend => {
                let d = side;
                let Step::Send { start, end } = r.steps[d] else {
                    r.steps[d] = Step::Idle;
                    r.fail(ring, idx, gen, End::Failed);
                    return self.settle(ring, idx);
                };
                r.steps[d] = Step::Idle;
                let Released::Bytes(buf) = released else {
                    r.fail(ring, idx, gen, End::Failed);
                    return self.settle(ring, idx);
                };
                if result > 0 {
                    let counter = if d == CLIENT {
                        &counters.bytes_to_upstream
                    } else {
                        &counters.bytes_to_client
                    };
                    Counters::add(counter, result as u64);
                }
                if r.end.is_some() {
                    r.bufs[d] = Some(buf);
                } else if result > 0 {
                    let start = (start + result as usize).min(end);
                    if start < end {
                        r.send(ring, idx, gen, d, buf, start, end);
                    } else {
                        r.recv(ring, idx, gen, d, buf);
                    }
                } else {
                    // A send of at least one byte that sent none, or failed
                    // (EPIPE, ECONNRESET): the sink is gone.
                    r.bufs[d] = Some(buf);
                    r.fail(ring, idx, gen, End::Failed);
                }
            }
            Tag::RelayShutdown => {
                let d = side;
                if r.steps[d] == Step::Shutdown {
                    r.steps[d] = Step::Done;
                }
                if result == -libc::EINVAL && r.end.is_none() {
                    // No IORING_OP_SHUTDOWN (before 5.11): the same call,
                    // synchronously; it does not block.
                    if let Some(fd) = &r.fds[1 - d] {
                        let _ = SockRef::from(fd).shutdown(std::net::Shutdown::Write);
                    }
                }
                // ENOTCONN here means the sink already went away; the other
                // direction finds out on its own next operation.
                if r.end.is_none() && r.steps.iter().all(|s| *s == Step::Done) {
                    r.end = Some(End::Completed);
                }
            }
            _ => {}
        }
        self.settle(ring, idx);
    }

    /// Closes a relay's sockets once nothing of it is in flight, and frees
    /// its slot once both closes completed.
    fn settle(&mut self, ring: &mut Uring, idx: usize) {
        let Some(slot) = self.slots.get_mut(idx) else {
            return;
        };
        let gen = slot.gen;
        let Some(r) = slot.relay.as_mut() else {
            return;
        };
        let Some(end) = r.end else { return };
        if r.ops > 0 {
            return;
        }
        for side in [CLIENT, UPSTREAM] {
            if let Some(fd) = r.fds[side].take() {
                if end != End::Completed {
                    // An abortive close: the peer sees RST, as a splice
                    // should report a reset or a failure of the far side.
                    let _ = SockRef::from(&fd).set_linger(Some(Duration::ZERO));
                }
                let ud = user_data(Tag::RelayClose, pack(idx, gen, side));
                // On error the descriptor was dropped, hence closed, by
                // `close` itself: closed once either way.
                if ring.close(fd, ud).is_ok() {
                    r.closes += 1;
                }
            }
        }
        if r.closes > 0 {
            return;
        }
        slot.relay = None;
        self.free.push(idx);
        self.live -= 1;
        self.counters.active.fetch_sub(1, Ordering::Relaxed);
        let counter = match end {
            End::Completed => &self.counters.completed,
            End::Failed => &self.counters.failed,
            End::Shutdown => &self.counters.closed_at_shutdown,
        };
        Counters::add(counter, 1);
    }

    /// Shutdown: no new relays; every live one is torn down.
    pub(crate) fn stop(&mut self, ring: &mut Uring) {
        self.stopping = true;
        for idx in 0..self.slots.len() {
            let gen = self.slots[idx].gen;
            if let Some(r) = self.slots[idx].relay.as_mut() {
                r.fail(ring, idx, gen, End::Shutdown);
            }
            self.settle(ring, idx);
        }
    }

    /// Whether no relay operation is in flight.
    pub(crate) fn is_idle(&self) -> bool {
        self.live == 0
    }

    /// Last call on the shard thread. Normally nothing is left; after a
    /// broken ring, what is left is dropped (its sockets close here, its
    /// in-flight memory stays with the ring, which leaks it).
    pub(crate) fn finish(&mut self) {
        for slot in &mut self.slots {
            if slot.relay.take().is_some() {
                self.counters.active.fetch_sub(1, Ordering::Relaxed);
                Counters::add(&self.counters.closed_at_shutdown, 1);
            }
        }
        self.live = 0;
        self.free.clear();
        self.slots.clear();
    }
}

/// Consumes a complete PROXY header at the head of `fd`'s stream, if any.
fn strip_proxy_header(fd: &OwnedFd) -> io::Result<()> {
    use std::os::fd::AsFd;
    // v1 is at most 107 bytes; v2 at most 16 + 65535, but headers with TLVs
    // beyond a few hundred bytes do not occur in practice.
    const PEEK: usize = 1024;
    let head = sys::peek_now(fd.as_fd(), PEEK)?;
    if let Ok(h) = crate::proxy_protocol::parse(&head) {
        let consumed = sys::consume_now(fd.as_fd(), h.header_len)?;
        if consumed != h.header_len {
            return Err(io::Error::other("PROXY header vanished while consumed"));
        }
    }
    Ok(())
}

impl Relay {
    fn recv(&mut self, ring: &mut Uring, idx: usize, gen: u32, d: usize, buf: Box<[u8]>) {
        if self.end.is_some() {
            self.bufs[d] = Some(buf);
            return;
        }
        let ud = user_data(Tag::RelayRecv, pack(idx, gen, d));
        match ring.recv_into(self.raw[d], buf, ud) {
            Ok(()) => {
                self.steps[d] = Step::Recv;
                self.ops += 1;
            }
            Err(_) => self.fail(ring, idx, gen, End::Failed),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        ring: &mut Uring,
        idx: usize,
        gen: u32,
        d: usize,
        buf: Box<[u8]>,
        start: usize,
        end: usize,
    ) {
        if self.end.is_some() {
            self.bufs[d] = Some(buf);
            return;
        }
        let ud = user_data(Tag::RelaySend, pack(idx, gen, d));
        match ring.send_range(self.raw[1 - d], buf, start..end, libc::MSG_NOSIGNAL, ud) {
            Ok(()) => {
                self.steps[d] = Step::Send { start, end };
                self.ops += 1;
            }
            Err(_) => self.fail(ring, idx, gen, End::Failed),
        }
    }

    /// Starts tearing the relay down: cancels what is in flight; the
    /// sockets are closed once every completion is in (`settle`).
    fn fail(&mut self, ring: &mut Uring, idx: usize, gen: u32, end: End) {
        if self.end.is_some() {
            return;
        }
        self.end = Some(end);
        let cancel = user_data(Tag::Cancel, 0);
        if self.connecting {
            let target = user_data(Tag::RelayConnect, pack(idx, gen, UPSTREAM));
            let _ = ring.cancel(target, cancel);
        }
        for d in [CLIENT, UPSTREAM] {
            if let Some(tag) = self.steps[d].in_flight() {
                let _ = ring.cancel(user_data(tag, pack(idx, gen, d)), cancel);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_payload_round_trips_and_fits_56_bits() {
        for (slot, gen, side) in [(0, 0, 0), (1, 2, 1), (0xFF_FFFF, 0x7FFF_FFFF, 1)] {
            let p = pack(slot, gen, side);
            assert!(p < 1 << 56);
            assert_eq!(decode(p), (slot, gen, side));
        }
    }

    #[test]
    fn buffer_size_is_clamped() {
        assert_eq!(RelayOptions::new().with_buffer_size(0).buffer_size(), 1);
        assert_eq!(
            RelayOptions::new()
                .with_buffer_size(usize::MAX)
                .buffer_size(),
            MAX_RELAY_BUFFER
        );
    }
}
