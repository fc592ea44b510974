//! Benchmark peer: the Floodgate engine with one shard.
//!
//! Same command line as the other peers ([`PeerArgs`]) plus:
//! - `--mode handler` (default): the engine's inline handler replies `x` and closes, on the
//!   shard's ring (`ShardContext::reply_and_close`: linked SEND with MSG_MORE + CLOSE);
//! - `--mode accept`: the main thread runs a blocking `Listener::accept()` loop: write `x`, drop;
//! - `--mode accept-reply`: the same loop answering with `Admitted::reply_and_close` (a send with
//!   MSG_MORE, then the close: the reply leaves with the FIN, as the handler's does);
//! - `--mode accept-many`: the same with `Listener::accept_many` (batches of up to 64), blocking in
//!   `accept()` only when nothing is pending;
//! - `--mode driven`: no engine thread: the main thread drives the shard (`build_driven`), waiting on
//!   its descriptor with poll(2); its handler replies with `reply_and_close` as the inline one does;
//! - `--mode driven-std`: the same, the application writing `x` itself and dropping the connection;
//! - `--mode driven-accept`: a blocking `DrivenShard::accept()` loop on the main thread (it waits
//!   in the shard's own ring): write `x`, drop;
//! - `--mode driven-accept-ring`: the same loop answering with `DrivenShard::reply_and_close` (the
//!   linked SEND+CLOSE on the shard's ring, submitted with the next `accept()`'s wait);
//! - `--mode tokio`: `floodgate::tokio::TcpListener` on a tokio multi-thread runtime: one task
//!   `loop { let (mut s, _) = listener.accept().await?; s.write_all(b"x").await; }`, as
//!   `peer_tokio --multi-thread` does with tokio's own listener;
//! - `--mode tokio-driven`: no engine thread: `floodgate::tokio::DrivenListener` on a
//!   `current_thread` runtime on the main thread, the same loop;
//! - `--mode tokio-driven-ring`: the same runtime and listener, `accept_admitted().await` and
//!   `DrivenListener::reply_and_close` (the reply on the shard's ring, no tokio stream);
//! - `--condition trivial`: adds an admission condition that returns `Verdict::accept()`;
//! - `--max-connections N`, `--accept-budget N`: the listener's limits (the shard then polls its
//!   listener and accepts with `accept4` instead of a multishot ACCEPT).
//!
//! The process pins its main thread to `--pin CORE` before the listener is built, and builds the
//! listener with `pin(false)`, so the shard thread inherits that single-core affinity: one shard
//! on the `--pin` core (the engine itself would pin shard 0 to core 0). Every thread is an
//! ordinary thread of this one process, so `CpuQuota::add_process_threads` caps all of them.

use std::io::Write;

use clap::{Parser, ValueEnum};
use floodgate::{Coalesce, ConnectRequest, Error, Listener, Moderation, Verdict};
use floodgate_bench::peer::{self, PeerArgs, REPLY};

const NAME: &str = "peer_floodgate";

/// How connections reach the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Inline handler on the shard thread: reply_and_close("x").
    Handler,
    /// Blocking accept() loop on the main thread: write "x", drop.
    Accept,
    /// Blocking accept() loop on the main thread: Admitted::reply_and_close("x").
    AcceptReply,
    /// accept_many() batches on the main thread: write "x", drop.
    AcceptMany,
    /// A driven shard on the main thread: reply_and_close("x") from its handler.
    Driven,
    /// A driven shard on the main thread: write "x", drop.
    DrivenStd,
    /// A blocking DrivenShard::accept() loop on the main thread: write "x", drop.
    DrivenAccept,
    /// A blocking DrivenShard::accept() loop: DrivenShard::reply_and_close("x") on the ring.
    DrivenAcceptRing,
    /// floodgate::tokio::TcpListener on a multi-thread runtime: write "x", drop.
    Tokio,
    /// floodgate::tokio::DrivenListener on a current_thread runtime: write "x", drop.
    TokioDriven,
    /// The same runtime and listener: accept_admitted(), reply_and_close("x") on the ring.
    TokioDrivenRing,
}

/// Which admission condition the listener runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Cond {
    /// No condition.
    None,
    /// A condition that admits everything (`Verdict::accept()`).
    Trivial,
}

/// Floodgate (one shard) accept loop: accept, write one byte, close.
#[derive(Parser, Debug)]
#[command(name = NAME, version, about)]
struct Cli {
    #[command(flatten)]
    peer: PeerArgs,

    /// Delivery path.
    #[arg(long, value_enum, default_value_t = Mode::Handler)]
    mode: Mode,

    /// Admission condition.
    #[arg(long, value_enum, default_value_t = Cond::None)]
    condition: Cond,

    /// The fixed coalescing rule instead of the default moderation
    /// (`Moderation::Fixed(Coalesce::default())`: pause 50 µs after a turn
    /// that accepted 8+).
    #[arg(long)]
    coalesce: bool,

    /// Wake-up moderation: `off`, `adaptive` (the default, 64 µs ceiling),
    /// a ceiling in µs for the adaptive controller, or
    /// `fixed:<threshold>:<µs>` (pause µs after a turn that accepted at
    /// least threshold connections).
    #[arg(long, default_value = "adaptive", value_parser = parse_moderation)]
    moderation: Moderation,

    /// Send the handler's reply at once instead of with the FIN
    /// (`ListenerBuilder::replies_at_once`).
    #[arg(long)]
    replies_at_once: bool,

    /// The engine's backend.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    backend: BackendArg,

    /// `ListenerBuilder::max_connections`.
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,

    /// `ListenerBuilder::accept_budget`.
    #[arg(long, value_name = "N")]
    accept_budget: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum BackendArg {
    Auto,
    IoUring,
    Epoll,
}

fn parse_moderation(s: &str) -> Result<Moderation, String> {
    match s {
        "off" => Ok(Moderation::Off),
        "adaptive" => Ok(Moderation::default()),
        fixed if fixed.starts_with("fixed:") => {
            let mut it = fixed["fixed:".len()..].split(':').map(str::parse::<u64>);
            match (it.next(), it.next(), it.next()) {
                (Some(Ok(threshold)), Some(Ok(us)), None) => Ok(Moderation::Fixed(Coalesce {
                    threshold: usize::try_from(threshold).unwrap_or(usize::MAX),
                    pause: std::time::Duration::from_micros(us),
                })),
                _ => Err(format!("{fixed}: expected fixed:<threshold>:<µs>")),
            }
        }
        us => us
            .parse::<u64>()
            .map(|us| Moderation::Adaptive {
                max_pause: std::time::Duration::from_micros(us),
            })
            .map_err(|_| format!("{us}: expected off, adaptive or a number of µs")),
    }
}

fn trivial(_req: &ConnectRequest<'_>) -> Verdict {
    Verdict::accept()
}

fn main() {
    let cli = Cli::parse();
    let args = &cli.peer;
    if let Err(msg) = peer::check_loopback(&args.listen) {
        peer::fatal(NAME, msg);
    }
    if let Some(core) = args.pin {
        if let Err(msg) = peer::pin_current_thread(core) {
            peer::fatal(NAME, msg);
        }
    }
    let backlog = usize::try_from(args.backlog).unwrap_or(1).max(1);
    let mut builder = Listener::builder(args.listen)
        .shards(1)
        .pin(false)
        .backlog(backlog)
        .moderation(if cli.coalesce {
            Moderation::Fixed(Coalesce::default())
        } else {
            cli.moderation
        })
        .replies_at_once(cli.replies_at_once)
        .backend(match cli.backend {
            BackendArg::Auto => floodgate::Backend::Auto,
            BackendArg::IoUring => floodgate::Backend::IoUring,
            BackendArg::Epoll => floodgate::Backend::Epoll,
        });
    if let Some(n) = cli.max_connections {
        builder = builder.max_connections(n);
    }
    if let Some(n) = cli.accept_budget {
        builder = builder.accept_budget(n);
    }
    if cli.condition == Cond::Trivial {
        builder = builder.condition(trivial);
    }
    if cli.mode == Mode::Handler {
        builder = builder.handler(|conn, ctx| {
            // The client may already have reset; the engine closes the socket either way.
            let _ = ctx.reply_and_close(conn, REPLY);
        });
    }
    if cli.mode == Mode::Tokio {
        tokio_loop(builder, args);
    }
    if matches!(
        cli.mode,
        Mode::Driven
            | Mode::DrivenStd
            | Mode::DrivenAccept
            | Mode::DrivenAcceptRing
            | Mode::TokioDriven
            | Mode::TokioDrivenRing
    ) {
        if cli.mode == Mode::TokioDriven {
            builder = builder.nonblocking(true);
        }
        let (listener, mut shards) = match builder.build_driven() {
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
        peer::announce(NAME, listener.local_addr());
        if matches!(cli.mode, Mode::DrivenAccept | Mode::DrivenAcceptRing) {
            driven_accept_loop(shard, cli.mode == Mode::DrivenAcceptRing);
        }
        if matches!(cli.mode, Mode::TokioDriven | Mode::TokioDrivenRing) {
            tokio_driven_loop(shard, cli.mode == Mode::TokioDrivenRing);
        }
        drive_loop(shard, cli.mode == Mode::Driven);
    }
    let listener = match builder.build() {
        Ok(l) => l,
        Err(e) => peer::fatal(
            NAME,
            format_args!("--listen {}: cannot start the listener: {e}", args.listen),
        ),
    };
    if let Err(msg) = peer::exit_after(args.max_seconds) {
        peer::fatal(NAME, msg);
    }
    peer::announce(NAME, listener.local_addr());
    match cli.mode {
        Mode::Handler => park_forever(),
        Mode::Accept => accept_loop(&listener, false),
        Mode::AcceptReply => accept_loop(&listener, true),
        Mode::AcceptMany => accept_many_loop(&listener),
        Mode::Driven
        | Mode::DrivenStd
        | Mode::DrivenAccept
        | Mode::DrivenAcceptRing
        | Mode::Tokio
        | Mode::TokioDriven
        | Mode::TokioDrivenRing => {
            unreachable!("handled above")
        }
    }
}

/// A blocking accept loop on the one driven shard, on this thread.
fn driven_accept_loop(mut shard: floodgate::DrivenShard, on_ring: bool) -> ! {
    loop {
        match shard.accept() {
            Ok(conn) if on_ring => {
                if let Err(e) = shard.reply_and_close(conn, REPLY) {
                    peer::fatal(NAME, format_args!("reply failed: {e}"));
                }
            }
            // The client may already have gone (RST); that is its business.
            Ok(mut conn) => {
                let _ = conn.write_all(REPLY);
            }
            Err(Error::Accept { shard, source }) => {
                eprintln!("{NAME}: shard {shard}: accept error (shard retries): {source}");
            }
            Err(e) => peer::fatal(NAME, format_args!("accept failed: {e}")),
        }
    }
}

/// Drives the one shard on this thread: drive, then wait on its descriptor.
fn drive_loop(mut shard: floodgate::DrivenShard, on_ring: bool) -> ! {
    loop {
        let driven = shard.drive(|mut conn, ctx| {
            if on_ring {
                let _ = ctx.reply_and_close(conn, REPLY);
            } else {
                // The client may already have gone (RST); that is its business.
                let _ = conn.write_all(REPLY);
            }
        });
        match driven {
            Ok(_) => {}
            Err(Error::Accept { shard, source }) => {
                eprintln!("{NAME}: shard {shard}: accept error (shard retries): {source}");
            }
            Err(e) => peer::fatal(NAME, format_args!("drive failed: {e}")),
        }
        if let Err(e) = shard.wait(None) {
            peer::fatal(NAME, format_args!("wait failed: {e}"));
        }
    }
}

fn accept_many_loop(listener: &Listener) -> ! {
    let mut conns = Vec::with_capacity(64);
    loop {
        match listener.accept_many(&mut conns, 64) {
            Ok(0) => match listener.accept() {
                Ok(c) => conns.push(c),
                Err(Error::Accept { shard, source }) => {
                    eprintln!("{NAME}: shard {shard}: accept error (shard retries): {source}");
                }
                Err(e) => peer::fatal(NAME, format_args!("accept failed: {e}")),
            },
            Ok(_) => {}
            Err(Error::Accept { shard, source }) => {
                eprintln!("{NAME}: shard {shard}: accept error (shard retries): {source}");
            }
            Err(e) => peer::fatal(NAME, format_args!("accept failed: {e}")),
        }
        for mut conn in conns.drain(..) {
            let _ = conn.write_all(REPLY);
        }
    }
}

/// The handler runs on the shard thread; the main thread only waits for the alarm or a signal.
fn park_forever() -> ! {
    loop {
        std::thread::park();
    }
}

fn accept_loop(listener: &Listener, reply_and_close: bool) -> ! {
    loop {
        match listener.accept() {
            // The client may already have gone (RST); that is its business.
            Ok(conn) if reply_and_close => {
                let _ = conn.reply_and_close(REPLY);
            }
            Ok(mut conn) => {
                // The client may already have gone (RST); that is its business.
                let _ = conn.write_all(REPLY);
            }
            // A shard's accept error is reported once; the shard keeps retrying.
            Err(Error::Accept { shard, source }) => {
                eprintln!("{NAME}: shard {shard}: accept error (shard retries): {source}");
            }
            Err(e) => peer::fatal(NAME, format_args!("accept failed: {e}")),
        }
    }
}

/// Transient per-connection errors an async accept loop skips; the shard retries its own.
fn skip(e: &std::io::Error) -> bool {
    let engine = e.get_ref().and_then(|i| i.downcast_ref::<Error>());
    matches!(engine, Some(Error::Accept { .. }))
        || matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
        )
}

/// floodgate::tokio::TcpListener on a multi-thread runtime, the accept loop one task.
fn tokio_loop(builder: floodgate::ListenerBuilder, args: &PeerArgs) -> ! {
    use tokio::io::AsyncWriteExt;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_io()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => peer::fatal(NAME, format_args!("cannot build the tokio runtime: {e}")),
    };
    let listen = args.listen;
    let max_seconds = args.max_seconds;
    let served = runtime.block_on(async move {
        let listener = match floodgate::tokio::TcpListener::from_builder(builder) {
            Ok(l) => l,
            Err(e) => peer::fatal(
                NAME,
                format_args!("--listen {listen}: cannot start the listener: {e}"),
            ),
        };
        if let Err(msg) = peer::exit_after(max_seconds) {
            peer::fatal(NAME, msg);
        }
        peer::announce(NAME, listener.local_addr());
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((mut s, _)) => {
                        let _ = s.write_all(REPLY).await;
                    }
                    Err(e) if skip(&e) => {}
                    Err(e) => return e,
                }
            }
        })
        .await
    });
    match served {
        Ok(e) => peer::fatal(NAME, format_args!("accept failed: {e}")),
        Err(e) => peer::fatal(NAME, format_args!("accept task failed: {e}")),
    }
}

/// floodgate::tokio::DrivenListener on a current_thread runtime on this thread.
fn tokio_driven_loop(shard: floodgate::DrivenShard, on_ring: bool) -> ! {
    use tokio::io::AsyncWriteExt;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => peer::fatal(NAME, format_args!("cannot build the tokio runtime: {e}")),
    };
    let e = runtime.block_on(async move {
        let mut listener = match floodgate::tokio::DrivenListener::new(shard) {
            Ok(l) => l,
            Err(e) => return e,
        };
        loop {
            if on_ring {
                match listener.accept_admitted().await {
                    Ok(conn) => {
                        if let Err(e) = listener.reply_and_close(conn, REPLY) {
                            return e;
                        }
                    }
                    Err(e) if skip(&e) => {}
                    Err(e) => return e,
                }
                continue;
            }
            match listener.accept().await {
                Ok((mut s, _)) => {
                    let _ = s.write_all(REPLY).await;
                }
                Err(e) if skip(&e) => {}
                Err(e) => return e,
            }
        }
    });
    peer::fatal(NAME, format_args!("accept failed: {e}"))
}
