//! Condition functions: the application's inline admission decision.
//!
//! When a connection reaches the head of admission, the shard calls the
//! listener's [`Condition`] with what it knows of the request: the caller's
//! address, the first bytes it sent (peeked, not consumed), and the QoS its
//! SYN carried. The condition answers [`Verdict::Accept`],
//! [`Verdict::Reject`] or [`Verdict::Defer`].

use std::net::SocketAddr;
use std::time::Duration;

use crate::qos::Qos;
use crate::syn::SynInfo;

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
    /// consuming them (empty when the listener asks for none, or nothing
    /// arrived in time). At most the listener's `peek` length.
    pub first_bytes: &'a [u8],
    /// Whether the caller has half-closed (sent FIN) after `first_bytes`.
    pub peer_finished: bool,
    /// The caller's QoS, from its SYN (`None` unless the listener saves SYNs).
    pub syn: Option<SynInfo>,
    /// How many times this request was deferred before.
    pub deferrals: u32,
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
    /// `reply` first, then hand it to the application.
    Accept {
        /// Response QoS for this connection.
        qos: Option<Qos>,
        /// Bytes sent before the application gets the connection.
        reply: Option<Vec<u8>>,
    },
    /// Refuse it: send `reply` (if any), then close or reset.
    Reject {
        /// Close or reset.
        how: RejectHow,
        /// Bytes sent before closing (e.g. a one-line refusal).
        reply: Option<Vec<u8>>,
    },
    /// Leave it pending and ask again when more bytes arrive or after the
    /// listener's defer interval, until its pending timeout withdraws it.
    Defer,
}

impl Verdict {
    /// Accept with nothing added.
    pub fn accept() -> Self {
        Verdict::Accept {
            qos: None,
            reply: None,
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
