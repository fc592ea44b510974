//! The Prometheus exposition (`floodgate::metrics`, feature `prometheus`):
//! what the collectors write parses as the Prometheus text format, and
//! every sample equals the stats snapshot of the same moment.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use floodgate::metrics::{ConnectorCollector, ListenerCollector};
use floodgate::{
    BackendChoice, ConnectRequest, ConnectShardStats, Connector, ConnectorStats, Listener,
    ListenerStats, SequencePlan, ShardStats, Verdict,
};
use floodgate_tests::{banner_listener, ended_by_server_from, serial, wait_for, FdTable};
use prometheus_client::encoding::prometheus_text::encode;
use prometheus_client::registry::Registry;
use prometheus_parse::{Scrape, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Counter,
    Gauge,
}

/// A sample: its name and its labels, sorted.
type Key = (String, Vec<(String, String)>);

/// The samples expected, written out here from the stats' fields (not from
/// the collector's tables), so that a wrong field, name, label or type in
/// the collector fails.
#[derive(Debug, Default)]
struct Expected(BTreeMap<Key, (Kind, u64)>);

impl Expected {
    fn add(&mut self, kind: Kind, name: &str, shard: usize, label: Option<(&str, &str)>, v: u64) {
        let mut labels = vec![("shard".to_string(), shard.to_string())];
        if let Some((k, val)) = label {
            labels.push((k.to_string(), val.to_string()));
        }
        labels.sort();
        let old = self.0.insert((name.to_string(), labels), (kind, v));
        assert!(old.is_none(), "{name} listed twice");
    }

    /// A listener-wide gauge (no `shard` label).
    fn global(&mut self, name: &str, v: u64) {
        let old = self
            .0
            .insert((name.to_string(), Vec::new()), (Kind::Gauge, v));
        assert!(old.is_none(), "{name} listed twice");
    }

    fn c(&mut self, name: &str, shard: usize, v: u64) {
        self.add(Kind::Counter, name, shard, None, v);
    }

    fn g(&mut self, name: &str, shard: usize, v: u64) {
        self.add(Kind::Gauge, name, shard, None, v);
    }

    fn by(&mut self, name: &str, shard: usize, key: &str, kinds: &[(&str, u64)]) {
        for (k, v) in kinds {
            self.add(Kind::Counter, name, shard, Some((key, k)), *v);
        }
    }
}

fn listener_expected(stats: &ListenerStats) -> Expected {
    let mut e = Expected::default();
    for s in &stats.shards {
        shard_expected(&mut e, s);
    }
    if let Some(o) = stats.open {
        e.global("floodgate_open_connections", o.open);
        e.global("floodgate_open_connections_high_water", o.high_water);
        e.global("floodgate_max_connections", o.limit);
        e.global("floodgate_shards_paused_at_limit", o.shards_paused);
    }
    e
}

fn shard_expected(e: &mut Expected, s: &ShardStats) {
    let k = s.shard;
    e.c("floodgate_accepted_total", k, s.accepted);
    e.c("floodgate_delivered_total", k, s.delivered);
    e.c(
        "floodgate_closed_at_shutdown_total",
        k,
        s.closed_at_shutdown,
    );
    let r = &s.rejected;
    e.by(
        "floodgate_rejected_total",
        k,
        "how",
        &[("close", r.close), ("reset", r.reset)],
    );
    let w = &s.withdrawn;
    e.by(
        "floodgate_withdrawn_total",
        k,
        "cause",
        &[("peer_gone", w.peer_gone), ("timeout", w.timeout)],
    );
    let b = &s.backoff;
    e.by(
        "floodgate_accept_backoffs_total",
        k,
        "errno",
        &[
            ("EMFILE", b.emfile),
            ("ENFILE", b.enfile),
            ("ENOBUFS", b.enobufs),
            ("ENOMEM", b.enomem),
        ],
    );
    e.c("floodgate_accept_aborted_total", k, s.aborted);
    e.c("floodgate_accept_errors_total", k, s.accept_errors);
    e.c("floodgate_accept_rearms_total", k, s.rearms);
    e.c("floodgate_ring_full_pauses_total", k, s.ring_full_pauses);
    e.c("floodgate_ring_resumes_total", k, s.resumes);
    e.c("floodgate_limit_pauses_total", k, s.limit_pauses);
    e.c("floodgate_rate_pauses_total", k, s.rate_pauses);
    e.c("floodgate_budget_stops_total", k, s.budget_stops);
    e.c("floodgate_coalesced_pauses_total", k, s.coalesced_pauses);
    e.c(
        "floodgate_moderation_empty_pauses_total",
        k,
        s.moderation.empty_pauses,
    );
    e.c(
        "floodgate_moderation_paused_microseconds_total",
        k,
        s.moderation.paused_us,
    );
    e.c("floodgate_handler_panics_total", k, s.handler_panics);
    e.c("floodgate_condition_panics_total", k, s.condition_panics);
    e.c("floodgate_deferred_total", k, s.deferred);
    e.c("floodgate_peek_timeouts_total", k, s.peek_timeouts);
    e.c("floodgate_register_events_total", k, s.register_events);
    e.c("floodgate_register_rearms_total", k, s.register_rearms);
    let r = &s.relays;
    e.c("floodgate_relays_started_total", k, r.started);
    e.by(
        "floodgate_relays_ended_total",
        k,
        "end",
        &[
            ("completed", r.completed),
            ("idle_timeout", r.idle_timeout),
            ("closed_at_shutdown", r.closed_at_shutdown),
            ("client_reset", r.client_reset),
            ("upstream_reset", r.upstream_reset),
            ("upstream_refused", r.upstream_refused),
            ("upstream_timeout", r.upstream_timeout),
            ("error", r.errors),
        ],
    );
    e.by(
        "floodgate_relays_not_started_total",
        k,
        "why",
        &[("cap", r.refused_cap), ("start_failed", r.start_failed)],
    );
    e.c(
        "floodgate_relays_reset_at_shutdown_total",
        k,
        r.reset_at_shutdown,
    );
    e.c(
        "floodgate_relay_callback_panics_total",
        k,
        r.callback_panics,
    );
    e.by(
        "floodgate_relay_bytes_total",
        k,
        "direction",
        &[
            ("to_upstream", r.bytes_to_upstream),
            ("to_client", r.bytes_to_client),
        ],
    );
    e.g("floodgate_pending", k, s.pending);
    e.g("floodgate_admitting", k, s.admitting);
    e.g("floodgate_registered", k, s.registered);
    e.g("floodgate_ring_depth", k, s.ring_depth as u64);
    e.g("floodgate_ring_high_water", k, s.ring_high_water as u64);
    e.g("floodgate_ring_capacity", k, s.ring_capacity as u64);
    e.g(
        "floodgate_max_accepted_per_turn",
        k,
        s.max_accepted_per_turn,
    );
    e.g("floodgate_relays_active", k, r.active);
    if let Some(q) = s.kernel {
        e.g("floodgate_kernel_accept_queue", k, q.accept_queue.into());
        e.g("floodgate_kernel_backlog", k, q.backlog.into());
    }
    e.g("floodgate_last_accept_errno", k, s.last_errno as u64);
    e.g("floodgate_multishot", k, s.multishot.into());
    e.g(
        "floodgate_moderation_pause_microseconds",
        k,
        s.moderation.level_us,
    );
}

fn connector_expected(stats: &ConnectorStats) -> Expected {
    let mut e = Expected::default();
    for s in &stats.shards {
        connect_shard_expected(&mut e, s);
    }
    e
}

fn connect_shard_expected(e: &mut Expected, s: &ConnectShardStats) {
    let k = s.shard;
    e.c("floodgate_connect_submitted_total", k, s.submitted);
    e.c("floodgate_connect_connected_total", k, s.connected);
    e.by(
        "floodgate_connect_failed_total",
        k,
        "kind",
        &[
            ("refused", s.refused),
            ("timed_out", s.timed_out),
            ("addr_unavailable", s.addr_unavailable),
            ("unreachable", s.unreachable),
            ("exhausted", s.exhausted),
            ("other", s.other),
        ],
    );
    e.c("floodgate_connect_cancelled_total", k, s.cancelled);
    e.c("floodgate_connect_backoffs_total", k, s.backoffs);
    e.c(
        "floodgate_connect_sockets_created_total",
        k,
        s.sockets_created,
    );
    e.c(
        "floodgate_connect_sequences_started_total",
        k,
        s.sequences_started,
    );
    let ended: Vec<(&str, u64)> = floodgate::SequenceOutcome::ALL
        .iter()
        .map(|o| (o.name(), s.sequences.get(*o)))
        .collect();
    e.by(
        "floodgate_connect_sequences_ended_total",
        k,
        "outcome",
        &ended,
    );
    e.c("floodgate_connect_bytes_sent_total", k, s.bytes_sent);
    e.c(
        "floodgate_connect_bytes_received_total",
        k,
        s.bytes_received,
    );
    e.c(
        "floodgate_connect_handler_panics_total",
        k,
        s.handler_panics,
    );
    e.c(
        "floodgate_connect_moderation_pauses_total",
        k,
        s.moderation.pauses,
    );
    e.c(
        "floodgate_connect_moderation_paused_microseconds_total",
        k,
        s.moderation.paused_us,
    );
    e.g("floodgate_connect_in_flight", k, s.in_flight);
    e.g("floodgate_connect_open_sockets", k, s.open_sockets);
    e.g(
        "floodgate_connect_moderation_pause_microseconds",
        k,
        s.moderation.level_us,
    );
}

/// Parses `text` as the Prometheus text format, strictly: every line is a
/// HELP, a TYPE or a sample; every sample's family has a HELP and a TYPE
/// before it; the parser reads every sample line. Returns the samples but
/// the info metric `info` (whose free-text labels the parser cannot split),
/// which must appear as `info_line`.
fn parse_strictly(text: &str, info: &str, info_line: &str) -> BTreeMap<Key, (Kind, u64)> {
    let mut helped = Vec::new();
    let mut typed = Vec::new();
    let mut sample_lines = 0;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP name text");
            assert!(!help.trim().is_empty(), "{name} has no help");
            helped.push(name.to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').expect("TYPE name type");
            assert!(["counter", "gauge"].contains(&ty), "{line}");
            assert!(
                helped.last().map(String::as_str) == Some(name),
                "TYPE without HELP before it: {line}"
            );
            if ty == "counter" {
                assert!(
                    name.ends_with("_total"),
                    "a counter not named _total: {line}"
                );
            } else {
                assert!(!name.ends_with("_total"), "a gauge named _total: {line}");
            }
            typed.push(name.to_string());
        } else {
            let name_end = line
                .find(['{', ' '])
                .unwrap_or_else(|| panic!("not a sample: {line:?}"));
            let name = &line[..name_end];
            assert!(
                name.starts_with("floodgate_")
                    && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "bad metric name: {line}"
            );
            assert_eq!(typed.last().map(String::as_str), Some(name), "{line}");
            let value = line.rsplit_once(' ').map(|(_, v)| v).unwrap_or_default();
            assert!(value.parse::<f64>().is_ok(), "bad value: {line}");
            sample_lines += 1;
        }
    }
    let mut seen = typed.clone();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), typed.len(), "a family twice");
    assert!(
        text.lines().any(|l| l == info_line),
        "no `{info_line}` in:\n{text}"
    );

    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("parses");
    assert_eq!(
        scrape.samples.len(),
        sample_lines,
        "the parser skipped lines"
    );
    let mut out = BTreeMap::new();
    for s in scrape.samples {
        if s.metric == info {
            continue;
        }
        let (kind, v) = match s.value {
            Value::Counter(v) => (Kind::Counter, v),
            Value::Gauge(v) => (Kind::Gauge, v),
            other => panic!("{}: unexpected {other:?}", s.metric),
        };
        assert!(v >= 0.0 && v.fract() == 0.0, "{}: {v}", s.metric);
        let mut labels: Vec<(String, String)> = s
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.sort();
        let old = out.insert((s.metric.clone(), labels), (kind, v as u64));
        assert!(old.is_none(), "{} twice", s.metric);
    }
    out
}

/// The info sample a collector writes for `b`.
fn info_line(name: &str, b: &BackendChoice) -> String {
    format!(
        "{name}{{backend=\"{}\",reason=\"{}\"}} 1",
        b.backend, b.reason
    )
}

/// Both ways: every sample is expected and has its value, and every
/// expected sample is there.
fn assert_same(got: &BTreeMap<Key, (Kind, u64)>, want: &Expected, text: &str) {
    let mut wrong = Vec::new();
    for (k, v) in got {
        match want.0.get(k) {
            None => wrong.push(format!("unexpected {k:?} = {v:?}")),
            Some(w) if w != v => wrong.push(format!("{k:?}: got {v:?}, stats say {w:?}")),
            _ => {}
        }
    }
    for k in want.0.keys().filter(|k| !got.contains_key(*k)) {
        wrong.push(format!("missing {k:?}"));
    }
    assert!(wrong.is_empty(), "{}\n{text}", wrong.join("\n"));
}

fn scrape(registry: &Registry) -> String {
    let mut text = String::new();
    encode(&mut text, registry).expect("encode");
    text
}

const NORMAL: usize = 60;
const RESET: usize = 10;
const CLOSED: usize = 5;

#[test]
fn listener_collector_writes_exactly_the_listeners_stats() {
    listener_collector_case(None);
}

/// With limits the shards take another path (poll, then accept4) and the
/// listener-wide open-connection gauges appear.
#[test]
fn listener_collector_writes_the_limit_counters_and_open_gauges() {
    listener_collector_case(Some(1_000));
}

fn listener_collector_case(max_connections: Option<usize>) {
    let _g = serial();
    let baseline = FdTable::now();
    {
        let mut builder = Listener::builder("127.0.0.1:0".parse().unwrap());
        if let Some(n) = max_connections {
            builder = builder.max_connections(n).accept_budget(4);
        }
        let listener = builder
            .shards(2)
            .pin(false)
            .condition(|req: &ConnectRequest<'_>| match req.peer.ip() {
                IpAddr::V4(ip) if ip.octets()[3] == 3 => Verdict::reset(),
                IpAddr::V4(ip) if ip.octets()[3] == 4 => Verdict::close(),
                _ => Verdict::accept(),
            })
            .handler(|conn, ctx| {
                let _ = ctx.reply_and_close(conn, b"x");
            })
            .build()
            .expect("listener");
        let listener = Arc::new(listener);
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ListenerCollector::new(listener.clone())));

        let addr = listener.local_addr();
        let from = |last: u8, n: usize| {
            for _ in 0..n {
                let ended = ended_by_server_from([127, 0, 0, last].into(), addr).expect("connect");
                assert!(ended);
            }
        };
        from(2, NORMAL);
        from(3, RESET);
        from(4, CLOSED);
        let total = (NORMAL + RESET + CLOSED) as u64;
        wait_for("every connection decided", || {
            let t = listener.stats().total();
            t.accepted == total && t.delivered + t.rejected.total() == total && t.pending == 0
        });

        let before = listener.stats();
        let text = scrape(&registry);
        assert_eq!(listener.stats(), before, "the listener was not quiet");
        let t = before.total();
        assert_eq!(
            (t.delivered, t.rejected.reset, t.rejected.close),
            (NORMAL as u64, RESET as u64, CLOSED as u64)
        );
        let info = info_line("floodgate_backend_info", &listener.backend());
        let got = parse_strictly(&text, "floodgate_backend_info", &info);
        assert_same(&got, &listener_expected(&before), &text);
        assert_eq!(
            before.open.is_some(),
            text.contains("floodgate_max_connections "),
            "{text}"
        );

        drop(registry);
        listener.shutdown();
    }
    baseline.assert_back("descriptors leaked");
}

#[test]
fn connector_collector_writes_exactly_the_connectors_stats() {
    let _g = serial();
    let baseline = FdTable::now();
    {
        let server = banner_listener();
        let (_hold, refused) = floodgate_tests::refusing_port();
        let connector = Connector::builder()
            .shards(1)
            .pin(false)
            .build()
            .expect("connector");
        let connector = Arc::new(connector);
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ConnectorCollector::new(connector.clone())));

        let plan = SequencePlan::new(server.local_addr())
            .concurrency(4)
            .count(200);
        let summary = connector
            .run(&plan, |_| |_: &floodgate::SequenceRecord| {})
            .expect("run");
        assert_eq!(summary.started, 200);
        for _ in 0..5 {
            assert!(connector.connect(refused).is_err());
        }

        let before = connector.stats();
        let text = scrape(&registry);
        assert_eq!(connector.stats(), before, "the connector was not quiet");
        let t = before.total();
        assert_eq!((t.refused, t.sequences_started), (5, 200), "{t:?}");
        let info = info_line("floodgate_connect_backend_info", &connector.backend());
        let got = parse_strictly(&text, "floodgate_connect_backend_info", &info);
        assert_same(&got, &connector_expected(&before), &text);

        drop(registry);
        connector.shutdown();
        server.shutdown();
    }
    baseline.assert_back("descriptors leaked");
}
