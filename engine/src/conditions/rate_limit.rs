//! Per-source-address token buckets with bounded memory.
//!
//! Each source address owns a bucket of at most `burst` tokens that refills
//! continuously at `rate_per_sec` tokens per second; a connection is allowed
//! when its source's bucket holds a token, which it then consumes. A new
//! source starts with a full bucket.
//!
//! Time is passed in by the caller ([`RateLimiter::check`] takes an
//! [`Instant`]), so the limiter holds no clock and tests are deterministic.
//!
//! # Memory bound and eviction
//!
//! At most `max_sources` buckets are kept. When a new source arrives and the
//! table is full, the bucket of the *least recently checked* source is
//! evicted, in O(1) (a hash map plus an intrusive recency list in a slab).
//! That source has been idle longest; any bucket idle for `burst /
//! rate_per_sec` seconds has refilled completely and so is equivalent to a
//! fresh one, so eviction forgets nothing unless all `max_sources` sources
//! were active within that window. Then the evicted source starts again
//! with a full bucket: size `max_sources` above the number of sources
//! expected to be active at once.
//!
//! # Sharing
//!
//! `check` takes `&mut self`: the engine calls it from one shard thread, and
//! each shard owns its own limiter (with SO_REUSEPORT a given client usually
//! lands on the same shard, and each shard then grants up to the full
//! rate). To share one limit across threads, wrap a limiter in a
//! `std::sync::Mutex`, one per shard or one overall.
//!
//! IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) share the bucket of their
//! IPv4 address. Every other IPv6 address has its own bucket; a caller that
//! wants one bucket per IPv6 /64 should mask the address before calling.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::time::Instant;

/// Slack, in tokens, under which a bucket still counts as holding a token,
/// so that floating-point rounding of many small refills never denies a
/// request the configured rate has already paid for.
const TOKEN_EPSILON: f64 = 1e-9;

/// "No entry" link in the recency list.
const NIL: usize = usize::MAX;

/// Why [`RateLimiter::new`] rejected its parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RateLimitError {
    /// `rate_per_sec` is NaN, infinite, zero or negative.
    InvalidRate {
        /// The rejected value.
        rate_per_sec: f64,
    },
    /// `burst` is zero.
    InvalidBurst {
        /// The rejected value.
        burst: u32,
    },
    /// `max_sources` is zero.
    InvalidMaxSources {
        /// The rejected value.
        max_sources: usize,
    },
}

impl fmt::Display for RateLimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RateLimitError::InvalidRate { rate_per_sec } => write!(
                f,
                "rate_per_sec must be finite and greater than 0, got {rate_per_sec}"
            ),
            RateLimitError::InvalidBurst { burst } => {
                write!(f, "burst must be at least 1, got {burst}")
            }
            RateLimitError::InvalidMaxSources { max_sources } => {
                write!(f, "max_sources must be at least 1, got {max_sources}")
            }
        }
    }
}

impl std::error::Error for RateLimitError {}

/// One source's bucket, also a node of the recency list.
#[derive(Debug)]
struct Entry {
    /// The (normalised) source address this bucket belongs to.
    ip: IpAddr,
    /// Tokens held, in `0.0..=burst`, as of `last`.
    tokens: f64,
    /// Latest `now` seen for this source; never moves backwards.
    last: Instant,
    /// Slab index of the next more recently checked entry, or `NIL`.
    prev: usize,
    /// Slab index of the next less recently checked entry, or `NIL`.
    next: usize,
}

/// Per-source-address token-bucket rate limiter with at most `max_sources`
/// buckets. See the [module documentation](self) for the eviction policy
/// and how to share it between threads.
pub struct RateLimiter {
    /// Refill rate in tokens per second; finite and > 0.
    rate_per_sec: f64,
    /// Bucket capacity in tokens; >= 1.
    burst: u32,
    /// Largest number of buckets kept; >= 1.
    max_sources: usize,
    /// Source address to slab index; same size as `entries`.
    index: HashMap<IpAddr, usize>,
    /// Slab of buckets; never longer than `max_sources`, every slot in use.
    entries: Vec<Entry>,
    /// Most recently checked entry, or `NIL` when empty.
    head: usize,
    /// Least recently checked entry (the next to evict), or `NIL` when empty.
    tail: usize,
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("rate_per_sec", &self.rate_per_sec)
            .field("burst", &self.burst)
            .field("max_sources", &self.max_sources)
            .field("sources", &self.entries.len())
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// Creates a limiter allowing each source `burst` connections at once,
    /// refilled at `rate_per_sec` per second, tracking at most `max_sources`
    /// sources. Memory grows with the sources seen, up to `max_sources`.
    ///
    /// # Errors
    ///
    /// [`RateLimitError::InvalidRate`] unless `rate_per_sec` is finite and
    /// greater than 0, [`RateLimitError::InvalidBurst`] if `burst` is 0,
    /// [`RateLimitError::InvalidMaxSources`] if `max_sources` is 0.
    pub fn new(rate_per_sec: f64, burst: u32, max_sources: usize) -> Result<Self, RateLimitError> {
        if !(rate_per_sec.is_finite() && rate_per_sec > 0.0) {
            return Err(RateLimitError::InvalidRate { rate_per_sec });
        }
        if burst == 0 {
            return Err(RateLimitError::InvalidBurst { burst });
        }
        if max_sources == 0 {
            return Err(RateLimitError::InvalidMaxSources { max_sources });
        }
        Ok(RateLimiter {
            rate_per_sec,
            burst,
            max_sources,
            index: HashMap::new(),
            entries: Vec::new(),
            head: NIL,
            tail: NIL,
        })
    }

    /// Decides whether a connection from `ip` at time `now` is allowed, and
    /// if so consumes one token from `ip`'s bucket.
    ///
    /// The bucket first refills by `rate_per_sec` tokens per second elapsed
    /// since this source was last checked, up to `burst`. If `now` is
    /// earlier than that last check (instants from different clocks or
    /// threads), no time is taken to have elapsed. A bucket holding at least
    /// `1 - 1e-9` tokens allows the connection.
    ///
    /// # Examples
    ///
    /// ```
    /// use floodgate::rate_limit::RateLimiter;
    /// use std::time::{Duration, Instant};
    ///
    /// // 2 connections per second per source, bursts of 3, 10_000 sources.
    /// let mut limiter = RateLimiter::new(2.0, 3, 10_000)?;
    /// let client = "192.0.2.7".parse()?;
    /// let t0 = Instant::now();
    /// assert!(limiter.check(client, t0));
    /// assert!(limiter.check(client, t0));
    /// assert!(limiter.check(client, t0));
    /// assert!(!limiter.check(client, t0)); // burst spent
    /// assert!(limiter.check(client, t0 + Duration::from_millis(500))); // one token back
    /// assert!(limiter.check("198.51.100.1".parse()?, t0)); // other sources unaffected
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn check(&mut self, ip: IpAddr, now: Instant) -> bool {
        let ip = normalise(ip);
        if let Some(&i) = self.index.get(&ip) {
            let (rate, burst) = (self.rate_per_sec, f64::from(self.burst));
            let entry = &mut self.entries[i];
            let elapsed = now.saturating_duration_since(entry.last);
            // Nanoseconds as f64 are exact below 2^53 ns (104 days); past
            // that the bucket is full anyway. The product cannot be NaN.
            let refill = elapsed.as_nanos() as f64 * rate / 1e9;
            entry.tokens = (entry.tokens + refill).min(burst);
            entry.last = entry.last.max(now);
            let allowed = entry.tokens >= 1.0 - TOKEN_EPSILON;
            if allowed {
                entry.tokens = (entry.tokens - 1.0).max(0.0);
            }
            self.unlink(i);
            self.link_front(i);
            return allowed;
        }

        let entry = Entry {
            ip,
            tokens: f64::from(self.burst) - 1.0,
            last: now,
            prev: NIL,
            next: NIL,
        };
        let i = if self.entries.len() < self.max_sources {
            self.entries.push(entry);
            self.entries.len() - 1
        } else {
            // Full (max_sources >= 1, so the list is non-empty): reuse the
            // least recently checked slot.
            let victim = self.tail;
            self.unlink(victim);
            self.index.remove(&self.entries[victim].ip);
            self.entries[victim] = entry;
            victim
        };
        self.link_front(i);
        self.index.insert(ip, i);
        true
    }

    /// Number of sources currently tracked; never more than
    /// [`max_sources`](Self::max_sources).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no source is tracked yet.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The largest number of sources tracked at once.
    pub fn max_sources(&self) -> usize {
        self.max_sources
    }

    /// Removes entry `i` from the recency list (it stays in the slab).
    fn unlink(&mut self, i: usize) {
        let (prev, next) = (self.entries[i].prev, self.entries[i].next);
        match prev {
            NIL => self.head = next,
            p => self.entries[p].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.entries[n].prev = prev,
        }
        self.entries[i].prev = NIL;
        self.entries[i].next = NIL;
    }

    /// Inserts unlinked entry `i` as the most recently checked.
    fn link_front(&mut self, i: usize) {
        self.entries[i].prev = NIL;
        self.entries[i].next = self.head;
        match self.head {
            NIL => self.tail = i,
            h => self.entries[h].prev = i,
        }
        self.head = i;
    }
}

/// An IPv4-mapped IPv6 address as its IPv4 address; others unchanged.
fn normalise(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0xc000_0200 + n))
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Checks the recency list against the slab and the index.
    fn assert_consistent(l: &RateLimiter) {
        assert!(l.entries.len() <= l.max_sources);
        assert_eq!(l.index.len(), l.entries.len());
        let mut seen = 0;
        let mut prev = NIL;
        let mut cur = l.head;
        while cur != NIL {
            assert_eq!(l.entries[cur].prev, prev);
            assert_eq!(l.index.get(&l.entries[cur].ip), Some(&cur));
            prev = cur;
            cur = l.entries[cur].next;
            seen += 1;
        }
        assert_eq!(l.tail, prev);
        assert_eq!(seen, l.entries.len());
    }

    #[test]
    fn new_rejects_bad_parameters_naming_them() {
        let err = |r, b, m| RateLimiter::new(r, b, m).expect_err("invalid");
        assert_eq!(
            err(0.0, 1, 1),
            RateLimitError::InvalidRate { rate_per_sec: 0.0 }
        );
        assert_eq!(
            err(-1.0, 1, 1),
            RateLimitError::InvalidRate { rate_per_sec: -1.0 }
        );
        assert!(matches!(
            err(f64::NAN, 1, 1),
            RateLimitError::InvalidRate { .. }
        ));
        assert!(matches!(
            err(f64::INFINITY, 1, 1),
            RateLimitError::InvalidRate { .. }
        ));
        assert_eq!(err(1.0, 0, 1), RateLimitError::InvalidBurst { burst: 0 });
        assert_eq!(
            err(1.0, 1, 0),
            RateLimitError::InvalidMaxSources { max_sources: 0 }
        );
        assert_eq!(
            err(f64::NAN, 1, 1).to_string(),
            "rate_per_sec must be finite and greater than 0, got NaN"
        );
        assert_eq!(
            err(1.0, 0, 1).to_string(),
            "burst must be at least 1, got 0"
        );
        assert_eq!(
            err(1.0, 1, 0).to_string(),
            "max_sources must be at least 1, got 0"
        );
        assert!(RateLimiter::new(f64::MIN_POSITIVE, 1, usize::MAX).is_ok());
    }

    #[test]
    fn burst_is_allowed_then_denied() {
        let mut l = RateLimiter::new(1.0, 5, 10).expect("valid");
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(l.check(ip(1), t0));
        }
        assert!(!l.check(ip(1), t0));
        assert!(!l.check(ip(1), t0 + ms(999)));
    }

    #[test]
    fn refill_follows_the_exact_rate() {
        let mut l = RateLimiter::new(4.0, 2, 10).expect("valid");
        let t0 = Instant::now();
        assert!(l.check(ip(1), t0));
        assert!(l.check(ip(1), t0));
        assert!(!l.check(ip(1), t0 + ms(249)));
        assert!(l.check(ip(1), t0 + ms(250)));
        assert!(!l.check(ip(1), t0 + ms(250)));
        assert!(!l.check(ip(1), t0 + ms(499)));
        assert!(l.check(ip(1), t0 + ms(500)));
        // Idle for a long time: refilled to burst, not beyond.
        let later = t0 + Duration::from_secs(3600);
        assert!(l.check(ip(1), later));
        assert!(l.check(ip(1), later));
        assert!(!l.check(ip(1), later));
    }

    #[test]
    fn many_small_refills_add_up_exactly() {
        // 100/s polled every millisecond for 10 s: one grant per 10 ms.
        let mut l = RateLimiter::new(100.0, 1, 10).expect("valid");
        let t0 = Instant::now();
        assert!(l.check(ip(1), t0));
        let allowed = (1..=10_000u64)
            .filter(|&n| l.check(ip(1), t0 + ms(n)))
            .count();
        assert_eq!(allowed, 1000);
        // Fractional rate: 3/s, exact to the nanosecond.
        let mut l = RateLimiter::new(3.0, 1, 10).expect("valid");
        assert!(l.check(ip(2), t0));
        assert!(!l.check(ip(2), t0 + Duration::from_nanos(333_333_332)));
        assert!(l.check(ip(2), t0 + Duration::from_nanos(333_333_334)));
    }

    #[test]
    fn sources_are_independent() {
        let mut l = RateLimiter::new(1.0, 2, 10).expect("valid");
        let t0 = Instant::now();
        assert!(l.check(ip(1), t0) && l.check(ip(1), t0));
        assert!(!l.check(ip(1), t0));
        assert!(l.check(ip(2), t0) && l.check(ip(2), t0));
        assert!(!l.check(ip(2), t0));
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn ipv4_mapped_addresses_share_the_ipv4_bucket() {
        let mut l = RateLimiter::new(1.0, 1, 10).expect("valid");
        let t0 = Instant::now();
        assert!(l.check("192.0.2.1".parse().expect("ip"), t0));
        assert!(!l.check("::ffff:192.0.2.1".parse().expect("ip"), t0));
        assert!(l.check("2001:db8::1".parse().expect("ip"), t0));
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn memory_is_bounded_by_max_sources() {
        let mut l = RateLimiter::new(1.0, 1, 3).expect("valid");
        let t0 = Instant::now();
        for n in 0..1000 {
            assert!(l.check(ip(n), t0), "new sources start full");
            assert!(l.len() <= 3);
        }
        assert_eq!(l.len(), 3);
        assert_consistent(&l);
    }

    #[test]
    fn least_recently_checked_source_is_evicted() {
        let mut l = RateLimiter::new(0.001, 1, 3).expect("valid");
        let t0 = Instant::now();
        for n in 1..=3 {
            assert!(l.check(ip(n), t0)); // A=1, B=2, C=3 drained
        }
        assert!(!l.check(ip(1), t0 + ms(1))); // touch A: B is now oldest
        assert!(l.check(ip(4), t0 + ms(2))); // D evicts B
        assert_consistent(&l);
        assert!(!l.check(ip(1), t0 + ms(3))); // A still tracked, still drained
        assert!(!l.check(ip(3), t0 + ms(4))); // C still tracked
        assert!(!l.check(ip(4), t0 + ms(5))); // D tracked
        assert!(l.check(ip(2), t0 + ms(6))); // B was forgotten: fresh bucket
        assert_consistent(&l);
    }

    #[test]
    fn time_going_backwards_counts_as_no_elapsed_time() {
        let mut l = RateLimiter::new(1.0, 1, 10).expect("valid");
        let t0 = Instant::now();
        let t10 = t0 + Duration::from_secs(10);
        assert!(l.check(ip(1), t10));
        assert!(!l.check(ip(1), t0));
        // Refill is measured from the latest instant seen (t10), not t0.
        assert!(!l.check(ip(1), t10 + ms(999)));
        assert!(l.check(ip(1), t10 + ms(1000)));
    }

    proptest! {
        #[test]
        fn random_traffic_keeps_the_bounds(
            rate in 0.001f64..1000.0,
            burst in 1u32..10,
            max_sources in 1usize..6,
            ops in proptest::collection::vec((0u32..10, -2000i64..2000), 0..300),
        ) {
            let mut l = RateLimiter::new(rate, burst, max_sources).expect("valid");
            let t0 = Instant::now() + Duration::from_secs(3600);
            let mut t = t0;
            for (src, delta_ms) in ops {
                t = if delta_ms >= 0 {
                    t + ms(delta_ms.unsigned_abs())
                } else {
                    t.checked_sub(ms(delta_ms.unsigned_abs())).unwrap_or(t)
                };
                l.check(ip(src), t);
                prop_assert!(l.len() <= max_sources);
            }
            assert_consistent(&l);
        }

        #[test]
        fn one_source_never_exceeds_burst_plus_rate(
            rate in 0.01f64..100.0,
            burst in 1u32..20,
            gaps in proptest::collection::vec(0u64..500, 1..400),
        ) {
            let mut l = RateLimiter::new(rate, burst, 4).expect("valid");
            let t0 = Instant::now();
            let mut t = t0;
            let mut allowed = 0u64;
            for gap in gaps {
                t += ms(gap);
                if l.check(ip(0), t) {
                    allowed += 1;
                }
            }
            let span = (t - t0).as_secs_f64();
            let bound = f64::from(burst) + rate * span + 1e-6;
            prop_assert!(allowed as f64 <= bound, "allowed {} > bound {}", allowed, bound);
        }
    }
}
