//! `flood run`: the load generator. The sequences (connect, send, receive,
//! close) run on the connector's shards, on their rings; this thread only
//! draws the progress bar and reports.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{ArgGroup, Args, ValueEnum};
use floodgate::{CloseMode, Connector, RunSummary, SequencePlan, SequenceRecord};
use floodgate_bench::measure;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::args;
use crate::report::{Cpu, Latencies, Percentiles, Report};

/// The bound used when neither `--duration` nor `--connections` is given.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(10);

/// `flood run`'s exit status when the run ended without one successful
/// connection (all refused, timed out, reset, or short of `--expect`): the
/// report is printed all the same. 0 means at least one succeeded; 1 that
/// flood could not run; 2 a bad command line.
pub const EXIT_NO_SUCCESS: u8 = 3;

/// The exit statuses, for `flood run --help`.
const EXIT_HELP: &str = "Exit status:
  0  at least one connection succeeded
  1  flood could not run (the connector could not start, --pin failed, ...)
  2  bad command line
  3  no connection succeeded (all refused, timed out, reset or short of
     --expect); the report is printed all the same";

/// How to close each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Close {
    /// Normal close (FIN); the client side keeps TIME_WAIT.
    Fin,
    /// RST (SO_LINGER 0 then close, or a disconnect that keeps the socket for the next connection); no TIME_WAIT.
    Rst,
}

/// `flood run` options.
#[derive(Args, Debug, Clone)]
#[command(group(ArgGroup::new("payload").args(["send", "proxy_v1", "proxy_v2", "tls_hello"])))]
#[command(after_help = EXIT_HELP)]
pub struct RunArgs {
    /// The server to flood: a loopback address and its port (not 0).
    #[arg(long, value_name = "ADDR", value_parser = args::target_addr)]
    pub target: SocketAddr,

    /// Closed loop: connections in flight over all threads.
    #[arg(long, short = 'c', value_name = "C", default_value_t = 64, allow_hyphen_values = true,
          value_parser = args::int_in(1u64, 1_000_000))]
    pub concurrency: u64,

    /// Open loop instead: intended connections per second (latency counts
    /// from each intended start, so a stalled server shows).
    #[arg(long, value_name = "R", allow_hyphen_values = true, value_parser = args::rate)]
    pub rate: Option<f64>,

    /// Open loop: the most connections in flight at once.
    #[arg(long, value_name = "N", default_value_t = 4096, allow_hyphen_values = true,
          value_parser = args::int_in(1u64, 1_000_000))]
    pub max_in_flight: u64,

    /// Stop starting connections after this long: 30s, 1m30s, 500ms, 1h,
    /// or plain seconds; at most 24h (default 10s if --connections is not
    /// given either).
    #[arg(long, short = 'd', value_name = "D", allow_hyphen_values = true, value_parser = args::duration)]
    pub duration: Option<std::time::Duration>,

    /// Stop after this many connections.
    #[arg(long, short = 'n', value_name = "N", allow_hyphen_values = true,
          value_parser = args::int_from(1u64))]
    pub connections: Option<u64>,

    /// Load run first for this long, not measured.
    #[arg(long, value_name = "D", default_value = "0", allow_hyphen_values = true,
          value_parser = args::duration_or_zero)]
    pub warmup: std::time::Duration,

    /// Send these bytes after connecting (escapes: \r \n \t \\ \0 \xHH).
    #[arg(long, value_name = "BYTES", value_parser = args::payload)]
    pub send: Option<args::Bytes>,

    /// Send a PROXY protocol v1 header (fixed, claiming the first source).
    #[arg(long)]
    pub proxy_v1: bool,

    /// Send a PROXY protocol v2 header (fixed, claiming the first source).
    #[arg(long)]
    pub proxy_v2: bool,

    /// Send a TLS ClientHello carrying this SNI host name (≤ 255 bytes).
    #[arg(long, value_name = "SNI", value_parser = args::sni)]
    pub tls_hello: Option<String>,

    /// Wait for this many response bytes before closing; 0: don't. A reply
    /// cut short by the server's close (EOF first) fails as short_read.
    #[arg(long, value_name = "N", default_value_t = 1, allow_hyphen_values = true,
          value_parser = args::int_in(0u64, 1 << 30))]
    pub expect: u64,

    /// How to close.
    #[arg(long, value_enum, default_value_t = Close::Rst)]
    pub close: Close,

    /// Source addresses, round-robin: 127.0.0.2-127.0.0.50 (loopback only).
    #[arg(long, value_name = "RANGE", value_parser = args::sources)]
    pub sources: Option<args::Sources>,

    /// Threads (connector shards); default one per core, or 1 with --pin.
    #[arg(long, short = 't', value_name = "T", allow_hyphen_values = true,
          value_parser = args::int_in(1u64, 1024))]
    pub threads: Option<u64>,

    /// Pin every thread of flood to this core.
    #[arg(long, value_name = "CORE", allow_hyphen_values = true, value_parser = args::int_from(0usize))]
    pub pin: Option<usize>,

    /// Report this server process's CPU time per connection.
    #[arg(long, value_name = "PID", allow_hyphen_values = true, value_parser = args::int_from(1u32))]
    pub server_pid: Option<u32>,

    /// Connect timeout.
    #[arg(long, value_name = "D", default_value = "3s", allow_hyphen_values = true,
          value_parser = args::duration)]
    pub connect_timeout: std::time::Duration,

    /// Time allowed after the connect for sending and receiving.
    #[arg(long, value_name = "D", default_value = "5s", allow_hyphen_values = true,
          value_parser = args::duration)]
    pub io_timeout: std::time::Duration,

    /// Print the report as one JSON object on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Pins the calling thread to `core`, naming `flag` on failure.
pub fn pin_here(core: usize, flag: &str) -> Result<(), String> {
    let ids = core_affinity::get_core_ids()
        .ok_or_else(|| format!("{flag} {core}: cannot read the list of cores"))?;
    let id = ids
        .into_iter()
        .find(|c| c.id == core)
        .ok_or_else(|| format!("{flag} {core}: no such core available to this process"))?;
    if core_affinity::set_for_current(id) {
        Ok(())
    } else {
        Err(format!("{flag} {core}: sched_setaffinity failed"))
    }
}

/// The number of cores this process may run on.
pub fn cores() -> usize {
    core_affinity::get_core_ids().map_or(1, |v| v.len().max(1))
}

impl RunArgs {
    fn payload(&self) -> Vec<u8> {
        let src_ip = self
            .sources
            .as_ref()
            .and_then(|s| s.0.first().copied())
            .unwrap_or(match self.target {
                SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        let src = SocketAddr::new(src_ip, 40_000);
        if let Some(b) = &self.send {
            b.0.clone()
        } else if self.proxy_v1 {
            floodgate::proxy_protocol::encode_v1(src, self.target)
        } else if self.proxy_v2 {
            floodgate::proxy_protocol::encode_v2(src, self.target)
        } else if let Some(sni) = &self.tls_hello {
            // args::sni checked the length, so this cannot panic.
            floodgate::sni::client_hello(sni)
        } else {
            Vec::new()
        }
    }

    /// What each connection does and how they are paced, without bounds.
    fn base_plan(&self) -> SequencePlan {
        let plan = SequencePlan::new(self.target)
            .payload(self.payload())
            .expect(self.expect as usize)
            .close(match self.close {
                Close::Fin => CloseMode::Fin,
                Close::Rst => CloseMode::Reset,
            })
            .connect_timeout(Some(self.connect_timeout))
            .io_timeout(self.io_timeout);
        match self.rate {
            Some(r) => plan.rate(r, self.max_in_flight as usize),
            None => plan.concurrency(self.concurrency as usize),
        }
    }

    /// The plan for the measured window.
    pub fn plan(&self) -> SequencePlan {
        let mut plan = self.base_plan();
        if let Some(n) = self.connections {
            plan = plan.count(n);
        }
        match (self.duration, self.connections) {
            (Some(d), _) => plan.duration(d),
            (None, None) => plan.duration(DEFAULT_DURATION),
            (None, Some(_)) => plan,
        }
    }
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress_bar() -> ProgressBar {
    let pb = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(10));
    if let Ok(style) = ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}") {
        pb.set_style(style);
    }
    pb
}

/// What [`execute`] measured.
pub struct Executed {
    /// The run's summary.
    pub summary: RunSummary,
    /// Latencies of every shard, merged.
    pub latencies: Latencies,
    /// Sockets the connector created during the run.
    pub sockets_created: u64,
    /// Whether every shard can keep its sockets in the ring's direct table
    /// (it does for runs without source addresses).
    pub direct_sockets: bool,
}

/// Runs `plan` on `connector`, with a progress bar labelled `label`,
/// and returns the summary with the merged latency histograms.
pub fn execute(
    connector: &Connector,
    plan: &SequencePlan,
    label: &str,
) -> Result<Executed, String> {
    let shards = connector.shards();
    let hists: Vec<Arc<Mutex<Latencies>>> = (0..shards)
        .map(|_| Arc::new(Mutex::new(Latencies::default())))
        .collect();
    let before = connector.stats().total();
    let done = AtomicBool::new(false);
    let pb = progress_bar();
    let started = Instant::now();
    let summary = std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                let t = connector.stats().total();
                let ok = t.sequences.get(floodgate::SequenceOutcome::Ok)
                    - before.sequences.get(floodgate::SequenceOutcome::Ok);
                let errors = t.sequences.errors() - before.sequences.errors();
                let secs = started.elapsed().as_secs_f64().max(1e-3);
                pb.set_message(format!(
                    "{label}: {ok} ok  {errors} errors  {:.0} conn/s  {} in flight",
                    ok as f64 / secs,
                    t.in_flight
                ));
                pb.tick();
                std::thread::park_timeout(Duration::from_millis(100));
            }
        });
        let r = connector.run(plan, |k| {
            let h = hists[k.min(shards - 1)].clone();
            move |r: &SequenceRecord| {
                if let Ok(mut g) = h.lock() {
                    g.record(r);
                }
            }
        });
        done.store(true, Ordering::Relaxed);
        r
    });
    pb.finish_and_clear();
    let summary = summary.map_err(|e| format!("the run failed: {e}"))?;
    let mut all = Latencies::default();
    for h in &hists {
        if let Ok(g) = h.lock() {
            all.merge(&g);
        }
    }
    let after = connector.stats().total();
    Ok(Executed {
        summary,
        latencies: all,
        sockets_created: after.sockets_created - before.sockets_created,
        direct_sockets: after.direct_sockets,
    })
}

/// Builds the report of a measured run.
pub fn report(
    target: SocketAddr,
    threads: usize,
    plan: &SequencePlan,
    run: &Executed,
    cpu: Cpu,
) -> Report {
    let (summary, lat) = (&run.summary, &run.latencies);
    let (ok, errors, errors_by_kind) = Report::counts(&summary.outcomes);
    let secs = summary.elapsed.as_secs_f64();
    let (concurrency, rate) = match plan.load() {
        floodgate::Load::Closed { concurrency } => (Some(concurrency), None),
        floodgate::Load::Open { rate, .. } => (None, Some(rate)),
    };
    Report {
        target: target.to_string(),
        threads,
        mode: if rate.is_some() { "open" } else { "closed" },
        concurrency,
        rate,
        elapsed_s: secs,
        started: summary.started,
        ok,
        errors,
        errors_by_kind,
        conn_per_s: if secs > 0.0 { ok as f64 / secs } else { 0.0 },
        connect_us: Percentiles::of(&lat.connect),
        first_byte_us: Percentiles::of(&lat.first_byte),
        cpu,
        sockets_created: run.sockets_created,
        direct_sockets: run.direct_sockets,
    }
}

/// `flood run`.
pub fn main(a: RunArgs) -> Result<ExitCode, String> {
    if let Some(core) = a.pin {
        pin_here(core, "--pin")?;
    }
    if let Some(pid) = a.server_pid {
        measure::proc_cpu_time(pid)
            .map_err(|e| format!("--server-pid {pid}: cannot read /proc/{pid}/stat: {e}"))?;
    }
    if let Some(src) = &a.sources {
        if src.0.iter().any(|ip| ip.is_ipv4() != a.target.is_ipv4()) {
            return Err(
                "--sources: the source addresses and --target must be of one family".into(),
            );
        }
    }
    let threads = match (a.threads, a.pin) {
        (Some(t), _) => t as usize,
        (None, Some(_)) => 1,
        (None, None) => cores(),
    };
    let mut builder = Connector::builder()
        .shards(threads)
        .pin(false)
        .timeout(Some(a.connect_timeout));
    if let Some(core) = a.pin {
        builder = builder.cores(vec![core]);
    }
    if let Some(src) = &a.sources {
        builder = builder.sources(src.0.iter().copied());
    }
    let connector = builder
        .build()
        .map_err(|e| format!("cannot start the connector: {e}"))?;
    // On stderr: stdout may be --json.
    let _ = writeln!(
        std::io::stderr(),
        "flood run: backend {}",
        connector.backend()
    );
    let plan = a.plan();
    if !a.warmup.is_zero() {
        execute(&connector, &a.base_plan().duration(a.warmup), "warm-up")?;
    }
    let before = measure::CpuSample::take(a.server_pid, a.pin);
    let run = execute(&connector, &plan, "run")?;
    let after = measure::CpuSample::take(a.server_pid, a.pin);
    let ok = run.summary.outcomes.get(floodgate::SequenceOutcome::Ok);
    let cpu = Cpu::per_conn(&before, &after, ok);
    let rep = report(a.target, threads, &plan, &run, cpu);
    connector.shutdown();
    if a.json {
        let text = serde_json::to_string(&rep).map_err(|e| format!("JSON: {e}"))?;
        crate::emit(&text);
    } else {
        for line in rep.table() {
            crate::emit(&line);
        }
    }
    if ok == 0 {
        crate::emit_err(&format!(
            "flood: no connection succeeded ({} started, {} errors): exit status {EXIT_NO_SUCCESS}",
            rep.started, rep.errors
        ));
        return Ok(ExitCode::from(EXIT_NO_SUCCESS));
    }
    Ok(ExitCode::SUCCESS)
}
