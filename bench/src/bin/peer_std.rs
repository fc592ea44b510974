//! Benchmark peer: blocking `std::net::TcpListener` loop on one thread.
//!
//! For each connection: accept, `write_all(b"x")`, drop (close). Prints `LISTENING <addr>` when
//! ready; runs until killed or `--max-seconds`.

use std::io::{ErrorKind, Write};

use clap::Parser;
use floodgate_bench::peer::{self, PeerArgs, REPLY};

const NAME: &str = "peer_std";

/// One-thread blocking accept loop: accept, write one byte, close.
#[derive(Parser, Debug)]
#[command(name = NAME, version, about)]
struct Cli {
    #[command(flatten)]
    peer: PeerArgs,
}

fn main() {
    let cli = Cli::parse();
    let listener = peer::start(NAME, &cli.peer);
    loop {
        match listener.accept() {
            Ok((mut stream, _)) => {
                // The client may already have gone (RST); that is its business.
                let _ = stream.write_all(REPLY);
            }
            Err(e) if is_transient(e.kind()) => {}
            Err(e) => peer::fatal(NAME, format_args!("accept failed: {e}")),
        }
    }
}

/// Accept errors that concern one connection only and leave the listener usable.
fn is_transient(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::Interrupted
    )
}
