//! What a connection costs the client's core: `flood run` against the independent one-thread
//! epoll client (`client_epoll`), on the same servers, in the same run (run by
//! `bench/client_cost.sh`).
//!
//! For every round, server and client (interleaved), it starts the server pinned to core 0 on
//! a fresh port, warms it up with the same client, then runs the client pinned to core 1 in a
//! closed loop (connect, read one byte, RST close) and records conn/s, the client core's busy
//! µs per connection (`/proc/stat`, softirq included: on loopback the handshake of both ends
//! runs on the connecting core), the client's process CPU, the server's CPU µs per
//! connection, and flood's first-byte p50/p99. It prints the medians and the ratio of flood's
//! core cost to the epoll client's (issue 4's goal: ≤ 0.7), and writes every run as JSON.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use clap::Parser;
use floodgate_bench::harness::{flood, median, num, start, Server, CLIENT_CORE};
use serde_json::{json, Value};

/// Runs flood and the epoll client against each server and compares their cost.
#[derive(Parser, Debug)]
#[command(name = "client_cost", about)]
struct Cli {
    /// Directory holding the release binaries (flood, client_epoll, peer_*).
    #[arg(long, value_name = "DIR")]
    bin_dir: PathBuf,

    /// Rounds (each runs every client against every server once).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,

    /// Measured seconds per run.
    #[arg(long, default_value_t = 4.0)]
    seconds: f64,

    /// Unmeasured warm-up seconds per run (the same client, before the measured run).
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,

    /// Connections in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: u32,

    /// Where to write the JSON results.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

/// The clients compared.
const CLIENTS: [&str; 2] = ["flood", "client_epoll"];

/// The figures of one run.
#[derive(Debug, Clone, Default)]
struct Figures {
    conn_per_s: f64,
    core_us: f64,
    process_us: f64,
    server_us: f64,
    p50_us: f64,
    p99_us: f64,
    errors: f64,
}

impl Figures {
    fn to_json(&self) -> Value {
        json!({
            "conn_per_s": self.conn_per_s,
            "client_core_busy_us_per_conn": self.core_us,
            "client_process_us_per_conn": self.process_us,
            "server_cpu_us_per_conn": self.server_us,
            "first_byte_p50_us": self.p50_us,
            "first_byte_p99_us": self.p99_us,
            "errors": self.errors,
        })
    }
}

/// Runs `client_epoll` once; returns its JSON report.
fn epoll_client(
    bin_dir: &Path,
    addr: SocketAddr,
    pid: u32,
    concurrency: u32,
    secs: f64,
) -> Result<Value, String> {
    let out = Command::new(bin_dir.join("client_epoll"))
        .arg("--target")
        .arg(addr.to_string())
        .arg("--pin")
        .arg(CLIENT_CORE.to_string())
        .arg("--concurrency")
        .arg(concurrency.to_string())
        .arg("--duration")
        .arg(secs.to_string())
        .arg("--server-pid")
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run client_epoll: {e}"))?;
    if !out.status.success() {
        return Err(format!("client_epoll exited with {}", out.status));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("client_epoll's JSON: {e}"))
}

/// One measured run of `client` against `server`.
fn run_one(cli: &Cli, server: &Server, client: &str) -> Result<Figures, String> {
    let max_seconds = (cli.warmup + cli.seconds).ceil() as u64 + 30;
    let (running, addr) = start(server, max_seconds)?;
    let pid = running.child.id();
    let c = cli.concurrency.to_string();
    let load = ["--concurrency", c.as_str()];
    if client == "flood" {
        if cli.warmup > 0.0 {
            flood(&cli.bin_dir, addr, pid, &load, cli.warmup)?;
        }
        let rep = flood(&cli.bin_dir, addr, pid, &load, cli.seconds)?;
        Ok(Figures {
            conn_per_s: num(&rep, &["conn_per_s"]),
            core_us: num(&rep, &["cpu", "core_busy_us_per_conn"]),
            process_us: num(&rep, &["cpu", "flood_us_per_conn"]),
            server_us: num(&rep, &["cpu", "server_us_per_conn"]),
            p50_us: num(&rep, &["first_byte_us", "p50"]),
            p99_us: num(&rep, &["first_byte_us", "p99"]),
            errors: num(&rep, &["errors"]),
        })
    } else {
        if cli.warmup > 0.0 {
            epoll_client(&cli.bin_dir, addr, pid, cli.concurrency, cli.warmup)?;
        }
        let rep = epoll_client(&cli.bin_dir, addr, pid, cli.concurrency, cli.seconds)?;
        Ok(Figures {
            conn_per_s: num(&rep, &["conn_per_s"]),
            core_us: num(&rep, &["core_busy_us_per_conn"]),
            process_us: num(&rep, &["client_us_per_conn"]),
            server_us: num(&rep, &["server_us_per_conn"]),
            p50_us: f64::NAN,
            p99_us: f64::NAN,
            errors: num(&rep, &["errors"]),
        })
    }
}

fn medians(runs: &[Figures]) -> Figures {
    let m = |f: fn(&Figures) -> f64| median(runs.iter().map(f).collect());
    Figures {
        conn_per_s: m(|f| f.conn_per_s),
        core_us: m(|f| f.core_us),
        process_us: m(|f| f.process_us),
        server_us: m(|f| f.server_us),
        p50_us: m(|f| f.p50_us),
        p99_us: m(|f| f.p99_us),
        errors: m(|f| f.errors),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let b = cli.bin_dir.as_path();
    let servers = [
        Server::flood_serve(b, "flood_serve", &[]),
        Server::peer(b, "peer_tokio", "peer_tokio", &[]),
        Server::peer(b, "peer_uring", "peer_uring", &[]),
    ];
    let mut runs: BTreeMap<(&str, &str), Vec<Figures>> = BTreeMap::new();
    let mut log = Vec::new();
    for round in 1..=cli.rounds {
        for server in &servers {
            for client in CLIENTS {
                match run_one(&cli, server, client) {
                    Ok(f) => {
                        eprintln!(
                            "round {round} {} <- {client}: {:.0} conn/s, client core {:.2} µs/conn",
                            server.name, f.conn_per_s, f.core_us
                        );
                        log.push(json!({
                            "round": round, "server": server.name, "client": client,
                            "figures": f.to_json(),
                        }));
                        runs.entry((server.name, client)).or_default().push(f);
                    }
                    Err(e) => {
                        eprintln!("client_cost: {} <- {client}: {e}", server.name);
                        return ExitCode::FAILURE;
                    }
                }
            }
        }
    }
    println!(
        "Closed loop C={}, {} s measured per run, {} interleaved rounds, medians. Server pinned \
         to core 0, client to core 1: client and server share the machine's 2 cores.",
        cli.concurrency, cli.seconds, cli.rounds
    );
    println!();
    println!(
        "| server | client | conn/s | client core µs/conn | client process µs/conn | \
         server CPU µs/conn | first byte p50 / p99 µs | errors |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    let mut med = BTreeMap::new();
    for server in &servers {
        for client in CLIENTS {
            let m = medians(runs.get(&(server.name, client)).map_or(&[][..], |v| v));
            let lat = if m.p50_us.is_finite() {
                format!("{:.0} / {:.0}", m.p50_us, m.p99_us)
            } else {
                "-".to_string()
            };
            println!(
                "| {} | {client} | {:.0} | {:.2} | {:.2} | {:.2} | {lat} | {:.0} |",
                server.name, m.conn_per_s, m.core_us, m.process_us, m.server_us, m.errors
            );
            med.insert((server.name, client), m);
        }
    }
    println!();
    println!("| server | flood core / epoll client core (goal ≤ 0.7) | flood conn/s / epoll client conn/s |");
    println!("|---|---:|---:|");
    let mut ratios = Vec::new();
    for server in &servers {
        let (Some(f), Some(e)) = (
            med.get(&(server.name, "flood")),
            med.get(&(server.name, "client_epoll")),
        ) else {
            continue;
        };
        let core = f.core_us / e.core_us;
        let rate = f.conn_per_s / e.conn_per_s;
        println!(
            "| {} | {core:.3} ({}) | {rate:.3} |",
            server.name,
            if core <= 0.7 { "met" } else { "missed" }
        );
        ratios.push(json!({"server": server.name, "core_ratio": core, "conn_per_s_ratio": rate}));
    }
    let medians_json: Vec<Value> = med
        .iter()
        .map(|((s, c), m)| json!({"server": s, "client": c, "figures": m.to_json()}))
        .collect();
    let doc = json!({
        "concurrency": cli.concurrency,
        "seconds": cli.seconds,
        "rounds": cli.rounds,
        "runs": log,
        "medians": medians_json,
        "ratios": ratios,
    });
    match serde_json::to_string_pretty(&doc) {
        Ok(text) => {
            if let Err(e) = std::fs::write(&cli.out, text) {
                eprintln!("client_cost: cannot write {}: {e}", cli.out.display());
                return ExitCode::FAILURE;
            }
        }
        Err(e) => {
            eprintln!("client_cost: JSON: {e}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
