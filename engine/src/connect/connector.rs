//! The application's handle: [`ConnectorBuilder`] validates and starts
//! the shards; [`Connector`] queues connects and runs for them and takes
//! their results (blocking, try/poll, the completion event).

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_queue::SegQueue;

use crate::admit::attrs::SocketAttrs;
use crate::driver::{sys, RingSetup};
use crate::error::{ConfigError, Error};
use crate::listen::accept::Delivery;
use crate::shard::{self, Placement, ShardControl};

use super::dial::{Completion, ConnectHandler, Connected, Dial, Ticket};
use super::dialer::{refuse, Common, Dialer, ShardShared};
use super::job::{ConnectJob, Job, Reply, RunJob};
use super::load::{Load, RunSummary, SequencePlan, SequenceRecord};
use super::socket::check_attrs;
use super::stats::{add, ConnectorStats, Counters};
use super::DEFAULT_CONNECT_TIMEOUT;

/// Configures and starts a [`Connector`]. See [`Connector::builder`].
///
/// ```
/// use std::time::Duration;
/// use floodgate::Connector;
///
/// let connector = Connector::builder()
///     .shards(1)
///     .pin(false)
///     .sources(["127.0.0.2".parse()?, "127.0.0.3".parse()?])
///     .timeout(Some(Duration::from_secs(1)))
///     .build()?;
/// assert_eq!(connector.shards(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct ConnectorBuilder {
    shards: Option<usize>,
    pin: bool,
    backend: crate::driver::Backend,
    cores: Option<Vec<usize>>,
    sources: Vec<IpAddr>,
    timeout: Option<Duration>,
    handler: Option<Arc<ConnectHandler>>,
    attrs: SocketAttrs,
    moderation: crate::Moderation,
}

impl std::fmt::Debug for ConnectorBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectorBuilder")
            .field("shards", &self.shards)
            .field("pin", &self.pin)
            .field("backend", &self.backend)
            .field("cores", &self.cores)
            .field("sources", &self.sources)
            .field("timeout", &self.timeout)
            .field("handler", &self.handler.is_some())
            .field("attrs", &self.attrs)
            .field("moderation", &self.moderation)
            .finish()
    }
}

impl ConnectorBuilder {
    pub(super) fn new() -> Self {
        ConnectorBuilder {
            shards: None,
            pin: true,
            backend: crate::driver::Backend::Auto,
            cores: None,
            sources: Vec::new(),
            timeout: Some(DEFAULT_CONNECT_TIMEOUT),
            handler: None,
            attrs: SocketAttrs::default(),
            moderation: crate::Moderation::default(),
        }
    }

    /// How the shards moderate their wake-ups (default adaptive, as
    /// [`crate::ListenerBuilder::moderation`]; [`crate::Moderation::Fixed`]
    /// counts accepted connections, so on a connector it is off).
    pub fn moderation(mut self, m: crate::Moderation) -> Self {
        self.moderation = m;
        self
    }

    /// Socket attributes for every outgoing socket (the type the listener
    /// uses, [`crate::ListenerBuilder::attrs`]): options are set when the
    /// socket is created, before its connect; the file flags
    /// (`nonblocking`, `close_on_exec`) when a connected socket is handed
    /// over. A [`Dial`] may bring its own. Load sequences with attributes
    /// use plain descriptors (kept across sequences with RST close, so
    /// the attributes are set once per socket). Checked at
    /// [`ConnectorBuilder::build`] on a scratch socket.
    pub fn attrs(mut self, attrs: SocketAttrs) -> Self {
        self.attrs = attrs;
        self
    }

    /// Number of shards. Default: one per core this process may run on.
    pub fn shards(mut self, n: usize) -> Self {
        self.shards = Some(n);
        self
    }

    /// Which backend runs the shards (default [`Backend::Auto`](crate::Backend::Auto):
    /// io_uring, or epoll where io_uring is denied).
    pub fn backend(mut self, b: crate::driver::Backend) -> Self {
        self.backend = b;
        self
    }

    /// Pin shard `k` to core `k` (default on), or to the `cores` list.
    pub fn pin(mut self, on: bool) -> Self {
        self.pin = on;
        self
    }

    /// Pin shard `k` to `cores[k % cores.len()]` (implies pinning).
    pub fn cores(mut self, cores: Vec<usize>) -> Self {
        self.cores = Some(cores);
        self.pin = true;
        self
    }

    /// Bind every connect to `ip` (any port): an explicit source address.
    pub fn source(mut self, ip: IpAddr) -> Self {
        self.sources = vec![ip];
        self
    }

    /// Use these source addresses round-robin. Empty: implicit bind.
    pub fn sources(mut self, ips: impl IntoIterator<Item = IpAddr>) -> Self {
        self.sources = ips.into_iter().collect();
        self
    }

    /// The default connect timeout (default [`DEFAULT_CONNECT_TIMEOUT`]);
    /// `None`: the kernel's SYN retries decide.
    pub fn timeout(mut self, t: Option<Duration>) -> Self {
        self.timeout = t;
        self
    }

    /// Delivers every submitted connect's [`Completion`] to `handler`,
    /// inline on the shard thread; `try_complete` is then not available.
    /// It must not block (a blocking [`Connector::connect`] from it would
    /// wait for its own shard). A panic is caught and counted.
    pub fn handler<F>(mut self, handler: F) -> Self
    where
        F: Fn(Completion) + Send + Sync + 'static,
    {
        self.handler = Some(Arc::new(handler));
        self
    }

    /// Validates and starts the shards, each with its own io_uring.
    ///
    /// # Errors
    /// [`Error::Config`] naming the field for a bad value;
    /// [`Error::UringUnavailable`] or [`Error::Setup`] if a shard cannot
    /// start (the ring, or a kernel without io_uring CONNECT). Nothing is
    /// left running on error.
    pub fn build(self) -> Result<Connector, Error> {
        let available = core_affinity::get_core_ids().unwrap_or_default();
        let n = self.shards.unwrap_or(available.len().max(1));
        if n == 0 || n > 1024 {
            return Err(ConfigError::new("shards", n, "must be in 1..=1024").into());
        }
        if self.timeout == Some(Duration::ZERO) {
            return Err(ConfigError::new("timeout", "0s", "must be positive").into());
        }
        for ip in &self.sources {
            if ip.is_unspecified() || ip.is_multicast() {
                return Err(
                    ConfigError::new("sources", ip, "a source must be a unicast address").into(),
                );
            }
        }
        check_attrs(&self.attrs)?;
        let placement = |k: usize| -> Result<Option<core_affinity::CoreId>, ConfigError> {
            if !self.pin {
                return Ok(None);
            }
            match &self.cores {
                Some(list) if !list.is_empty() => {
                    let want = list[k % list.len()];
                    available
                        .iter()
                        .find(|c| c.id == want)
                        .copied()
                        .map(Some)
                        .ok_or_else(|| {
                            ConfigError::new(
                                "cores",
                                want,
                                "no such core available to this process",
                            )
                        })
                }
                Some(_) => Err(ConfigError::new("cores", "[]", "the list is empty")),
                None => Ok(available.get(k).copied()),
            }
        };
        let placements = (0..n)
            .map(placement)
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let common = Arc::new(Common {
            completions: SegQueue::new(),
            delivery: Delivery::new()?,
            handler: self.handler.clone(),
            sources: self.sources.clone(),
            next_source: AtomicUsize::new(0),
            timeout: self.timeout,
            attrs: Arc::new(self.attrs.clone()),
        });
        let mut connector = Connector {
            shards: Vec::with_capacity(n),
            common: common.clone(),
            threads: Mutex::new(Vec::with_capacity(n)),
            next_shard: AtomicUsize::new(0),
            next_ticket: AtomicU64::new(1),
            run_lock: Mutex::new(()),
            setup: RingSetup::default(),
            backend: None,
        };
        for (k, core) in placements.into_iter().enumerate() {
            let control = Arc::new(ShardControl::new()?);
            let shared = Arc::new(ShardShared {
                queue: SegQueue::new(),
                counters: Counters::default(),
                control: control.clone(),
            });
            let dialer = Dialer::new(k, shared.clone(), common.clone());
            let placement = Placement {
                index: k,
                core,
                backend: self.backend,
                moderation: self.moderation,
            };
            match shard::spawn("floodgate-connect", placement, control, dialer) {
                Ok((handle, started)) => {
                    connector.shards.push(shared);
                    if let Ok(mut t) = connector.threads.lock() {
                        t.push(handle);
                    }
                    if k == 0 {
                        connector.setup = started.setup;
                        connector.backend = Some(started.backend);
                    }
                }
                Err(e) => {
                    connector.shutdown();
                    return Err(e);
                }
            }
        }
        crate::events::report_fallback(self.backend, connector.backend.as_ref(), "connector");
        Ok(connector)
    }
}

/// A running connector: one shard per core posting io_uring CONNECTs.
///
/// Built with [`Connector::builder`]. Any number of threads may call its
/// methods. Dropping it shuts it down.
///
/// ```
/// use std::net::TcpListener;
/// use floodgate::{ConnectErrorKind, Connector, Error};
///
/// let server = TcpListener::bind("127.0.0.1:0")?;
/// let connector = Connector::builder().shards(1).pin(false).build()?;
///
/// // Blocking.
/// let conn = connector.connect(server.local_addr()?)?;
/// let (accepted, _) = server.accept()?;
/// assert_eq!(accepted.peer_addr()?, conn.local_addr()?);
///
/// // Submitted, then polled.
/// let ticket = connector.submit(server.local_addr()?)?;
/// let done = loop {
///     if let Some(c) = connector.complete_timeout(std::time::Duration::from_secs(5))? {
///         break c;
///     }
/// };
/// assert_eq!(done.ticket, ticket);
/// assert!(done.result.is_ok());
///
/// // A closed port: a typed error naming the cause and the address.
/// let closed = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
/// match connector.connect(closed) {
///     Err(Error::Connect { kind: ConnectErrorKind::Refused, addr, .. }) => assert_eq!(addr, closed),
///     other => panic!("expected refused, got {other:?}"),
/// }
/// connector.shutdown();
/// assert!(connector.stats().conserved());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Connector {
    shards: Vec<Arc<ShardShared>>,
    common: Arc<Common>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    next_shard: AtomicUsize,
    next_ticket: AtomicU64,
    run_lock: Mutex<()>,
    setup: RingSetup,
    backend: Option<crate::driver::BackendChoice>,
}

impl Connector {
    /// Starts configuring a connector.
    pub fn builder() -> ConnectorBuilder {
        ConnectorBuilder::new()
    }

    /// The number of shards.
    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// How the shards' rings were set up.
    pub fn ring_setup(&self) -> RingSetup {
        self.setup
    }

    /// The backend the shards run on, and why it was chosen.
    pub fn backend(&self) -> crate::driver::BackendChoice {
        self.backend
            .clone()
            .unwrap_or_else(crate::driver::BackendChoice::none_started)
    }

    fn closed(&self) -> bool {
        self.common.delivery.closed.load(Ordering::SeqCst)
    }

    /// Queues `job` for a shard and wakes it; after shutdown, or if
    /// shutdown raced with the push, the job is refused (and counted).
    fn post(&self, shard: usize, job: Job) -> Result<(), Error> {
        if self.closed() {
            return Err(Error::Closed);
        }
        let s = &self.shards[shard];
        if matches!(job, Job::Connect(_)) {
            add(&s.counters.submitted, 1);
            add(&s.counters.in_flight, 1);
        }
        s.queue.push(job);
        s.control.wake();
        if self.closed() {
            // Shutdown may have drained the queue before our push: whoever
            // pops a job refuses it, so it is answered exactly once.
            while let Some(j) = s.queue.pop() {
                refuse(j, shard, &s.counters, &self.common);
            }
        }
        Ok(())
    }

    fn job(&self, dial: Dial, reply: Reply) -> (usize, ConnectJob) {
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        let shard = self.next_shard.fetch_add(1, Ordering::Relaxed) % self.shards.len();
        let job = ConnectJob {
            ticket,
            addr: dial.addr,
            source: dial.source,
            timeout: dial.timeout.unwrap_or(self.common.timeout),
            attrs: dial.attrs.unwrap_or_else(|| self.common.attrs.clone()),
            reply,
        };
        (shard, job)
    }

    /// Connects to `addr` and waits for the result.
    ///
    /// # Errors
    /// [`Error::Connect`] with its [`ConnectErrorKind`](crate::ConnectErrorKind) and the address;
    /// [`Error::Closed`] after (or during) shutdown.
    pub fn connect(&self, addr: SocketAddr) -> Result<Connected, Error> {
        self.connect_with(Dial::new(addr))
    }

    /// Connects as `dial` says and waits for the result.
    ///
    /// # Errors
    /// As [`Connector::connect`].
    pub fn connect_with(&self, dial: Dial) -> Result<Connected, Error> {
        let (tx, rx) = mpsc::sync_channel(1);
        let (shard, job) = self.job(dial, Reply::Wait(tx));
        self.post(shard, Job::Connect(job))?;
        rx.recv().unwrap_or(Err(Error::Closed))
    }

    /// Posts a connect without waiting; its [`Completion`] comes from
    /// [`Connector::try_complete`] (or the inline handler).
    ///
    /// # Errors
    /// [`Error::Closed`] after shutdown.
    pub fn submit(&self, dial: impl Into<Dial>) -> Result<Ticket, Error> {
        let (shard, job) = self.job(dial.into(), Reply::Deliver);
        let ticket = Ticket(job.ticket);
        self.post(shard, Job::Connect(job))?;
        Ok(ticket)
    }

    /// Takes the next finished submitted connect, without waiting.
    /// Completions still queued at shutdown are returned first; then
    /// [`Error::Closed`].
    ///
    /// # Errors
    /// [`Error::InlineDelivery`] with an inline handler; [`Error::Closed`].
    pub fn try_complete(&self) -> Result<Option<Completion>, Error> {
        if self.common.handler.is_some() {
            return Err(Error::InlineDelivery);
        }
        let d = &self.common.delivery;
        if let Some(c) = self.common.completions.pop() {
            d.popped();
            if d.pending.load(Ordering::SeqCst) == 0 {
                d.quiesce();
            }
            return Ok(Some(c));
        }
        d.quiesce();
        if self.closed() {
            return Err(Error::Closed);
        }
        Ok(None)
    }

    /// Waits at most `timeout` for the next finished submitted connect.
    ///
    /// # Errors
    /// As [`Connector::try_complete`]; `poll(2)` failures as [`Error::Setup`].
    pub fn complete_timeout(&self, timeout: Duration) -> Result<Option<Completion>, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.try_complete()? {
                return Ok(Some(c));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            sys::poll_readable(self.common.delivery.event.as_fd(), Some(deadline - now)).map_err(
                |e| Error::Setup {
                    op: "poll",
                    source: e,
                },
            )?;
        }
    }

    /// The completion event: readable while completions of submitted
    /// connects are waiting (and after shutdown). Register it in any event
    /// loop, then call [`Connector::try_complete`] until `Ok(None)`, which
    /// also clears it. Do not read from it.
    pub fn completion_event(&self) -> BorrowedFd<'_> {
        self.common.delivery.event.as_fd()
    }

    /// Runs `plan` on the shards and waits until it is done: every shard
    /// starts its share of the sequences (concurrency, rate and count are
    /// split evenly) on its own ring, and calls `sink(shard)`'s closure on
    /// the shard thread with each finished sequence's record. One run at a
    /// time; [`Connector::stats`] shows progress meanwhile.
    ///
    /// # Errors
    /// [`Error::Config`] for a plan without a bound or with a bad value;
    /// [`Error::Closed`] after shutdown (a shutdown during the run ends it
    /// early, with its in-flight sequences counted as cancelled).
    pub fn run<F, S>(&self, plan: &SequencePlan, sink: F) -> Result<RunSummary, Error>
    where
        F: Fn(usize) -> S,
        S: FnMut(&SequenceRecord) + Send + 'static,
    {
        plan.validate(self.shards.len())?;
        let _one = self.run_lock.lock().unwrap_or_else(|p| p.into_inner());
        // Shards that take part: all, or as many as the concurrency allows.
        let n = match plan.load {
            Load::Closed { concurrency } => self.shards.len().min(concurrency),
            Load::Open { .. } => self.shards.len(),
        };
        let share =
            |total: u64, k: usize| total / n as u64 + u64::from((k as u64) < total % n as u64);
        let plan = Arc::new(plan.clone());
        let started = Instant::now();
        let (tx, rx) = mpsc::channel();
        let mut posted = 0;
        for k in 0..n {
            let (concurrency, interval) = match plan.load {
                Load::Closed { concurrency } => (share(concurrency as u64, k) as usize, None),
                Load::Open {
                    rate,
                    max_in_flight,
                } => (
                    (share(max_in_flight as u64, k) as usize).max(1),
                    Some(Duration::from_secs_f64(n as f64 / rate)),
                ),
            };
            let job = RunJob {
                plan: plan.clone(),
                started,
                concurrency,
                interval,
                count: plan.count.map(|c| share(c, k)),
                sink: Box::new(sink(k)),
                done: tx.clone(),
            };
            self.post(k, Job::Run(Box::new(job)))?;
            posted += 1;
        }
        drop(tx);
        let mut summary = RunSummary::default();
        let mut last = started;
        for _ in 0..posted {
            let Ok((n_started, outcomes, end)) = rx.recv() else {
                break;
            };
            summary.started += n_started;
            summary.outcomes.add(&outcomes);
            last = last.max(end);
        }
        summary.elapsed = last.saturating_duration_since(started);
        Ok(summary)
    }

    /// A snapshot of every shard's counters.
    pub fn stats(&self) -> ConnectorStats {
        ConnectorStats {
            shards: self
                .shards
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let mut st = s.counters.snapshot(i);
                    st.moderation = s.control.moderation.snapshot();
                    st
                })
                .collect(),
        }
    }

    /// Stops the shards: queued connects fail with [`Error::Closed`],
    /// in-flight ones are cancelled (or complete), every socket is closed
    /// and counted, and the threads are joined. Completions already queued
    /// stay available to [`Connector::try_complete`]. Idempotent; `Drop`
    /// calls it.
    pub fn shutdown(&self) {
        if self.common.delivery.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        for s in &self.shards {
            s.control.stop();
        }
        let threads = match self.threads.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        };
        for t in threads {
            let _ = t.join();
        }
        for (k, s) in self.shards.iter().enumerate() {
            while let Some(j) = s.queue.pop() {
                refuse(j, k, &s.counters, &self.common);
            }
        }
        self.common.delivery.notify();
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        self.shutdown();
    }
}
