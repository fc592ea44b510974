//! Reference client: a one-thread epoll (mio) closed-loop connect flood.
//!
//! This is the yardstick `flood` is measured against (issue 4: "an independent one-thread epoll
//! client"): per connection it creates a nonblocking socket, sets `SO_LINGER 0`, connects,
//! waits on epoll for the server's first byte (or EOF), reads it and closes with RST. It keeps
//! `--concurrency` connections in flight, pins itself to `--pin`, and reports its core's busy
//! time per connection from /proc/stat (softirq included) and its own process CPU, the same
//! figures `flood run` prints.
//!
//! Bounded: it stops after `--duration` seconds or `--connections` connections, whichever
//! comes first.

use std::collections::HashMap;
use std::io::{ErrorKind, Read};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser;
use floodgate_bench::measure::CpuSample;
use floodgate_bench::peer;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

const NAME: &str = "client_epoll";

/// One-thread epoll connect flood: connect, read one byte, RST close.
#[derive(Parser, Debug)]
#[command(name = NAME, version, about)]
struct Cli {
    /// Server to connect to (loopback only).
    #[arg(long)]
    target: SocketAddr,
    /// Connections in flight.
    #[arg(long, short = 'c', default_value_t = 64)]
    concurrency: usize,
    /// Stop starting connections after this many seconds.
    #[arg(long, short = 'd', default_value_t = 4.0)]
    duration: f64,
    /// Stop after this many connections.
    #[arg(long, short = 'n', default_value_t = 10_000_000)]
    connections: u64,
    /// Pin the thread to this core.
    #[arg(long)]
    pin: Option<usize>,
    /// Report this server process's CPU time per connection too.
    #[arg(long)]
    server_pid: Option<u32>,
}

struct Flood {
    poll: Poll,
    target: SocketAddr,
    streams: HashMap<Token, TcpStream>,
    next_token: usize,
    started: u64,
    ok: u64,
    errors: u64,
}

impl Flood {
    /// Starts one connection; a failure to start counts as an error.
    fn start_one(&mut self) {
        self.started += 1;
        let mut stream = match TcpStream::connect(self.target) {
            Ok(s) => s,
            Err(_) => {
                self.errors += 1;
                return;
            }
        };
        if socket2::SockRef::from(&stream)
            .set_linger(Some(Duration::ZERO))
            .is_err()
        {
            self.errors += 1;
            return;
        }
        let token = Token(self.next_token);
        self.next_token = self.next_token.wrapping_add(1);
        if self
            .poll
            .registry()
            .register(&mut stream, token, Interest::READABLE)
            .is_err()
        {
            self.errors += 1;
            return;
        }
        self.streams.insert(token, stream);
    }

    /// Handles a readable event: done on a byte or EOF, error on an error.
    fn on_readable(&mut self, token: Token) {
        let Some(stream) = self.streams.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(_) => self.ok += 1,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(_) => self.errors += 1,
        }
        // Dropping closes the socket; SO_LINGER 0 makes that an RST. Closing the last
        // descriptor also removes it from the epoll set.
        self.streams.remove(&token);
    }
}

fn main() {
    let cli = Cli::parse();
    if !cli.target.ip().is_loopback() {
        peer::fatal(
            NAME,
            format_args!(
                "--target {}: only loopback addresses may be used",
                cli.target
            ),
        );
    }
    if cli.concurrency == 0 {
        peer::fatal(NAME, "--concurrency: must be at least 1");
    }
    if !(cli.duration > 0.0 && cli.duration <= 600.0) {
        peer::fatal(NAME, "--duration: must be in (0, 600] seconds");
    }
    if let Some(core) = cli.pin {
        if let Err(e) = peer::pin_current_thread(core) {
            peer::fatal(NAME, format_args!("--pin: {e}"));
        }
    }
    let poll = match Poll::new() {
        Ok(p) => p,
        Err(e) => peer::fatal(NAME, format_args!("epoll_create failed: {e}")),
    };
    let mut flood = Flood {
        poll,
        target: cli.target,
        streams: HashMap::with_capacity(cli.concurrency * 2),
        next_token: 0,
        started: 0,
        ok: 0,
        errors: 0,
    };
    let mut events = Events::with_capacity(1024);
    let deadline = Duration::from_secs_f64(cli.duration);

    let before = CpuSample::take(cli.server_pid, cli.pin);
    if cli.pin.is_some() && !before.has_core() {
        peer::fatal(NAME, "cannot read the pinned core's times from /proc/stat");
    }
    let begin = Instant::now();

    loop {
        let open = begin.elapsed() < deadline && flood.started < cli.connections;
        if open {
            while flood.streams.len() < cli.concurrency && flood.started < cli.connections {
                flood.start_one();
            }
        }
        if flood.streams.is_empty() && !open {
            break;
        }
        if let Err(e) = flood.poll.poll(&mut events, Some(Duration::from_secs(5))) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            peer::fatal(NAME, format_args!("epoll_wait failed: {e}"));
        }
        if events.is_empty() {
            peer::fatal(NAME, "no event for 5 s: is the server running?");
        }
        for event in events.iter() {
            flood.on_readable(event.token());
        }
    }

    let elapsed = begin.elapsed();
    let cpu = before.per_conn(
        &CpuSample::take(cli.server_pid, cli.pin),
        flood.ok + flood.errors,
    );
    let mut report = serde_json::json!({
        "client": NAME,
        "ok": flood.ok,
        "errors": flood.errors,
        "seconds": elapsed.as_secs_f64(),
        "conn_per_s": flood.ok as f64 / elapsed.as_secs_f64(),
    });
    for (key, value) in [
        ("core_busy_us_per_conn", cpu.core_busy_us),
        ("client_us_per_conn", cpu.own_us),
        ("server_us_per_conn", cpu.server_us),
    ] {
        if let Some(v) = value {
            report[key] = v.into();
        }
    }
    println!("{report}");
}
