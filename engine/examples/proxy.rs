//! A small L4 proxy on Floodgate: the product's used-by case in miniature.
//!
//! ```text
//! cargo run --release -p floodgate --example proxy -- \
//!     --listen 127.0.0.1:8000 --upstream 127.0.0.1:9000 [--deny 127.0.0.9/32] \
//!     [--max-seconds 60] [--buffer 65536] [--shards N] \
//!     [--strip-proxy-header] [--idle-seconds 600] [--max-relays N] [--relay-memory BYTES]
//! ```
//!
//! Every connection to `--listen` goes through a condition: its source
//! address, or the original client's address when its first bytes are a
//! PROXY header (v1 or v2), is checked against the `--deny` CIDR list;
//! denied connections are reset. Admitted ones are relayed to `--upstream`
//! on the shard that accepted them ([`floodgate::ShardContext::relay`]):
//! dialled with io_uring CONNECT, bytes copied both ways on the shard's
//! ring, half-closes forwarded, resets propagated. Once a second it prints
//! the relay counters; after `--max-seconds` it shuts down and prints them
//! one last time. With `--strip-proxy-header`, a client's PROXY header is
//! consumed rather than passed to the upstream. A relay idle (no byte either
//! way) for `--idle-seconds` is torn down (0: never); `--max-relays` and
//! `--relay-memory` cap each shard's relays and their buffer memory (a
//! client beyond the cap is reset). Relays that end other than cleanly are
//! logged from their outcome ([`floodgate::RelayOutcome`]), at most
//! `LOG_LIMIT` lines a run.
//!
//! Loopback only: both addresses must be loopback addresses.

use std::error::Error;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use floodgate::cidr::CidrList;
use floodgate::conditions::{Chain, CidrFilter, ProxyProtocol, Refusal};
use floodgate::{Listener, RejectHow, RelayEnd, RelayOptions};

/// Most outcome lines logged in a run.
const LOG_LIMIT: u64 = 100;

struct Args {
    listen: SocketAddr,
    upstream: SocketAddr,
    deny: CidrList,
    max_seconds: u64,
    buffer: usize,
    shards: Option<usize>,
    strip: bool,
    idle: Duration,
    max_relays: Option<usize>,
    relay_memory: Option<usize>,
}

const USAGE: &str = "usage: proxy --listen ADDR --upstream ADDR [--deny CIDR[,CIDR…]]… \
[--max-seconds N (default 60)] [--buffer BYTES (default 65536)] [--shards N] \
[--strip-proxy-header] [--idle-seconds N (default 600, 0: none)] \
[--max-relays N (per shard)] [--relay-memory BYTES (per shard)]";

fn parse_args() -> Result<Args, String> {
    let mut listen = None;
    let mut upstream = None;
    let mut deny = CidrList::new();
    let mut max_seconds = 60;
    let mut buffer = floodgate::DEFAULT_RELAY_BUFFER;
    let mut shards = None;
    let mut strip = false;
    let mut idle = floodgate::DEFAULT_RELAY_IDLE_TIMEOUT;
    let mut max_relays = None;
    let mut relay_memory = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            return Err(USAGE.to_owned());
        }
        if flag == "--strip-proxy-header" {
            strip = true;
            continue;
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--listen" => listen = Some(value.parse::<SocketAddr>().map_err(|e| bad(&e))?),
            "--upstream" => upstream = Some(value.parse::<SocketAddr>().map_err(|e| bad(&e))?),
            "--deny" => {
                let list: CidrList = value.parse().map_err(|e| bad(&e))?;
                for c in list.iter() {
                    deny.push(*c);
                }
            }
            "--max-seconds" => max_seconds = value.parse().map_err(|e| bad(&e))?,
            "--buffer" => buffer = value.parse().map_err(|e| bad(&e))?,
            "--shards" => shards = Some(value.parse().map_err(|e| bad(&e))?),
            "--idle-seconds" => idle = Duration::from_secs(value.parse().map_err(|e| bad(&e))?),
            "--max-relays" => max_relays = Some(value.parse().map_err(|e| bad(&e))?),
            "--relay-memory" => relay_memory = Some(value.parse().map_err(|e| bad(&e))?),
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    let listen = listen.ok_or_else(|| format!("--listen is required\n{USAGE}"))?;
    let upstream = upstream.ok_or_else(|| format!("--upstream is required\n{USAGE}"))?;
    for (name, addr) in [("--listen", listen), ("--upstream", upstream)] {
        if !addr.ip().is_loopback() {
            return Err(format!(
                "{name} {addr}: this example runs on loopback only (127.0.0.0/8 or ::1)"
            ));
        }
    }
    Ok(Args {
        listen,
        upstream,
        deny,
        max_seconds,
        buffer,
        shards,
        strip,
        idle,
        max_relays,
        relay_memory,
    })
}

/// The admission decision: deny by the original client's address.
/// Denied by its transport address (decided before any byte arrives), or
/// by the original address of a PROXY header (optional: a plain request is
/// told apart by its first bytes).
fn condition(deny: CidrList) -> Chain {
    let by_addr = CidrFilter::new()
        .deny(deny.clone())
        .refuse(Refusal::new(RejectHow::Reset));
    let by_header = ProxyProtocol::wrap(by_addr.clone()).optional(true);
    Chain::new(by_addr).then(by_header)
}

fn run(args: Args) -> Result<(), Box<dyn Error>> {
    let upstream = args.upstream;
    let opts = RelayOptions::new()
        .with_buffer_size(args.buffer)
        .with_strip_proxy_header(args.strip)
        .with_idle_timeout(args.idle);
    let deny = args.deny.clone();
    let mut builder = Listener::builder(args.listen);
    if let Some(n) = args.shards {
        builder = builder.shards(n);
    }
    if let Some(n) = args.max_relays {
        builder = builder.max_relays_per_shard(n);
    }
    if let Some(n) = args.relay_memory {
        builder = builder.relay_memory_per_shard(n);
    }
    let logged = Arc::new(AtomicU64::new(0));
    if !deny.is_empty() {
        builder = builder.condition(condition(deny));
    }
    let listener = builder
        .handler(move |conn, ctx| {
            let peer = conn.peer_addr().ok();
            let logged = logged.clone();
            // On error the connection is already reset and the outcome
            // reported; the failure shows in the listener's counters too.
            let _ = ctx.relay_with(conn, upstream, opts, move |o| {
                // Runs on the shard thread: keep it short.
                if o.end != RelayEnd::Completed
                    && logged.fetch_add(1, Ordering::Relaxed) < LOG_LIMIT
                {
                    println!(
                        "relay {peer:?}: {:?}, first {:?}, {} B up, {} B down, {:?}",
                        o.end, o.first, o.bytes_to_upstream, o.bytes_to_client, o.duration
                    );
                }
            });
        })
        .build()?;
    println!(
        "proxy {} -> {} on {} shard(s), deny [{}], for {} s",
        listener.local_addr(),
        upstream,
        listener.shards(),
        args.deny,
        args.max_seconds
    );
    let end = Instant::now() + Duration::from_secs(args.max_seconds);
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        std::thread::sleep((end - now).min(Duration::from_secs(1)));
        report(&listener, "");
    }
    listener.shutdown();
    report(&listener, " (final)");
    Ok(())
}

fn report(listener: &Listener, what: &str) {
    let t = listener.stats().total();
    let r = t.relays;
    println!(
        "accepted {} rejected {} | relays active {} completed {} failed {} \
(client rst {} upstream rst {} refused {} timeout {} other {}) idle {} shutdown {} \
cap-refused {} | bytes up {} down {}{what}",
        t.accepted,
        t.rejected.total(),
        r.active,
        r.completed,
        r.failed,
        r.client_reset,
        r.upstream_reset,
        r.upstream_refused,
        r.upstream_timeout,
        r.errors,
        r.idle_timeout,
        r.closed_at_shutdown,
        r.refused_cap,
        r.bytes_to_upstream,
        r.bytes_to_client
    );
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("proxy: {e}");
            ExitCode::FAILURE
        }
    }
}
