//! Notified accept: the listener's accept event registered in the
//! application's own mio (epoll) event loop, next to its other sources.
//!
//! `cargo run --release -p floodgate --example accept_event`

use std::io::Read;
use std::net::TcpStream;
use std::os::fd::AsRawFd;

use floodgate::Listener;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

const ACCEPT: Token = Token(0);
const CONNECTIONS: usize = 100;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listener = Listener::builder("127.0.0.1:0".parse()?).build()?;
    let mut poll = Poll::new()?;
    let event_fd = listener.accept_event().as_raw_fd();
    poll.registry()
        .register(&mut SourceFd(&event_fd), ACCEPT, Interest::READABLE)?;

    let addr = listener.local_addr();
    let clients = std::thread::spawn(move || -> std::io::Result<usize> {
        let mut replies = 0;
        for _ in 0..CONNECTIONS {
            let mut s = TcpStream::connect(addr)?;
            let mut b = Vec::new();
            s.read_to_end(&mut b)?;
            replies += usize::from(b == b"hello\n");
        }
        Ok(replies)
    });

    let mut events = Events::with_capacity(16);
    let mut served = 0;
    while served < CONNECTIONS {
        poll.poll(&mut events, None)?;
        for event in &events {
            if event.token() == ACCEPT {
                // Drain until None: that also clears the event.
                while let Some(mut conn) = listener.try_accept()? {
                    use std::io::Write;
                    conn.write_all(b"hello\n")?;
                    served += 1;
                }
            }
        }
    }
    let replies = clients.join().map_err(|_| "client panicked")??;
    listener.shutdown();
    println!(
        "served {served}, clients got {replies} replies; stats conserved: {}",
        listener.stats().conserved()
    );
    Ok(())
}
