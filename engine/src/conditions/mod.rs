//! Ready-made conditions, built on the public [`Condition`] API: address
//! filters ([`CidrFilter`]), per-source rate limits ([`RateLimit`]), the
//! PROXY protocol ([`ProxyProtocol`]), TLS SNI routing ([`Sni`]) and
//! chaining ([`Chain`], [`all_of`]).
//!
//! Each is a plain value implementing [`Condition`]; give it to
//! [`ListenerBuilder::condition`](crate::ListenerBuilder::condition):
//!
//! ```
//! use floodgate::conditions::{CidrFilter, Chain, RateLimit};
//! use floodgate::Listener;
//!
//! let filter = CidrFilter::new().deny("10.0.0.0/8".parse()?);
//! let limit = RateLimit::new(1, 100.0, 20, 10_000)?;
//! let listener = Listener::builder("127.0.0.1:0".parse()?)
//!     .shards(1)
//!     .condition(Chain::new(filter).then(limit))
//!     .build()?;
//! let _client = std::net::TcpStream::connect(listener.local_addr())?;
//! let conn = listener.accept()?; // 127.0.0.1: not denied, within the rate
//! assert!(conn.peer_addr()?.ip().is_loopback());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod cidr;
pub mod proxy_protocol;
pub mod rate_limit;
pub mod sni;
pub use crate::admit::syn;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Instant;

use crate::admit::condition::{Condition, ConnectRequest, RejectHow, Verdict, MAX_PEEK};
use cidr::CidrList;
use proxy_protocol::{ProxyError, ProxyHeader};
use rate_limit::{RateLimitError, RateLimiter};
use sni::SniError;

/// How a ready-made condition refuses a connection: close or reset, after
/// an optional reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Close (FIN) or reset (RST).
    pub how: RejectHow,
    /// Bytes sent before closing, e.g. `"HTTP/1.1 429 Too Many Requests\r\n\r\n"`.
    pub reply: Option<Vec<u8>>,
}

impl Refusal {
    /// A refusal with `how` and no reply.
    pub fn new(how: RejectHow) -> Self {
        Refusal { how, reply: None }
    }

    /// A refusal that sends `reply`, then closes with a FIN.
    pub fn reply(reply: impl Into<Vec<u8>>) -> Self {
        Refusal {
            how: RejectHow::Close,
            reply: Some(reply.into()),
        }
    }

    /// The verdict carrying it out.
    pub fn verdict(&self) -> Verdict {
        Verdict::Reject {
            how: self.how,
            reply: self.reply.clone(),
        }
    }
}

/// Admits or refuses by the caller's address: an allow list and/or a deny
/// list of [`CidrList`] blocks.
///
/// An address is admitted when it is in no deny block and, if an allow
/// list is set, in one of its blocks: deny wins over allow. IPv4 blocks
/// match IPv4-mapped IPv6 callers too (see [`cidr::Cidr::contains`]).
/// A refused caller is closed by default ([`CidrFilter::refuse`] changes it).
///
/// ```
/// use floodgate::conditions::{CidrFilter, Refusal};
/// use floodgate::RejectHow;
///
/// let f = CidrFilter::new()
///     .allow("10.0.0.0/8".parse()?)
///     .deny("10.6.6.0/24".parse()?)
///     .refuse(Refusal::new(RejectHow::Reset));
/// assert!(f.admits("10.1.2.3".parse()?));
/// assert!(!f.admits("10.6.6.6".parse()?)); // denied, though allowed
/// assert!(!f.admits("192.0.2.1".parse()?)); // not allowed
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct CidrFilter {
    allow: Option<CidrList>,
    deny: CidrList,
    refusal: Refusal,
}

impl Default for CidrFilter {
    fn default() -> Self {
        CidrFilter::new()
    }
}

impl CidrFilter {
    /// A filter that admits every address (until lists are added).
    pub fn new() -> Self {
        CidrFilter {
            allow: None,
            deny: CidrList::new(),
            refusal: Refusal::new(RejectHow::Close),
        }
    }

    /// Admit only addresses in `list` (and not denied). Calling it again
    /// replaces the list; an empty list admits nobody.
    pub fn allow(mut self, list: CidrList) -> Self {
        self.allow = Some(list);
        self
    }

    /// Refuse addresses in `list`, whatever the allow list says. Calling
    /// it again adds to the list.
    pub fn deny(mut self, list: CidrList) -> Self {
        for c in &list {
            self.deny.push(*c);
        }
        self
    }

    /// How refused callers are turned away (default: close, no reply).
    pub fn refuse(mut self, refusal: Refusal) -> Self {
        self.refusal = refusal;
        self
    }

    /// Whether `ip` passes the filter.
    pub fn admits(&self, ip: IpAddr) -> bool {
        !self.deny.contains(ip) && self.allow.as_ref().map_or(true, |a| a.contains(ip))
    }

    /// The verdict for a caller at `ip`: accept (nothing added) or the
    /// configured refusal. Usable from inside other conditions, e.g. on
    /// the original address a [`ProxyProtocol`] header carries.
    pub fn verdict_for(&self, ip: IpAddr) -> Verdict {
        if self.admits(ip) {
            Verdict::accept()
        } else {
            self.refusal.verdict()
        }
    }
}

impl Condition for CidrFilter {
    fn decide(&self, req: &ConnectRequest<'_>) -> Verdict {
        self.verdict_for(req.peer.ip())
    }
}

/// A per-source-address token bucket ([`RateLimiter`]): each source may
/// open `burst` connections at once, refilled at `rate_per_sec`.
///
/// The limiter needs `&mut` to check, so there is one per shard, each
/// behind its own [`Mutex`], chosen by [`ConnectRequest::shard`] (modulo
/// the count given to [`RateLimit::new`], which should be the listener's
/// shard count). A shard's conditions run one at a time on that shard's
/// thread, so its mutex is uncontended: locking it costs one atomic
/// exchange and never waits. The limit is therefore per shard; with
/// SO_REUSEPORT a given client usually lands on the same shard (with CPU
/// steering, on the shard of the CPU receiving its packets), so each
/// shard grants a source up to the full rate.
///
/// Over the limit, the connection is reset by default
/// ([`RateLimit::refuse`] changes it, e.g. to an HTTP 429 reply).
///
/// ```
/// use floodgate::conditions::{RateLimit, Refusal};
///
/// // One shard, 0.001 connection per second, bursts of 2.
/// let limit = RateLimit::new(1, 0.001, 2, 1000)?
///     .refuse(Refusal::reply("HTTP/1.1 429 Too Many Requests\r\n\r\n"));
/// let ip = "192.0.2.7".parse()?;
/// assert!(limit.check(0, ip));
/// assert!(limit.check(0, ip));
/// assert!(!limit.check(0, ip)); // burst spent
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct RateLimit {
    limiters: Vec<Mutex<RateLimiter>>,
    refusal: Refusal,
    /// Set on a connection once it has been charged: a deferred connection
    /// asked again (in a [`Chain`] before a condition that waits for bytes)
    /// takes no second token.
    charged: crate::admit::condition::Mark,
}

impl RateLimit {
    /// `shards` limiters (at least one), each allowing a source `burst`
    /// connections at once refilled at `rate_per_sec` per second, and
    /// tracking at most `max_sources` sources (see [`RateLimiter::new`]).
    ///
    /// # Errors
    /// As [`RateLimiter::new`], for a bad rate, burst or source count.
    pub fn new(
        shards: usize,
        rate_per_sec: f64,
        burst: u32,
        max_sources: usize,
    ) -> Result<Self, RateLimitError> {
        let limiters = (0..shards.max(1))
            .map(|_| RateLimiter::new(rate_per_sec, burst, max_sources).map(Mutex::new))
            .collect::<Result<_, _>>()?;
        Ok(RateLimit {
            limiters,
            refusal: Refusal::new(RejectHow::Reset),
            charged: crate::admit::condition::Mark::new(),
        })
    }

    /// How a caller over the limit is turned away (default: reset).
    pub fn refuse(mut self, refusal: Refusal) -> Self {
        self.refusal = refusal;
        self
    }

    /// Whether a connection from `ip` on `shard` is within the limit now;
    /// if so it takes a token.
    pub fn check(&self, shard: usize, ip: IpAddr) -> bool {
        self.check_at(shard, ip, Instant::now())
    }

    /// As [`RateLimit::check`], at time `now`.
    pub fn check_at(&self, shard: usize, ip: IpAddr, now: Instant) -> bool {
        let m = &self.limiters[shard % self.limiters.len()];
        // A poisoned lock only means a panic elsewhere mid-check: the
        // buckets are still consistent numbers; keep using them.
        let mut l = m.lock().unwrap_or_else(|p| p.into_inner());
        l.check(ip, now)
    }
}

impl Condition for RateLimit {
    /// Takes one token per connection: asked again about a connection it
    /// already let through (a deferral elsewhere in a chain), it accepts
    /// without charging.
    fn decide(&self, req: &ConnectRequest<'_>) -> Verdict {
        if !req.first_time(self.charged) {
            return Verdict::accept();
        }
        if self.check(req.shard, req.peer.ip()) {
            Verdict::accept()
        } else {
            self.refusal.verdict()
        }
    }
}

/// What [`ProxyProtocol`] hands its inner decision.
#[derive(Debug, Clone, Copy)]
pub struct Proxied<'a> {
    /// The request as the proxy's client made it: `peer` is the original
    /// client address from the header (the proxy's address when the header
    /// carries none, as v1 `UNKNOWN` or v2 `LOCAL`), and `first_bytes` the
    /// client's own bytes after the header.
    pub request: ConnectRequest<'a>,
    /// The transport peer: the proxy that sent the header.
    pub proxy: SocketAddr,
    /// The parsed header; `None` when the listener's PROXY support is
    /// optional and this connection came without one.
    pub header: Option<ProxyHeader>,
}

impl Proxied<'_> {
    /// The original client address, if the header carried one.
    pub fn original(&self) -> Option<SocketAddr> {
        self.header.and_then(|h| h.source)
    }

    /// How many bytes the header occupies at the start of the stream (0
    /// without one): the application skips them before its own data.
    pub fn header_len(&self) -> usize {
        self.header.map_or(0, |h| h.header_len)
    }
}

type ProxiedFn = dyn Fn(&Proxied<'_>) -> Verdict + Send + Sync;

/// Parses a PROXY protocol v1 or v2 header from the first bytes and decides
/// on the original client.
///
/// No `peek` setting is needed: asked on the address alone, it asks for the
/// signature's bytes, then for what the header declares (the v2 length
/// field; a v1 line up to its CRLF) with [`Verdict::NeedBytes`], so it is
/// decided as soon as the header is there, however long it is (up to
/// [`MAX_PEEK`]). With a listener `peek(n, wait)` it works
/// the same way, starting from `n` bytes.
///
/// - A header not complete yet: [`Verdict::NeedBytes`] for what it lacks;
///   refused if the peer already half-closed.
/// - No PROXY signature, or a malformed header: refused (closed, by
///   default; see [`ProxyProtocol::refuse`]); with
///   [`ProxyProtocol::optional`], a connection without a signature is
///   passed to the inner decision as it is (`header: None`).
/// - A header: the inner decision is called with [`Proxied`], whose
///   request carries the original client address.
///
/// Peeking does not consume: the header stays in the stream and the
/// application reads it first. It skips [`Proxied::header_len`] bytes (or
/// parses it again with [`proxy_protocol::parse`], which returns the same
/// `header_len`).
///
/// ```
/// use std::io::{Read, Write};
/// use std::net::TcpStream;
/// use floodgate::conditions::{CidrFilter, ProxyProtocol};
/// use floodgate::{proxy_protocol, Listener};
///
/// let deny = CidrFilter::new().deny("203.0.113.0/24".parse()?);
/// let listener = Listener::builder("127.0.0.1:0".parse()?)
///     .shards(1)
///     .condition(ProxyProtocol::new(move |p| deny.verdict_for(p.request.peer.ip())))
///     .build()?;
/// let mut client = TcpStream::connect(listener.local_addr())?;
/// let header = proxy_protocol::encode_v2("192.0.2.9:4000".parse()?, listener.local_addr());
/// client.write_all(&header)?;
/// client.write_all(b"hello")?;
/// let mut conn = listener.accept()?;
/// let mut buf = vec![0u8; header.len() + 5];
/// conn.read_exact(&mut buf)?;
/// let h = proxy_protocol::parse(&buf)?; // the header is still in the stream
/// assert_eq!(h.source, Some("192.0.2.9:4000".parse()?));
/// assert_eq!(&buf[h.header_len..], b"hello");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct ProxyProtocol {
    inner: Box<ProxiedFn>,
    optional: bool,
    refusal: Refusal,
}

impl fmt::Debug for ProxyProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyProtocol")
            .field("optional", &self.optional)
            .field("refusal", &self.refusal)
            .finish_non_exhaustive()
    }
}

impl ProxyProtocol {
    /// PROXY header required; `inner` decides on each proxied connection.
    pub fn new<F>(inner: F) -> Self
    where
        F: Fn(&Proxied<'_>) -> Verdict + Send + Sync + 'static,
    {
        ProxyProtocol {
            inner: Box::new(inner),
            optional: false,
            refusal: Refusal::new(RejectHow::Close),
        }
    }

    /// PROXY header required; any [`Condition`] decides on the request as
    /// the original client made it ([`Proxied::request`]).
    pub fn wrap(condition: impl Condition) -> Self {
        ProxyProtocol::new(move |p| condition.decide(&p.request))
    }

    /// Whether connections without a PROXY signature are passed on as they
    /// are (default false: refused). Malformed headers are refused anyway.
    pub fn optional(mut self, on: bool) -> Self {
        self.optional = on;
        self
    }

    /// How connections without a valid header are refused (default: close).
    pub fn refuse(mut self, refusal: Refusal) -> Self {
        self.refusal = refusal;
        self
    }
}

impl Condition for ProxyProtocol {
    fn decide(&self, req: &ConnectRequest<'_>) -> Verdict {
        match proxy_protocol::parse(req.first_bytes) {
            Ok(header) => {
                let mut request = *req;
                request.peer = header.source.unwrap_or(req.peer);
                request.first_bytes = req.first_bytes.get(header.header_len..).unwrap_or(&[]);
                (self.inner)(&Proxied {
                    request,
                    proxy: req.peer,
                    header: Some(header),
                })
            }
            Err(ProxyError::Incomplete { needed_at_least }) if !req.peer_finished => {
                // Until the signature is known, one more byte at a time: a
                // short request that is not PROXY must not wait for a
                // header's length.
                let b = req.first_bytes;
                let known = b.len() >= 12 || b.starts_with(b"PROXY ");
                let need = if known { needed_at_least } else { b.len() + 1 };
                if need > MAX_PEEK {
                    self.refusal.verdict()
                } else {
                    Verdict::NeedBytes(need)
                }
            }
            Err(ProxyError::NotProxy) if self.optional => (self.inner)(&Proxied {
                request: *req,
                proxy: req.peer,
                header: None,
            }),
            Err(_) => self.refusal.verdict(),
        }
    }
}

type SniFn = dyn Fn(&ConnectRequest<'_>, Option<&str>) -> Verdict + Send + Sync;

/// Routes by the TLS server name: parses the ClientHello in the first bytes
/// and calls the inner decision with its SNI host name (`None` when the
/// ClientHello has no server_name extension).
///
/// No `peek` setting is needed: asked on the address alone, it asks for the
/// TLS record header, then for the length the ClientHello declares
/// ([`sni::needed_len`], with [`Verdict::NeedBytes`]), so it decides as soon
/// as the whole ClientHello is there, whatever its size (OpenSSL pads to
/// 517 bytes; post-quantum key shares make 1.2 KiB and more), up to
/// [`MAX_PEEK`]. Bytes that are not TLS, a malformed
/// ClientHello, or one that cannot fit: refused (reset, by default; see
/// [`Sni::refuse`]), or passed to the inner decision with `None` with
/// [`Sni::pass_non_tls`].
///
/// ```
/// use floodgate::conditions::Sni;
/// use floodgate::{Qos, Verdict};
///
/// let route = Sni::new(|_req, name| match name {
///     Some("api.example.test") => {
///         Verdict::accept().with_qos(Qos { mark: Some(1), ..Default::default() })
///     }
///     Some(_) => Verdict::accept(),
///     None => Verdict::close(),
/// });
/// # let _ = route;
/// ```
pub struct Sni {
    inner: Box<SniFn>,
    pass_non_tls: bool,
    refusal: Refusal,
}

impl fmt::Debug for Sni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sni")
            .field("pass_non_tls", &self.pass_non_tls)
            .field("refusal", &self.refusal)
            .finish_non_exhaustive()
    }
}

/// Another name for [`Sni`], for configurations that read as routing.
pub type SniRouter = Sni;

impl Sni {
    /// `inner` decides on each TLS connection, given its SNI host name.
    pub fn new<F>(inner: F) -> Self
    where
        F: Fn(&ConnectRequest<'_>, Option<&str>) -> Verdict + Send + Sync + 'static,
    {
        Sni {
            inner: Box::new(inner),
            pass_non_tls: false,
            refusal: Refusal::new(RejectHow::Reset),
        }
    }

    /// Whether connections that are not TLS (or whose ClientHello is
    /// malformed) go to the inner decision with `None` (default false:
    /// refused).
    pub fn pass_non_tls(mut self, on: bool) -> Self {
        self.pass_non_tls = on;
        self
    }

    /// How non-TLS connections are refused (default: reset).
    pub fn refuse(mut self, refusal: Refusal) -> Self {
        self.refusal = refusal;
        self
    }
}

impl Condition for Sni {
    fn decide(&self, req: &ConnectRequest<'_>) -> Verdict {
        match sni::parse_sni(req.first_bytes) {
            Ok(name) => (self.inner)(req, name.as_deref()),
            Err(SniError::Incomplete) if !req.peer_finished => {
                let need = sni::needed_len(req.first_bytes);
                if need <= MAX_PEEK {
                    return Verdict::NeedBytes(need);
                }
                if self.pass_non_tls {
                    (self.inner)(req, None)
                } else {
                    self.refusal.verdict()
                }
            }
            Err(_) if self.pass_non_tls => (self.inner)(req, None),
            Err(_) => self.refusal.verdict(),
        }
    }
}

/// Conditions asked in order; the first verdict that is not an accept
/// (a reject or a defer) is the answer, and the rest are not asked.
///
/// When every condition accepts, the accept carries the QoS and the value
/// of the last condition that gave one (a later `Some` overrides an earlier
/// one; `None` leaves it), and the replies of all of them, concatenated in
/// order. A member that decides on the address alone (a [`CidrFilter`])
/// decides before any byte arrives when it comes first; a member asked
/// again after a later one waited for bytes gives the same answer, and a
/// [`RateLimit`] takes no second token.
///
/// ```
/// use floodgate::conditions::{Chain, CidrFilter};
/// use floodgate::{ConnectRequest, Verdict};
///
/// let chain = Chain::new(CidrFilter::new().deny("10.0.0.0/8".parse()?))
///     .then(|req: &ConnectRequest<'_>| {
///         if req.first_bytes.is_empty() { Verdict::Defer } else { Verdict::accept() }
///     });
/// assert_eq!(chain.len(), 2);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Default)]
pub struct Chain {
    conditions: Vec<Box<dyn Condition>>,
}

impl fmt::Debug for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chain")
            .field("conditions", &self.conditions.len())
            .finish()
    }
}

impl Chain {
    /// A chain starting with `first`.
    pub fn new(first: impl Condition) -> Self {
        Chain {
            conditions: vec![Box::new(first)],
        }
    }

    /// Appends `next`, asked only if every earlier condition accepted.
    pub fn then(mut self, next: impl Condition) -> Self {
        self.conditions.push(Box::new(next));
        self
    }

    /// Number of conditions in the chain.
    pub fn len(&self) -> usize {
        self.conditions.len()
    }

    /// Whether the chain is empty (it then accepts everything).
    pub fn is_empty(&self) -> bool {
        self.conditions.is_empty()
    }
}

/// A [`Chain`] of `conditions`, in order (empty: accepts everything).
pub fn all_of(conditions: Vec<Box<dyn Condition>>) -> Chain {
    Chain { conditions }
}

impl Condition for Chain {
    fn decide(&self, req: &ConnectRequest<'_>) -> Verdict {
        let mut qos = None;
        let mut value = None;
        let mut reply: Option<Vec<u8>> = None;
        for c in &self.conditions {
            match c.decide(req) {
                Verdict::Accept {
                    qos: q,
                    reply: r,
                    value: v,
                } => {
                    if q.is_some() {
                        qos = q;
                    }
                    if v.is_some() {
                        value = v;
                    }
                    if let Some(r) = r {
                        reply.get_or_insert_with(Vec::new).extend_from_slice(&r);
                    }
                }
                other => return other,
            }
        }
        Verdict::Accept { qos, reply, value }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admit::qos::Qos;
    use std::time::Duration;

    fn req<'a>(peer: &str, bytes: &'a [u8]) -> ConnectRequest<'a> {
        ConnectRequest {
            peer: peer.parse().unwrap(),
            local: "127.0.0.1:80".parse().unwrap(),
            shard: 0,
            pending_for: Duration::ZERO,
            first_bytes: bytes,
            peek_full: false,
            peer_finished: false,
            syn: None,
            deferrals: 0,
            // A test's requests each get marks of their own, for the test's life.
            marks: Box::leak(Box::new(crate::admit::condition::Marks::new())),
        }
    }

    #[test]
    fn cidr_deny_wins_over_allow() {
        let f = CidrFilter::new()
            .allow("10.0.0.0/8".parse().unwrap())
            .deny("10.9.0.0/16".parse().unwrap())
            .refuse(Refusal::reply("go away\n"));
        assert_eq!(f.decide(&req("10.1.1.1:5", b"")), Verdict::accept());
        assert_eq!(
            f.decide(&req("10.9.1.1:5", b"")),
            Verdict::Reject {
                how: RejectHow::Close,
                reply: Some(b"go away\n".to_vec())
            }
        );
        assert_eq!(
            f.decide(&req("192.0.2.1:5", b"")),
            f.verdict_for("10.9.0.1".parse().unwrap())
        );
        let plain = CidrFilter::new().allow("10.0.0.0/8".parse().unwrap());
        assert_eq!(plain.decide(&req("192.0.2.1:5", b"")), Verdict::close());
        assert!(CidrFilter::new().admits("192.0.2.1".parse().unwrap()));
        assert!(!CidrFilter::new()
            .allow(CidrList::new())
            .admits("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn rate_limit_rejects_past_burst_per_source_and_shard() {
        let l = RateLimit::new(2, 0.000_001, 3, 100).unwrap();
        // Each call is a new connection (marks of its own).
        for _ in 0..3 {
            assert_eq!(l.decide(&req("192.0.2.1:1", b"")), Verdict::accept());
        }
        assert_eq!(l.decide(&req("192.0.2.1:1", b"")), Verdict::reset());
        // Another source, and the same source on another shard, are fresh.
        assert_eq!(l.decide(&req("192.0.2.2:1", b"")), Verdict::accept());
        let mut r1 = req("192.0.2.1:1", b"");
        r1.shard = 1;
        assert_eq!(l.decide(&r1), Verdict::accept());
        // Refills with time.
        let t = Instant::now() + Duration::from_secs(10_000_000);
        assert!(l.check_at(0, "192.0.2.1".parse().unwrap(), t));
        assert!(RateLimit::new(1, 0.0, 1, 1).is_err());
    }

    #[test]
    fn rate_limit_charges_a_connection_once_however_often_asked() {
        let l = RateLimit::new(1, 0.000_001, 2, 100).unwrap();
        // Three connections from one source, each asked three times (as a
        // chain before a byte-waiting condition asks them): two tokens
        // cover the first two connections; the third is refused.
        let conns: Vec<_> = (0..3)
            .map(|i| req(&format!("192.0.2.1:{}", 100 + i), b""))
            .collect();
        for c in &conns[..2] {
            for _ in 0..3 {
                assert_eq!(l.decide(c), Verdict::accept());
            }
        }
        assert_eq!(l.decide(&conns[2]), Verdict::reset());
    }

    #[test]
    fn chain_carries_the_last_value() {
        let v1 = crate::admit::condition::Value::new(1u8);
        let v2 = crate::admit::condition::Value::new(2u8);
        let (a, b) = (v1.clone(), v2.clone());
        let c = Chain::new(move |_: &ConnectRequest<'_>| Verdict::accept_with(a.clone()))
            .then(move |_: &ConnectRequest<'_>| Verdict::accept_with(b.clone()))
            .then(|_: &ConnectRequest<'_>| Verdict::accept());
        match c.decide(&req("127.0.0.1:1", b"")) {
            Verdict::Accept { value: Some(v), .. } => assert_eq!(v.get::<u8>(), Some(&2)),
            other => panic!("{other:?}"),
        }
        assert_ne!(v1, v2);
    }

    #[test]
    fn sni_refuses_a_hello_that_cannot_fit_the_peek() {
        let s = Sni::new(|_r: &ConnectRequest<'_>, _n: Option<&str>| Verdict::accept());
        // A record header declaring a 16 KiB record holding a 16 KiB hello.
        let mut big = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0x3f, 0xfc];
        big.resize(100, 0);
        assert_eq!(s.decide(&req("127.0.0.1:9", &big)), Verdict::reset());
    }

    #[test]
    fn proxy_protocol_defers_then_passes_original_address() {
        let seen = std::sync::Arc::new(Mutex::new(None));
        let s = seen.clone();
        let p = ProxyProtocol::new(move |p: &Proxied<'_>| {
            *s.lock().unwrap() = Some((p.request.peer, p.proxy, p.header_len()));
            assert_eq!(p.request.first_bytes, b"GET");
            Verdict::accept()
        });
        let src: SocketAddr = "192.0.2.7:4242".parse().unwrap();
        let mut bytes = proxy_protocol::encode_v2(src, "198.51.100.1:443".parse().unwrap());
        let hlen = bytes.len();
        bytes.extend_from_slice(b"GET");
        assert_eq!(
            p.decide(&req("127.0.0.1:9", &bytes[..10])),
            Verdict::NeedBytes(11),
            "signature not known yet: one more byte"
        );
        assert_eq!(
            p.decide(&req("127.0.0.1:9", &bytes[..12])),
            Verdict::NeedBytes(16)
        );
        assert_eq!(
            p.decide(&req("127.0.0.1:9", &bytes[..20])),
            Verdict::NeedBytes(hlen)
        );
        assert!(seen.lock().unwrap().is_none());
        assert_eq!(p.decide(&req("127.0.0.1:9", &bytes)), Verdict::accept());
        let got = seen.lock().unwrap().unwrap();
        assert_eq!(got, (src, "127.0.0.1:9".parse().unwrap(), hlen));
        // v1 works too.
        let v1 = proxy_protocol::encode_v1(src, "198.51.100.1:443".parse().unwrap());
        let mut v1b = v1.clone();
        v1b.extend_from_slice(b"GET");
        assert_eq!(p.decide(&req("127.0.0.1:9", &v1b)), Verdict::accept());
        assert_eq!(seen.lock().unwrap().unwrap().2, v1.len());
    }

    #[test]
    fn proxy_protocol_refuses_or_passes_without_header() {
        let p = ProxyProtocol::new(|_p: &Proxied<'_>| Verdict::accept());
        assert_eq!(
            p.decide(&req("127.0.0.1:9", b"GET / HTTP/1.1")),
            Verdict::close()
        );
        assert_eq!(
            p.decide(&req("127.0.0.1:9", b"PROXY TCP4 garbage\r\n")),
            Verdict::close()
        );
        let mut fin = req("127.0.0.1:9", b"PROXY TCP4 1.2");
        fin.peer_finished = true;
        assert_eq!(p.decide(&fin), Verdict::close());
        let opt = ProxyProtocol::new(|p: &Proxied<'_>| {
            assert!(p.header.is_none());
            assert_eq!(p.request.peer, p.proxy);
            Verdict::accept()
        })
        .optional(true)
        .refuse(Refusal::new(RejectHow::Reset));
        assert_eq!(opt.decide(&req("127.0.0.1:9", b"GET /")), Verdict::accept());
        assert_eq!(
            opt.decide(&req("127.0.0.1:9", b"PROXY TCP4 garbage\r\n")),
            Verdict::reset()
        );
        let wrapped = ProxyProtocol::wrap(CidrFilter::new().deny("192.0.2.0/24".parse().unwrap()));
        let h = proxy_protocol::encode_v1(
            "192.0.2.7:1".parse().unwrap(),
            "198.51.100.1:443".parse().unwrap(),
        );
        assert_eq!(wrapped.decide(&req("127.0.0.1:9", &h)), Verdict::close());
    }

    #[test]
    fn sni_routes_by_host_name() {
        let s = Sni::new(|_r: &ConnectRequest<'_>, name: Option<&str>| match name {
            Some("a.test") => Verdict::accept(),
            Some(_) => Verdict::close(),
            None => Verdict::Defer,
        });
        let hello = sni::client_hello("a.test");
        assert_eq!(s.decide(&req("127.0.0.1:9", &hello)), Verdict::accept());
        assert_eq!(
            s.decide(&req("127.0.0.1:9", &hello[..20])),
            Verdict::NeedBytes(hello.len())
        );
        assert_eq!(s.decide(&req("127.0.0.1:9", b"")), Verdict::NeedBytes(5));
        let other = sni::client_hello("b.test");
        assert_eq!(s.decide(&req("127.0.0.1:9", &other)), Verdict::close());
        assert_eq!(s.decide(&req("127.0.0.1:9", b"GET /")), Verdict::reset());
        let pass = Sni::new(|_r: &ConnectRequest<'_>, n: Option<&str>| {
            assert!(n.is_none());
            Verdict::accept()
        })
        .pass_non_tls(true);
        assert_eq!(
            pass.decide(&req("127.0.0.1:9", b"GET /")),
            Verdict::accept()
        );
    }

    #[test]
    fn chain_stops_at_first_non_accept_and_merges_accepts() {
        let q1 = Qos {
            mark: Some(1),
            ..Default::default()
        };
        let q2 = Qos {
            mark: Some(2),
            ..Default::default()
        };
        let a = move |_: &ConnectRequest<'_>| Verdict::accept().with_qos(q1).with_reply("a");
        let b = move |_: &ConnectRequest<'_>| Verdict::accept().with_qos(q2).with_reply("b");
        let none = |_: &ConnectRequest<'_>| Verdict::accept();
        let c = Chain::new(a).then(b).then(none);
        assert_eq!(
            c.decide(&req("127.0.0.1:1", b"")),
            Verdict::Accept {
                qos: Some(q2),
                reply: Some(b"ab".to_vec()),
                value: None,
            }
        );
        let asked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = asked.clone();
        let d = Chain::new(a)
            .then(|_: &ConnectRequest<'_>| Verdict::Defer)
            .then(move |_: &ConnectRequest<'_>| {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                Verdict::accept()
            });
        assert_eq!(d.decide(&req("127.0.0.1:1", b"")), Verdict::Defer);
        assert!(!asked.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(
            all_of(Vec::new()).decide(&req("127.0.0.1:1", b"")),
            Verdict::accept()
        );
    }
}
