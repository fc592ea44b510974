//! Benchmark peer: `mio` (epoll) event loop on one thread.
//!
//! The listener is nonblocking; on each readable event `accept()` is drained until
//! `WouldBlock`, and each accepted socket gets one nonblocking `write(b"x")` (one byte into an
//! empty send buffer always fits; on error the socket is simply dropped) and is dropped (closed).

use std::io::{ErrorKind, Write};

use clap::Parser;
use floodgate_bench::peer::{self, PeerArgs, REPLY};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};

const NAME: &str = "peer_epoll";
const LISTENER: Token = Token(0);

/// One-thread epoll (mio) accept loop: drain accept, write one byte, close.
#[derive(Parser, Debug)]
#[command(name = NAME, version, about)]
struct Cli {
    #[command(flatten)]
    peer: PeerArgs,

    /// Send the byte with MSG_MORE, so it leaves in the same segment as the
    /// FIN of the close that follows (the lever Floodgate's reply-and-close
    /// uses).
    #[arg(long)]
    msg_more: bool,

    /// Start one more thread that only sleeps, so that the process is
    /// multi-threaded as an engine with shard threads always is: the
    /// kernel then takes a file reference on every descriptor syscall
    /// (`fdget`), which a one-thread process skips.
    #[arg(long)]
    extra_thread: bool,

    /// Accept up to this many connections before replying to (and closing)
    /// them, as an engine that takes a slice of accepts per turn does; 1
    /// (the default) replies to each as it is accepted.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    batch: u16,
}

fn main() {
    let cli = Cli::parse();
    if cli.extra_thread {
        // Parks for the life of the process; it never runs again.
        std::thread::spawn(|| loop {
            std::thread::park();
        });
    }
    let std_listener = peer::start(NAME, &cli.peer);
    if let Err(e) = std_listener.set_nonblocking(true) {
        peer::fatal(
            NAME,
            format_args!("cannot make the listener nonblocking: {e}"),
        );
    }
    let mut listener = TcpListener::from_std(std_listener);
    let mut poll = match Poll::new() {
        Ok(p) => p,
        Err(e) => peer::fatal(NAME, format_args!("epoll_create failed: {e}")),
    };
    if let Err(e) = poll
        .registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
    {
        peer::fatal(NAME, format_args!("cannot register the listener: {e}"));
    }
    let mut events = Events::with_capacity(64);
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            peer::fatal(NAME, format_args!("epoll_wait failed: {e}"));
        }
        for event in events.iter() {
            if event.token() == LISTENER {
                drain_accept(&listener, cli.msg_more, usize::from(cli.batch));
            }
        }
    }
}

/// Accepts until `WouldBlock` (mio registers edge-triggered), replying to each connection:
/// at once, or after `batch` of them were accepted (and at `WouldBlock`).
fn drain_accept(listener: &TcpListener, msg_more: bool, batch: usize) {
    let mut taken = Vec::with_capacity(batch);
    loop {
        let more = match listener.accept() {
            Ok((stream, _)) => {
                taken.push(stream);
                true
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => false,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionAborted
                        | ErrorKind::ConnectionReset
                        | ErrorKind::Interrupted
                ) =>
            {
                true
            }
            Err(e) => peer::fatal(NAME, format_args!("accept failed: {e}")),
        };
        if taken.len() >= batch || !more {
            for mut stream in taken.drain(..) {
                if msg_more {
                    let _ = socket2::SockRef::from(&stream).send_with_flags(REPLY, libc::MSG_MORE);
                    let _ = stream.flush();
                } else {
                    // One byte into an empty send buffer: succeeds unless the peer is gone.
                    let _ = stream.write(REPLY);
                }
            }
        }
        if !more {
            return;
        }
    }
}
