//! Keep-alive ping-pong through a relay: the load that showed the relay's
//! client-side socket without TCP_NODELAY (responses written in two parts
//! stall on Nagle's algorithm against the client's delayed ACK).
//!
//! ```text
//! cargo run --release -p floodgate --example relay_pingpong -- \
//!     [--conns 8] [--rounds 200000] [--seconds 10] [--hand-nodelay]
//! ```
//!
//! Everything runs in this process on loopback: an upstream that answers
//! each 64-byte request with a 100-byte head and a 200-byte body in two
//! writes (as an HTTP server writes its head, then its body), a one-shard
//! Floodgate listener relaying to it, and `--conns` client threads, each
//! with one connection doing request → whole response rounds. It stops at
//! `--rounds` rounds in all or after `--seconds`, whichever comes first,
//! and prints requests per second and the latency percentiles of a round.
//! `--hand-nodelay` sets TCP_NODELAY on the relay's client-side socket in
//! the handler, before the relay takes it (the users' workaround).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use floodgate::{Listener, RelayOptions};

const REQUEST: usize = 64;
const HEAD: usize = 100;
const BODY: usize = 200;

struct Args {
    conns: usize,
    rounds: u64,
    seconds: u64,
    hand_nodelay: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        conns: 8,
        rounds: 200_000,
        seconds: 10,
        hand_nodelay: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--hand-nodelay" {
            a.hand_nodelay = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--conns" => a.conns = value.parse().map_err(|e| bad(&e))?,
            "--rounds" => a.rounds = value.parse().map_err(|e| bad(&e))?,
            "--seconds" => a.seconds = value.parse().map_err(|e| bad(&e))?,
            _ => {
                return Err(format!(
                    "unknown flag {flag}\nusage: relay_pingpong [--conns N] [--rounds N] \
                     [--seconds N] [--hand-nodelay]"
                ))
            }
        }
    }
    if a.conns == 0 || a.conns > 256 || a.seconds == 0 || a.seconds > 600 {
        return Err("--conns must be 1..=256 and --seconds 1..=600".to_owned());
    }
    Ok(a)
}

/// The upstream: per connection, read a request, write head then body.
fn upstream(stop: Arc<AtomicBool>) -> std::io::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        for s in l.incoming() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let (head, body) = ([b'h'; HEAD], [b'b'; BODY]);
                let mut req = [0u8; REQUEST];
                while s.read_exact(&mut req).is_ok() {
                    if s.write_all(&head).is_err() || s.write_all(&body).is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(addr)
}

fn run(a: Args) -> Result<(), Box<dyn std::error::Error>> {
    let stop = Arc::new(AtomicBool::new(false));
    let up = upstream(stop.clone())?;
    let hand = a.hand_nodelay;
    let listener = Listener::builder("127.0.0.1:0".parse()?)
        .shards(1)
        .pin(false)
        .handler(move |conn, ctx| {
            if hand {
                let _ = conn.as_std().set_nodelay(true);
            }
            let _ = ctx.relay(conn, up, RelayOptions::default());
        })
        .build()?;
    let addr = listener.local_addr();
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(a.seconds);
    let started = Instant::now();
    let threads: Vec<_> = (0..a.conns)
        .map(|_| {
            let (done, rounds) = (done.clone(), a.rounds);
            std::thread::spawn(move || -> std::io::Result<Vec<u32>> {
                let mut c = TcpStream::connect(addr)?;
                c.set_nodelay(true)?;
                let req = [b'q'; REQUEST];
                let mut resp = [0u8; HEAD + BODY];
                let mut lat = Vec::new();
                while done.fetch_add(1, Ordering::Relaxed) < rounds && Instant::now() < deadline {
                    let t = Instant::now();
                    c.write_all(&req)?;
                    c.read_exact(&mut resp)?;
                    lat.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                }
                c.shutdown(Shutdown::Write)?;
                Ok(lat)
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in threads {
        lat.extend(t.join().map_err(|_| "a client thread panicked")??);
    }
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let _ = TcpStream::connect(up);
    listener.shutdown();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "conns {} hand-nodelay {}: {} rounds in {:.2} s = {:.0} req/s; latency µs p50 {} p99 {} p99.9 {} max {}",
        a.conns,
        hand,
        lat.len(),
        took.as_secs_f64(),
        lat.len() as f64 / took.as_secs_f64(),
        pct(0.50),
        pct(0.99),
        pct(0.999),
        lat.last().copied().unwrap_or(0),
    );
    Ok(())
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
            eprintln!("relay_pingpong: {e}");
            ExitCode::FAILURE
        }
    }
}
