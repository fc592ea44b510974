//! Listener configuration: a builder whose `build()` validates every value
//! first (refusing a bad one with a [`ConfigError`] naming the field), then
//! binds the shards' sockets and starts their threads.

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use crate::admit::attrs::SocketAttrs;
use crate::admit::condition::{Condition, MAX_PEEK};
use crate::admit::conn::Admitted;
use crate::admit::slot::OpenCount;
use crate::admit::AdmissionConfig;
use crate::error::{ConfigError, Error};
use crate::listen::accept::{BacklogLength, Delivery, Listener, ShardShared};
use crate::listen::acceptor::{Acceptor, Handler};
use crate::listen::driven::DrivenShard;
use crate::listen::group::{self, SocketSpec, Steering};
use crate::listen::limits::{Bucket, LimitConfig, Limits};
use crate::relay::context::ShardContext;
use crate::shard::{self, Coalesce, Moderation, Placement, ShardControl};
use socket2::Socket;

/// The ceiling used when `net.core.somaxconn` cannot be read (the kernel's
/// own default since 5.4).
pub const DEFAULT_CEILING: usize = 4096;

/// The largest ring a shard may have (entries); larger requests are refused
/// as a configuration error rather than allocating gigabytes.
pub const MAX_CEILING: usize = 1 << 24;

/// The backlog asked for when the application does not say.
pub const DEFAULT_BACKLOG: usize = 1024;

/// How long a connection may stay pending (in admission or in the ring)
/// before it is withdrawn, unless the application says otherwise.
pub const DEFAULT_PENDING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The kernel's `net.core.somaxconn`: the natural provider ceiling.
pub fn kernel_somaxconn() -> Option<usize> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Configures and starts a [`Listener`]. See [`Listener::builder`].
///
/// ```
/// use floodgate::{Listener, Steering};
///
/// let listener = Listener::builder("127.0.0.1:0".parse()?)
///     .shards(1)
///     .backlog(1_000_000) // above the ceiling: clamped, not an error
///     .steering(Steering::Hash)
///     .build()?;
/// assert_eq!(listener.backlog().effective, listener.backlog().ceiling);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct ListenerBuilder {
    addr: SocketAddr,
    shards: Option<usize>,
    backlog: usize,
    ceiling: Option<usize>,
    pin: bool,
    backend: crate::driver::Backend,
    steering: Steering,
    handler: Option<Arc<Handler>>,
    condition: Option<Arc<dyn Condition>>,
    peek: usize,
    peek_wait: std::time::Duration,
    pending_timeout: std::time::Duration,
    defer_interval: std::time::Duration,
    save_syn: bool,
    attrs: SocketAttrs,
    moderation: Moderation,
    replies_at_once: bool,
    registration: Option<crate::admit::register::Registration>,
    relay_limits: crate::relay::RelayLimits,
    pub(super) limits: LimitConfig,
    adopted: Option<Adopted>,
}

/// Listening sockets a builder adopts instead of binding its own.
pub(crate) struct Adopted {
    pub sockets: Vec<Socket>,
    /// The steering their group had, when a hand-over says it.
    pub steering: Option<crate::listen::group::SteeringInForce>,
}

impl Listener {
    /// Starts configuring a listener on `addr` (IPv4 or IPv6; port 0 picks
    /// a free port shared by every shard).
    // Here rather than beside the rest of `Listener` in `accept`: the
    // builder builds the listener, so `accept` need not know the builder.
    pub fn builder(addr: SocketAddr) -> ListenerBuilder {
        ListenerBuilder::new(addr)
    }

    /// Starts configuring a listener on sockets the application already
    /// has listening (a parent's, or its own: anything that converts into
    /// an [`OwnedFd`](std::os::fd::OwnedFd), such as
    /// [`std::net::TcpListener`] or [`socket2::Socket`]), all on one
    /// address, in the order of their reuseport group. `build()` checks
    /// each is a listening TCP socket (`SO_ACCEPTCONN`, `SO_TYPE`,
    /// `SO_DOMAIN`, `SO_PROTOCOL`) and refuses one that is not in the field
    /// `sockets`; sets close-on-exec and the declared attributes on them;
    /// with fewer sockets than shards adds `SO_REUSEPORT` siblings on the
    /// same address (refused in the field `shards` when the sockets lack
    /// `SO_REUSEPORT`); with more, a shard accepts on several (shard `k` on
    /// sockets `k`, `k + n`, ...), all kept open, since closing a reuseport
    /// listener resets the connections in its queue. CPU steering is
    /// attached either way.
    ///
    /// ```
    /// use floodgate::Listener;
    ///
    /// let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    /// let addr = std_listener.local_addr()?;
    /// let listener = Listener::adopt([std_listener]).shards(1).build()?;
    /// assert_eq!(listener.local_addr(), addr);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn adopt<I, S>(sockets: I) -> ListenerBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<std::os::fd::OwnedFd>,
    {
        let sockets = sockets
            .into_iter()
            .map(|s| Socket::from(s.into()))
            .collect();
        ListenerBuilder::adopting(sockets, None)
    }
}

impl std::fmt::Debug for ListenerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerBuilder")
            .field("addr", &self.addr)
            .field("shards", &self.shards)
            .field("backlog", &self.backlog)
            .field("ceiling", &self.ceiling)
            .field("pin", &self.pin)
            .field("steering", &self.steering)
            .field("handler", &self.handler.is_some())
            .field("condition", &self.condition.is_some())
            .field("peek", &self.peek)
            .field("peek_wait", &self.peek_wait)
            .field("pending_timeout", &self.pending_timeout)
            .field("defer_interval", &self.defer_interval)
            .field("save_syn", &self.save_syn)
            .field("attrs", &self.attrs)
            .field("moderation", &self.moderation)
            .field("replies_at_once", &self.replies_at_once)
            .field("registration", &self.registration)
            .field("relay_limits", &self.relay_limits)
            .field("limits", &self.limits)
            .field(
                "adopted",
                &self.adopted.as_ref().map_or(0, |a| a.sockets.len()),
            )
            .finish()
    }
}

impl ListenerBuilder {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        ListenerBuilder {
            addr,
            shards: None,
            backlog: DEFAULT_BACKLOG,
            ceiling: None,
            pin: true,
            backend: crate::driver::Backend::Auto,
            steering: Steering::Cpu,
            handler: None,
            condition: None,
            peek: 0,
            peek_wait: std::time::Duration::from_secs(1),
            pending_timeout: DEFAULT_PENDING_TIMEOUT,
            defer_interval: std::time::Duration::from_millis(10),
            save_syn: false,
            attrs: SocketAttrs::default(),
            moderation: Moderation::default(),
            replies_at_once: false,
            registration: None,
            relay_limits: crate::relay::RelayLimits::default(),
            limits: LimitConfig::default(),
            adopted: None,
        }
    }

    /// A builder for a listener on sockets that are already listening.
    pub(crate) fn adopting(
        sockets: Vec<Socket>,
        steering: Option<crate::listen::group::SteeringInForce>,
    ) -> Self {
        let addr = sockets
            .first()
            .and_then(|s| s.local_addr().ok())
            .and_then(|a| a.as_socket())
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let mut b = ListenerBuilder::new(addr);
        b.adopted = Some(Adopted { sockets, steering });
        b
    }

    /// The most relays ([`ShardContext::relay`]) each shard runs at once,
    /// counting those still closing. A relay asked for at the cap is
    /// refused: its client is reset, it is counted in
    /// [`crate::RelayStats::refused_cap`], and its outcome says
    /// [`crate::RelayEnd::CapRefused`]. Must be in
    /// `1..=`[`crate::MAX_RELAYS_PER_SHARD`], which is the default (the
    /// process's descriptor limit is then the practical bound: each relay
    /// holds two sockets).
    ///
    /// ```
    /// use floodgate::{Error, Listener};
    ///
    /// let listener = Listener::builder("127.0.0.1:0".parse()?)
    ///     .shards(1)
    ///     .max_relays_per_shard(10_000)
    ///     .relay_memory_per_shard(256 << 20) // 256 MiB of relay buffers
    ///     .build()?;
    /// # drop(listener);
    /// let refused = Listener::builder("127.0.0.1:0".parse()?)
    ///     .max_relays_per_shard(0)
    ///     .build();
    /// assert!(matches!(refused, Err(Error::Config(e)) if e.field == "max_relays_per_shard"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn max_relays_per_shard(mut self, n: usize) -> Self {
        self.relay_limits.max_relays = n;
        self
    }

    /// The most relay buffer memory each shard holds at once, in bytes: a
    /// relay holds two buffers of its
    /// [`crate::RelayOptions::buffer_size`] from its start until both of
    /// its sockets are closed. A relay that would exceed it is refused as
    /// at [`ListenerBuilder::max_relays_per_shard`]. Must be at least 2
    /// (one relay with 1-byte buffers). Default: no bound.
    pub fn relay_memory_per_shard(mut self, bytes: usize) -> Self {
        self.relay_limits.memory = bytes;
        self
    }

    /// Event registration: every admitted connection is registered on its
    /// shard's io_uring for `interest` (a multishot poll) and its events
    /// go to `handler`, called on the shard thread, until the handler
    /// closes it, takes it (into the backlog ring, for
    /// [`Listener::accept`] or the inline handler) or releases it. See
    /// [`Registered`](crate::Registered) and [`Interest`](crate::Interest).
    /// The handler must not block; registered sockets are non-blocking
    /// and events are edge-like (read until `WouldBlock`). A panic closes
    /// that connection and is counted in `handler_panics`.
    ///
    /// ```
    /// use std::io::{Read, Write};
    /// use std::net::TcpStream;
    /// use floodgate::{Interest, Listener};
    ///
    /// // Echo on the shard thread; close on EOF.
    /// let listener = Listener::builder("127.0.0.1:0".parse()?)
    ///     .shards(1)
    ///     .register(Interest::READABLE, |conn, _events| {
    ///         let mut buf = [0u8; 512];
    ///         loop {
    ///             match conn.read(&mut buf) {
    ///                 Ok(0) => return conn.close(),
    ///                 Ok(n) => {
    ///                     let _ = conn.write_all(&buf[..n]);
    ///                 }
    ///                 Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
    ///                 Err(_) => return conn.close(),
    ///             }
    ///         }
    ///     })
    ///     .build()?;
    /// let mut client = TcpStream::connect(listener.local_addr())?;
    /// client.write_all(b"ping")?;
    /// let mut back = [0u8; 4];
    /// client.read_exact(&mut back)?;
    /// assert_eq!(&back, b"ping");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn register<F>(mut self, interest: crate::admit::register::Interest, handler: F) -> Self
    where
        F: Fn(&mut crate::admit::register::Registered<'_>, crate::admit::register::Events)
            + Send
            + Sync
            + 'static,
    {
        self.registration = Some(crate::admit::register::Registration {
            interest,
            handler: Arc::new(handler),
        });
        self
    }

    /// How every shard of the listener (engine threads and driven shards,
    /// either backend) moderates its wake-ups. Default
    /// [`Moderation::Adaptive`] with a 64 µs ceiling: under sustained load a
    /// shard naps between turns (after submitting what it queued, so no
    /// reply or close waits out a nap) so that one wake-up finds a batch;
    /// the pause length is measured, not set, and at light load or idle it
    /// never pauses. [`Moderation::Off`] waits for each completion as it
    /// comes; [`Moderation::Fixed`] is the older threshold rule. Counted in
    /// [`ShardStats::moderation`](crate::ShardStats::moderation); PERF.md
    /// has the design and the figures. With `Adaptive`, the shard thread's
    /// timer slack is set to 1 µs so that a pause is as short as asked (on
    /// a driven shard: the thread that first drives it).
    pub fn moderation(mut self, m: Moderation) -> Self {
        self.moderation = m;
        self
    }

    /// The fixed coalescing rule: `Some(c)` is
    /// `moderation(Moderation::Fixed(c))` (pause `c.pause` after a turn
    /// that accepted `c.threshold` connections); `None` is the default
    /// moderation ([`Moderation::Adaptive`]). Kept for callers of the
    /// older knob; prefer [`ListenerBuilder::moderation`].
    pub fn coalesce(mut self, c: Option<Coalesce>) -> Self {
        self.moderation = c.map_or_else(Moderation::default, Moderation::Fixed);
        self
    }

    /// Whether replies ([`crate::ShardContext::reply_and_close`] and
    /// condition verdict replies) leave at once rather than with the FIN.
    ///
    /// Off by default: a reply is sent with `MSG_MORE` and leaves in one
    /// segment with the FIN, which saves a segment and its processing on
    /// both ends (server CPU per connection ~2 µs lower at C=64 in PERF.md).
    /// On: the reply leaves before the close runs, which lowers first-byte
    /// latency at light load (PERF.md, C=4: p50 ~50 µs instead of ~79 on
    /// that machine). Choose by whether CPU under load or latency at light
    /// load matters more.
    pub fn replies_at_once(mut self, on: bool) -> Self {
        self.replies_at_once = on;
        self
    }

    /// The admission decision, called inline on the shard thread for every
    /// connection before it is delivered. See [`Condition`].
    pub fn condition(mut self, c: impl Condition) -> Self {
        self.condition = Some(Arc::new(c));
        self
    }

    /// Show the condition up to `bytes` first bytes of each connection
    /// (peeked, not consumed), waiting at most `wait` for them; the
    /// condition is asked once they are there or `wait` has passed, and
    /// decides with what arrived. With no condition, the connection is
    /// delivered once its bytes are there (or `wait` passed). 0 (the
    /// default): the condition is asked at once, on the address, and asks
    /// for bytes itself with [`Verdict::NeedBytes`](crate::Verdict::NeedBytes)
    /// (as the ready-made `Sni` and `ProxyProtocol` do). At most [`MAX_PEEK`].
    pub fn peek(mut self, bytes: usize, wait: std::time::Duration) -> Self {
        self.peek = bytes;
        self.peek_wait = wait;
        self
    }

    /// A connection pending longer than this (waiting for bytes, deferred,
    /// or in the ring) is withdrawn: closed and counted. Default 10 s.
    pub fn pending_timeout(mut self, d: std::time::Duration) -> Self {
        self.pending_timeout = d;
        self
    }

    /// After a [`crate::Verdict::Defer`], ask again after this long if no
    /// more bytes arrived first. Default 10 ms.
    pub fn defer_interval(mut self, d: std::time::Duration) -> Self {
        self.defer_interval = d;
        self
    }

    /// Save each connection's SYN (`TCP_SAVE_SYN`, 4.2+) so the condition
    /// sees the caller's QoS: DSCP/ECN and TCP options.
    pub fn save_syn(mut self, on: bool) -> Self {
        self.save_syn = on;
        self
    }

    /// Attributes every admitted socket carries (set on the listener, and
    /// on each admitted socket where Linux does not inherit them).
    pub fn attrs(mut self, attrs: SocketAttrs) -> Self {
        self.attrs = attrs;
        self
    }

    /// Admitted sockets non-blocking (O_NONBLOCK) from the accept itself:
    /// SOCK_NONBLOCK in the io_uring ACCEPT's flags, or in `accept4`'s on
    /// the epoll backend and under limits, so no connection costs an
    /// `fcntl`. What an async runtime wants (`tokio::net::TcpStream::from_std`
    /// needs a non-blocking socket). The same as
    /// [`SocketAttrs::nonblocking`]; a later [`attrs`](Self::attrs)
    /// replaces it. Default false (blocking, as `std` accepts).
    ///
    /// ```
    /// use floodgate::Listener;
    ///
    /// let listener = Listener::builder("127.0.0.1:0".parse()?)
    ///     .shards(1)
    ///     .nonblocking(true)
    ///     .build()?;
    /// let _client = std::net::TcpStream::connect(listener.local_addr())?;
    /// let conn = listener.accept()?.into_std();
    /// let mut buf = [0u8; 1];
    /// let err = std::io::Read::read(&mut &conn, &mut buf).unwrap_err();
    /// assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn nonblocking(mut self, on: bool) -> Self {
        self.attrs.nonblocking = on;
        self
    }

    /// Number of shards (threads, rings, listening sockets). Default: one
    /// per core this process may run on. Must be at least 1, and with
    /// pinning on at most the number of cores.
    pub fn shards(mut self, n: usize) -> Self {
        self.shards = Some(n);
        self
    }

    /// Requested backlog: each shard's ring capacity and `listen(2)` length,
    /// clamped to the ceiling. Must be at least 1. Default 1024.
    pub fn backlog(mut self, n: usize) -> Self {
        self.backlog = n;
        self
    }

    /// Provider ceiling for the backlog. Default: `net.core.somaxconn`.
    /// Must be in `1..=MAX_CEILING`.
    pub fn ceiling(mut self, n: usize) -> Self {
        self.ceiling = Some(n);
        self
    }

    /// Which backend runs the shards (default [`Backend::Auto`](crate::Backend::Auto):
    /// io_uring, or epoll where io_uring is denied; the choice and its
    /// reason are in [`Listener::backend`](crate::Listener::backend)).
    pub fn backend(mut self, b: crate::driver::Backend) -> Self {
        self.backend = b;
        self
    }

    /// Pin shard `k` to core `k` (default on).
    pub fn pin(mut self, on: bool) -> Self {
        self.pin = on;
        self
    }

    /// How connections are spread over the shards (default [`Steering::Cpu`]).
    pub fn steering(mut self, s: Steering) -> Self {
        self.steering = s;
        self
    }

    /// Delivers every connection to `handler`, called inline on the shard
    /// thread that accepted it: the fastest path. `accept()` is then not
    /// available. A panic in the handler drops that connection and is
    /// counted; the shard goes on.
    pub fn handler<F>(mut self, handler: F) -> Self
    where
        F: Fn(Admitted, &mut ShardContext<'_>) + Send + Sync + 'static,
    {
        self.handler = Some(Arc::new(handler));
        self
    }

    /// Validates the configuration without starting anything; returns the
    /// shard count, the cores to pin to and the backlog lengths.
    fn validate(
        &self,
    ) -> Result<(usize, Vec<Option<core_affinity::CoreId>>, BacklogLength), ConfigError> {
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let available = cores.len().max(1);
        let shards = self.shards.unwrap_or(available);
        if shards == 0 {
            return Err(ConfigError::new(
                "shards",
                shards,
                "at least one shard is needed",
            ));
        }
        if self.pin && shards > cores.len() {
            return Err(ConfigError::new(
                "shards",
                shards,
                format!(
                    "pinning is on and this process may run on {} core(s); use fewer shards or pin(false)",
                    cores.len()
                ),
            ));
        }
        if shards > 1024 {
            return Err(ConfigError::new("shards", shards, "at most 1024 shards"));
        }
        if self.backlog == 0 {
            return Err(ConfigError::new(
                "backlog",
                self.backlog,
                "must be at least 1",
            ));
        }
        let ceiling = match self.ceiling {
            Some(c) => c,
            None => kernel_somaxconn().unwrap_or(DEFAULT_CEILING),
        };
        if ceiling == 0 || ceiling > MAX_CEILING {
            return Err(ConfigError::new(
                "ceiling",
                ceiling,
                format!("must be between 1 and {MAX_CEILING}"),
            ));
        }
        if self.peek > MAX_PEEK {
            return Err(ConfigError::new(
                "peek",
                self.peek,
                format!("at most {MAX_PEEK} bytes"),
            ));
        }
        if self.pending_timeout.is_zero() {
            return Err(ConfigError::new(
                "pending_timeout",
                "0s",
                "must be longer than zero",
            ));
        }
        if self.defer_interval.is_zero() {
            return Err(ConfigError::new(
                "defer_interval",
                "0s",
                "must be longer than zero",
            ));
        }
        if let Some(c) = &self.attrs.congestion {
            if c.is_empty() || c.len() > 15 {
                return Err(ConfigError::new(
                    "attrs.congestion",
                    c,
                    "a congestion control name of 1 to 15 bytes",
                ));
            }
        }
        let relays = self.relay_limits.max_relays;
        if relays == 0 || relays > crate::relay::MAX_RELAYS_PER_SHARD {
            return Err(ConfigError::new(
                "max_relays_per_shard",
                relays,
                format!(
                    "must be between 1 and {}",
                    crate::relay::MAX_RELAYS_PER_SHARD
                ),
            ));
        }
        if self.relay_limits.memory < 2 {
            return Err(ConfigError::new(
                "relay_memory_per_shard",
                self.relay_limits.memory,
                "at least 2 bytes: a relay holds two buffers of at least 1 byte",
            ));
        }
        self.limits.validate()?;
        if self.addr.ip().is_multicast() {
            return Err(ConfigError::new(
                "addr",
                self.addr,
                "a multicast address cannot accept TCP",
            ));
        }
        let effective = self.backlog.min(ceiling);
        let backlog = BacklogLength {
            requested: self.backlog,
            ceiling,
            effective,
            kernel: kernel_somaxconn().map_or(effective, |k| effective.min(k)),
        };
        let placements = (0..shards)
            .map(|k| {
                if self.pin {
                    cores.get(k).copied()
                } else {
                    None
                }
            })
            .collect();
        Ok((shards, placements, backlog))
    }

    /// Validates, binds one `SO_REUSEPORT` socket per shard, attaches the
    /// steering program, and starts the shard threads, each with its own
    /// io_uring.
    ///
    /// # Errors
    /// [`Error::Config`] naming the field for a bad value;
    /// [`Error::UringUnavailable`] naming the cause (ENOSYS, the
    /// `kernel.io_uring_disabled` sysctl, a seccomp filter) and what to do;
    /// [`Error::Bind`] if the address is taken (without `SO_REUSEPORT`) or
    /// not local; [`Error::Setup`] for other system failures. Nothing is
    /// left running or open on error.
    pub fn build(self) -> Result<Listener, Error> {
        self.start(false).map(|(listener, _)| listener)
    }

    /// Whether an inline handler was set.
    #[cfg(feature = "tokio")]
    pub(crate) fn has_handler(&self) -> bool {
        self.handler.is_some()
    }

    /// Builds the listener without starting a thread: one [`DrivenShard`]
    /// per shard, for the application to move onto threads it owns and
    /// drive there (a thread per core running its own event loop, a tokio
    /// `current_thread` runtime per core, another executor). Each shard's
    /// descriptor is readable while it has work; its
    /// [`DrivenShard::drive`] hands the admitted connections to the caller
    /// on that thread. Everything else is as with [`build`](Self::build):
    /// `SO_REUSEPORT` sockets with CPU steering (shard `k` receives the
    /// connections that arrive on CPU `k`, so drive it on core `k`), the
    /// backlog ring and its backpressure, admission, registrations, limits,
    /// conservation. [`Listener::accept`] returns
    /// [`Error::DrivenDelivery`]; [`Listener::shutdown`] tells the shards to
    /// stop (each finishes at its next `drive()`, or when dropped) and does
    /// not wait for them. `pin` does not apply: the application places its
    /// threads.
    ///
    /// # Errors
    /// As [`build`](Self::build); [`Error::Config`] naming `handler` if an
    /// inline handler was set (the handler goes to `drive()`).
    pub fn build_driven(self) -> Result<(Listener, Vec<DrivenShard>), Error> {
        if self.handler.is_some() {
            return Err(Error::Config(ConfigError::new(
                "handler",
                "set",
                "a driven listener hands connections to DrivenShard::drive's handler",
            )));
        }
        self.start(true)
    }

    fn start(mut self, driven: bool) -> Result<(Listener, Vec<DrivenShard>), Error> {
        let adopted = self.adopted.take();
        if let Some(a) = &adopted {
            // Validation sees the address the adopted sockets listen on.
            self.addr = group::adopted_addr(&a.sockets)?;
        }
        let (n, placements, backlog) = self.validate()?;
        let cpus: Vec<usize> = placements
            .iter()
            .enumerate()
            .map(|(k, c)| c.map_or(k, |c| c.id))
            .collect();
        let spec = SocketSpec {
            backlog: backlog.effective,
            attrs: &self.attrs,
            save_syn: self.save_syn,
        };
        let group = match adopted {
            None => group::bind_group(self.addr, n, &spec, self.steering, &cpus)?,
            Some(a) => group::adopt_group(a.sockets, n, &spec, self.steering, &cpus, a.steering)?,
        };
        let local_addr = group.local_addr;
        let steering = group.steering;
        let all: Vec<Arc<Socket>> = group.sockets.into_iter().map(Arc::new).collect();
        // Shard k accepts on sockets k, k + n, k + 2n... (one, unless more
        // sockets were adopted than there are shards).
        let owned: Vec<Vec<Arc<Socket>>> = (0..n)
            .map(|k| all.iter().skip(k).step_by(n).cloned().collect())
            .collect();
        let admission = Arc::new(AdmissionConfig {
            condition: self.condition.clone(),
            peek: self.peek,
            peek_wait: self.peek_wait,
            pending_timeout: self.pending_timeout,
            defer_interval: self.defer_interval,
            save_syn: self.save_syn,
            attrs: self.attrs.clone(),
            ipv6: self.addr.is_ipv6(),
            local: (!local_addr.ip().is_unspecified()).then_some(local_addr),
        });
        let open = self
            .limits
            .max_connections
            .map(|n| Arc::new(OpenCount::new(n)));
        let bucket = self
            .limits
            .rate
            .map(|(per_second, burst)| Arc::new(Bucket::new(per_second, burst)));
        let mut listener = Listener {
            shards: Vec::with_capacity(n),
            delivery: Arc::new(Delivery::for_listener()?),
            threads: Mutex::new(Vec::with_capacity(n)),
            local_addr,
            backlog,
            inline: self.handler.is_some(),
            driven,
            next: AtomicUsize::new(0),
            setup: Default::default(),
            backend: None,
            pending_timeout: self.pending_timeout,
            open: open.clone(),
            steering,
            group: Mutex::new(Vec::new()),
        };
        let mut driven_shards = Vec::new();
        for (k, sockets) in owned.into_iter().enumerate() {
            let started = ShardControl::new().and_then(|control| {
                let control = Arc::new(control);
                let shared = Arc::new(ShardShared::new(
                    backlog.effective,
                    control.clone(),
                    sockets.clone(),
                ));
                if let Some(open) = &open {
                    open.add_shard(control.clone());
                }
                let limits = self
                    .limits
                    .any()
                    .then(|| Limits::new(&self.limits, open.clone(), bucket.clone()));
                let acceptor = Acceptor::new(
                    k,
                    sockets,
                    shared.clone(),
                    listener.delivery.clone(),
                    self.handler.clone(),
                    admission.clone(),
                )
                .with_coalesce(match self.moderation {
                    Moderation::Fixed(c) => Some(c),
                    _ => None,
                })
                .with_replies_at_once(self.replies_at_once)
                .with_registration(self.registration.clone())
                .with_relay_limits(self.relay_limits)
                .with_limits(limits);
                let placement = Placement {
                    index: k,
                    core: placements[k],
                    backend: self.backend,
                    moderation: self.moderation,
                };
                if driven {
                    let (shard, s) = shard::prepare_driven(placement, control, acceptor.driven())?;
                    driven_shards.push(DrivenShard::new(k, shard, shared.clone()));
                    Ok((shared, None, s))
                } else {
                    shard::spawn("floodgate", placement, control, acceptor)
                        .map(|(h, s)| (shared, Some(h), s))
                }
            });
            match started {
                Ok((shared, handle, s)) => {
                    listener.shards.push(shared);
                    if let (Some(h), Ok(mut threads)) = (handle, listener.threads.lock()) {
                        threads.push(h);
                    }
                    listener.backend.get_or_insert(s.backend);
                    if k == 0 {
                        listener.setup = s.setup;
                    }
                }
                Err(e) => {
                    // Stop what already runs (the shards' own threads, or
                    // the driven shards, which drop here); the rest of the
                    // sockets close when `all` is dropped.
                    drop(driven_shards);
                    listener.shutdown();
                    return Err(e);
                }
            }
        }
        if let Ok(mut g) = listener.group.lock() {
            *g = all;
        }
        crate::events::report_fallback(self.backend, listener.backend.as_ref(), "listener");
        Ok((listener, driven_shards))
    }
}
