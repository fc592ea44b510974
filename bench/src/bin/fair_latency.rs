//! Fair accept latency, interleaved: the measurement of the `accept_fair` criterion bench
//! (`floodgate_bench::fair`: acceptor asleep in its wait on core 0, client on core 1, time from
//! just before `connect()` to the application holding the socket), run in rounds A B C … A B C …
//! so that a change of the shared machine's load lands on every peer alike.
//!
//! Each round starts each peer afresh, makes `--warmup` unmeasured connections, then
//! `--connections` measured ones; it prints one markdown table: per peer the p50, p90 and p99
//! over all rounds, each round's p50, and the ratio of its p50 to `std_blocking`'s.

use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use floodgate_bench::fair::{self, peers, Probe, CLIENT_CORE, SERVER_CORE};
use floodgate_bench::harness::median;
use hdrhistogram::Histogram;

/// Fair accept latency, every peer in turn, in rounds.
#[derive(Parser, Debug)]
#[command(name = "fair_latency", about)]
struct Cli {
    /// Rounds (each measures every peer once).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=50))]
    rounds: u32,

    /// Measured connections per peer and round.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    connections: u32,

    /// Unmeasured connections per peer and round, first.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    warmup: u32,

    /// Only these peers (comma list of names as printed).
    #[arg(long, value_delimiter = ',')]
    peers: Option<Vec<String>>,
}

struct Tally {
    name: &'static str,
    all: Histogram<u64>,
    round_p50_us: Vec<f64>,
    failed: Option<String>,
}

fn uptime() -> String {
    Command::new("uptime")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// One round of one peer: its latencies in nanoseconds.
fn round(peer: peers::Peer, cli: &Cli) -> Result<Histogram<u64>, String> {
    let probe = Arc::new(Probe::default());
    let running = peers::start_checked(peer, probe.clone())?;
    let addr = running.addr();
    for _ in 0..cli.warmup {
        fair::measure_one(&probe, addr)?;
    }
    let mut h = Histogram::<u64>::new(3).map_err(|e| format!("histogram: {e}"))?;
    for _ in 0..cli.connections {
        let took = fair::measure_one(&probe, addr)?;
        h.record(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX))
            .map_err(|e| format!("histogram: {e}"))?;
    }
    drop(running);
    Ok(h)
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let chosen: Vec<peers::Peer> = match &cli.peers {
        None => peers::PEERS.to_vec(),
        Some(names) => {
            let mut v = Vec::new();
            for n in names {
                match peers::find(n) {
                    Some(p) => v.push(p),
                    None => {
                        let known: Vec<&str> = peers::PEERS.iter().map(|p| p.name).collect();
                        eprintln!("fair_latency: --peers: no peer {n:?} (known: {known:?})");
                        return ExitCode::from(2);
                    }
                }
            }
            v
        }
    };
    if let Err(e) = fair::pin_here(CLIENT_CORE) {
        eprintln!("fair_latency: cannot pin the client to core {CLIENT_CORE}: {e}");
        return ExitCode::FAILURE;
    }
    let mut tallies: Vec<Tally> = Vec::new();
    for p in &chosen {
        let all = match Histogram::<u64>::new(3) {
            Ok(h) => h,
            Err(e) => {
                eprintln!("fair_latency: histogram: {e}");
                return ExitCode::FAILURE;
            }
        };
        tallies.push(Tally {
            name: p.name,
            all,
            round_p50_us: Vec::new(),
            failed: None,
        });
    }
    println!("load before: {}", uptime());
    println!(
        "acceptors pinned to core {SERVER_CORE}, client pinned to core {CLIENT_CORE}: client and server share the machine's 2 cores"
    );
    println!(
        "{} round(s) x {} peer(s), {} warm-up + {} measured connections each",
        cli.rounds,
        chosen.len(),
        cli.warmup,
        cli.connections
    );
    let started = Instant::now();
    for r in 1..=cli.rounds {
        for (p, t) in chosen.iter().zip(tallies.iter_mut()) {
            if t.failed.is_some() {
                continue;
            }
            match round(*p, &cli) {
                Ok(h) => {
                    let p50 = us(h.value_at_quantile(0.5));
                    eprintln!("round {r} {:<24} p50 {p50:>8.1} µs", p.name);
                    t.round_p50_us.push(p50);
                    if let Err(e) = t.all.add(&h) {
                        t.failed = Some(format!("histogram: {e}"));
                    }
                }
                Err(e) => {
                    eprintln!("round {r} {}: FAILED: {e}", p.name);
                    t.failed = Some(e);
                }
            }
        }
    }
    let base = tallies
        .iter()
        .find(|t| t.name == "std_blocking" && t.failed.is_none())
        .map(|t| us(t.all.value_at_quantile(0.5)));
    println!();
    println!("| peer | p50 µs | p90 µs | p99 µs | median of round p50s µs | round p50s µs | p50 / std_blocking |");
    println!("|---|---:|---:|---:|---:|---|---:|");
    for t in &tallies {
        if let Some(e) = &t.failed {
            println!("| {} | failed: {e} | | | | | |", t.name);
            continue;
        }
        let p50 = us(t.all.value_at_quantile(0.5));
        let rounds: Vec<String> = t.round_p50_us.iter().map(|v| format!("{v:.1}")).collect();
        println!(
            "| {} | {p50:.1} | {:.1} | {:.1} | {:.1} | {} | {} |",
            t.name,
            us(t.all.value_at_quantile(0.9)),
            us(t.all.value_at_quantile(0.99)),
            median(t.round_p50_us.clone()),
            rounds.join(", "),
            base.map_or("n/a".to_string(), |b| format!("{:.3}", p50 / b)),
        );
    }
    println!();
    println!("load after: {}", uptime());
    println!("wall time {:.0} s", started.elapsed().as_secs_f64());
    if tallies.iter().any(|t| t.failed.is_some()) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
