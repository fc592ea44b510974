//! Accept limits, as HAProxy and Envoy have them: a listener-wide maximum
//! of open connections (`maxconn`), a per-turn accept budget
//! (`tune.maxaccept`, Envoy's `max_connections_to_accept_per_socket_event`)
//! and an accept rate (a token bucket). All three leave the excess in the
//! kernel's accept queue; none rejects a connection.
//!
//! Why the shard accepts by itself when a limit is set: a multishot ACCEPT
//! takes whatever the kernel's queue holds in one go (the kernel loops in
//! its task work until the queue is empty), so by the time the shard reads
//! the completions and cancels the accept it may be past a limit by the
//! whole queue. An exact limit needs the decision *before* each accept, as
//! HAProxy makes it (it takes a slot of `actconn` with a compare-and-swap,
//! then calls `accept4`). So a listener with a limit keeps a multishot POLL
//! for readability on its listening socket instead of an ACCEPT, and on
//! each turn takes connections with `accept4` (socket2) until the queue is
//! empty or a limit says stop: [`Limits::take_from_kernel`], the one call
//! the acceptor makes per turn. The same code runs on both backends. A
//! listener without limits keeps the multishot ACCEPT and never reaches
//! this module.
//!
//! The open count travels with the connection: a [`ConnectionSlot`] is in
//! the connection's pending entry and in its [`Admitted`](crate::Admitted),
//! in a relay, in a registration and in a reply's CLOSE until it completes;
//! dropping it is what counts the connection as closed and wakes the shards
//! that stopped at the limit.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::admit::slot::{ConnectionSlot, OpenCount};
use crate::driver::sys;
use crate::error::ConfigError;
use crate::shard::op_kinds;
use crate::stats::Counters;

op_kinds! {
    /// The operations a shard with limits posts for its listener.
    pub(crate) enum LimitOp {
        /// The multishot POLL for readability on the listening socket.
        Ready = 60,
        /// The timer that waits for the rate's next token.
        Refill = 61,
    }
}

/// The accept budget of a turn when a limit is set and no budget is.
pub const DEFAULT_ACCEPT_BUDGET: usize = 64;

/// The largest accept budget [`crate::ListenerBuilder::accept_budget`] takes.
pub const MAX_ACCEPT_BUDGET: usize = 1 << 20;

/// The highest accept rate and burst [`crate::ListenerBuilder::accept_rate`]
/// takes (per second; tokens).
pub const MAX_ACCEPT_RATE: u64 = 1 << 32;

/// The limits a listener was configured with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct LimitConfig {
    pub max_connections: Option<usize>,
    pub accept_budget: Option<usize>,
    /// Tokens per second and bucket size.
    pub rate: Option<(u64, u64)>,
}

impl LimitConfig {
    /// Whether any limit is set (the shard then accepts by itself).
    pub fn any(&self) -> bool {
        self.max_connections.is_some() || self.accept_budget.is_some() || self.rate.is_some()
    }

    /// Refuses a nonsensical limit, naming its field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_connections == Some(0) {
            return Err(ConfigError::new(
                "max_connections",
                0,
                "at least 1 (a listener that may hold no connection accepts none)",
            ));
        }
        if let Some(b) = self.accept_budget {
            if b == 0 || b > MAX_ACCEPT_BUDGET {
                return Err(ConfigError::new(
                    "accept_budget",
                    b,
                    format!("must be between 1 and {MAX_ACCEPT_BUDGET}"),
                ));
            }
        }
        if let Some((per_second, burst)) = self.rate {
            if per_second == 0 || per_second > MAX_ACCEPT_RATE {
                return Err(ConfigError::new(
                    "accept_rate.per_second",
                    per_second,
                    format!("must be between 1 and {MAX_ACCEPT_RATE}"),
                ));
            }
            if burst == 0 || burst > MAX_ACCEPT_RATE {
                return Err(ConfigError::new(
                    "accept_rate.burst",
                    burst,
                    format!("must be between 1 and {MAX_ACCEPT_RATE}"),
                ));
            }
        }
        Ok(())
    }
}

/// An accept rate: a token bucket shared by a listener's shards.
#[derive(Debug)]
pub(crate) struct Bucket {
    per_second: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    pub fn new(per_second: u64, burst: u64) -> Self {
        Bucket {
            per_second: per_second as f64,
            burst: burst as f64,
            state: Mutex::new((burst as f64, Instant::now())),
        }
    }

    /// Takes up to `want` whole tokens; when none is there, says how long
    /// until the next one.
    fn take(&self, want: usize, now: Instant) -> Result<usize, Duration> {
        let Ok(mut s) = self.state.lock() else {
            return Ok(want);
        };
        let (tokens, last) = &mut *s;
        let elapsed = now.saturating_duration_since(*last).as_secs_f64();
        *tokens = (*tokens + elapsed * self.per_second).min(self.burst);
        *last = now.max(*last);
        let whole = tokens.floor();
        if whole < 1.0 {
            let missing = 1.0 - *tokens;
            // At least 1 µs, so that a timer is never asked for zero.
            let wait = Duration::from_secs_f64(missing / self.per_second);
            return Err(wait.max(Duration::from_micros(1)));
        }
        let n = (whole as usize).min(want);
        *tokens -= n as f64;
        Ok(n)
    }

    /// Tokens taken and not used.
    fn give_back(&self, n: usize) {
        if n == 0 {
            return;
        }
        if let Ok(mut s) = self.state.lock() {
            s.0 = (s.0 + n as f64).min(self.burst);
        }
    }
}

/// Why a turn's taking stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// The kernel's queue is empty (EAGAIN): wait for readability.
    Drained,
    /// The turn's budget is spent; more may wait: take on next turn.
    Budget,
    /// The listener is at its maximum: wait for a close to wake the shard.
    AtLimit,
    /// No token: wait this long.
    Rate(Duration),
    /// accept4 failed with this errno (exhaustion or an unexpected error):
    /// the acceptor backs off as it does for a failed ACCEPT.
    Error(i32),
}

/// One shard's view of its listener's limits.
#[derive(Debug)]
pub(crate) struct Limits {
    budget: usize,
    open: Option<Arc<OpenCount>>,
    rate: Option<Arc<Bucket>>,
    /// This shard is counted in `OpenCount::paused`.
    paused: bool,
    /// Readability seen and the queue not yet found empty.
    pub readable: bool,
    /// A refill timer is in flight.
    pub refill_timer: bool,
}

impl Limits {
    pub fn new(cfg: &LimitConfig, open: Option<Arc<OpenCount>>, rate: Option<Arc<Bucket>>) -> Self {
        Limits {
            budget: cfg.accept_budget.unwrap_or(DEFAULT_ACCEPT_BUDGET),
            open,
            rate,
            paused: false,
            readable: false,
            refill_timer: false,
        }
    }

    /// Whether the shard waits for a close at the limit.
    pub fn at_limit(&self) -> bool {
        self.paused
    }

    fn pause(&mut self, open: &OpenCount, c: &Counters) {
        if !self.paused {
            self.paused = true;
            open.pause();
            Counters::add(&c.limit_pauses, 1);
        }
    }

    fn unpause(&mut self, open: &OpenCount) {
        if self.paused {
            self.paused = false;
            open.unpause();
        }
    }

    /// Takes connections from the kernel's queue of `socket` (non-blocking)
    /// into `out`, each with its slot, until the queue is empty or a limit
    /// stops it: at most the budget, one token each, one slot each.
    /// Transient accept errors are counted and skipped. The sockets are
    /// close-on-exec, and non-blocking with `nonblocking` (in `accept4`'s
    /// flags).
    pub fn take_from_kernel(
        &mut self,
        socket: &Socket,
        nonblocking: bool,
        c: &Counters,
        now: Instant,
        out: &mut Vec<(OwnedFd, ConnectionSlot)>,
    ) -> Stop {
        let mut grant = self.budget;
        if let Some(b) = &self.rate {
            match b.take(grant, now) {
                Ok(n) => grant = n,
                Err(wait) => {
                    Counters::add(&c.rate_pauses, 1);
                    return Stop::Rate(wait);
                }
            }
        }
        let mut taken = 0;
        let stop = loop {
            if taken == grant {
                if let (Some(b), true) = (&self.rate, grant < self.budget) {
                    match b.take(self.budget - grant, now) {
                        Ok(n) if n > 0 => {
                            grant += n;
                            continue;
                        }
                        Ok(_) => {}
                        Err(wait) => {
                            Counters::add(&c.rate_pauses, 1);
                            break Stop::Rate(wait);
                        }
                    }
                }
                Counters::add(&c.budget_stops, 1);
                break Stop::Budget;
            }
            let slot = match self.open.clone() {
                None => ConnectionSlot::none(),
                Some(open) => {
                    if !open.reserve() {
                        self.pause(&open, c);
                        // Announced first, checked again: a close that came
                        // in between either is seen here or sees the flag.
                        if !open.reserve() {
                            break Stop::AtLimit;
                        }
                    }
                    self.unpause(&open);
                    ConnectionSlot::counted(open)
                }
            };
            match sys::accept4(socket.as_fd(), nonblocking) {
                Ok(s) => {
                    taken += 1;
                    if let Some(open) = &self.open {
                        open.note_high_water();
                    }
                    out.push((s, slot));
                }
                Err(e) => {
                    drop(slot);
                    let errno = e.raw_os_error().unwrap_or(libc::EIO);
                    match errno {
                        libc::EAGAIN => {
                            self.readable = false;
                            break Stop::Drained;
                        }
                        libc::EINTR => continue,
                        _ => match sys::classify(errno) {
                            sys::AcceptErrorKind::Transient => {
                                c.last_errno.store(errno as u64, Ordering::Relaxed);
                                Counters::add(&c.aborted, 1);
                            }
                            _ => break Stop::Error(errno),
                        },
                    }
                }
            }
        };
        if let (Some(b), Stop::Drained | Stop::AtLimit | Stop::Error(_)) = (&self.rate, stop) {
            b.give_back(grant - taken);
        }
        stop
    }

    /// The shard is ending: it no longer waits for closes.
    pub fn finish(&mut self) {
        if let Some(open) = self.open.clone() {
            self.unpause(&open);
        }
    }
}

/// Sets the listening socket non-blocking for the shard's own accepts.
pub(crate) fn prepare(socket: &Socket) -> io::Result<()> {
    socket.set_nonblocking(true)
}
