//! Tracing events, with the `tracing` feature: the engine's faults and
//! state changes (accept backoffs, ring-full pauses and resumes, the
//! backend's fallback, panics caught on a shard, errors surfaced to
//! `accept()`, connector backoffs, relay refusals), never one per
//! connection on the hot path. Every event has the target `floodgate`.
//!
//! Call sites are one line each through [`event!`], which compiles to
//! nothing without the feature (its arguments are not even evaluated).

/// `event!(level, field = value, ..., "message")`: a `tracing` event at
/// `level` (`error`, `warn`, `info`, `debug`, `trace`) with target
/// `floodgate`; nothing without the `tracing` feature.
macro_rules! event {
    ($level:ident, $($arg:tt)+) => {{
        #[cfg(feature = "tracing")]
        ::tracing::$level!(target: "floodgate", $($arg)+);
    }};
}

use crate::driver::{Backend, BackendChoice};

/// Emits the `tracing` event for a build whose `Auto` did not get
/// io_uring (`what`: "listener" or "connector"): a warning for a fallback,
/// information when the operator forced epoll (`FLOODGATE_BACKEND`);
/// nothing otherwise.
#[cfg_attr(not(feature = "tracing"), allow(unused_variables))]
pub(crate) fn report_fallback(asked: Backend, chosen: Option<&BackendChoice>, what: &str) {
    let Some(c) = chosen.filter(|c| asked == Backend::Auto && c.backend == Backend::Epoll) else {
        return;
    };
    if c.reason.starts_with(crate::driver::BACKEND_ENV) {
        // The operator's choice, not a fallback.
        event!(info, what, reason = %c.reason, "the shards run on epoll, as the operator asks");
    } else {
        event!(warn, what, reason = %c.reason, "io_uring not used: the shards run on epoll");
    }
}
