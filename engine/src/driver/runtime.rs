//! Registration of a descriptor with tokio's reactor, for the `tokio`
//! feature's listeners: the only `unsafe` they need.
//!
//! tokio 1.54 made `AsyncFd`'s constructors `unsafe`
//! (`AsyncFd::register_with_interest`; `new` and `try_new` are deprecated
//! as unsound): the reactor keys its registration by the descriptor's
//! number, so the number must stay open and mean the same file for the
//! registration's life. An [`OwnedFd`] the `AsyncFd` owns does that, so
//! this function takes nothing else.

use std::io;
use std::os::fd::OwnedFd;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Registers `fd` with the current tokio runtime's reactor for
/// readability. The `AsyncFd` owns `fd` and closes it when dropped (after
/// deregistering it).
///
/// # Errors
/// `Other` when called outside a tokio runtime (instead of tokio's panic),
/// or the reactor's error (`epoll_ctl`).
pub(crate) fn readable(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(io::Error::other(
            "a floodgate tokio listener must be created inside a tokio runtime",
        ));
    }
    // SAFETY: `AsyncFd::register_with_interest` needs the descriptor that
    // `inner.as_raw_fd()` returns to be open and to refer to the same open
    // file for the AsyncFd's whole life, and to be returned unchanged by
    // every `as_raw_fd()` call. `inner` is an `OwnedFd` moved into the
    // AsyncFd: it owns the number (nobody else closes it), it is open (an
    // `OwnedFd` always is), and its `as_raw_fd()` is constant; the AsyncFd
    // deregisters before it drops it. A runtime is current (checked above),
    // so the call does not panic.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(|e| {
        let (_fd, cause) = e.into_parts();
        cause
    })
}
