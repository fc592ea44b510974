//! Socket attributes declared once for a listener and guaranteed on every
//! admitted socket.
//!
//! Linux copies many options from a listening socket into the sockets it
//! accepts, and not others. [`INHERITED`] is that knowledge, in one table
//! (a test checks it against the running kernel): the engine sets every
//! declared attribute on the listener, then on each admitted socket only the
//! ones the kernel does not carry over, so the hot path makes the fewest
//! syscalls.

use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

use crate::admit::qos::Qos;
use crate::driver::sys;

/// One attribute, as named in [`INHERITED`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Attr {
    /// TCP_NODELAY.
    NoDelay,
    /// SO_KEEPALIVE with TCP_KEEPIDLE / TCP_KEEPINTVL / TCP_KEEPCNT.
    Keepalive,
    /// SO_RCVBUF.
    RecvBuffer,
    /// SO_SNDBUF.
    SendBuffer,
    /// SO_LINGER.
    Linger,
    /// IP_TOS / IPV6_TCLASS.
    Tos,
    /// SO_PRIORITY.
    Priority,
    /// SO_MARK.
    Mark,
    /// TCP_USER_TIMEOUT.
    UserTimeout,
    /// TCP_CONGESTION.
    Congestion,
    /// SO_MAX_PACING_RATE.
    PacingRate,
    /// O_NONBLOCK (a file status flag).
    NonBlocking,
    /// FD_CLOEXEC (a descriptor flag).
    CloseOnExec,
}

/// Whether Linux copies each attribute from the listener into an accepted
/// socket (`sk_clone_lock` copies the socket; file and descriptor flags
/// belong to the new file and are never inherited). Checked against the
/// running kernel by `inheritance_table_matches_the_kernel`.
pub const INHERITED: &[(Attr, bool)] = &[
    (Attr::NoDelay, true),
    (Attr::Keepalive, true),
    (Attr::RecvBuffer, true),
    (Attr::SendBuffer, true),
    (Attr::Linger, true),
    (Attr::Tos, true),
    (Attr::Priority, false),
    (Attr::Mark, true),
    (Attr::UserTimeout, true),
    (Attr::Congestion, true),
    (Attr::PacingRate, true),
    (Attr::NonBlocking, false),
    (Attr::CloseOnExec, false),
];

fn inherited(a: Attr) -> bool {
    INHERITED.iter().any(|(x, i)| *x == a && *i)
}

/// Keepalive timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time before the first probe (TCP_KEEPIDLE).
    pub idle: Duration,
    /// Between probes (TCP_KEEPINTVL).
    pub interval: Duration,
    /// Probes before the connection is dropped (TCP_KEEPCNT).
    pub count: u32,
}

/// The declared attributes. Each `None` is left as the kernel has it.
///
/// ```
/// use std::time::Duration;
/// use floodgate::{Keepalive, SocketAttrs};
///
/// let attrs = SocketAttrs {
///     nodelay: Some(true),
///     keepalive: Some(Keepalive { idle: Duration::from_secs(30), interval: Duration::from_secs(5), count: 3 }),
///     nonblocking: true,
///     ..SocketAttrs::default()
/// };
/// assert!(attrs.nonblocking);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketAttrs {
    /// TCP_NODELAY.
    pub nodelay: Option<bool>,
    /// SO_KEEPALIVE on, with these timings.
    pub keepalive: Option<Keepalive>,
    /// SO_RCVBUF in bytes (the kernel doubles it; getsockopt shows double).
    pub recv_buffer: Option<usize>,
    /// SO_SNDBUF in bytes (likewise doubled).
    pub send_buffer: Option<usize>,
    /// SO_LINGER on with this timeout (`Duration::ZERO`: close resets).
    pub linger: Option<Duration>,
    /// TOS/DSCP, SO_PRIORITY, SO_MARK, SO_MAX_PACING_RATE.
    pub qos: Qos,
    /// TCP_USER_TIMEOUT.
    pub user_timeout: Option<Duration>,
    /// TCP_CONGESTION, e.g. "cubic", "reno", "bbr" (must be allowed in
    /// `net.ipv4.tcp_allowed_congestion_control`).
    pub congestion: Option<String>,
    /// O_NONBLOCK on the admitted socket (default false: blocking, as
    /// `std::net::TcpListener::accept` gives). The listener's accept itself
    /// gives it (SOCK_NONBLOCK in the io_uring ACCEPT's or `accept4`'s
    /// flags), so it costs no syscall per connection; an async runtime's
    /// stream wants it ([`ListenerBuilder::nonblocking`](crate::ListenerBuilder::nonblocking)).
    pub nonblocking: bool,
    /// FD_CLOEXEC (default true).
    pub close_on_exec: bool,
}

impl Default for SocketAttrs {
    fn default() -> Self {
        SocketAttrs {
            nodelay: None,
            keepalive: None,
            recv_buffer: None,
            send_buffer: None,
            linger: None,
            qos: Qos::default(),
            user_timeout: None,
            congestion: None,
            nonblocking: false,
            close_on_exec: true,
        }
    }
}

impl SocketAttrs {
    /// Whether nothing needs doing on an admitted socket.
    pub(crate) fn is_default(&self) -> bool {
        self == &SocketAttrs::default()
    }

    /// Whether an accepted socket needs nothing more than its accept gave
    /// it: close-on-exec and `nonblocking` come with the accept's flags,
    /// every other attribute is at its default.
    pub(crate) fn nothing_after_accept(&self) -> bool {
        let SocketAttrs {
            nodelay,
            keepalive,
            recv_buffer,
            send_buffer,
            linger,
            qos,
            user_timeout,
            congestion,
            nonblocking: _,
            close_on_exec,
        } = self;
        nodelay.is_none()
            && keepalive.is_none()
            && recv_buffer.is_none()
            && send_buffer.is_none()
            && linger.is_none()
            && *qos == Qos::default()
            && user_timeout.is_none()
            && congestion.is_none()
            && *close_on_exec
    }

    /// Sets what an accepted socket still lacks after its accept: the
    /// non-inherited attributes, and close-on-exec off if so declared
    /// (O_NONBLOCK came with the accept's flags and is not set again).
    pub(crate) fn apply_after_accept(&self, fd: impl AsFd, ipv6: bool) -> io::Result<()> {
        self.apply(fd.as_fd(), ipv6, true)?;
        if !self.close_on_exec {
            SockRef::from(&fd).set_cloexec(false)?;
        }
        Ok(())
    }

    /// Sets every declared attribute, or only the non-inherited ones
    /// (`only_not_inherited`), on `fd`.
    ///
    /// # Errors
    /// The first setsockopt or fcntl that fails.
    pub fn apply(&self, fd: impl AsFd, ipv6: bool, only_not_inherited: bool) -> io::Result<()> {
        self.apply_named(fd, ipv6, only_not_inherited)
            .map_err(|(_, e)| e)
    }

    /// As [`SocketAttrs::apply`], naming the attribute the kernel refused.
    pub(crate) fn apply_named(
        &self,
        fd: impl AsFd,
        ipv6: bool,
        only_not_inherited: bool,
    ) -> Result<(), (Attr, io::Error)> {
        let want = |a: Attr| !(only_not_inherited && inherited(a));
        let s = SockRef::from(&fd);
        let at = |a: Attr| move |e: io::Error| (a, e);
        if let (Some(v), true) = (self.nodelay, want(Attr::NoDelay)) {
            s.set_nodelay(v).map_err(at(Attr::NoDelay))?;
        }
        if let (Some(k), true) = (self.keepalive, want(Attr::Keepalive)) {
            s.set_keepalive(true).map_err(at(Attr::Keepalive))?;
            let ka = TcpKeepalive::new()
                .with_time(k.idle)
                .with_interval(k.interval)
                .with_retries(k.count);
            s.set_tcp_keepalive(&ka).map_err(at(Attr::Keepalive))?;
        }
        if let (Some(v), true) = (self.recv_buffer, want(Attr::RecvBuffer)) {
            s.set_recv_buffer_size(v).map_err(at(Attr::RecvBuffer))?;
        }
        if let (Some(v), true) = (self.send_buffer, want(Attr::SendBuffer)) {
            s.set_send_buffer_size(v).map_err(at(Attr::SendBuffer))?;
        }
        if let (Some(v), true) = (self.linger, want(Attr::Linger)) {
            s.set_linger(Some(v)).map_err(at(Attr::Linger))?;
        }
        if let (Some(v), true) = (self.user_timeout, want(Attr::UserTimeout)) {
            s.set_tcp_user_timeout(Some(v))
                .map_err(at(Attr::UserTimeout))?;
        }
        if let (Some(v), true) = (&self.congestion, want(Attr::Congestion)) {
            s.set_tcp_congestion(v.as_bytes())
                .map_err(at(Attr::Congestion))?;
        }
        // One field at a time so that a refusal names its field. TOS before
        // priority: Linux resets SO_PRIORITY when IP_TOS changes.
        let one = |q: Qos, a: Attr| q.apply(fd.as_fd(), ipv6).map_err(at(a));
        if let (Some(tos), true) = (self.qos.tos, want(Attr::Tos)) {
            one(
                Qos {
                    tos: Some(tos),
                    ..Qos::default()
                },
                Attr::Tos,
            )?;
        }
        if let (Some(p), true) = (self.qos.priority, want(Attr::Priority)) {
            one(
                Qos {
                    priority: Some(p),
                    ..Qos::default()
                },
                Attr::Priority,
            )?;
        }
        if let (Some(m), true) = (self.qos.mark, want(Attr::Mark)) {
            one(
                Qos {
                    mark: Some(m),
                    ..Qos::default()
                },
                Attr::Mark,
            )?;
        }
        if let (Some(r), true) = (self.qos.max_pacing_rate, want(Attr::PacingRate)) {
            let q = Qos {
                max_pacing_rate: Some(r),
                ..Qos::default()
            };
            one(q, Attr::PacingRate)?;
        }
        Ok(())
    }

    /// The builder field an attribute is declared in, and its value here,
    /// for an error that names both.
    pub(crate) fn field(&self, a: Attr) -> (&'static str, String) {
        match a {
            Attr::NoDelay => ("attrs.nodelay", format!("{:?}", self.nodelay)),
            Attr::Keepalive => ("attrs.keepalive", format!("{:?}", self.keepalive)),
            Attr::RecvBuffer => ("attrs.recv_buffer", format!("{:?}", self.recv_buffer)),
            Attr::SendBuffer => ("attrs.send_buffer", format!("{:?}", self.send_buffer)),
            Attr::Linger => ("attrs.linger", format!("{:?}", self.linger)),
            Attr::Tos => ("attrs.qos.tos", format!("{:?}", self.qos.tos)),
            Attr::Priority => ("attrs.qos.priority", format!("{:?}", self.qos.priority)),
            Attr::Mark => ("attrs.qos.mark", format!("{:?}", self.qos.mark)),
            Attr::UserTimeout => ("attrs.user_timeout", format!("{:?}", self.user_timeout)),
            Attr::Congestion => (
                "attrs.congestion",
                self.congestion.clone().unwrap_or_default(),
            ),
            Attr::PacingRate => (
                "attrs.qos.max_pacing_rate",
                format!("{:?}", self.qos.max_pacing_rate),
            ),
            Attr::NonBlocking => ("attrs.nonblocking", self.nonblocking.to_string()),
            Attr::CloseOnExec => ("attrs.close_on_exec", self.close_on_exec.to_string()),
        }
    }

    /// Sets the file flags (never inherited) of a socket the engine did not
    /// accept itself (a connector's connected socket): O_NONBLOCK and
    /// close-on-exec as declared.
    pub(crate) fn apply_file_flags(&self, fd: impl AsFd) -> io::Result<()> {
        let s = SockRef::from(&fd);
        if self.nonblocking {
            s.set_nonblocking(true)?;
        }
        if !self.close_on_exec {
            s.set_cloexec(false)?;
        }
        Ok(())
    }

    /// Reads every declared attribute back from `fd` and lists the ones
    /// that differ, by name; empty when all hold.
    ///
    /// # Errors
    /// A getsockopt that fails.
    pub fn verify(&self, fd: impl AsFd, ipv6: bool) -> io::Result<Vec<Attr>> {
        let s = SockRef::from(&fd);
        let mut bad = Vec::new();
        if let Some(v) = self.nodelay {
            if s.nodelay()? != v {
                bad.push(Attr::NoDelay);
            }
        }
        if let Some(k) = self.keepalive {
            let ok = s.keepalive()?
                && s.keepalive_time()? == k.idle
                && s.keepalive_interval()? == k.interval
                && s.keepalive_retries()? == k.count;
            if !ok {
                bad.push(Attr::Keepalive);
            }
        }
        if let Some(v) = self.recv_buffer {
            if s.recv_buffer_size()? != 2 * v {
                bad.push(Attr::RecvBuffer);
            }
        }
        if let Some(v) = self.send_buffer {
            if s.send_buffer_size()? != 2 * v {
                bad.push(Attr::SendBuffer);
            }
        }
        if let Some(v) = self.linger {
            if s.linger()? != Some(Duration::from_secs(v.as_secs())) {
                bad.push(Attr::Linger);
            }
        }
        if let Some(v) = self.user_timeout {
            if s.tcp_user_timeout()? != Some(v) {
                bad.push(Attr::UserTimeout);
            }
        }
        if let Some(v) = &self.congestion {
            let got = s.tcp_congestion()?;
            let got = got.split(|b| *b == 0).next().unwrap_or_default();
            if got != v.as_bytes() {
                bad.push(Attr::Congestion);
            }
        }
        if let Some(tos) = self.qos.tos {
            let got = if ipv6 { s.tclass_v6()? } else { s.tos()? };
            if got != u32::from(tos) {
                bad.push(Attr::Tos);
            }
        }
        if let Some(p) = self.qos.priority {
            if sys::getsockopt::<i32>(fd.as_fd(), libc::SOL_SOCKET, libc::SO_PRIORITY)? != p as i32
            {
                bad.push(Attr::Priority);
            }
        }
        if let Some(m) = self.qos.mark {
            if s.mark()? != m {
                bad.push(Attr::Mark);
            }
        }
        if let Some(r) = self.qos.max_pacing_rate {
            if sys::getsockopt::<u64>(fd.as_fd(), libc::SOL_SOCKET, libc::SO_MAX_PACING_RATE)? != r
            {
                bad.push(Attr::PacingRate);
            }
        }
        if s.nonblocking()? != self.nonblocking {
            bad.push(Attr::NonBlocking);
        }
        if sys::is_cloexec(fd.as_fd())? != self.close_on_exec {
            bad.push(Attr::CloseOnExec);
        }
        Ok(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn full() -> SocketAttrs {
        SocketAttrs {
            nodelay: Some(true),
            keepalive: Some(Keepalive {
                idle: Duration::from_secs(31),
                interval: Duration::from_secs(7),
                count: 4,
            }),
            recv_buffer: Some(96 * 1024),
            send_buffer: Some(80 * 1024),
            linger: Some(Duration::from_secs(3)),
            qos: Qos {
                tos: Some(46 << 2),
                priority: Some(5),
                mark: Some(0x2a),
                max_pacing_rate: Some(1_000_000),
            },
            user_timeout: Some(Duration::from_millis(12_000)),
            congestion: Some("reno".into()),
            nonblocking: true,
            close_on_exec: true,
        }
    }

    /// Sets each attribute on a listener, accepts, and checks which ones the
    /// accepted socket carries: they must be exactly the ones INHERITED says.
    #[test]
    fn inheritance_table_matches_the_kernel() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let attrs = full();
        attrs.apply(&l, false, false).unwrap();
        SockRef::from(&l).set_nonblocking(true).unwrap();
        let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (accepted, _) = loop {
            match l.accept() {
                Ok(a) => break a,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        };
        // std's accept4 sets CLOEXEC, never NONBLOCK (unless the listener...
        // it does not: file flags are per file).
        SockRef::from(&accepted).set_nonblocking(false).unwrap();
        let missing = attrs.verify(&accepted, false).unwrap();
        let disagree: Vec<_> = INHERITED
            .iter()
            .filter(|(attr, _)| *attr != Attr::CloseOnExec) // std sets it at accept
            .filter(|(attr, inherited)| missing.contains(attr) == *inherited)
            .collect();
        assert!(
            disagree.is_empty(),
            "the table disagrees with the kernel on {disagree:?}"
        );
    }

    #[test]
    fn apply_then_verify_holds() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let attrs = full();
        attrs.apply(&c, false, false).unwrap();
        attrs.apply_file_flags(&c).unwrap();
        assert_eq!(attrs.verify(&c, false).unwrap(), vec![]);
    }
}
