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
