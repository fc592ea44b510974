//! Starts a listener with one shard per core, connects to it on loopback
//! from as many client threads for a bounded number of connections, and
//! prints the counts.
//!
//! `cargo run --release -p floodgate --example loopback [CONNECTIONS]`

use std::io::Read;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Instant;

use floodgate::Listener;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let total: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(50_000);
    let listener = Arc::new(
        Listener::builder("127.0.0.1:0".parse()?)
            .handler(|conn, ctx| {
                // Reply one byte and close, on the shard's ring.
                let _ = ctx.reply_and_close(conn, b"x");
            })
            .build()?,
    );
    let addr = listener.local_addr();
    let threads = listener.shards() as u64;
    println!(
        "listening on {addr}: {threads} shard(s), backlog {:?}, ring setup {:?}",
        listener.backlog(),
        listener.ring_setup()
    );
    let started = Instant::now();
    let clients: Vec<_> = (0..threads)
        .map(|t| {
            std::thread::spawn(move || -> std::io::Result<u64> {
                let mut ok = 0;
                for _ in (t..total).step_by(threads as usize) {
                    let mut s = TcpStream::connect(addr)?;
                    let mut b = Vec::new();
                    s.read_to_end(&mut b)?;
                    // RST close: no TIME_WAIT left behind on the client side.
                    socket2::SockRef::from(&s).set_linger(Some(std::time::Duration::ZERO))?;
                    ok += u64::from(b == b"x");
                }
                Ok(ok)
            })
        })
        .collect();
    let mut ok = 0;
    for c in clients {
        ok += c.join().map_err(|_| "client thread panicked")??;
    }
    let elapsed = started.elapsed();
    listener.shutdown();
    let stats = listener.stats();
    for s in &stats.shards {
        println!(
            "shard {}: accepted {} delivered {} closed_at_shutdown {} pauses {} rearms {} multishot {}",
            s.shard, s.accepted, s.delivered, s.closed_at_shutdown, s.ring_full_pauses, s.rearms, s.multishot
        );
    }
    let t = stats.total();
    println!(
        "{ok}/{total} replies in {:.2} s: {:.0} conn/s (client and server share this machine's cores)",
        elapsed.as_secs_f64(),
        ok as f64 / elapsed.as_secs_f64()
    );
    println!(
        "conservation accepted == delivered + closed_at_shutdown + pending: {} == {} + {} + {} -> {}",
        t.accepted,
        t.delivered,
        t.closed_at_shutdown,
        t.pending,
        if stats.conserved() { "holds" } else { "BROKEN" }
    );
    if !stats.conserved() || ok != total {
        std::process::exit(1);
    }
    Ok(())
}
