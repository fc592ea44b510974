//! Side-by-side load comparison of the peer servers and Floodgate (run by `bench/compare.sh`).
//!
//! For every round, scenario and server (interleaved: A B C … A B C …), it starts the server
//! pinned to core 0 on a fresh port, runs `flood run` pinned to core 1 against it, and records
//! conn/s, client first-byte p50/p99, the server's CPU µs per connection (utime+stime over the
//! window, from flood's `--server-pid`), the server core's busy µs per connection (from
//! `/proc/stat`, softirq included) and the server's voluntary context switches per connection.
//!
//! Scenarios: `saturated` (server in a cgroup CPU quota, period 10 ms, quota 2 ms; C=64),
//! `c64`, `c256` (normal closed loop), `c4` (light), `rate20k` (open loop at 20,000 conn/s).
//!
//! It prints one markdown table per scenario (medians over the rounds), the goal checks of
//! PERF.md, and writes every run and every median as JSON to `--out`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Instant;

use clap::Parser;
use floodgate_bench::harness::{
    flood, median, num, start, Launch, Server, CLIENT_CORE, SERVER_CORE,
};
use floodgate_bench::measure::{self, CpuQuota};
use serde_json::{json, Value};

/// Runs every server through every scenario and prints the comparison.
#[derive(Parser, Debug)]
#[command(name = "compare", about)]
struct Cli {
    /// Directory holding the release binaries (peer_*, flood).
    #[arg(long, value_name = "DIR")]
    bin_dir: PathBuf,

    /// bench/nginx/run.sh; nginx is skipped when absent or with --skip-nginx.
    #[arg(long, value_name = "PATH")]
    nginx_run: Option<PathBuf>,

    /// Skip the nginx peer, giving this reason.
    #[arg(long, value_name = "REASON")]
    skip_nginx: Option<String>,

    /// Rounds (each runs every scenario for every server once).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,

    /// Measured seconds per run.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,

    /// Unmeasured warm-up seconds per run (a separate flood run before the measured one).
    #[arg(long, default_value_t = 0.3)]
    warmup: f64,

    /// Only these scenarios (comma list of saturated,c64,c256,c4,rate20k).
    #[arg(long, value_delimiter = ',')]
    scenarios: Option<Vec<String>>,

    /// Only these servers (comma list of names as printed).
    #[arg(long, value_delimiter = ',')]
    servers: Option<Vec<String>>,

    /// Where to write the JSON results.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,

    /// A directory with another build's `peer_floodgate` (for example
    /// one `bench/baseline.sh` built at an earlier commit): adds the rows
    /// `baseline_handler` (its inline handler, `--mode handler`) and
    /// `baseline_epoll` (the same on the epoll backend), run in
    /// every round beside this build's, for an interleaved A/B of the two.
    #[arg(long, value_name = "DIR")]
    baseline_dir: Option<PathBuf>,
}

/// A scenario: its name, flood's load options, whether the server is CPU-capped.
struct Scenario {
    name: &'static str,
    load: &'static [&'static str],
    capped: bool,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "saturated",
        load: &["--concurrency", "64"],
        capped: true,
    },
    Scenario {
        name: "c64",
        load: &["--concurrency", "64"],
        capped: false,
    },
    Scenario {
        name: "c256",
        load: &["--concurrency", "256"],
        capped: false,
    },
    Scenario {
        name: "c4",
        load: &["--concurrency", "4"],
        capped: false,
    },
    Scenario {
        name: "rate20k",
        load: &["--rate", "20000"],
        capped: false,
    },
];

/// The figures of one run.
#[derive(Debug, Clone, Default)]
struct Figures {
    conn_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    server_us: f64,
    core_us: f64,
    vcsw: f64,
    errors: f64,
}

impl Figures {
    fn to_json(&self) -> Value {
        json!({
            "conn_per_s": self.conn_per_s,
            "first_byte_p50_us": self.p50_us,
            "first_byte_p99_us": self.p99_us,
            "server_cpu_us_per_conn": self.server_us,
            "server_core_busy_us_per_conn": self.core_us,
            "voluntary_switches_per_conn": self.vcsw,
            "errors": self.errors,
        })
    }
}

/// One measured run of `server` under `scenario`.
fn run_one(cli: &Cli, server: &Server, scenario: &Scenario) -> Result<Figures, String> {
    let max_seconds = (cli.warmup + cli.seconds).ceil() as u64 + 30;
    let (running, addr) = start(server, max_seconds)?;
    let pid = running.child.id();
    let _quota = if scenario.capped {
        let q = CpuQuota::create("floodgate-compare", 10_000, 2_000)
            .map_err(|e| format!("cgroup CPU quota: {e}"))?;
        q.add_process_threads(pid)
            .map_err(|e| format!("moving {pid}'s threads into the quota: {e}"))?;
        Some(q)
    } else {
        None
    };
    if cli.warmup > 0.0 {
        flood(&cli.bin_dir, addr, pid, scenario.load, cli.warmup)?;
    }
    let before = measure::core_busy(SERVER_CORE).map_err(|e| format!("/proc/stat: {e}"))?;
    let rep = flood(&cli.bin_dir, addr, pid, scenario.load, cli.seconds)?;
    let after = measure::core_busy(SERVER_CORE).map_err(|e| format!("/proc/stat: {e}"))?;
    let ok = num(&rep, &["ok"]);
    let busy_us = after.busy_since(&before).as_secs_f64() * 1e6;
    Ok(Figures {
        conn_per_s: num(&rep, &["conn_per_s"]),
        p50_us: num(&rep, &["first_byte_us", "p50"]),
        p99_us: num(&rep, &["first_byte_us", "p99"]),
        server_us: num(&rep, &["cpu", "server_us_per_conn"]),
        core_us: if ok > 0.0 { busy_us / ok } else { f64::NAN },
        vcsw: num(&rep, &["cpu", "server_voluntary_switches_per_conn"]),
        errors: num(&rep, &["errors"]),
    })
}

fn medians(runs: &[Figures]) -> Figures {
    let m = |f: fn(&Figures) -> f64| median(runs.iter().map(f).collect());
    Figures {
        conn_per_s: m(|f| f.conn_per_s),
        p50_us: m(|f| f.p50_us),
        p99_us: m(|f| f.p99_us),
        server_us: m(|f| f.server_us),
        core_us: m(|f| f.core_us),
        vcsw: m(|f| f.vcsw),
        errors: m(|f| f.errors),
    }
}

fn shell(cmd: &str) -> String {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Peers the goals compare Floodgate with ("best peer"): every non-Floodgate server except the
/// raw io_uring loop with the two levers, which has a goal of its own.
const PEERS: &[&str] = &[
    "peer_std",
    "peer_epoll",
    "peer_tokio",
    "peer_uring",
    "nginx",
];

type Table = BTreeMap<(&'static str, &'static str), Figures>;

fn get<'a>(t: &'a Table, scenario: &'static str, server: &'static str) -> Option<&'a Figures> {
    t.get(&(scenario, server))
}

fn best_peer(
    t: &Table,
    scenario: &'static str,
    key: fn(&Figures) -> f64,
    lower: bool,
) -> Option<(&'static str, f64)> {
    PEERS
        .iter()
        .filter_map(|p| get(t, scenario, p).map(|f| (*p, key(f))))
        .filter(|(_, v)| v.is_finite())
        .reduce(|a, b| if (b.1 < a.1) == lower { b } else { a })
}

/// Prints and returns the goal checks (ratio, limit, met).
fn goals(t: &Table) -> Vec<Value> {
    let mut out = Vec::new();
    let mut check =
        |goal: &str, ours: Option<f64>, base: Option<(&str, f64)>, limit: f64, at_most: bool| {
            let (Some(ours), Some((who, base))) = (ours, base) else {
                println!("| {goal} | n/a | n/a | n/a | not measured |");
                out.push(json!({"goal": goal, "met": Value::Null}));
                return;
            };
            let ratio = ours / base;
            let met = if at_most {
                ratio <= limit
            } else {
                ratio >= limit
            };
            let sign = if at_most { "≤" } else { "≥" };
            println!(
                "| {goal} | {ours:.2} | {base:.2} ({who}) | {ratio:.3} ({sign} {limit}) | {} |",
                if met { "met" } else { "MISSED" }
            );
            out.push(
                json!({"goal": goal, "floodgate": ours, "baseline": base, "baseline_server": who,
                        "ratio": ratio, "limit": limit, "met": met}),
            );
        };
    println!("\n### Goals (medians)\n");
    println!("| goal | Floodgate | baseline | ratio | verdict |");
    println!("|---|---|---|---|---|");
    let fg = |s: &'static str, k: fn(&Figures) -> f64| get(t, s, "floodgate_handler").map(k);
    check(
        "saturated server µs/conn, handler vs best peer",
        fg("saturated", |f| f.server_us),
        best_peer(t, "saturated", |f| f.server_us, true),
        0.75,
        true,
    );
    check(
        "C=64 server core µs/conn, handler vs best peer",
        fg("c64", |f| f.core_us),
        best_peer(t, "c64", |f| f.core_us, true),
        0.65,
        true,
    );
    check(
        "C=64 conn/s, handler vs best peer",
        fg("c64", |f| f.conn_per_s),
        best_peer(t, "c64", |f| f.conn_per_s, false),
        1.3,
        false,
    );
    let std =
        |s: &'static str, k: fn(&Figures) -> f64| get(t, s, "peer_std").map(|f| ("peer_std", k(f)));
    check(
        "C=4 first-byte p50, handler vs std",
        fg("c4", |f| f.p50_us),
        std("c4", |f| f.p50_us),
        1.10,
        true,
    );
    check(
        "C=4 server µs/conn, handler vs std",
        fg("c4", |f| f.server_us),
        std("c4", |f| f.server_us),
        1.0,
        true,
    );
    // Issue 13: moderation on by default must leave C=256 and the open loop
    // no worse than moderation off (the default before it), same run.
    let off = |s: &'static str, k: fn(&Figures) -> f64| {
        get(t, s, "floodgate_off").map(|f| ("floodgate_off", k(f)))
    };
    check(
        "C=256 conn/s, handler vs moderation off",
        fg("c256", |f| f.conn_per_s),
        off("c256", |f| f.conn_per_s),
        1.0,
        false,
    );
    check(
        "C=256 server core µs/conn, handler vs moderation off",
        fg("c256", |f| f.core_us),
        off("c256", |f| f.core_us),
        1.0,
        true,
    );
    check(
        "20k/s server µs/conn, handler vs moderation off",
        fg("rate20k", |f| f.server_us),
        off("rate20k", |f| f.server_us),
        1.0,
        true,
    );
    check(
        "20k/s first-byte p50, handler vs moderation off",
        fg("rate20k", |f| f.p50_us),
        off("rate20k", |f| f.p50_us),
        1.0,
        true,
    );
    check(
        "20k/s conn/s, handler vs moderation off",
        fg("rate20k", |f| f.conn_per_s),
        off("rate20k", |f| f.conn_per_s),
        1.0,
        false,
    );
    let levers = |s: &'static str, k: fn(&Figures) -> f64| {
        get(t, s, "uring_levers").map(|f| ("uring_levers", k(f)))
    };
    check(
        "saturated server µs/conn, handler vs uring --msg-more --adaptive-pause",
        fg("saturated", |f| f.server_us),
        levers("saturated", |f| f.server_us),
        1.05,
        true,
    );
    check(
        "C=64 server core µs/conn, handler vs uring --msg-more --adaptive-pause",
        fg("c64", |f| f.core_us),
        levers("c64", |f| f.core_us),
        1.05,
        true,
    );
    for (scenario, label) in [("saturated", "saturated"), ("c64", "C=64")] {
        check(
            &format!("{label} server µs/conn, io_uring handler vs the baseline build"),
            get(t, scenario, "floodgate_handler").map(|f| f.server_us),
            get(t, scenario, "baseline_handler").map(|f| ("baseline_handler", f.server_us)),
            1.02,
            true,
        );
    }
    check(
        "saturated server µs/conn, epoll backend vs the baseline build",
        get(t, "saturated", "floodgate_epoll").map(|f| f.server_us),
        get(t, "saturated", "baseline_epoll").map(|f| ("baseline_epoll", f.server_us)),
        1.02,
        true,
    );
    check(
        "saturated server µs/conn, epoll backend vs epoll loop with MSG_MORE",
        get(t, "saturated", "floodgate_epoll").map(|f| f.server_us),
        get(t, "saturated", "epoll_msg_more").map(|f| ("epoll_msg_more", f.server_us)),
        1.05,
        true,
    );
    // Delivery on the application's threads (issue: embedding).
    for (scenario, label) in [("saturated", "saturated"), ("c64", "C=64")] {
        let handler =
            || get(t, scenario, "floodgate_handler").map(|f| ("floodgate_handler", f.server_us));
        for (server, what, base, limit) in [
            ("floodgate_accept", "accept() loop", "handler", 1.15),
            ("floodgate_accept", "accept() loop", "peer_tokio", 0.8),
            (
                "floodgate_accept_reply",
                "accept() loop, reply_and_close",
                "handler",
                1.15,
            ),
            (
                "floodgate_accept_reply",
                "accept() loop, reply_and_close",
                "peer_tokio",
                0.8,
            ),
            (
                "floodgate_accept_many",
                "accept_many() loop",
                "handler",
                1.15,
            ),
            (
                "floodgate_driven_accept",
                "accept() loop on a driven shard",
                "handler",
                1.15,
            ),
            (
                "floodgate_driven_accept",
                "accept() loop on a driven shard",
                "peer_tokio",
                0.8,
            ),
            (
                "floodgate_driven_accept_ring",
                "accept() loop on a driven shard, reply on its ring",
                "handler",
                1.15,
            ),
            (
                "floodgate_driven_accept_ring",
                "accept() loop on a driven shard, reply on its ring",
                "peer_tokio",
                0.8,
            ),
            ("floodgate_driven", "driven shard", "handler", 1.1),
            (
                "floodgate_tokio",
                "tokio async accept (multi-thread)",
                "tokio_mt",
                0.85,
            ),
            (
                "floodgate_tokio_driven",
                "driven shard, current_thread runtime",
                "handler",
                1.1,
            ),
            (
                "floodgate_tokio_driven_ring",
                "driven shard, current_thread runtime, reply on the ring",
                "handler",
                1.1,
            ),
            (
                "floodgate_driven_std",
                "driven shard, app writes",
                "handler",
                1.1,
            ),
        ] {
            let baseline = if base == "handler" {
                handler()
            } else {
                get(t, scenario, base).map(|f| (base, f.server_us))
            };
            let goal = format!("{label} server µs/conn, {what} vs {base}");
            check(
                goal.as_str(),
                get(t, scenario, server).map(|f| f.server_us),
                baseline,
                limit,
                true,
            );
        }
    }
    check(
        "saturated server µs/conn, trivial condition vs none",
        get(t, "saturated", "floodgate_trivial").map(|f| f.server_us),
        get(t, "saturated", "floodgate_handler").map(|f| ("floodgate_handler", f.server_us)),
        1.05,
        true,
    );
    out
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let b = &cli.bin_dir;
    let mut servers = vec![
        Server::peer(b, "peer_std", "peer_std", &[]),
        Server::peer(b, "peer_epoll", "peer_epoll", &[]),
        Server::peer(b, "epoll_msg_more", "peer_epoll", &["--msg-more"]),
        Server::peer(
            b,
            "epoll_msg_more_mt",
            "peer_epoll",
            &["--msg-more", "--extra-thread"],
        ),
        Server::peer(
            b,
            "epoll_msg_more_batch16",
            "peer_epoll",
            &["--msg-more", "--batch", "16"],
        ),
        Server::peer(b, "peer_tokio", "peer_tokio", &[]),
        Server::peer(b, "tokio_mt", "peer_tokio", &["--multi-thread"]),
        Server::peer(b, "peer_uring", "peer_uring", &[]),
        Server::peer(
            b,
            "uring_levers",
            "peer_uring",
            &["--msg-more", "--adaptive-pause"],
        ),
    ];
    let mut skipped = Value::Null;
    match (&cli.skip_nginx, &cli.nginx_run) {
        (Some(reason), _) => {
            println!("SKIP nginx: {reason}");
            skipped = json!(reason);
        }
        (None, Some(run)) => servers.push(Server {
            name: "nginx",
            program: run.clone(),
            args: Vec::new(),
            launch: Launch::Nginx,
        }),
        (None, None) => {
            println!("SKIP nginx: no --nginx-run given");
            skipped = json!("no --nginx-run given");
        }
    }
    // The engine's rows: `peer_floodgate` with these arguments.
    #[rustfmt::skip]
    const FLOODGATE: &[(&str, &[&str])] = &[
        ("floodgate_handler", &["--mode", "handler"]),
        ("floodgate_off", &["--mode", "handler", "--moderation", "off"]),
        ("floodgate_adaptive256", &["--mode", "handler", "--moderation", "256"]),
        ("floodgate_nap", &["--mode", "handler", "--moderation", "fixed:1:50"]),
        ("floodgate_epoll", &["--mode", "handler", "--backend", "epoll"]),
        ("floodgate_epoll_off", &["--mode", "handler", "--backend", "epoll", "--moderation", "off"]),
        ("floodgate_accept", &["--mode", "accept"]),
        ("floodgate_accept_reply", &["--mode", "accept-reply"]),
        ("floodgate_accept_many", &["--mode", "accept-many"]),
        ("floodgate_driven", &["--mode", "driven"]),
        ("floodgate_driven_std", &["--mode", "driven-std"]),
        ("floodgate_driven_accept", &["--mode", "driven-accept"]),
        ("floodgate_driven_accept_ring", &["--mode", "driven-accept-ring"]),
        ("floodgate_tokio", &["--mode", "tokio"]),
        ("floodgate_tokio_driven", &["--mode", "tokio-driven"]),
        ("floodgate_tokio_driven_ring", &["--mode", "tokio-driven-ring"]),
        ("floodgate_trivial", &["--mode", "handler", "--condition", "trivial"]),
        ("floodgate_coalesce", &["--mode", "handler", "--coalesce"]),
        ("floodgate_at_once", &["--mode", "handler", "--replies-at-once"]),
        ("floodgate_limits", &["--mode", "handler", "--max-connections", "100000", "--accept-budget", "64"]),
    ];
    for (name, args) in FLOODGATE {
        servers.push(Server::peer(b, name, "peer_floodgate", args));
    }
    if let Some(dir) = &cli.baseline_dir {
        servers.push(Server::peer(
            dir,
            "baseline_handler",
            "peer_floodgate",
            &["--mode", "handler"],
        ));
        servers.push(Server::peer(
            dir,
            "baseline_epoll",
            "peer_floodgate",
            &["--mode", "handler", "--backend", "epoll"],
        ));
    }
    if let Some(only) = &cli.servers {
        servers.retain(|s| only.iter().any(|o| o == s.name));
    }
    let scenarios: Vec<&Scenario> = SCENARIOS
        .iter()
        .filter(|s| match &cli.scenarios {
            Some(only) => only.iter().any(|n| n == s.name),
            None => true,
        })
        .collect();

    let machine = json!({
        "date": shell("date -u +%Y-%m-%dT%H:%M:%SZ"),
        "nproc": shell("nproc"),
        "uname_r": shell("uname -r"),
        "somaxconn": shell("cat /proc/sys/net/core/somaxconn"),
        "uptime_before": shell("uptime"),
    });
    println!(
        "machine: nproc {}  kernel {}  somaxconn {}",
        machine["nproc"], machine["uname_r"], machine["somaxconn"]
    );
    println!("load before: {}", machine["uptime_before"]);
    println!(
        "servers pinned to core {SERVER_CORE}, flood pinned to core {CLIENT_CORE}; client and server share the 2 cores"
    );
    println!(
        "{} round(s) x {} scenario(s) x {} server(s), {} s measured + {} s warm-up each",
        cli.rounds,
        scenarios.len(),
        servers.len(),
        cli.seconds,
        cli.warmup
    );

    let started = Instant::now();
    let mut runs: BTreeMap<(&'static str, &'static str), Vec<Figures>> = BTreeMap::new();
    let mut records = Vec::new();
    for round in 1..=cli.rounds {
        for scenario in &scenarios {
            for server in &servers {
                let r = run_one(&cli, server, scenario);
                match &r {
                    Ok(f) => {
                        eprintln!(
                            "round {round} {:<9} {:<18} {:>8.0} conn/s  server {:>6.2} µs/conn  core {:>6.2} µs/conn",
                            scenario.name, server.name, f.conn_per_s, f.server_us, f.core_us
                        );
                        runs.entry((scenario.name, server.name))
                            .or_default()
                            .push(f.clone());
                        records.push(json!({"round": round, "scenario": scenario.name,
                                            "server": server.name, "figures": f.to_json()}));
                    }
                    Err(e) => {
                        eprintln!(
                            "round {round} {} {}: FAILED: {e}",
                            scenario.name, server.name
                        );
                        records.push(json!({"round": round, "scenario": scenario.name,
                                            "server": server.name, "error": e}));
                    }
                }
            }
        }
    }
    let uptime_after = shell("uptime");

    let table: Table = runs.iter().map(|(k, v)| (*k, medians(v))).collect();
    let mut med_json = Vec::new();
    for scenario in &scenarios {
        let what = match scenario.name {
            "saturated" => "saturated: server capped at 2 ms per 10 ms (cgroup), C=64 (latency distorted by throttling)",
            "c64" => "normal: closed loop C=64, uncapped",
            "c256" => "normal: closed loop C=256, uncapped",
            "c4" => "light: closed loop C=4, uncapped",
            _ => "open loop: 20,000 conn/s intended, uncapped",
        };
        println!("\n### {} — {what}\n", scenario.name);
        println!("| server | conn/s | p50 µs | p99 µs | server CPU µs/conn | core 0 busy µs/conn | vol. cs/conn | errors |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        for server in &servers {
            if let Some(f) = get(&table, scenario.name, server.name) {
                println!(
                    "| {} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.3} | {:.0} |",
                    server.name,
                    f.conn_per_s,
                    f.p50_us,
                    f.p99_us,
                    f.server_us,
                    f.core_us,
                    f.vcsw,
                    f.errors
                );
                med_json.push(json!({"scenario": scenario.name, "server": server.name,
                                     "median": f.to_json()}));
            } else {
                println!("| {} | failed | | | | | | |", server.name);
            }
        }
    }
    let goal_json = goals(&table);
    println!("\nload after: {uptime_after}");
    println!("wall time {:.0} s", started.elapsed().as_secs_f64());

    let doc = json!({
        "machine": machine,
        "uptime_after": uptime_after,
        "rounds": cli.rounds,
        "seconds": cli.seconds,
        "warmup": cli.warmup,
        "server_core": SERVER_CORE,
        "client_core": CLIENT_CORE,
        "nginx_skipped": skipped,
        "runs": records,
        "medians": med_json,
        "goals": goal_json,
    });
    let text = match serde_json::to_string_pretty(&doc) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("compare: JSON: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(dir) = cli.out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = std::fs::write(&cli.out, text) {
        eprintln!("compare: cannot write {}: {e}", cli.out.display());
        return ExitCode::FAILURE;
    }
    println!("JSON written to {}", cli.out.display());
    ExitCode::SUCCESS
}
