//! Per-core scaling run (run by `bench/scaling.sh`): N Floodgate shards against N pinned client
//! threads on 2N cores.
//!
//! The server is in this process: a `Listener` with `--shards N`, shard k pinned to core k
//! (the default placement), steering by CPU (the default), and the inline handler answering
//! `x` with `reply_and_close`. The clients are N `flood run` processes, client k pinned to core
//! N + k with one thread each (`--pin N+k --threads 1`), closed loop at `--concurrency` each,
//! all running at once. On loopback the handshake runs on the client's core, so CPU steering
//! sends client k's connections to shard (N + k) mod N = k.
//!
//! Per round (warm-up flood runs first, then the measured ones; `--rounds` rounds, medians):
//! conn/s in all and per server core; each shard's accepted connections over the window (from
//! the listener's per-shard stats) and the spread between shards (max / min, and
//! (max - min) / mean); the server's CPU per connection (this process's CPU over the window,
//! which is its shards' work: the clients are other processes) and each shard thread's
//! (`/proc/self/task/TID/stat`); the busy time of the server cores and of the client cores
//! (`/proc/stat`, softirq included) per connection.
//!
//! It refuses an N for which this machine has fewer than 2N cores. Every flood run is bounded
//! by its `--duration`; the script wraps the whole in `timeout`.

use std::fs;
use std::net::SocketAddr;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;

use clap::Parser;
use floodgate::{Backend, Listener};
use floodgate_bench::harness::{median, num};
use floodgate_bench::measure::{self, CoreTimes};
use serde_json::Value;

/// Per-core scaling: N shards on cores 0..N-1 against N flood clients on cores N..2N-1.
#[derive(Parser, Debug)]
#[command(name = "scaling", about)]
struct Cli {
    /// Directory holding the release `flood` binary.
    #[arg(long, value_name = "DIR")]
    bin_dir: std::path::PathBuf,

    /// N: server shards (cores 0..N-1) and client threads (cores N..2N-1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=512))]
    shards: u64,

    /// Connections in flight per client (closed loop).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    concurrency: u64,

    /// Measured seconds per round.
    #[arg(long, default_value_t = 2.0, value_parser = seconds)]
    seconds: f64,

    /// Unmeasured warm-up seconds per round.
    #[arg(long, default_value_t = 0.3, value_parser = seconds)]
    warmup: f64,

    /// Rounds.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,

    /// The engine's backend.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    backend: BackendArg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum BackendArg {
    Auto,
    IoUring,
    Epoll,
}

fn seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=60.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds in 0..=60")),
    }
}

/// Refuses an `n` that needs more than the `cores` this process may use (2n: n server, n
/// client), naming `--shards`.
fn check_shards(n: usize, cores: &[usize]) -> Result<(), String> {
    let need: Vec<usize> = (0..2 * n).collect();
    let missing: Vec<usize> = need
        .iter()
        .copied()
        .filter(|c| !cores.contains(c))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "--shards {n} needs 2 x {n} = {} cores (server shards on cores 0..={}, clients on cores \
         {n}..={}), but this process may use {} core(s) {cores:?} (missing {missing:?}): at most \
         --shards {}",
        2 * n,
        n - 1,
        2 * n - 1,
        cores.len(),
        max_shards(cores)
    ))
}

/// The largest N for which cores 0..2N-1 are all usable.
fn max_shards(cores: &[usize]) -> usize {
    let mut n = 0;
    while (0..2 * (n + 1)).all(|c| cores.contains(&c)) {
        n += 1;
    }
    n
}

/// Spread of per-shard counts: (max / min, (max - min) / mean); NaN without counts.
fn spread(counts: &[u64]) -> (f64, f64) {
    let (Some(&max), Some(&min)) = (counts.iter().max(), counts.iter().min()) else {
        return (f64::NAN, f64::NAN);
    };
    let mean = counts.iter().sum::<u64>() as f64 / counts.len() as f64;
    let ratio = if min == 0 {
        f64::INFINITY
    } else {
        max as f64 / min as f64
    };
    (ratio, (max - min) as f64 / mean)
}

/// CPU time of this process's threads named `floodgate-K` (the listener's shards), by K.
fn shard_thread_cpu(n: usize) -> Result<Vec<Duration>, String> {
    let hz = measure::clock_ticks_per_second().map_err(|e| format!("clock ticks: {e}"))?;
    let mut out = vec![Duration::ZERO; n];
    let dir = fs::read_dir("/proc/self/task").map_err(|e| format!("/proc/self/task: {e}"))?;
    for entry in dir.flatten() {
        let comm = fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        let Some(k) = comm
            .trim()
            .strip_prefix("floodgate-")
            .and_then(|k| k.parse::<usize>().ok())
        else {
            continue;
        };
        if k >= n {
            continue;
        }
        let stat = fs::read_to_string(entry.path().join("stat"))
            .map_err(|e| format!("{}: {e}", entry.path().display()))?;
        let (u, s) = measure::parse_stat_cpu_ticks(&stat).map_err(|e| e.to_string())?;
        out[k] = measure::ticks_to_duration(u + s, hz);
    }
    Ok(out)
}

/// Counters at one edge of the measured window.
struct Edge {
    accepted: Vec<u64>,
    process_cpu: Duration,
    thread_cpu: Vec<Duration>,
    cores: Vec<CoreTimes>,
}

fn edge(listener: &Listener, n: usize) -> Result<Edge, String> {
    let accepted = listener.stats().shards.iter().map(|s| s.accepted).collect();
    let process_cpu = measure::own_cpu_time().map_err(|e| format!("getrusage: {e}"))?;
    let thread_cpu = shard_thread_cpu(n)?;
    let cores = (0..2 * n)
        .map(|c| measure::core_busy(c).map_err(|e| format!("/proc/stat cpu{c}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Edge {
        accepted,
        process_cpu,
        thread_cpu,
        cores,
    })
}

/// Runs the N clients at once for `secs`; returns their JSON reports.
fn clients(cli: &Cli, addr: SocketAddr, n: usize, secs: f64) -> Result<Vec<Value>, String> {
    let mut children: Vec<(usize, Child)> = Vec::new();
    for k in 0..n {
        let core = n + k;
        let child = Command::new(cli.bin_dir.join("flood"))
            .args(["run", "--target", &addr.to_string()])
            .args(["--pin", &core.to_string(), "--threads", "1"])
            .args(["--concurrency", &cli.concurrency.to_string()])
            .args(["--duration", &format!("{secs}s"), "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run {}/flood: {e}", cli.bin_dir.display()))?;
        children.push((core, child));
    }
    // Wait for every child, even after one failed, so none is left running.
    let mut reports = Vec::new();
    let mut failure = None;
    for (core, child) in children {
        match child.wait_with_output() {
            Ok(out) if out.status.success() => match serde_json::from_slice(&out.stdout) {
                Ok(v) => reports.push(v),
                Err(e) => failure = Some(format!("client on core {core}: JSON: {e}")),
            },
            Ok(out) => failure = Some(format!("client on core {core}: exit {}", out.status)),
            Err(e) => failure = Some(format!("client on core {core}: {e}")),
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(reports),
    }
}

/// The figures of one round.
#[derive(Debug, Clone)]
struct Round {
    conn_per_s: f64,
    per_core_conn_per_s: f64,
    shard_accepted: Vec<u64>,
    shard_conn_per_s: Vec<f64>,
    spread_ratio: f64,
    spread_rel: f64,
    server_cpu_us: f64,
    shard_cpu_us: Vec<f64>,
    server_cores_us: f64,
    client_cores_us: f64,
    errors: f64,
}

fn round(cli: &Cli, listener: &Listener, n: usize) -> Result<Round, String> {
    let addr = listener.local_addr();
    if cli.warmup > 0.0 {
        clients(cli, addr, n, cli.warmup)?;
    }
    let before = edge(listener, n)?;
    let reports = clients(cli, addr, n, cli.seconds)?;
    let after = edge(listener, n)?;
    let deltas: Vec<u64> = after
        .accepted
        .iter()
        .zip(&before.accepted)
        .map(|(a, b)| a.saturating_sub(*b))
        .collect();
    let accepted: u64 = deltas.iter().sum();
    let ok: f64 = reports.iter().map(|r| num(r, &["ok"])).sum();
    let errors: f64 = reports.iter().map(|r| num(r, &["errors"])).sum();
    let conn_per_s: f64 = reports.iter().map(|r| num(r, &["conn_per_s"])).sum();
    let elapsed = median(reports.iter().map(|r| num(r, &["elapsed_s"])).collect());
    let per = |d: Duration, conns: f64| {
        if conns > 0.0 {
            d.as_secs_f64() * 1e6 / conns
        } else {
            f64::NAN
        }
    };
    let busy = |cores: std::ops::Range<usize>| {
        cores
            .map(|c| after.cores[c].busy_since(&before.cores[c]))
            .sum::<Duration>()
    };
    let (spread_ratio, spread_rel) = spread(&deltas);
    Ok(Round {
        conn_per_s,
        per_core_conn_per_s: conn_per_s / n as f64,
        shard_conn_per_s: deltas.iter().map(|d| *d as f64 / elapsed).collect(),
        shard_cpu_us: after
            .thread_cpu
            .iter()
            .zip(&before.thread_cpu)
            .zip(&deltas)
            .map(|((a, b), d)| per(a.saturating_sub(*b), *d as f64))
            .collect(),
        shard_accepted: deltas,
        spread_ratio,
        spread_rel,
        server_cpu_us: per(
            after.process_cpu.saturating_sub(before.process_cpu),
            accepted as f64,
        ),
        server_cores_us: per(busy(0..n), accepted as f64),
        client_cores_us: per(busy(n..2 * n), ok),
        errors,
    })
}

fn uptime() -> String {
    Command::new("uptime")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn list(v: &[f64], digits: usize) -> String {
    v.iter()
        .map(|x| format!("{x:.digits$}"))
        .collect::<Vec<_>>()
        .join(" / ")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cores: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    let Ok(n) = usize::try_from(cli.shards) else {
        eprintln!("scaling: --shards {} is too large", cli.shards);
        return ExitCode::from(2);
    };
    if let Err(e) = check_shards(n, &cores) {
        eprintln!("scaling: {e}");
        return ExitCode::from(2);
    }
    let listener = match Listener::builder(SocketAddr::from(([127, 0, 0, 1], 0)))
        .shards(n)
        .backlog(4096)
        .backend(match cli.backend {
            BackendArg::Auto => Backend::Auto,
            BackendArg::IoUring => Backend::IoUring,
            BackendArg::Epoll => Backend::Epoll,
        })
        .handler(|conn, ctx| {
            // The client may have reset already; the engine closes the socket either way.
            let _ = ctx.reply_and_close(conn, b"x");
        })
        .build()
    {
        Ok(l) => l,
        Err(e) => {
            eprintln!("scaling: cannot start the listener: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("load before: {}", uptime());
    println!(
        "N = {n}: shards on cores 0..={}, one flood client thread each on cores {n}..={}, \
         C={} per client, backend {}; client and server share the machine's {} cores",
        n - 1,
        2 * n - 1,
        cli.concurrency,
        listener.backend(),
        cores.len()
    );
    println!(
        "{} round(s) of {} s warm-up + {} s measured",
        cli.rounds, cli.warmup, cli.seconds
    );
    let mut rounds = Vec::new();
    for r in 1..=cli.rounds {
        match round(&cli, &listener, n) {
            Ok(f) => {
                eprintln!(
                    "round {r}: {:.0} conn/s, shards {:?}, server {:.2} µs/conn, server cores {:.2} µs/conn",
                    f.conn_per_s, f.shard_accepted, f.server_cpu_us, f.server_cores_us
                );
                rounds.push(f);
            }
            Err(e) => {
                eprintln!("scaling: round {r} failed: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    listener.shutdown();
    let stats = listener.stats();
    let m = |f: fn(&Round) -> f64| median(rounds.iter().map(f).collect());
    let per_shard = |f: fn(&Round) -> &Vec<f64>, k: usize| {
        median(
            rounds
                .iter()
                .map(|r| f(r).get(k).copied().unwrap_or(f64::NAN))
                .collect(),
        )
    };
    println!();
    println!("| N | conn/s | conn/s per server core | shard spread max/min | (max-min)/mean | server CPU µs/conn | server cores busy µs/conn | client cores busy µs/conn | errors |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {n} | {:.0} | {:.0} | {:.3} | {:.3} | {:.2} | {:.2} | {:.2} | {:.0} |",
        m(|r| r.conn_per_s),
        m(|r| r.per_core_conn_per_s),
        m(|r| r.spread_ratio),
        m(|r| r.spread_rel),
        m(|r| r.server_cpu_us),
        m(|r| r.server_cores_us),
        m(|r| r.client_cores_us),
        m(|r| r.errors),
    );
    println!();
    println!("| shard (core) | conn/s | shard thread CPU µs/conn |");
    println!("|---|---:|---:|");
    for k in 0..n {
        println!(
            "| {k} | {:.0} | {:.2} |",
            per_shard(|r| &r.shard_conn_per_s, k),
            per_shard(|r| &r.shard_cpu_us, k)
        );
    }
    println!();
    println!(
        "rounds: conn/s {}; server CPU µs/conn {}",
        list(&rounds.iter().map(|r| r.conn_per_s).collect::<Vec<_>>(), 0),
        list(
            &rounds.iter().map(|r| r.server_cpu_us).collect::<Vec<_>>(),
            2
        )
    );
    println!("conservation held: {}", stats.conserved());
    println!("load after: {}", uptime());
    if stats.conserved() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_more_shards_than_half_the_cores_naming_the_flag() {
        assert_eq!(check_shards(1, &[0, 1]), Ok(()));
        let e = check_shards(2, &[0, 1]).expect_err("2 shards need 4 cores");
        assert!(
            e.contains("--shards 2") && e.contains("at most --shards 1"),
            "{e}"
        );
        // Cores 0..2N-1 must all be there, not just 2N of them.
        let e = check_shards(2, &[0, 1, 2, 5]).expect_err("core 3 missing");
        assert!(e.contains("missing [3]"), "{e}");
        assert_eq!(check_shards(3, &[0, 1, 2, 3, 4, 5, 6]), Ok(()));
        assert_eq!(max_shards(&[1, 2]), 0);
    }

    #[test]
    fn spread_is_max_over_min_and_range_over_mean() {
        assert_eq!(spread(&[100]), (1.0, 0.0));
        assert_eq!(spread(&[100, 300]), (3.0, 1.0));
        assert!(spread(&[0, 5]).0.is_infinite());
        assert!(spread(&[]).0.is_nan());
    }
}
