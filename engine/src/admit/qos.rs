//! QoS on Linux: marking and pacing of a connection's packets.

use std::io;
use std::os::fd::AsFd;

use socket2::SockRef;

use crate::driver::sys;

/// Marking and pacing for one connection (Winsock's flow spec, the Linux
/// way). Each field left `None` is not touched.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Qos {
    /// IP_TOS (IPv4) / IPV6_TCLASS (IPv6): DSCP in the top 6 bits, ECN in
    /// the low 2 (the kernel keeps the ECN bits under its own control).
    pub tos: Option<u8>,
    /// SO_PRIORITY: the queueing priority (0–6 without CAP_NET_ADMIN).
    pub priority: Option<u32>,
    /// SO_MARK: the fwmark for policy routing and filtering (CAP_NET_ADMIN).
    pub mark: Option<u32>,
    /// SO_MAX_PACING_RATE in bytes per second (a token rate).
    pub max_pacing_rate: Option<u64>,
}

impl Qos {
    /// Sets DSCP (0–63) in `tos`, keeping ECN bits clear.
    pub fn with_dscp(mut self, dscp: u8) -> Self {
        self.tos = Some((dscp & 0x3f) << 2);
        self
    }

    /// Applies every set field to `fd`.
    ///
    /// # Errors
    /// The first failing setsockopt (e.g. EPERM for SO_MARK without
    /// CAP_NET_ADMIN).
    pub fn apply(&self, fd: impl AsFd, ipv6: bool) -> io::Result<()> {
        let s = SockRef::from(&fd);
        if let Some(tos) = self.tos {
            if ipv6 {
                s.set_tclass_v6(u32::from(tos))?;
            } else {
                s.set_tos(u32::from(tos))?;
            }
        }
        if let Some(p) = self.priority {
            sys::setsockopt::<i32>(fd.as_fd(), libc::SOL_SOCKET, libc::SO_PRIORITY, p as i32)?;
        }
        if let Some(m) = self.mark {
            s.set_mark(m)?;
        }
        if let Some(rate) = self.max_pacing_rate {
            sys::setsockopt::<u64>(fd.as_fd(), libc::SOL_SOCKET, libc::SO_MAX_PACING_RATE, rate)?;
        }
        Ok(())
    }
}
