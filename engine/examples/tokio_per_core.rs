//! Thread per core with tokio: one `current_thread` runtime per driven
//! shard, each on its own pinned thread (feature `tokio`).
//!
//! ```text
//! cargo run --release --example tokio_per_core --features tokio -- [--port 8080] [--seconds 10]
//! curl http://127.0.0.1:8080/
//! ```
//!
//! The listener is built with `build_driven()`: no engine thread. Each
//! thread pins itself to core `k`, starts a `current_thread` runtime and
//! wraps shard `k` in `floodgate::tokio::DrivenListener`: the shard runs on
//! that runtime's thread (CPU steering sends it the connections that
//! arrive on core `k`), and every connection is served by a task on the
//! same thread, with no hop between threads. Each answers a one-line HTTP
//! response and closes; after `--seconds` the listener shuts down and each
//! thread prints what it served.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use floodgate::tokio::DrivenListener;
use floodgate::Listener;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (mut port, mut seconds) = (8080u16, 10u64);
    while let Some(a) = args.next() {
        let v = args.next();
        match (a.as_str(), v.as_deref().map(str::parse::<u64>)) {
            ("--port", Some(Ok(p))) if p <= u64::from(u16::MAX) => port = p as u16,
            ("--seconds", Some(Ok(s))) if s > 0 => seconds = s,
            _ => {
                eprintln!("usage: tokio_per_core [--port N] [--seconds N (> 0)]");
                return ExitCode::from(2);
            }
        }
    }
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let n = cores.len().max(1);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let (listener, shards) = match Listener::builder(addr)
        .shards(n)
        .nonblocking(true)
        .build_driven()
    {
        Ok(l) => l,
        Err(e) => {
            eprintln!("tokio_per_core: cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "serving on http://{} with {n} shards, a current_thread runtime each ({})",
        listener.local_addr(),
        listener.backend()
    );
    let threads: Vec<_> = shards
        .into_iter()
        .map(|shard| {
            let core = cores.get(shard.index()).copied();
            std::thread::spawn(move || -> std::io::Result<(usize, u64)> {
                if let Some(c) = core {
                    core_affinity::set_for_current(c);
                }
                let index = shard.index();
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async move {
                    let mut listener = DrivenListener::new(shard)?;
                    let mut served = 0u64;
                    loop {
                        let (mut stream, _meta) = match listener.accept().await {
                            Ok(got) => got,
                            // Shut down: the shard has finished.
                            Err(e) if e.kind() == std::io::ErrorKind::NotConnected => break,
                            Err(e) => {
                                eprintln!("shard {index}: {e}");
                                continue;
                            }
                        };
                        served += 1;
                        // A task per connection, on this same thread.
                        tokio::spawn(async move {
                            let mut buf = [0u8; 1024];
                            let _ = stream.read(&mut buf).await;
                            let _ = stream.write_all(RESPONSE).await;
                        });
                    }
                    Ok((index, served))
                })
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(seconds));
    listener.shutdown();
    for t in threads {
        match t.join() {
            Ok(Ok((index, served))) => println!("shard {index}: served {served}"),
            Ok(Err(e)) => eprintln!("a shard thread failed: {e}"),
            Err(_) => eprintln!("a shard thread panicked"),
        }
    }
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
