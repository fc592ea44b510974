//! TLS routed by SNI, relayed on the shard: the ready-made [`Sni`] condition
//! with the default settings (no peek, no wait), each known host name
//! routed to its upstream, the chosen address handed to the handler as the
//! verdict's value, and the connection relayed there on the shard's ring.
//! The TLS handshake itself runs between the client and the upstream.
//!
//! ```text
//! cargo run --release -p floodgate --example sni_proxy -- \
//!     --listen 127.0.0.1:8443 --route example.test=127.0.0.1:9443 [--route NAME=ADDR ...] \
//!     [--max-seconds 60] [--peek BYTES,MS]
//! ```
//!
//! Unknown names and non-TLS bytes are reset. It prints its address, then
//! serves until `--max-seconds` pass or standard input closes.

use std::collections::HashMap;
use std::error::Error;
use std::io::Read;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use floodgate::conditions::Sni;
use floodgate::{Listener, RelayOptions, Value, Verdict};

type Args = (
    SocketAddr,
    HashMap<String, SocketAddr>,
    u64,
    Option<(usize, u64)>,
);

fn parse() -> Result<Args, String> {
    let mut listen = "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?;
    let mut routes = HashMap::new();
    let mut max_seconds = 60;
    let mut peek = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => listen = value.parse().map_err(|e| format!("--listen: {e}"))?,
            "--route" => {
                let (name, addr) = value
                    .split_once('=')
                    .ok_or("--route: NAME=ADDR".to_string())?;
                let addr: SocketAddr = addr.parse().map_err(|e| format!("--route: {e}"))?;
                routes.insert(name.to_string(), addr);
            }
            "--max-seconds" => {
                max_seconds = value.parse().map_err(|e| format!("--max-seconds: {e}"))?
            }
            "--peek" => {
                let (n, ms) = value
                    .split_once(',')
                    .ok_or("--peek: BYTES,MS".to_string())?;
                let n = n.parse().map_err(|e| format!("--peek: {e}"))?;
                let ms = ms.parse().map_err(|e| format!("--peek: {e}"))?;
                peek = Some((n, ms));
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if routes.is_empty() {
        return Err("at least one --route NAME=ADDR".into());
    }
    Ok((listen, routes, max_seconds, peek))
}

fn run() -> Result<(), Box<dyn Error>> {
    let (listen, routes, max_seconds, peek) = parse()?;
    let routes = Arc::new(routes);
    let mut builder = Listener::builder(listen);
    if let Some((n, ms)) = peek {
        // The fixed-prefix way (asked once n bytes or ms have passed), to
        // compare with the default.
        builder = builder.peek(n, Duration::from_millis(ms));
    }
    let listener = builder
        .condition(Sni::new(move |_req, name| {
            match name.and_then(|n| routes.get(n)) {
                Some(up) => Verdict::accept_with(Value::new(*up)),
                None => Verdict::reset(),
            }
        }))
        .handler(|conn, ctx| {
            if let Some(up) = conn.value::<SocketAddr>().copied() {
                let _ = ctx.relay(conn, up, RelayOptions::new());
            }
        })
        .build()?;
    println!("sni_proxy {}", listener.local_addr());
    // Until stdin closes or the time is up, whichever comes first.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(Duration::from_secs(max_seconds));
    listener.shutdown();
    let t = listener.stats().total();
    println!(
        "accepted {} delivered {} rejected {} withdrawn {} relays {}",
        t.accepted,
        t.delivered,
        t.rejected.total(),
        t.withdrawn.total(),
        t.relays.started
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sni_proxy: {e}");
            ExitCode::FAILURE
        }
    }
}
