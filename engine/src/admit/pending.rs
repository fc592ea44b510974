//! A connection between its accept and its delivery.

use std::os::fd::OwnedFd;
use std::time::Instant;

use crate::admit::slot::ConnectionSlot;

/// A connection accepted from the kernel and not yet delivered.
#[derive(Debug)]
pub(crate) struct Pending {
    /// The accepted socket, owned from the moment its completion was read.
    pub fd: OwnedFd,
    /// When the shard read its completion.
    pub accepted_at: Instant,
    /// What the condition attached when it accepted it.
    pub value: Option<crate::admit::condition::Value>,
    /// Its slot of the listener's maximum of open connections (empty
    /// without one): it goes wherever the socket goes.
    pub slot: ConnectionSlot,
}

impl Pending {
    /// A connection just taken from the kernel.
    pub fn new(fd: OwnedFd, accepted_at: Instant) -> Self {
        Pending {
            fd,
            accepted_at,
            value: None,
            slot: ConnectionSlot::none(),
        }
    }
}
