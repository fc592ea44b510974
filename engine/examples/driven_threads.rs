//! Thread per core over driven shards: the application owns the threads.
//!
//! ```text
//! cargo run --release -p floodgate --example driven_threads -- [--seconds 10]
//! ```
//!
//! The listener is built with `build_driven()`: no engine thread starts.
//! The example starts one thread per core, pins it, and drives that core's
//! shard there (CPU steering sends each shard the connections that arrive
//! on its core): it waits on the shard's descriptor with poll(2), then
//! `drive()` hands it the admitted connections, which it answers with a
//! one-line HTTP response on the shard's own ring. It serves on
//! 127.0.0.1:8080 (try `curl http://127.0.0.1:8080/`) for `--seconds`, then
//! shuts down and prints each shard's counts.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use floodgate::{Error, Listener};

const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut seconds = 10u64;
    while let Some(a) = args.next() {
        match (a.as_str(), args.next().map(|v| v.parse::<u64>())) {
            ("--seconds", Some(Ok(v))) if v > 0 => seconds = v,
            _ => {
                eprintln!("usage: driven_threads [--seconds N (> 0)]");
                return ExitCode::from(2);
            }
        }
    }
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let n = cores.len().max(1);
    let (listener, shards) =
        match Listener::builder("127.0.0.1:8080".parse().expect("a loopback address"))
            .shards(n)
            .build_driven()
        {
            Ok(l) => l,
            Err(e) => {
                eprintln!("driven_threads: cannot listen on 127.0.0.1:8080: {e}");
                return ExitCode::FAILURE;
            }
        };
    println!(
        "serving on {} with {n} driven shards ({})",
        listener.local_addr(),
        listener.backend()
    );
    let until = Instant::now() + Duration::from_secs(seconds);
    let threads: Vec<_> = shards
        .into_iter()
        .map(|mut shard| {
            let core = cores.get(shard.index()).copied();
            std::thread::spawn(move || {
                if let Some(c) = core {
                    core_affinity::set_for_current(c);
                }
                let mut served = 0u64;
                while Instant::now() < until {
                    match shard.drive(|conn, ctx| {
                        // The client may have gone; the engine closes it anyway.
                        let _ = ctx.reply_and_close(conn, RESPONSE);
                    }) {
                        Ok(n) => served += n as u64,
                        Err(Error::Accept { shard, source }) => {
                            eprintln!("shard {shard}: accept error (it retries): {source}");
                        }
                        Err(e) => {
                            eprintln!("shard {}: {e}", shard.index());
                            break;
                        }
                    }
                    let left = until.saturating_duration_since(Instant::now());
                    if shard.wait(Some(left)).is_err() {
                        break;
                    }
                }
                (shard.index(), served)
            })
        })
        .collect();
    for t in threads {
        if let Ok((index, served)) = t.join() {
            println!("shard {index}: served {served}");
        }
    }
    listener.shutdown();
    let stats = listener.stats();
    println!(
        "accepted {} delivered {} closed at shutdown {} conserved {}",
        stats.total().accepted,
        stats.total().delivered,
        stats.total().closed_at_shutdown,
        stats.conserved()
    );
    ExitCode::SUCCESS
}
