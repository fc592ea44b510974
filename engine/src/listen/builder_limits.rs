//! The builder's limit settings: [`max_connections`], [`accept_budget`]
//! and [`accept_rate`] (what they do to a shard is in `limits.rs`).
//!
//! [`max_connections`]: ListenerBuilder::max_connections
//! [`accept_budget`]: ListenerBuilder::accept_budget
//! [`accept_rate`]: ListenerBuilder::accept_rate

use crate::listen::config::ListenerBuilder;

impl ListenerBuilder {
    /// The most connections of this listener open at once, over all its
    /// shards (HAProxy's `maxconn`). A connection counts from its accept
    /// until it is closed, wherever it is: in admission, in a ring, held
    /// by the application as an [`Admitted`](crate::Admitted) (dropping it closes it), in a
    /// relay, a registration, or a reply being sent and closed. At the
    /// maximum every shard stops accepting, so the excess waits in the
    /// kernel's accept queue (not rejected: it is accepted when a close
    /// brings the count below, which wakes the shards). The socket taken
    /// out of an `Admitted` stops counting unless it is taken with
    /// [`Admitted::into_std_with_slot`](crate::Admitted::into_std_with_slot). Counted in
    /// [`ListenerStats::open`](crate::ListenerStats::open) and
    /// [`ShardStats::limit_pauses`](crate::ShardStats::limit_pauses).
    /// Must be at least 1. Default: no maximum.
    ///
    /// Any limit (this one, [`ListenerBuilder::accept_budget`],
    /// [`ListenerBuilder::accept_rate`]) makes the shards take connections
    /// with `accept4` after a readiness POLL instead of a multishot
    /// ACCEPT, so that each is decided before the kernel hands it over
    /// (PERF.md measures the cost); without limits the accept path is
    /// unchanged.
    ///
    /// ```
    /// use std::net::TcpStream;
    /// use floodgate::{Error, Listener};
    ///
    /// let listener = Listener::builder("127.0.0.1:0".parse()?)
    ///     .shards(1)
    ///     .max_connections(1)
    ///     .build()?;
    /// let _a = TcpStream::connect(listener.local_addr())?;
    /// let _b = TcpStream::connect(listener.local_addr())?; // waits in the kernel
    /// let first = listener.accept()?;
    /// assert_eq!(listener.stats().open.map(|o| o.open), Some(1));
    /// drop(first); // closed: the second is accepted now
    /// let _second = listener.accept()?;
    /// # drop(listener);
    /// let refused = Listener::builder("127.0.0.1:0".parse()?).max_connections(0).build();
    /// assert!(matches!(refused, Err(Error::Config(e)) if e.field == "max_connections"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn max_connections(mut self, n: usize) -> Self {
        self.limits.max_connections = Some(n);
        self
    }

    /// The most connections a shard takes from the kernel in one turn of
    /// its loop (HAProxy's `tune.maxaccept`, Envoy's
    /// `max_connections_to_accept_per_socket_event`): after that many the
    /// turn runs its other work (completions of replies, relays,
    /// registrations) and the next turn goes on, so a burst of accepts
    /// cannot starve the connections already open. The rest waits in the
    /// kernel's queue meanwhile. Counted in
    /// [`ShardStats::budget_stops`](crate::ShardStats::budget_stops);
    /// [`ShardStats::max_accepted_per_turn`](crate::ShardStats::max_accepted_per_turn)
    /// shows what turns took. Must be in `1..=`[`MAX_ACCEPT_BUDGET`](crate::MAX_ACCEPT_BUDGET).
    /// Default: no budget (a multishot ACCEPT takes the whole queue; with
    /// another limit set, [`DEFAULT_ACCEPT_BUDGET`](crate::DEFAULT_ACCEPT_BUDGET)).
    ///
    /// ```
    /// use floodgate::Listener;
    ///
    /// let listener = Listener::builder("127.0.0.1:0".parse()?)
    ///     .shards(1)
    ///     .accept_budget(4)
    ///     .build()?;
    /// let _clients: Vec<_> = (0..10)
    ///     .map(|_| std::net::TcpStream::connect(listener.local_addr()))
    ///     .collect::<Result<_, _>>()?;
    /// for _ in 0..10 {
    ///     listener.accept()?;
    /// }
    /// assert!(listener.stats().total().max_accepted_per_turn <= 4);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn accept_budget(mut self, n: usize) -> Self {
        self.limits.accept_budget = Some(n);
        self
    }

    /// An accept rate for the whole listener: a token bucket of `burst`
    /// tokens refilled at `per_second`, one token per connection taken
    /// from the kernel. When the bucket is empty the shards stop accepting
    /// until the next token is due (a timer on each waiting shard's ring),
    /// leaving connections in the kernel's accept queue rather than
    /// rejecting them (to reject above a rate instead, use the
    /// [`RateLimit`](crate::conditions::RateLimit) condition). Counted in
    /// [`ShardStats::rate_pauses`](crate::ShardStats::rate_pauses). Both
    /// must be at least 1. Default: no rate.
    ///
    /// ```
    /// use floodgate::{Error, Listener};
    ///
    /// let listener = Listener::builder("127.0.0.1:0".parse()?)
    ///     .shards(1)
    ///     .accept_rate(10_000, 100)
    ///     .build()?;
    /// # drop(listener);
    /// let refused = Listener::builder("127.0.0.1:0".parse()?).accept_rate(0, 1).build();
    /// assert!(matches!(refused, Err(Error::Config(e)) if e.field == "accept_rate.per_second"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn accept_rate(mut self, per_second: u64, burst: u64) -> Self {
        self.limits.rate = Some((per_second, burst));
        self
    }
}
