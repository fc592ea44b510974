//! Creating and configuring connect sockets: socket(2) with the options
//! io_uring cannot set, the checks of socket attributes at build time.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};

use crate::admit::attrs::SocketAttrs;
use crate::driver::sys;
use crate::error::{ConfigError, Error};

/// Creates a connect socket: blocking (io_uring does the waiting),
/// close-on-exec, SO_LINGER 0 for an RST close, bound to `source` with
/// IP_BIND_ADDRESS_NO_PORT (the port is chosen at connect time, per
/// 4-tuple, so many source addresses share the ephemeral range).
pub(super) fn open_socket(
    addr: SocketAddr,
    source: Option<IpAddr>,
    reset: bool,
    attrs: &SocketAttrs,
) -> io::Result<Socket> {
    let s = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )?;
    configure_socket(&SockRef::from(&s), addr, source, reset, attrs)?;
    Ok(s)
}

/// Refuses attributes the kernel will not take, by setting them on a
/// scratch socket; the error names the field.
pub(super) fn check_attrs(attrs: &SocketAttrs) -> Result<(), Error> {
    if attrs.is_default() {
        return Ok(());
    }
    if let Some(c) = &attrs.congestion {
        if c.is_empty() || c.len() > 15 {
            return Err(ConfigError::new(
                "attrs.congestion",
                c,
                "a congestion control name of 1 to 15 bytes",
            )
            .into());
        }
    }
    let scratch = Socket::new(Domain::IPV4, Type::STREAM.cloexec(), Some(Protocol::TCP))
        .map_err(|e| Error::setup("socket", e))?;
    attrs.apply(&scratch, false, false).map_err(|e| {
        Error::Config(ConfigError::new(
            "attrs",
            format!("{attrs:?}"),
            format!("the kernel refused it: {e}"),
        ))
    })
}

/// Applies what [`open_socket`] applies to a socket made elsewhere (by an
/// io_uring SOCKET): the attributes' socket options, then SO_LINGER 0 for
/// an RST close (so that it holds whatever the attributes say), then the
/// source address.
pub(super) fn configure_socket(
    s: &SockRef<'_>,
    addr: SocketAddr,
    source: Option<IpAddr>,
    reset: bool,
    attrs: &SocketAttrs,
) -> io::Result<()> {
    if !attrs.is_default() {
        attrs.apply(&**s, addr.is_ipv6(), false)?;
    }
    if reset {
        s.set_linger(Some(Duration::ZERO))?;
    }
    if let Some(ip) = source {
        if ip.is_ipv4() != addr.is_ipv4() {
            return Err(io::Error::from_raw_os_error(libc::EAFNOSUPPORT));
        }
        sys::setsockopt::<i32>(
            s.as_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            1,
        )?;
        s.bind(&SocketAddr::new(ip, 0).into())?;
    }
    Ok(())
}

pub(super) fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}
