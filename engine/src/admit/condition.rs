//! Condition functions: the application's inline admission decision.
//!
//! When a connection reaches the head of admission, the shard calls the
//! listener's [`Condition`] with what it knows of the request: the caller's
//! address, the first bytes it sent (peeked, not consumed), and the QoS its
//! SYN carried. The condition answers [`Verdict::Accept`],
//! [`Verdict::Reject`], [`Verdict::Defer`] or [`Verdict::NeedBytes`].
//!
//! When it is asked: without [`ListenerBuilder::peek`](crate::ListenerBuilder::peek),
//! at once, on the address alone (a deny list costs no wait), and again
//! whenever the bytes it asked for with [`Verdict::NeedBytes`] have arrived;
//! with `peek(n, wait)`, once `n` bytes have arrived or `wait` has passed
//! (for conditions written to look at a fixed prefix).

use std::any::Any;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::admit::qos::Qos;
use crate::admit::syn::SynInfo;

/// The most first bytes a condition may ask to see.
pub const MAX_PEEK: usize = 16 * 1024;

/// What the shard knows of a pending connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectRequest<'a> {
    /// The caller's address.
    pub peer: SocketAddr,
    /// The local address it connected to.
    pub local: SocketAddr,
    /// The shard deciding.
    pub shard: usize,
    /// How long it has been pending (since the shard took it from the kernel).
    pub pending_for: Duration,
    /// The caller's user data: the first bytes it sent, peeked without
    /// consuming them. Empty when nothing has arrived yet or nothing was
    /// asked for: without [`ListenerBuilder::peek`](crate::ListenerBuilder::peek)
    /// the condition is asked as soon as the connection is accepted, on the
    /// address alone, and asks for bytes with [`Verdict::NeedBytes`].
    pub first_bytes: &'a [u8],
    /// Whether `first_bytes` stops at the most that was peeked for this
    /// connection, not at what the caller sent: more may have arrived. A
    /// condition that needs more returns [`Verdict::NeedBytes`]; at
    /// [`MAX_PEEK`] it has everything it can get.
    pub peek_full: bool,
    /// Whether the caller has half-closed (sent FIN) after `first_bytes`:
    /// nothing more will arrive.
    pub peer_finished: bool,
    /// The caller's QoS, from its SYN (`None` unless the listener saves SYNs).
    pub syn: Option<SynInfo>,
    /// How many times this request was deferred before.
    pub deferrals: u32,
    /// Per-connection marks that survive deferrals, so that a condition
    /// asked again does a thing once per connection (see [`Mark`]).
    pub marks: &'a Marks,
}

impl ConnectRequest<'_> {
    /// Sets `mark` for this connection; returns whether it was not set yet,
    /// i.e. whether this is the first time the caller of this method with
    /// this mark sees the connection. [`RateLimit`](crate::conditions::RateLimit)
    /// uses it to take one token per connection however often it is asked.
    pub fn first_time(&self, mark: Mark) -> bool {
        self.marks.set(mark)
    }
}

/// One of the 64 per-connection marks a [`ConnectRequest`] carries.
///
/// Each [`Mark::new`] takes the next mark in turn (the 65th shares the first
/// one's bit), so conditions that each hold a mark do not disturb each
/// other within a listener unless more than 64 of them are alive.
///
/// ```
/// use floodgate::{Mark, Marks};
///
/// let marks = Marks::new();
/// let m = Mark::new();
/// assert!(marks.set(m));  // first time
/// assert!(!marks.set(m)); // already set
/// assert!(marks.is_set(m));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark(u8);

impl Mark {
    /// The next mark.
    pub fn new() -> Self {
        use std::sync::atomic::{AtomicU8, Ordering};
        static NEXT: AtomicU8 = AtomicU8::new(0);
        Mark(NEXT.fetch_add(1, Ordering::Relaxed) % 64)
    }
}

impl Default for Mark {
    fn default() -> Self {
        Mark::new()
    }
}

/// The marks of one pending connection (see [`Mark`]); the engine keeps one
/// per connection in admission. Build one with [`Marks::new`] to call a
/// condition directly, in a test.
#[derive(Debug, Default)]
pub struct Marks(std::cell::Cell<u64>);

impl Marks {
    /// No mark set.
    pub const fn new() -> Self {
        Marks(std::cell::Cell::new(0))
    }

    /// Sets `mark`; returns whether it was not set before.
    pub fn set(&self, mark: Mark) -> bool {
        let bit = 1u64 << mark.0;
        let old = self.0.get();
        self.0.set(old | bit);
        old & bit == 0
    }

    /// Whether `mark` is set.
    pub fn is_set(&self, mark: Mark) -> bool {
        self.0.get() & (1u64 << mark.0) != 0
    }
}

/// A value a condition attaches to the connection it accepts — a route, a
/// backend index, a parsed host name — for the code that gets the
/// connection: [`Admitted::value`](crate::Admitted::value), the inline
/// handler, registrations and the relay see it, so nothing is parsed twice.
///
/// Cheap to clone (one reference count); compared by identity.
///
/// ```
/// use floodgate::Value;
///
/// let v = Value::new(3usize);
/// assert_eq!(v.get::<usize>(), Some(&3));
/// assert_eq!(v.get::<String>(), None);
/// assert_eq!(v.clone(), v);
/// ```
#[derive(Clone)]
pub struct Value(Arc<dyn Any + Send + Sync>);

impl Value {
    /// Wraps `v`.
    pub fn new<T: Any + Send + Sync>(v: T) -> Self {
        Value(Arc::new(v))
    }

    /// The value, if it is a `T`.
    pub fn get<T: Any>(&self) -> Option<&T> {
        self.0.downcast_ref::<T>()
    }
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Value {}

impl std::fmt::Debug for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Value(..)")
    }
}

/// How a rejected connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectHow {
    /// A normal close: FIN (after the reply, in the same segment).
    Close,
    /// An abortive close: RST (SO_LINGER 0).
    Reset,
}

/// The condition's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Admit it: apply `qos` on top of the listener's attributes, send
    /// `reply` first, then hand it to the application with `value`.
    Accept {
        /// Response QoS for this connection.
        qos: Option<Qos>,
        /// Bytes sent before the application gets the connection.
        reply: Option<Vec<u8>>,
        /// What the application, its handler, registrations and the relay
        /// see of the decision ([`Admitted::value`](crate::Admitted::value)).
        value: Option<Value>,
    },
    /// Refuse it: send `reply` (if any), then close or reset.
    Reject {
        /// Close or reset.
        how: RejectHow,
        /// Bytes sent before closing (e.g. a one-line refusal).
        reply: Option<Vec<u8>>,
    },
    /// Leave it pending and ask again when more bytes arrive (if the
    /// condition is looking at bytes) or after the listener's defer
    /// interval, until its pending timeout withdraws it.
    Defer,
    /// Ask again once at least this many first bytes have arrived, or the
    /// caller half-closed; withdrawn at the pending timeout otherwise. The
    /// way a condition asks for what it needs, e.g. a TLS record's length
    /// from its header. Clamped to [`MAX_PEEK`]; asking for
    /// no more than it was given (with `peek_full` false: all that arrived)
    /// is taken as [`Verdict::Defer`].
    NeedBytes(usize),
}

impl Verdict {
    /// Accept with nothing added.
    pub fn accept() -> Self {
        Verdict::Accept {
            qos: None,
            reply: None,
            value: None,
        }
    }

    /// Accept, handing `value` to whoever gets the connection.
    ///
    /// ```
    /// use floodgate::{Value, Verdict};
    ///
    /// let v = Verdict::accept_with(Value::new("backend-2"));
    /// assert!(matches!(v, Verdict::Accept { value: Some(_), .. }));
    /// ```
    pub fn accept_with(value: Value) -> Self {
        Verdict::Accept {
            qos: None,
            reply: None,
            value: Some(value),
        }
    }

    /// Reject with a close and no reply.
    pub fn close() -> Self {
        Verdict::Reject {
            how: RejectHow::Close,
            reply: None,
        }
    }

    /// Reject with a reset and no reply.
    pub fn reset() -> Self {
        Verdict::Reject {
            how: RejectHow::Reset,
            reply: None,
        }
    }

    /// The same verdict with `qos`, if it is an accept (others unchanged).
    pub fn with_qos(mut self, q: Qos) -> Self {
        if let Verdict::Accept { qos, .. } = &mut self {
            *qos = Some(q);
        }
        self
    }

    /// The same verdict with `bytes` as its reply, if it is an accept or a
    /// reject (others unchanged).
    pub fn with_reply(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        match &mut self {
            Verdict::Accept { reply, .. } | Verdict::Reject { reply, .. } => {
                *reply = Some(bytes.into())
            }
            Verdict::Defer | Verdict::NeedBytes(_) => {}
        }
        self
    }

    /// The same verdict with `v` as its value, if it is an accept.
    pub fn with_value(mut self, v: Value) -> Self {
        if let Verdict::Accept { value, .. } = &mut self {
            *value = Some(v);
        }
        self
    }
}

/// An admission decision, called inline on the shard thread. It must not
/// block: it runs between two turns of the shard's loop. A panic is caught:
/// the connection is reset and counted, and the shard goes on.
///
/// Any `Fn(&ConnectRequest) -> Verdict + Send + Sync` is a condition:
///
/// ```
/// use floodgate::{ConnectRequest, Listener, Verdict};
///
/// let listener = Listener::builder("127.0.0.1:0".parse()?)
///     .shards(1)
///     .condition(|req: &ConnectRequest<'_>| {
///         if req.peer.ip().is_loopback() { Verdict::accept() } else { Verdict::reset() }
///     })
///     .build()?;
/// assert_eq!(listener.shards(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait Condition: Send + Sync + 'static {
    /// Decides on one pending connection.
    fn decide(&self, req: &ConnectRequest<'_>) -> Verdict;
}

impl<F> Condition for F
where
    F: Fn(&ConnectRequest<'_>) -> Verdict + Send + Sync + 'static,
{
    fn decide(&self, req: &ConnectRequest<'_>) -> Verdict {
        self(req)
    }
}
