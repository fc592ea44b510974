//! HTTP peer: one axum app (`GET /` answers `ok`), served on tokio's own `TcpListener` or on
//! Floodgate (`floodgate::tokio::TcpListener`, one shard), both on a tokio multi-thread runtime,
//! or on one driven shard (`floodgate::tokio::DrivenListener`) on a `current_thread` runtime
//! (no engine thread), for `bench/http.sh` (a new connection per request).
//!
//! `--engine tokio | floodgate | floodgate-driven`; the rest as every peer ([`PeerArgs`]: `--pin` pins the process
//! before the runtime starts, so every thread shares that core). Prints `LISTENING <addr>`.

use clap::{Parser, ValueEnum};
use floodgate_bench::peer::{self, PeerArgs};

const NAME: &str = "http_axum";

/// Which listener axum serves on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Engine {
    /// tokio::net::TcpListener.
    Tokio,
    /// floodgate::tokio::TcpListener (one shard, accepting non-blocking).
    Floodgate,
    /// floodgate::tokio::DrivenListener: one driven shard on a current_thread runtime.
    FloodgateDriven,
}

/// axum `GET /` on tokio's listener or on Floodgate.
#[derive(Parser, Debug)]
#[command(name = NAME, version, about)]
struct Cli {
    #[command(flatten)]
    peer: PeerArgs,

    /// The listener.
    #[arg(long, value_enum)]
    engine: Engine,
}

fn main() {
    let cli = Cli::parse();
    let args = cli.peer.clone();
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok\n" }));
    let std_listener = match cli.engine {
        Engine::Tokio => Some(peer::start(NAME, &args)),
        Engine::Floodgate | Engine::FloodgateDriven => {
            if let Err(msg) = peer::check_loopback(&args.listen) {
                peer::fatal(NAME, msg);
            }
            if let Some(core) = args.pin {
                if let Err(msg) = peer::pin_current_thread(core) {
                    peer::fatal(NAME, msg);
                }
            }
            None
        }
    };
    if cli.engine == Engine::FloodgateDriven {
        serve_driven(&args, app);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => peer::fatal(NAME, format_args!("cannot build the tokio runtime: {e}")),
    };
    let result = runtime.block_on(async move {
        match std_listener {
            Some(l) => {
                l.set_nonblocking(true)?;
                axum::serve(tokio::net::TcpListener::from_std(l)?, app).await
            }
            None => {
                let backlog = usize::try_from(args.backlog).unwrap_or(1).max(1);
                let builder = floodgate::Listener::builder(args.listen)
                    .shards(1)
                    .pin(false)
                    .backlog(backlog);
                let listener = floodgate::tokio::TcpListener::from_builder(builder)?;
                if let Err(msg) = peer::exit_after(args.max_seconds) {
                    peer::fatal(NAME, msg);
                }
                peer::announce(NAME, listener.local_addr());
                axum::serve(listener, app).await
            }
        }
    });
    if let Err(e) = result {
        peer::fatal(NAME, format_args!("serve failed: {e}"));
    }
}

/// axum on one driven shard, on a current_thread runtime on this (pinned) thread.
fn serve_driven(args: &PeerArgs, app: axum::Router) -> ! {
    let backlog = usize::try_from(args.backlog).unwrap_or(1).max(1);
    let built = floodgate::Listener::builder(args.listen)
        .shards(1)
        .pin(false)
        .backlog(backlog)
        .nonblocking(true)
        .build_driven();
    let (listener, mut shards) = match built {
        Ok(l) => l,
        Err(e) => peer::fatal(
            NAME,
            format_args!("--listen {}: cannot start the listener: {e}", args.listen),
        ),
    };
    let Some(shard) = shards.pop() else {
        peer::fatal(NAME, "no shard")
    };
    if let Err(msg) = peer::exit_after(args.max_seconds) {
        peer::fatal(NAME, msg);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => peer::fatal(NAME, format_args!("cannot build the tokio runtime: {e}")),
    };
    peer::announce(NAME, listener.local_addr());
    let result = runtime.block_on(async move {
        let driven = floodgate::tokio::DrivenListener::new(shard)?;
        axum::serve(driven, app).await
    });
    match result {
        Ok(()) => peer::fatal(NAME, "serve ended"),
        Err(e) => peer::fatal(NAME, format_args!("serve failed: {e}")),
    }
}
