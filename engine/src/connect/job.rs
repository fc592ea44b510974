//! What the connector handle sends a connect shard: single connects and
//! load runs, and how their results go back; the connect side's operation
//! kinds.

use std::net::{IpAddr, SocketAddr};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::admit::attrs::SocketAttrs;
use crate::error::Error;
use crate::shard::op_kinds;

use super::dial::Connected;
use super::load::{OutcomeCounts, SequencePlan, SequenceRecord};

op_kinds! {
    /// The operations of the connect side.
    pub(crate) enum ConnectOp {
        /// SOCKET creation.
        Socket = 16,
        /// The CONNECT operation.
        Connect = 17,
        /// The LINK_TIMEOUT linked to a CONNECT.
        Timeout = 18,
        /// A SEND of a connection's payload.
        Send = 19,
        /// A RECV of a connection's response.
        Recv = 20,
        /// A CLOSE.
        Close = 21,
        /// The shard's timer.
        Timer = 22,
        /// A CONNECT to AF_UNSPEC that ends a sequence (RST) and keeps its
        /// socket for the next one.
        Disconnect = 24,
        /// The CLOSE of a kept socket at the end of a run.
        Unpark = 25,
    }
}

/// A request for a shard.
pub(super) enum Job {
    Connect(ConnectJob),
    Run(Box<RunJob>),
}

pub(super) struct ConnectJob {
    pub(super) ticket: u64,
    pub(super) addr: SocketAddr,
    pub(super) source: Option<IpAddr>,
    pub(super) timeout: Option<Duration>,
    pub(super) attrs: Arc<SocketAttrs>,
    pub(super) reply: Reply,
}

pub(super) enum Reply {
    /// A blocking caller waits on this channel.
    Wait(mpsc::SyncSender<Result<Connected, Error>>),
    /// The completion queue (or the inline handler).
    Deliver,
}

type Sink = Box<dyn FnMut(&SequenceRecord) + Send>;

pub(super) struct RunJob {
    pub(super) plan: Arc<SequencePlan>,
    pub(super) started: Instant,
    /// Sequences in flight at most (closed loop: exactly) on this shard.
    pub(super) concurrency: usize,
    /// Open loop: time between starts on this shard.
    pub(super) interval: Option<Duration>,
    pub(super) count: Option<u64>,
    pub(super) sink: Sink,
    pub(super) done: mpsc::Sender<(u64, OutcomeCounts, Instant)>,
}
