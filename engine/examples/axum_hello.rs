//! An axum HTTP service on Floodgate: `axum::serve` over
//! `floodgate::tokio::TcpListener` (feature `axum`).
//!
//! ```text
//! cargo run --release --example axum_hello --features axum -- [--port 3000] [--seconds 0]
//! curl http://127.0.0.1:3000/
//! ```
//!
//! The engine's shards accept (io_uring, or epoll where io_uring is denied)
//! with SOCK_NONBLOCK in the accept itself; the runtime's tasks take the
//! connections from the shards' rings and axum serves them. It serves on
//! 127.0.0.1 until it is stopped (Ctrl-C), or for `--seconds` when given
//! (> 0): then it shuts down gracefully and prints the engine's counts.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use floodgate::Listener;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (mut port, mut seconds) = (3000u16, 0u64);
    while let Some(a) = args.next() {
        let v = args.next();
        match (a.as_str(), v.as_deref().map(str::parse::<u64>)) {
            ("--port", Some(Ok(p))) if p <= u64::from(u16::MAX) => port = p as u16,
            ("--seconds", Some(Ok(s))) => seconds = s,
            _ => {
                eprintln!("usage: axum_hello [--port N] [--seconds N (0: until stopped)]");
                return ExitCode::from(2);
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("axum_hello: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    runtime.block_on(async move {
        // The runtime's workers use every core: let the scheduler place the
        // shard threads too.
        let listener =
            match floodgate::tokio::TcpListener::from_builder(Listener::builder(addr).pin(false)) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("axum_hello: cannot listen on {addr}: {e}");
                    return ExitCode::FAILURE;
                }
            };
        let engine = listener.listener().clone();
        println!(
            "serving on http://{} with {} shards ({})",
            listener.local_addr(),
            engine.shards(),
            engine.backend()
        );
        let app = Router::new()
            .route("/", get(|| async { "hello from axum on floodgate\n" }))
            .route(
                "/stats",
                get({
                    let engine = engine.clone();
                    move || async move {
                        let t = engine.stats().total();
                        format!("accepted {} delivered {}\n", t.accepted, t.delivered)
                    }
                }),
            );
        let stop = async move {
            if seconds > 0 {
                tokio::time::sleep(Duration::from_secs(seconds)).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            eprintln!("axum_hello: {e}");
            return ExitCode::FAILURE;
        }
        engine.shutdown();
        let t = engine.stats().total();
        println!(
            "accepted {} delivered {} closed at shutdown {} conserved {}",
            t.accepted,
            t.delivered,
            t.closed_at_shutdown,
            engine.stats().conserved()
        );
        ExitCode::SUCCESS
    })
}
