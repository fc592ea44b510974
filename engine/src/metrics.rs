//! Prometheus metrics, with the `prometheus` feature: collectors for the
//! official [`prometheus_client`] crate that read [`Listener::stats`] and
//! [`Connector::stats`] when scraped, so nothing is added to the shards'
//! hot path (the counters are the same relaxed atomics the stats read).
//!
//! Every per-shard series has a `shard` label (the shard's index); series
//! split by kind have one more label (`how`, `cause`, `errno`, `end`,
//! `why`, `direction`, `kind`, `outcome`). Counters end in `_total`, as
//! the exposition formats want; the backend is an info metric.
//!
//! ```
//! use std::sync::Arc;
//! use floodgate::metrics::ListenerCollector;
//! use floodgate::Listener;
//! use prometheus_client::encoding::prometheus_text::encode;
//! use prometheus_client::registry::Registry;
//!
//! let listener = Arc::new(Listener::builder("127.0.0.1:0".parse()?).shards(1).build()?);
//! let mut registry = Registry::default();
//! registry.register_collector(Box::new(ListenerCollector::new(listener.clone())));
//!
//! let _client = std::net::TcpStream::connect(listener.local_addr())?;
//! drop(listener.accept()?);
//! let mut text = String::new();
//! encode(&mut text, &registry)?;
//! assert!(text.contains("# TYPE floodgate_accepted_total counter"));
//! assert!(text.contains("floodgate_accepted_total{shard=\"0\"} 1"));
//! assert!(text.contains("floodgate_backend_info{backend="));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! To tell several listeners apart, register each collector in a
//! sub-registry with a label of its own
//! ([`Registry::sub_registry_with_label`](prometheus_client::registry::Registry::sub_registry_with_label)).
//!
//! The listener's series (all per shard):
//!
//! | name | type | what |
//! | --- | --- | --- |
//! | `floodgate_accepted_total` | counter | connections taken from the kernel |
//! | `floodgate_delivered_total` | counter | connections handed to the application |
//! | `floodgate_closed_at_shutdown_total` | counter | closed by shutdown before delivery |
//! | `floodgate_rejected_total{how}` | counter | rejected by the condition: `close`, `reset` |
//! | `floodgate_withdrawn_total{cause}` | counter | withdrawn while pending: `peer_gone`, `timeout` |
//! | `floodgate_accept_backoffs_total{errno}` | counter | accept backoffs: `EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM` |
//! | `floodgate_accept_aborted_total` | counter | transient accept errors skipped |
//! | `floodgate_accept_errors_total` | counter | accept errors surfaced to `accept()` |
//! | `floodgate_accept_rearms_total` | counter | accept operations posted again |
//! | `floodgate_ring_full_pauses_total` | counter | times the ring filled and accepting paused |
//! | `floodgate_ring_resumes_total` | counter | times accepting resumed |
//! | `floodgate_limit_pauses_total` | counter | stops at `max_connections` |
//! | `floodgate_rate_pauses_total` | counter | stops for lack of an `accept_rate` token |
//! | `floodgate_budget_stops_total` | counter | turns that took the whole `accept_budget` |
//! | `floodgate_coalesced_pauses_total` | counter | wake-up coalescing pauses |
//! | `floodgate_handler_panics_total` | counter | inline or registration handler panics |
//! | `floodgate_condition_panics_total` | counter | condition panics |
//! | `floodgate_deferred_total` | counter | Defer and NeedBytes verdicts |
//! | `floodgate_peek_timeouts_total` | counter | decisions made when the peek wait ran out |
//! | `floodgate_register_events_total` | counter | events given to the registration handler |
//! | `floodgate_register_rearms_total` | counter | registration polls posted again |
//! | `floodgate_relays_started_total` | counter | relays started |
//! | `floodgate_relays_ended_total{end}` | counter | relays ended: `completed`, `idle_timeout`, `closed_at_shutdown`, `client_reset`, `upstream_reset`, `upstream_refused`, `upstream_timeout`, `error` |
//! | `floodgate_relays_not_started_total{why}` | counter | relays refused: `cap`, `start_failed` |
//! | `floodgate_relays_reset_at_shutdown_total` | counter | relays reset at shutdown (also in `closed_at_shutdown`) |
//! | `floodgate_relay_callback_panics_total` | counter | relay outcome callback panics |
//! | `floodgate_relay_bytes_total{direction}` | counter | bytes relayed: `to_upstream`, `to_client` |
//! | `floodgate_pending` | gauge | accepted, not yet delivered or closed |
//! | `floodgate_admitting` | gauge | waiting in admission |
//! | `floodgate_registered` | gauge | registered connections |
//! | `floodgate_ring_depth` | gauge | connections in the ring |
//! | `floodgate_ring_high_water` | gauge | deepest the ring has been |
//! | `floodgate_ring_capacity` | gauge | the ring's capacity |
//! | `floodgate_max_accepted_per_turn` | gauge | most connections taken in one turn |
//! | `floodgate_relays_active` | gauge | relays running |
//! | `floodgate_kernel_accept_queue` | gauge | the kernel's accept queue (while listening) |
//! | `floodgate_kernel_backlog` | gauge | the backlog the kernel enforces (while listening) |
//! | `floodgate_last_accept_errno` | gauge | errno of the last accept error (0: none) |
//! | `floodgate_multishot` | gauge | 1 with multishot accept, 0 with single-shot |
//! | `floodgate_backend_info{backend,reason}` | info | the backend and why it was chosen |
//!
//! With [`max_connections`](crate::ListenerBuilder::max_connections), four
//! listener-wide gauges (no `shard` label): `floodgate_open_connections`,
//! `floodgate_open_connections_high_water`, `floodgate_max_connections` and
//! `floodgate_shards_paused_at_limit`.
//!
//! The connector's series (per shard, [`ConnectorCollector`]):
//!
//! | name | type | what |
//! | --- | --- | --- |
//! | `floodgate_connect_submitted_total` | counter | connects asked of the shard |
//! | `floodgate_connect_connected_total` | counter | connects that succeeded |
//! | `floodgate_connect_failed_total{kind}` | counter | failed connects: `refused`, `timed_out`, `addr_unavailable`, `unreachable`, `exhausted`, `other` |
//! | `floodgate_connect_cancelled_total` | counter | cancelled by shutdown |
//! | `floodgate_connect_backoffs_total` | counter | load runs holding back for lack of descriptors |
//! | `floodgate_connect_sockets_created_total` | counter | sockets created |
//! | `floodgate_connect_sequences_started_total` | counter | load sequences started |
//! | `floodgate_connect_sequences_ended_total{outcome}` | counter | load sequences ended, by [`SequenceOutcome::name`](crate::SequenceOutcome::name) |
//! | `floodgate_connect_bytes_sent_total` | counter | payload bytes sent by sequences |
//! | `floodgate_connect_bytes_received_total` | counter | response bytes received by sequences |
//! | `floodgate_connect_handler_panics_total` | counter | handler or run sink panics |
//! | `floodgate_connect_in_flight` | gauge | connects queued or in flight |
//! | `floodgate_connect_open_sockets` | gauge | sockets held |
//! | `floodgate_connect_backend_info{backend,reason}` | info | the backend and why it was chosen |

use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;

use crate::connect::connector::Connector;
use crate::connect::stats::ConnectShardStats;
use crate::driver::BackendChoice;
use crate::listen::accept::Listener;
use crate::stats::ShardStats;

/// Reads one value of a shard's snapshot; `None`: no sample for it.
type Get<S> = fn(&S) -> Option<u64>;

/// One metric family: every shard's value of each kind.
struct Family<S: 'static> {
    /// The name without the `_total` of counters (the encoder adds it).
    name: &'static str,
    help: &'static str,
    ty: MetricType,
    /// The label that tells the kinds apart; `None`: one kind, unnamed.
    key: Option<&'static str>,
    kinds: &'static [(&'static str, Get<S>)],
}

const COUNTER: MetricType = MetricType::Counter;
const GAUGE: MetricType = MetricType::Gauge;

/// A field of a snapshot, as a sample value.
trait Sample {
    fn value(self) -> u64;
}

impl Sample for u64 {
    fn value(self) -> u64 {
        self
    }
}

impl Sample for usize {
    fn value(self) -> u64 {
        self as u64
    }
}

impl Sample for bool {
    fn value(self) -> u64 {
        u64::from(self)
    }
}

/// The one kind of a family without a kind label: `field`'s value.
macro_rules! one {
    ($field:ident) => {
        &[("", |s| Some(Sample::value(s.$field)))]
    };
}

/// The listener's families, in exposition order (the table in the module
/// docs lists the same).
#[rustfmt::skip]
const LISTENER: &[Family<ShardStats>] = &[
    Family { name: "floodgate_accepted", help: "Connections taken from the kernel", ty: COUNTER, key: None, kinds: one!(accepted) },
    Family { name: "floodgate_delivered", help: "Connections handed to the application (accept() or the handler)", ty: COUNTER, key: None, kinds: one!(delivered) },
    Family { name: "floodgate_closed_at_shutdown", help: "Connections closed by shutdown before being delivered", ty: COUNTER, key: None, kinds: one!(closed_at_shutdown) },
    Family {
        name: "floodgate_rejected", help: "Connections rejected by the condition, by how they ended", ty: COUNTER, key: Some("how"),
        kinds: &[("close", |s| Some(s.rejected.close)), ("reset", |s| Some(s.rejected.reset))],
    },
    Family {
        name: "floodgate_withdrawn", help: "Pending connections withdrawn, by cause", ty: COUNTER, key: Some("cause"),
        kinds: &[("peer_gone", |s| Some(s.withdrawn.peer_gone)), ("timeout", |s| Some(s.withdrawn.timeout))],
    },
    Family {
        name: "floodgate_accept_backoffs", help: "Times accepting stopped for lack of a resource and resumed after a pause, by errno", ty: COUNTER, key: Some("errno"),
        kinds: &[
            ("EMFILE", |s| Some(s.backoff.emfile)),
            ("ENFILE", |s| Some(s.backoff.enfile)),
            ("ENOBUFS", |s| Some(s.backoff.enobufs)),
            ("ENOMEM", |s| Some(s.backoff.enomem)),
        ],
    },
    Family { name: "floodgate_accept_aborted", help: "Transient accept errors skipped (ECONNABORTED, EPROTO, EPERM ...)", ty: COUNTER, key: None, kinds: one!(aborted) },
    Family { name: "floodgate_accept_errors", help: "Other accept errors, surfaced to accept()", ty: COUNTER, key: None, kinds: one!(accept_errors) },
    Family { name: "floodgate_accept_rearms", help: "Times the accept operation was posted again", ty: COUNTER, key: None, kinds: one!(rearms) },
    Family { name: "floodgate_ring_full_pauses", help: "Times the backlog ring filled and the shard stopped accepting", ty: COUNTER, key: None, kinds: one!(ring_full_pauses) },
    Family { name: "floodgate_ring_resumes", help: "Times the shard resumed accepting after the ring drained", ty: COUNTER, key: None, kinds: one!(resumes) },
    Family { name: "floodgate_limit_pauses", help: "Times the shard stopped accepting at the listener's max_connections", ty: COUNTER, key: None, kinds: one!(limit_pauses) },
    Family { name: "floodgate_rate_pauses", help: "Times the shard stopped accepting for lack of an accept_rate token", ty: COUNTER, key: None, kinds: one!(rate_pauses) },
    Family { name: "floodgate_budget_stops", help: "Turns that ended having taken the whole accept_budget", ty: COUNTER, key: None, kinds: one!(budget_stops) },
    Family { name: "floodgate_coalesced_pauses", help: "Pauses taken by load-adaptive wake-up coalescing", ty: COUNTER, key: None, kinds: one!(coalesced_pauses) },
    Family { name: "floodgate_handler_panics", help: "Inline or registration handler calls that panicked", ty: COUNTER, key: None, kinds: one!(handler_panics) },
    Family { name: "floodgate_condition_panics", help: "Condition calls that panicked (the connection was reset)", ty: COUNTER, key: None, kinds: one!(condition_panics) },
    Family { name: "floodgate_deferred", help: "Defer and NeedBytes verdicts", ty: COUNTER, key: None, kinds: one!(deferred) },
    Family { name: "floodgate_peek_timeouts", help: "Connections decided on with fewer first bytes than asked, the peek wait having run out", ty: COUNTER, key: None, kinds: one!(peek_timeouts) },
    Family { name: "floodgate_register_events", help: "Event notifications given to the registration handler", ty: COUNTER, key: None, kinds: one!(register_events) },
    Family { name: "floodgate_register_rearms", help: "Times a registered connection's poll was posted again", ty: COUNTER, key: None, kinds: one!(register_rearms) },
    Family { name: "floodgate_relays_started", help: "Relays started (the upstream dial was posted)", ty: COUNTER, key: None, kinds: &[("", |s| Some(s.relays.started))] },
    Family {
        name: "floodgate_relays_ended", help: "Relays ended, by how", ty: COUNTER, key: Some("end"),
        kinds: &[
            ("completed", |s| Some(s.relays.completed)),
            ("idle_timeout", |s| Some(s.relays.idle_timeout)),
            ("closed_at_shutdown", |s| Some(s.relays.closed_at_shutdown)),
            ("client_reset", |s| Some(s.relays.client_reset)),
            ("upstream_reset", |s| Some(s.relays.upstream_reset)),
            ("upstream_refused", |s| Some(s.relays.upstream_refused)),
            ("upstream_timeout", |s| Some(s.relays.upstream_timeout)),
            ("error", |s| Some(s.relays.errors)),
        ],
    },
    Family {
        name: "floodgate_relays_not_started", help: "Relays that never started (the client was reset), by why", ty: COUNTER, key: Some("why"),
        kinds: &[("cap", |s| Some(s.relays.refused_cap)), ("start_failed", |s| Some(s.relays.start_failed))],
    },
    Family { name: "floodgate_relays_reset_at_shutdown", help: "Relays reset at shutdown (still dialling, or a peer did not take its bytes within the grace)", ty: COUNTER, key: None, kinds: &[("", |s| Some(s.relays.reset_at_shutdown))] },
    Family { name: "floodgate_relay_callback_panics", help: "Relay outcome callbacks that panicked", ty: COUNTER, key: None, kinds: &[("", |s| Some(s.relays.callback_panics))] },
    Family {
        name: "floodgate_relay_bytes", help: "Bytes copied by relays, by direction", ty: COUNTER, key: Some("direction"),
        kinds: &[("to_upstream", |s| Some(s.relays.bytes_to_upstream)), ("to_client", |s| Some(s.relays.bytes_to_client))],
    },
    Family { name: "floodgate_pending", help: "Connections accepted and not yet delivered or closed", ty: GAUGE, key: None, kinds: one!(pending) },
    Family { name: "floodgate_admitting", help: "Connections waiting in admission", ty: GAUGE, key: None, kinds: one!(admitting) },
    Family { name: "floodgate_registered", help: "Connections registered now", ty: GAUGE, key: None, kinds: one!(registered) },
    Family { name: "floodgate_ring_depth", help: "Connections in the backlog ring now", ty: GAUGE, key: None, kinds: one!(ring_depth) },
    Family { name: "floodgate_ring_high_water", help: "Deepest the backlog ring has been", ty: GAUGE, key: None, kinds: one!(ring_high_water) },
    Family { name: "floodgate_ring_capacity", help: "The backlog ring's capacity (the effective backlog)", ty: GAUGE, key: None, kinds: one!(ring_capacity) },
    Family { name: "floodgate_max_accepted_per_turn", help: "The most connections the shard took from the kernel in one turn", ty: GAUGE, key: None, kinds: one!(max_accepted_per_turn) },
    Family { name: "floodgate_relays_active", help: "Relays running now", ty: GAUGE, key: None, kinds: &[("", |s| Some(s.relays.active))] },
    Family { name: "floodgate_kernel_accept_queue", help: "Connections waiting in the kernel's accept queue of the shard's listener", ty: GAUGE, key: None, kinds: &[("", |s| s.kernel.map(|k| u64::from(k.accept_queue)))] },
    Family { name: "floodgate_kernel_backlog", help: "The backlog the kernel enforces on the shard's listener", ty: GAUGE, key: None, kinds: &[("", |s| s.kernel.map(|k| u64::from(k.backlog)))] },
    Family { name: "floodgate_last_accept_errno", help: "The errno of the last accept error (0: none)", ty: GAUGE, key: None, kinds: &[("", |s| Some(s.last_errno.unsigned_abs().into()))] },
    Family { name: "floodgate_multishot", help: "1 when the shard accepts with multishot ACCEPT, 0 with single-shot accepts", ty: GAUGE, key: None, kinds: one!(multishot) },
];

/// The connector's families, in exposition order.
#[rustfmt::skip]
const CONNECTOR: &[Family<ConnectShardStats>] = &[
    Family { name: "floodgate_connect_submitted", help: "Connects asked of the shard", ty: COUNTER, key: None, kinds: one!(submitted) },
    Family { name: "floodgate_connect_connected", help: "Connects that succeeded", ty: COUNTER, key: None, kinds: one!(connected) },
    Family {
        name: "floodgate_connect_failed", help: "Connects that failed, by kind", ty: COUNTER, key: Some("kind"),
        kinds: &[
            ("refused", |s| Some(s.refused)),
            ("timed_out", |s| Some(s.timed_out)),
            ("addr_unavailable", |s| Some(s.addr_unavailable)),
            ("unreachable", |s| Some(s.unreachable)),
            ("exhausted", |s| Some(s.exhausted)),
            ("other", |s| Some(s.other)),
        ],
    },
    Family { name: "floodgate_connect_cancelled", help: "Connects cancelled by shutdown", ty: COUNTER, key: None, kinds: one!(cancelled) },
    Family { name: "floodgate_connect_backoffs", help: "Times a load held back because a socket could not be created", ty: COUNTER, key: None, kinds: one!(backoffs) },
    Family { name: "floodgate_connect_sockets_created", help: "Sockets the shard created", ty: COUNTER, key: None, kinds: one!(sockets_created) },
    Family { name: "floodgate_connect_sequences_started", help: "Load sequences started", ty: COUNTER, key: None, kinds: one!(sequences_started) },
    Family {
        name: "floodgate_connect_sequences_ended", help: "Load sequences ended, by outcome", ty: COUNTER, key: Some("outcome"),
        kinds: &[
            ("ok", |s| Some(s.sequences.0[0])),
            ("connect_refused", |s| Some(s.sequences.0[1])),
            ("connect_timed_out", |s| Some(s.sequences.0[2])),
            ("connect_addr_unavailable", |s| Some(s.sequences.0[3])),
            ("connect_unreachable", |s| Some(s.sequences.0[4])),
            ("connect_exhausted", |s| Some(s.sequences.0[5])),
            ("connect_other", |s| Some(s.sequences.0[6])),
            ("reset", |s| Some(s.sequences.0[7])),
            ("short_read", |s| Some(s.sequences.0[8])),
            ("timed_out", |s| Some(s.sequences.0[9])),
            ("io", |s| Some(s.sequences.0[10])),
            ("cancelled", |s| Some(s.sequences.0[11])),
        ],
    },
    Family { name: "floodgate_connect_bytes_sent", help: "Payload bytes sent by load sequences", ty: COUNTER, key: None, kinds: one!(bytes_sent) },
    Family { name: "floodgate_connect_bytes_received", help: "Response bytes received by load sequences", ty: COUNTER, key: None, kinds: one!(bytes_received) },
    Family { name: "floodgate_connect_handler_panics", help: "Inline handler or run sink calls that panicked", ty: COUNTER, key: None, kinds: one!(handler_panics) },
    Family { name: "floodgate_connect_in_flight", help: "Connects queued for the shard or in flight on it", ty: GAUGE, key: None, kinds: one!(in_flight) },
    Family { name: "floodgate_connect_open_sockets", help: "Sockets the shard holds now", ty: GAUGE, key: None, kinds: one!(open_sockets) },
];

/// Writes `families` for `shards` (their indices as the `shard` label),
/// then the backend as the info metric `{info}_info`.
fn encode<S>(
    encoder: &mut DescriptorEncoder<'_>,
    families: &[Family<S>],
    shards: &[(String, &S)],
    info: &str,
    backend: &BackendChoice,
) -> fmt::Result {
    for f in families {
        let mut metric = encoder.encode_descriptor(f.name, f.help, None, f.ty)?;
        for (id, s) in shards {
            for (kind, get) in f.kinds {
                let Some(v) = get(s) else { continue };
                let shard = ("shard", id.as_str());
                let labels = match f.key {
                    None => vec![shard],
                    Some(key) => vec![shard, (key, *kind)],
                };
                let sample = metric.encode_family(&labels)?;
                if f.ty == COUNTER {
                    ConstCounter::new(v).encode(sample)?;
                } else {
                    ConstGauge::new(v).encode(sample)?;
                }
            }
        }
    }
    let backend_info = Info::new([
        ("backend", backend.backend.to_string()),
        ("reason", backend.reason.clone()),
    ]);
    let metric = encoder.encode_descriptor(
        info,
        "The backend the shards run on, and why it was chosen",
        None,
        backend_info.metric_type(),
    )?;
    backend_info.encode(metric)
}

/// A [`Collector`] of a [`Listener`]'s stats: each scrape reads
/// [`Listener::stats`] (one snapshot per scrape) and
/// [`Listener::backend`]. See the [module docs](self) for the series.
#[derive(Debug)]
pub struct ListenerCollector {
    listener: Arc<Listener>,
}

impl ListenerCollector {
    /// A collector of `listener`; register it with
    /// [`Registry::register_collector`](prometheus_client::registry::Registry::register_collector).
    pub fn new(listener: Arc<Listener>) -> Self {
        ListenerCollector { listener }
    }
}

impl Collector for ListenerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let stats = self.listener.stats();
        let shards: Vec<(String, &ShardStats)> = stats
            .shards
            .iter()
            .map(|s| (s.shard.to_string(), s))
            .collect();
        encode(
            &mut encoder,
            LISTENER,
            &shards,
            "floodgate_backend",
            &self.listener.backend(),
        )?;
        let Some(open) = stats.open else {
            return Ok(());
        };
        #[rustfmt::skip]
        let gauges = [
            ("floodgate_open_connections", "Connections open now (accepted, not yet closed), with max_connections", open.open),
            ("floodgate_open_connections_high_water", "The most connections open at once", open.high_water),
            ("floodgate_max_connections", "The listener's max_connections", open.limit),
            ("floodgate_shards_paused_at_limit", "Shards stopped at max_connections now", open.shards_paused),
        ];
        for (name, help, v) in gauges {
            let metric = encoder.encode_descriptor(name, help, None, GAUGE)?;
            ConstGauge::new(v).encode(metric)?;
        }
        Ok(())
    }
}

/// A [`Collector`] of a [`Connector`]'s stats: each scrape reads
/// [`Connector::stats`] and [`Connector::backend`]. See the
/// [module docs](self) for the series.
///
/// ```
/// use std::sync::Arc;
/// use floodgate::metrics::ConnectorCollector;
/// use floodgate::Connector;
/// use prometheus_client::encoding::prometheus_text::encode;
/// use prometheus_client::registry::Registry;
///
/// let connector = Arc::new(Connector::builder().shards(1).build()?);
/// let mut registry = Registry::default();
/// registry.register_collector(Box::new(ConnectorCollector::new(connector.clone())));
/// let mut text = String::new();
/// encode(&mut text, &registry)?;
/// assert!(text.contains("floodgate_connect_submitted_total{shard=\"0\"} 0"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct ConnectorCollector {
    connector: Arc<Connector>,
}

impl ConnectorCollector {
    /// A collector of `connector`; register it with
    /// [`Registry::register_collector`](prometheus_client::registry::Registry::register_collector).
    pub fn new(connector: Arc<Connector>) -> Self {
        ConnectorCollector { connector }
    }
}

impl Collector for ConnectorCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let stats = self.connector.stats();
        let shards: Vec<(String, &ConnectShardStats)> = stats
            .shards
            .iter()
            .map(|s| (s.shard.to_string(), s))
            .collect();
        encode(
            &mut encoder,
            CONNECTOR,
            &shards,
            "floodgate_connect_backend",
            &self.connector.backend(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connect::load::SequenceOutcome;

    /// The module docs list every series, and the outcome labels are the
    /// outcomes' own names in index order.
    #[test]
    fn docs_list_every_family_and_outcomes_match_their_names() {
        let doc = include_str!("metrics.rs");
        for (name, ty) in LISTENER
            .iter()
            .map(|f| (f.name, f.ty))
            .chain(CONNECTOR.iter().map(|f| (f.name, f.ty)))
        {
            let full = if ty == COUNTER {
                format!("`{name}_total")
            } else {
                format!("`{name}")
            };
            assert!(doc.contains(&full), "{full} is not in the module docs");
        }
        let ended = CONNECTOR
            .iter()
            .find(|f| f.name == "floodgate_connect_sequences_ended")
            .map(|f| f.kinds)
            .unwrap_or_default();
        let names: Vec<&str> = ended.iter().map(|(k, _)| *k).collect();
        let want: Vec<&str> = SequenceOutcome::ALL.iter().map(|o| o.name()).collect();
        assert_eq!(names, want);
    }
}
