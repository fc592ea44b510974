//! Errors: one variant per cause, each naming what failed and what to do.

use std::fmt;
use std::io;
use std::net::SocketAddr;

/// A configuration value refused by a builder's validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The builder field at fault, e.g. `"shards"`.
    pub field: &'static str,
    /// The refused value, as given.
    pub value: String,
    /// Why it was refused.
    pub reason: String,
}

impl ConfigError {
    pub(crate) fn new(
        field: &'static str,
        value: impl fmt::Display,
        reason: impl Into<String>,
    ) -> Self {
        ConfigError {
            field,
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid `{}` = {}: {}",
            self.field, self.value, self.reason
        )
    }
}

impl std::error::Error for ConfigError {}

/// Why io_uring could not be used on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UringUnavailable {
    /// `io_uring_setup` does not exist (ENOSYS): a kernel older than 5.1 or
    /// built without `CONFIG_IO_URING`.
    NotInKernel,
    /// `kernel.io_uring_disabled = 2`: io_uring is disabled for everyone.
    DisabledBySysctl,
    /// `kernel.io_uring_disabled = 1` and this process is not in
    /// `kernel.io_uring_group` (and lacks CAP_SYS_ADMIN).
    RestrictedToGroup,
    /// EPERM/EACCES with the sysctl allowing it: a seccomp filter (the
    /// default profiles of Docker, containerd and podman block io_uring) or a
    /// security module denied `io_uring_setup`.
    DeniedBySandbox,
    /// ENOMEM: locked-memory limit (RLIMIT_MEMLOCK) too low for the rings on
    /// kernels before 5.12, or the system is out of memory.
    OutOfMemory,
}

impl UringUnavailable {
    /// Classifies an `io_uring_setup` failure; `None` when the error is not
    /// one that says io_uring is unusable.
    pub(crate) fn classify(err: &io::Error) -> Option<Self> {
        match err.raw_os_error()? {
            libc::ENOSYS => Some(UringUnavailable::NotInKernel),
            libc::EPERM | libc::EACCES => {
                let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").ok();
                Some(match sysctl.as_deref().map(str::trim) {
                    Some("2") => UringUnavailable::DisabledBySysctl,
                    Some("1") => UringUnavailable::RestrictedToGroup,
                    _ => UringUnavailable::DeniedBySandbox,
                })
            }
            libc::ENOMEM => Some(UringUnavailable::OutOfMemory),
            _ => None,
        }
    }

    /// What to do about it.
    pub fn remedy(&self) -> &'static str {
        match self {
            UringUnavailable::NotInKernel => {
                "run on Linux 5.19 or newer built with CONFIG_IO_URING=y"
            }
            UringUnavailable::DisabledBySysctl => {
                "set `sysctl kernel.io_uring_disabled=0` (or 1 with kernel.io_uring_group)"
            }
            UringUnavailable::RestrictedToGroup => {
                "add this process's group to `kernel.io_uring_group`, or set kernel.io_uring_disabled=0"
            }
            UringUnavailable::DeniedBySandbox => {
                "allow io_uring_setup/io_uring_enter/io_uring_register in the seccomp profile \
                 (e.g. docker --security-opt seccomp=<profile allowing io_uring>)"
            }
            UringUnavailable::OutOfMemory => {
                "raise RLIMIT_MEMLOCK (ulimit -l) or use a kernel >= 5.12, which charges rings to memcg"
            }
        }
    }
}

impl fmt::Display for UringUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self {
            UringUnavailable::NotInKernel => "this kernel has no io_uring (ENOSYS)",
            UringUnavailable::DisabledBySysctl => {
                "io_uring is disabled by sysctl kernel.io_uring_disabled=2"
            }
            UringUnavailable::RestrictedToGroup => {
                "io_uring is restricted to kernel.io_uring_group (kernel.io_uring_disabled=1)"
            }
            UringUnavailable::DeniedBySandbox => {
                "io_uring_setup was denied (EPERM) by a seccomp filter or security module"
            }
            UringUnavailable::OutOfMemory => "io_uring_setup failed with ENOMEM",
        };
        write!(f, "{what}; {}", self.remedy())
    }
}

/// Everything that can go wrong in the engine.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A builder value was refused; nothing was started.
    Config(ConfigError),
    /// io_uring cannot be used here; nothing was started.
    UringUnavailable {
        /// The classified cause.
        cause: UringUnavailable,
        /// The error `io_uring_setup` returned.
        source: io::Error,
    },
    /// Binding or listening on the address failed.
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The kernel's error (EADDRINUSE, EACCES, EADDRNOTAVAIL …).
        source: io::Error,
    },
    /// A system call made while setting things up failed.
    Setup {
        /// What was being done, e.g. `"io_uring_setup"`, `"eventfd"`.
        op: &'static str,
        /// The kernel's error.
        source: io::Error,
    },
    /// A shard's accept failed with an error that is neither transient nor
    /// resource exhaustion; the shard keeps retrying with backoff.
    Accept {
        /// The shard.
        shard: usize,
        /// The kernel's error.
        source: io::Error,
    },
    /// The listener delivers to its inline handler; `accept()` has nothing
    /// to return.
    InlineDelivery,
    /// The listener's shards are driven by the application
    /// ([`ListenerBuilder::build_driven`](crate::ListenerBuilder::build_driven)):
    /// connections come out of each [`DrivenShard::drive`](crate::DrivenShard::drive),
    /// and `accept()` has nothing to return.
    DrivenDelivery,
    /// A driven shard was driven from a thread other than the one that
    /// drove it first: io_uring binds a ring to one thread
    /// (SINGLE_ISSUER). Move the shard before its first `drive()`, not after.
    WrongThread {
        /// The shard.
        shard: usize,
    },
    /// The listener or connector was shut down.
    Closed,
    /// A connect failed; `kind` classifies the cause.
    Connect {
        /// What kind of failure it was.
        kind: ConnectErrorKind,
        /// The address that was being connected to.
        addr: SocketAddr,
        /// The kernel's error (for [`ConnectErrorKind::TimedOut`] after the
        /// engine's own timeout, ETIMEDOUT).
        source: io::Error,
    },
    /// A hand-over of listening sockets to or from another process failed.
    Handover {
        /// The step, e.g. `"connect"`, `"receive the sockets"`.
        step: &'static str,
        /// The Unix socket's path.
        path: std::path::PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// The cause of a failed connect, as the connector classifies and counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum ConnectErrorKind {
    /// Nobody listens there (ECONNREFUSED: the peer answered with an RST).
    Refused,
    /// The connect timeout ran out (a single connect's LINK_TIMEOUT, or a
    /// load sequence's deadline), or the
    /// kernel gave up retransmitting the SYN (ETIMEDOUT).
    TimedOut,
    /// No local address or port could be had: EADDRNOTAVAIL (the ephemeral
    /// port range of the source address is used up, TIME_WAIT included) or
    /// EADDRINUSE (the explicit source address and port are taken).
    AddrUnavailable,
    /// No route to the peer: ENETUNREACH, EHOSTUNREACH, ENETDOWN, EHOSTDOWN.
    Unreachable,
    /// No socket could be created: the process or the system is out of
    /// descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM). A shard
    /// running a load backs off before it starts more.
    Exhausted,
    /// Anything else (ECONNRESET, …).
    Other,
}

impl ConnectErrorKind {
    /// Classifies a connect errno.
    pub fn from_errno(errno: i32) -> Self {
        match errno {
            libc::ECONNREFUSED => ConnectErrorKind::Refused,
            libc::ETIMEDOUT | libc::ETIME => ConnectErrorKind::TimedOut,
            libc::EADDRNOTAVAIL | libc::EADDRINUSE => ConnectErrorKind::AddrUnavailable,
            libc::ENETUNREACH | libc::EHOSTUNREACH | libc::ENETDOWN | libc::EHOSTDOWN => {
                ConnectErrorKind::Unreachable
            }
            libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM => {
                ConnectErrorKind::Exhausted
            }
            _ => ConnectErrorKind::Other,
        }
    }

    /// A short lower-case name: `refused`, `timed_out`, `addr_unavailable`,
    /// `unreachable`, `exhausted`, `other`.
    pub fn name(&self) -> &'static str {
        match self {
            ConnectErrorKind::Refused => "refused",
            ConnectErrorKind::TimedOut => "timed_out",
            ConnectErrorKind::AddrUnavailable => "addr_unavailable",
            ConnectErrorKind::Unreachable => "unreachable",
            ConnectErrorKind::Exhausted => "exhausted",
            ConnectErrorKind::Other => "other",
        }
    }
}

impl fmt::Display for ConnectErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConnectErrorKind::Refused => "connection refused",
            ConnectErrorKind::TimedOut => "timed out",
            ConnectErrorKind::AddrUnavailable => {
                "no local address/port available (ports exhausted or address in use)"
            }
            ConnectErrorKind::Unreachable => "unreachable",
            ConnectErrorKind::Exhausted => {
                "no socket could be created (out of descriptors or memory)"
            }
            ConnectErrorKind::Other => "failed",
        })
    }
}

impl Error {
    pub(crate) fn setup(op: &'static str, source: io::Error) -> Self {
        match UringUnavailable::classify(&source) {
            Some(cause) if op == "io_uring_setup" => Error::UringUnavailable { cause, source },
            _ => Error::Setup { op, source },
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(e) => write!(f, "configuration: {e}"),
            Error::UringUnavailable { cause, source } => {
                write!(f, "io_uring unavailable: {cause} ({source})")
            }
            Error::Bind { addr, source } => {
                write!(f, "`addr` = {addr}: cannot listen there: {source}")
            }
            Error::Setup { op, source } => write!(f, "{op} failed: {source}"),
            Error::Accept { shard, source } => write!(f, "shard {shard}: accept failed: {source}"),
            Error::InlineDelivery => {
                f.write_str("connections go to the inline handler; accept() is not available")
            }
            Error::DrivenDelivery => f.write_str(
                "the application drives the shards; connections come from DrivenShard::drive()",
            ),
            Error::WrongThread { shard } => write!(
                f,
                "driven shard {shard} is bound to the thread that first drove it"
            ),
            Error::Closed => f.write_str("shut down"),
            Error::Connect { kind, addr, source } => {
                write!(f, "connect to {addr}: {kind} ({source})")
            }
            Error::Handover { step, path, source } => {
                write!(f, "hand-over on {}: {step}: {source}", path.display())
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Config(e) => Some(e),
            Error::UringUnavailable { source, .. }
            | Error::Bind { source, .. }
            | Error::Setup { source, .. }
            | Error::Accept { source, .. }
            | Error::Connect { source, .. }
            | Error::Handover { source, .. } => Some(source),
            Error::InlineDelivery
            | Error::DrivenDelivery
            | Error::WrongThread { .. }
            | Error::Closed => None,
        }
    }
}

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Self {
        Error::Config(e)
    }
}

impl From<Error> for io::Error {
    /// An [`io::Error`] for code that speaks `io::Result` (an async
    /// runtime's accept loop, `?` in a function returning `io::Result`).
    /// The kind follows the cause: the kernel's own error's kind where
    /// there is one (`Bind`: `AddrInUse`, ...; `Setup`, `Accept`, `Connect`,
    /// `Handover`), `InvalidInput` for a refused configuration,
    /// `Unsupported` / `PermissionDenied` / `OutOfMemory` for io_uring
    /// unavailable, `Unsupported` for the delivery paths a listener does
    /// not offer, `NotConnected` once shut down, `Other` for a driven shard
    /// on the wrong thread. The engine's error is kept whole:
    /// [`io::Error::get_ref`] / [`io::Error::into_inner`] give it back, and
    /// the message is its message.
    ///
    /// ```
    /// use std::io;
    ///
    /// let e: io::Error = floodgate::Error::Closed.into();
    /// assert_eq!(e.kind(), io::ErrorKind::NotConnected);
    /// let inner = e.get_ref().and_then(|i| i.downcast_ref::<floodgate::Error>());
    /// assert!(matches!(inner, Some(floodgate::Error::Closed)));
    /// ```
    fn from(e: Error) -> Self {
        let kind = match &e {
            Error::Config(_) => io::ErrorKind::InvalidInput,
            Error::UringUnavailable { cause, .. } => match cause {
                UringUnavailable::NotInKernel => io::ErrorKind::Unsupported,
                UringUnavailable::DisabledBySysctl
                | UringUnavailable::RestrictedToGroup
                | UringUnavailable::DeniedBySandbox => io::ErrorKind::PermissionDenied,
                UringUnavailable::OutOfMemory => io::ErrorKind::OutOfMemory,
            },
            Error::Bind { source, .. }
            | Error::Setup { source, .. }
            | Error::Accept { source, .. }
            | Error::Connect { source, .. }
            | Error::Handover { source, .. } => source.kind(),
            Error::InlineDelivery | Error::DrivenDelivery => io::ErrorKind::Unsupported,
            Error::WrongThread { .. } => io::ErrorKind::Other,
            Error::Closed => io::ErrorKind::NotConnected,
        };
        io::Error::new(kind, e)
    }
}

#[cfg(test)]
mod io_error_tests {
    use super::*;

    #[test]
    fn io_error_keeps_the_kernel_kind_and_the_engine_error() {
        let addr: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let e: io::Error = Error::Bind {
            addr,
            source: io::Error::from_raw_os_error(libc::EADDRINUSE),
        }
        .into();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert!(e.to_string().contains("127.0.0.1:1"), "{e}");
        let inner = e.into_inner().expect("inner");
        assert!(matches!(
            inner.downcast_ref::<Error>(),
            Some(Error::Bind { .. })
        ));
        let e: io::Error = Error::Config(ConfigError::new("shards", 0, "at least 1")).into();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let e: io::Error = Error::DrivenDelivery.into();
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
    }
}
