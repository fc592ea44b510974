//! `flood serve`: a Floodgate server for load tests. Each connection gets
//! the banner and is closed, by the engine's inline handler on the shard's
//! ring (`reply_and_close`: SEND with MSG_MORE + CLOSE, linked).
//!
//! Prints `LISTENING <addr>` on stdout when ready (then, with `--metrics`,
//! `METRICS <addr>` once `GET /metrics` is served there), stats on stderr
//! every `--stats-interval`, and its final stats as one JSON object on
//! stdout when it stops: on SIGINT/SIGTERM, after `--max-seconds`, or (with
//! `--exit-on-eof`) when its standard input closes.
//!
//! Restart under load: `--handover PATH` offers the listening sockets to a
//! successor on the Unix socket PATH; once one has taken them and is
//! accepting, this process stops accepting, drains and exits by itself.
//! `--takeover PATH` takes them from the process offering there (no
//! `--listen` then) and, given `--handover` too, offers them on once the
//! predecessor has let go.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use floodgate::cidr::{Cidr, CidrList};
use floodgate::{Coalesce, ConnectRequest, Listener, ListenerStats, Verdict};
use serde::Serialize;

use crate::args;
use crate::metrics::MetricsServer;

/// `flood serve` options.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on (loopback only); port 0 picks a free port.
    /// Not with --takeover, which takes the predecessor's sockets.
    #[arg(long, value_name = "ADDR", value_parser = args::loopback_addr,
          required_unless_present = "takeover", conflicts_with = "takeover")]
    pub listen: Option<SocketAddr>,

    /// Offer the listening sockets to a successor on this Unix socket; when
    /// one has taken them, stop accepting, drain and exit.
    #[arg(long, value_name = "PATH")]
    pub handover: Option<std::path::PathBuf>,

    /// Take the listening sockets from the process offering them on this
    /// Unix socket (its --handover), and serve on them.
    #[arg(long, value_name = "PATH")]
    pub takeover: Option<std::path::PathBuf>,

    /// How long a drain after a hand-over lets work under way finish.
    #[arg(long, value_name = "D", default_value = "30s", value_parser = args::duration_or_zero)]
    pub drain_timeout: Duration,

    /// Shards (threads, each pinned to its core: shard k on core k).
    #[arg(long, value_name = "N", allow_hyphen_values = true,
          value_parser = args::int_in(1u64, 1024))]
    pub shards: Option<u64>,

    /// Requested backlog (clamped to the provider ceiling, somaxconn).
    #[arg(long, value_name = "N", default_value_t = 4096, allow_hyphen_values = true,
          value_parser = args::int_from(1u64))]
    pub backlog: u64,

    /// Reject connections from this block (repeatable): the engine's
    /// condition closes them before delivery, without the banner; they are
    /// counted as rejected.
    #[arg(long, value_name = "CIDR", value_parser = args::cidr)]
    pub reject_cidr: Vec<Cidr>,

    /// Have the engine peek this many first bytes (waiting up to 1 s) before
    /// admitting a connection; the handler then reads and discards what the
    /// client sent before the banner, so the close is a FIN, not an RST. A
    /// client that goes away before is counted as withdrawn.
    #[arg(long, value_name = "N", default_value_t = 0, allow_hyphen_values = true,
          value_parser = args::int_in(0usize, floodgate::MAX_PEEK))]
    pub peek: usize,

    /// The banner (escapes: \r \n \t \\ \0 \xHH).
    #[arg(long, value_name = "BYTES", default_value = "x", value_parser = args::payload)]
    pub banner: args::Bytes,

    /// Use the engine's fixed wake-up coalescing rule instead of its
    /// default adaptive moderation: after a turn that accepted 8 or more
    /// connections a shard pauses 50 µs before waiting again.
    #[arg(long)]
    pub coalesce: bool,

    /// Print stats on stderr this often; 0 turns it off.
    #[arg(long, value_name = "D", default_value = "1s", allow_hyphen_values = true,
          value_parser = args::duration_or_zero)]
    pub stats_interval: Duration,

    /// Stop by itself after this many seconds (a number too large for the
    /// clock means never).
    #[arg(long, value_name = "S", allow_hyphen_values = true,
          value_parser = args::int_from(1u64))]
    pub max_seconds: Option<u64>,

    /// Stop when standard input reaches EOF (for a parent process).
    #[arg(long)]
    pub exit_on_eof: bool,

    /// Serve the engine's stats as Prometheus text on `GET /metrics` at
    /// this address (loopback only; port 0 picks a free port, printed as
    /// `METRICS <addr>`).
    #[arg(long, value_name = "ADDR", value_parser = args::loopback_addr)]
    pub metrics: Option<SocketAddr>,
}

/// The final stats `flood serve` prints.
#[derive(Debug, Serialize)]
pub struct ServeStats {
    /// The address it listened on.
    pub listen: String,
    /// The backend its shards ran on, and why (`epoll (io_uring_setup
    /// denied (EPERM): …)`).
    pub backend: String,
    /// Shards.
    pub shards: usize,
    /// Connections taken from the kernel.
    pub accepted: u64,
    /// Connections handed to the handler.
    pub delivered: u64,
    /// Banners posted (delivered and not rejected).
    pub served: u64,
    /// Connections rejected by the engine's condition (`--reject-cidr`).
    pub rejected: u64,
    /// Connections withdrawn while pending: the client went away, or the
    /// pending timeout passed, before the condition decided (`--peek`).
    pub withdrawn: u64,
    /// Connections closed by shutdown before delivery.
    pub closed_at_shutdown: u64,
    /// Connections still pending.
    pub pending: u64,
    /// The engine's conservation check.
    pub conserved: bool,
    /// Seconds it ran.
    pub uptime_s: f64,
    /// Whether it took its sockets over from a predecessor.
    pub took_over: bool,
    /// Whether it handed its sockets over to a successor (and drained).
    pub handed_over: bool,
    /// When it stopped accepting for the hand-over (µs since the Unix
    /// epoch), if it did.
    pub stopped_accepting_at_us: Option<u64>,
    /// When its handler got its first connection (µs since the Unix epoch).
    pub first_accept_at_us: Option<u64>,
    /// The engine's own stats, every counter of every shard (what
    /// `--metrics` serves, as JSON).
    pub stats: ListenerStats,
}

/// Counters the handler keeps.
#[derive(Debug, Default)]
pub struct HandlerCounts {
    /// Banners posted.
    pub served: AtomicU64,
    /// µs since the Unix epoch of the first connection; 0 before it.
    pub first_at_us: AtomicU64,
}

/// Microseconds since the Unix epoch of `t`.
pub fn unix_us(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Starts a listener whose condition rejects (closes) connections from
/// `reject` and, with `peek > 0`, waits for that many first bytes; its
/// inline handler sends `banner` to the admitted ones and closes them.
pub fn start(
    listen: SocketAddr,
    shards: Option<usize>,
    backlog: usize,
    reject: CidrList,
    peek: usize,
    banner: Vec<u8>,
    coalesce: Option<Coalesce>,
) -> Result<(Listener, Arc<HandlerCounts>), String> {
    start_on(
        Listener::builder(listen),
        shards,
        backlog,
        reject,
        peek,
        banner,
        coalesce,
    )
    .map_err(|e| format!("cannot start the listener on {listen}: {e}"))
}

/// As [`start`], on the listener `b` configures (a bound address, or
/// sockets taken over).
pub fn start_on(
    b: floodgate::ListenerBuilder,
    shards: Option<usize>,
    backlog: usize,
    reject: CidrList,
    peek: usize,
    banner: Vec<u8>,
    coalesce: Option<Coalesce>,
) -> Result<(Listener, Arc<HandlerCounts>), String> {
    let counts = Arc::new(HandlerCounts::default());
    let c = counts.clone();
    let mut b = b.backlog(backlog).coalesce(coalesce);
    if let Some(n) = shards {
        b = b.shards(n);
    }
    // The engine peeks for its condition only, and skips admission without
    // one: with --peek alone, the condition admits everyone.
    if !reject.is_empty() || peek > 0 {
        b = b.condition(move |req: &ConnectRequest<'_>| {
            if reject.contains(req.peer.ip()) {
                Verdict::close()
            } else {
                Verdict::accept()
            }
        });
    }
    if peek > 0 {
        b = b.peek(peek, Duration::from_secs(1));
    }
    let listener = b
        .handler(move |conn, ctx| {
            c.served.fetch_add(1, Ordering::Relaxed);
            if c.first_at_us.load(Ordering::Relaxed) == 0 {
                let _ = c.first_at_us.compare_exchange(
                    0,
                    unix_us(std::time::SystemTime::now()),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
            let _ = if peek > 0 {
                ctx.drain_reply_and_close(conn, &banner)
            } else {
                ctx.reply_and_close(conn, &banner)
            };
        })
        .build()
        .map_err(|e| e.to_string())?;
    Ok((listener, counts))
}

/// The final stats of a stopped listener.
pub fn final_stats(
    listener: &Listener,
    counts: &HandlerCounts,
    uptime: Duration,
) -> (ServeStats, ListenerStats) {
    let stats = listener.stats();
    let t = stats.total();
    (
        ServeStats {
            listen: listener.local_addr().to_string(),
            backend: listener.backend().to_string(),
            shards: listener.shards(),
            accepted: t.accepted,
            delivered: t.delivered,
            served: counts.served.load(Ordering::Relaxed),
            rejected: t.rejected.total(),
            withdrawn: t.withdrawn.total(),
            closed_at_shutdown: t.closed_at_shutdown,
            pending: t.pending,
            conserved: stats.conserved(),
            uptime_s: uptime.as_secs_f64(),
            took_over: false,
            handed_over: false,
            stopped_accepting_at_us: None,
            first_accept_at_us: match counts.first_at_us.load(Ordering::Relaxed) {
                0 => None,
                t => Some(t),
            },
            stats: stats.clone(),
        },
        stats,
    )
}

/// `flood serve`.
pub fn main(a: ServeArgs) -> Result<ExitCode, String> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| format!("cannot handle signal {sig}: {e}"))?;
    }
    let reject: CidrList = a.reject_cidr.iter().copied().collect();
    let mut takeover = match &a.takeover {
        Some(p) => {
            Some(floodgate::Takeover::connect(p).map_err(|e| format!("cannot take over: {e}"))?)
        }
        None => None,
    };
    let builder = match (&mut takeover, a.listen) {
        (Some(t), _) => t.builder(),
        (None, Some(addr)) => Listener::builder(addr),
        (None, None) => return Err("--listen or --takeover is needed".into()),
    };
    let (listener, counts) = start_on(
        builder,
        a.shards.map(|n| n as usize),
        a.backlog as usize,
        reject,
        a.peek,
        a.banner.0.clone(),
        a.coalesce.then(Coalesce::default),
    )
    .map_err(|e| format!("cannot start the listener: {e}"))?;
    let listener = Arc::new(listener);
    let started = Instant::now();
    crate::emit(&format!("LISTENING {}", listener.local_addr()));
    let metrics = match a.metrics {
        Some(addr) => match MetricsServer::start(addr, listener.clone()) {
            Ok(m) => {
                crate::emit(&format!("METRICS {}", m.local_addr()));
                crate::emit_err(&format!(
                    "flood serve: metrics on http://{}/metrics",
                    m.local_addr()
                ));
                Some(m)
            }
            Err(e) => {
                listener.shutdown();
                return Err(e);
            }
        },
        None => None,
    };
    // A closed stderr is not a reason to stop serving.
    let _ = writeln!(
        std::io::stderr(),
        "flood serve: backend {}",
        listener.backend()
    );
    if let Some(t) = &takeover {
        // Accepting on the sockets now: the predecessor may stop.
        t.ready().map_err(|e| format!("cannot take over: {e}"))?;
    }
    let successor: Arc<std::sync::Mutex<Option<floodgate::Successor>>> = Arc::default();
    if let Some(path) = a.handover.clone() {
        let (stop, listener, successor) = (stop.clone(), listener.clone(), successor.clone());
        std::thread::spawn(move || {
            // Offer on only once the predecessor has let go (its drain is
            // over and the path is free again).
            if let Some(t) = takeover {
                t.wait_released();
            }
            let offered = floodgate::Handover::bind(&path).and_then(|h| h.offer(&listener));
            match offered {
                Ok(s) => {
                    if let Ok(mut slot) = successor.lock() {
                        *slot = Some(s);
                    }
                    stop.store(true, Ordering::SeqCst);
                }
                Err(e) => crate::emit_err(&format!("flood serve: hand-over: {e}")),
            }
        });
    } else if let Some(t) = takeover {
        // Hold the predecessor's connection until it lets go.
        std::thread::spawn(move || t.wait_released());
    }
    if a.exit_on_eof {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut sink = [0u8; 256];
            let mut stdin = std::io::stdin().lock();
            while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
            stop.store(true, Ordering::SeqCst);
        });
    }
    // A deadline the clock cannot hold (u64::MAX seconds) is no deadline:
    // the server then runs until a signal or, with --exit-on-eof, EOF.
    let deadline = a
        .max_seconds
        .and_then(|s| started.checked_add(Duration::from_secs(s)));
    let mut next_stats = started.checked_add(a.stats_interval);
    let mut last = (started, 0u64);
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            break;
        }
        if !a.stats_interval.is_zero() && next_stats.is_some_and(|t| now >= t) {
            let t = listener.stats().total();
            let secs = now.duration_since(last.0).as_secs_f64().max(1e-3);
            crate::emit_err(&format!(
                "serve {:>6.1}s  accepted {}  delivered {}  rejected {}  withdrawn {}  {:.0} conn/s  ring {}  kernel queue {}",
                now.duration_since(started).as_secs_f64(),
                t.accepted,
                t.delivered,
                t.rejected.total(),
                t.withdrawn.total(),
                t.accepted.saturating_sub(last.1) as f64 / secs,
                t.ring_depth,
                t.kernel.map_or(0, |k| k.accept_queue),
            ));
            last = (now, t.accepted);
            next_stats = now.checked_add(a.stats_interval);
        }
        std::thread::park_timeout(Duration::from_millis(20));
    }
    if let Some(m) = metrics {
        m.stop();
    }
    let handed = successor.lock().ok().and_then(|mut s| s.take());
    let drained = handed.as_ref().map(|_| listener.drain(a.drain_timeout));
    listener.shutdown();
    // Let the successor offer on: this process holds no socket any more.
    if let Some(s) = handed {
        s.release();
    }
    let (mut out, _) = final_stats(&listener, &counts, started.elapsed());
    out.took_over = a.takeover.is_some();
    out.handed_over = drained.is_some();
    out.stopped_accepting_at_us = drained.map(|d| unix_us(d.stopped_accepting_at));
    let text = serde_json::to_string(&out).map_err(|e| format!("JSON: {e}"))?;
    crate::emit(&text);
    Ok(if out.conserved {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
