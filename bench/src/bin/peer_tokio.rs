//! Benchmark peer: tokio `current_thread` runtime on one thread.
//!
//! Default: the accept loop writes `b"x"` inline (no task per connection):
//! `loop { let (mut s, _) = listener.accept().await?; let _ = s.write_all(b"x").await; }`.
//! With `--spawn`, each accepted connection is handed to its own task instead. With
//! `--multi-thread`, the same loop runs on a multi-thread runtime (its workers: one per core
//! the process may use).

use std::io::ErrorKind;

use clap::Parser;
use floodgate_bench::peer::{self, PeerArgs, REPLY};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

const NAME: &str = "peer_tokio";

/// One-thread tokio accept loop: accept, write one byte, close.
#[derive(Parser, Debug)]
#[command(name = NAME, version, about)]
struct Cli {
    #[command(flatten)]
    peer: PeerArgs,

    /// Spawn a task per connection instead of writing inline in the accept loop.
    #[arg(long)]
    spawn: bool,

    /// A multi-thread runtime instead of `current_thread` (the accept loop is one task on it).
    #[arg(long)]
    multi_thread: bool,
}

fn main() {
    let cli = Cli::parse();
    let std_listener = peer::start(NAME, &cli.peer);
    if let Err(e) = std_listener.set_nonblocking(true) {
        peer::fatal(
            NAME,
            format_args!("cannot make the listener nonblocking: {e}"),
        );
    }
    let mut builder = if cli.multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = match builder.enable_io().build() {
        Ok(rt) => rt,
        Err(e) => peer::fatal(NAME, format_args!("cannot build the tokio runtime: {e}")),
    };
    let serve = async move {
        let listener = TcpListener::from_std(std_listener)?;
        if cli.spawn {
            serve_spawn(listener).await
        } else {
            serve_inline(listener).await
        }
    };
    // On a multi-thread runtime the loop is a task (on a worker), as an application's is.
    let result = if cli.multi_thread {
        let task = runtime.spawn(serve);
        runtime
            .block_on(task)
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    } else {
        runtime.block_on(serve)
    };
    if let Err(e) = result {
        peer::fatal(NAME, format_args!("accept failed: {e}"));
    }
}

/// Accept errors that concern one connection only and leave the listener usable.
fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::Interrupted
    )
}

async fn serve_inline(listener: TcpListener) -> std::io::Result<()> {
    loop {
        let (mut s, _) = match listener.accept().await {
            Ok(pair) => pair,
            Err(e) if is_transient(&e) => continue,
            Err(e) => return Err(e),
        };
        let _ = s.write_all(REPLY).await;
    }
}

async fn serve_spawn(listener: TcpListener) -> std::io::Result<()> {
    loop {
        let (mut s, _) = match listener.accept().await {
            Ok(pair) => pair,
            Err(e) if is_transient(&e) => continue,
            Err(e) => return Err(e),
        };
        tokio::spawn(async move {
            let _ = s.write_all(REPLY).await;
        });
    }
}
