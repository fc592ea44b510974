//! systemd socket activation: the listening sockets a service manager
//! passed in `LISTEN_FDS`, as `sd_listen_fds(3)` takes them.

use socket2::Socket;

use crate::driver::sys;
use crate::error::{ConfigError, Error};
use crate::listen::accept::Listener;
use crate::listen::config::ListenerBuilder;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

fn refused(field: &'static str, value: impl std::fmt::Display, why: impl Into<String>) -> Error {
    Error::Config(ConfigError::new(field, value, why))
}

impl Listener {
    /// Starts configuring a listener on the sockets systemd passed to this
    /// process (socket activation): `LISTEN_FDS` descriptors from 3 on,
    /// for this process only (`LISTEN_PID` must be its pid). With `name`,
    /// only those whose `LISTEN_FDNAMES` entry (`FileDescriptorName=`) is
    /// `name`. As `sd_listen_fds(1)` does, the variables are unset and the
    /// descriptors made close-on-exec, so neither a child nor a second call
    /// takes them again. Then as [`Listener::adopt`].
    ///
    /// # Errors
    /// [`Error::Config`] naming `LISTEN_FDS` (not set, not a number),
    /// `LISTEN_PID` (another process's), `LISTEN_FDNAMES` (no socket of
    /// that name) or `sockets` (a descriptor that is not open).
    pub fn from_systemd(name: Option<&str>) -> Result<ListenerBuilder, Error> {
        let fds = std::env::var("LISTEN_FDS").map_err(|_| {
            refused(
                "LISTEN_FDS",
                "unset",
                "not socket-activated: no descriptors were passed",
            )
        })?;
        let pid = std::env::var("LISTEN_PID").unwrap_or_default();
        let names = std::env::var("LISTEN_FDNAMES").ok();
        // Unset first, whatever follows: they were meant for one taker.
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDNAMES");
        let count: i32 = fds
            .trim()
            .parse()
            .ok()
            .filter(|n| (1..=4096).contains(n))
            .ok_or_else(|| refused("LISTEN_FDS", &fds, "a number of descriptors, 1 to 4096"))?;
        let me = std::process::id();
        if pid.trim().parse::<u32>().ok() != Some(me) {
            return Err(refused(
                "LISTEN_PID",
                &pid,
                format!("the descriptors are for another process (this is {me})"),
            ));
        }
        let names: Vec<&str> = names
            .as_deref()
            .map_or(Vec::new(), |n| n.split(':').collect());
        let mut sockets = Vec::new();
        for i in 0..count {
            let fd = LISTEN_FDS_START + i;
            let wanted = match name {
                None => true,
                Some(n) => names.get(i as usize).is_some_and(|have| *have == n),
            };
            if !wanted {
                // Another name's: left open for whoever takes it, but not
                // inherited by children (sd_listen_fds does the same).
                let _ = sys::set_cloexec_raw(fd);
                continue;
            }
            let owned = sys::inherited_fd(fd)
                .map_err(|e| refused("sockets", format!("fd {fd}"), format!("not open: {e}")))?;
            sockets.push(Socket::from(owned));
        }
        if sockets.is_empty() {
            return Err(refused(
                "LISTEN_FDNAMES",
                names.join(":"),
                format!("no descriptor is named {}", name.unwrap_or_default()),
            ));
        }
        Ok(ListenerBuilder::adopting(sockets, None))
    }
}
