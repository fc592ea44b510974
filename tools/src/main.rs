//! `flood`: Floodgate's load tool, built on the engine's connect side.
//!
//! - `flood run --target ADDR`: closed-loop (`--concurrency`) or open-loop
//!   (`--rate`) connection flood, executed on the connector's shards;
//!   prints a table (or `--json`) of outcomes, conn/s, latency percentiles
//!   and CPU per connection.
//! - `flood serve --listen ADDR`: a Floodgate server for load tests
//!   (banner, close), with periodic stats and final stats as JSON, and
//!   with `--metrics ADDR` its stats as Prometheus text on `GET /metrics`.
//! - `flood demo`: both in one process on loopback; checks conservation.
//!
//! Only loopback addresses are accepted anywhere.
//!
//! Exit status: 0 on success; 1 when flood could not do its work (or, for
//! serve and demo, the accounting did not hold); 2 for a bad command line;
//! 3 when `flood run` ended without one successful connection
//! ([`run::EXIT_NO_SUCCESS`]).

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod args;
mod demo;
mod metrics;
mod report;
mod run;
mod serve;

/// Floodgate's client flood tool (loopback only).
#[derive(Parser, Debug)]
#[command(name = "flood", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Flood a server with connections and report what happened; exits 3
    /// when no connection succeeded.
    Run(run::RunArgs),
    /// Run a Floodgate server that writes a banner and closes.
    Serve(serve::ServeArgs),
    /// Start the engine and flood it, in one process; check conservation.
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Run(a) => run::main(a),
        Cmd::Serve(a) => serve::main(a),
        Cmd::Demo(a) => demo::main(a),
    };
    match result {
        Ok(code) => code,
        Err(msg) => {
            emit_err(&format!("flood: {msg}"));
            ExitCode::FAILURE
        }
    }
}

/// Prints `text` and a newline on stdout. A reader that went away (a
/// closed pipe) is not flood's failure: the line is dropped, with no panic.
pub fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}").and_then(|()| out.flush());
}

/// As [`emit`], on stderr (which `eprintln!` would panic on, were it closed).
pub fn emit_err(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{text}").and_then(|()| err.flush());
}
