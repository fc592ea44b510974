//! What a run measured: latency histograms per shard (merged at the end),
//! CPU figures, and the report printed as a table or as one JSON object.

use floodgate_bench::measure::{CpuPerConn, CpuSample};
use std::collections::BTreeMap;
use std::time::Duration;

use floodgate::{OutcomeCounts, SequenceOutcome, SequenceRecord};
use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies are recorded in nanoseconds, 3 significant digits, up to 1 h.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3)
        .expect("constant histogram bounds are valid")
}

/// One shard's histograms, filled on the shard thread.
#[derive(Debug)]
pub struct Latencies {
    /// Intended start to connect completion.
    pub connect: Histogram<u64>,
    /// Intended start to the first response byte.
    pub first_byte: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            connect: new_histogram(),
            first_byte: new_histogram(),
        }
    }
}

impl Latencies {
    /// Records one finished sequence (successful ones only: a refused
    /// connect's latency says little).
    pub fn record(&mut self, r: &SequenceRecord) {
        if r.outcome != SequenceOutcome::Ok {
            return;
        }
        if let Some(c) = r.connect {
            self.connect.saturating_record(nanos(c));
        }
        if let Some(f) = r.first_byte {
            self.first_byte.saturating_record(nanos(f));
        }
    }

    /// Adds another shard's histograms.
    pub fn merge(&mut self, other: &Latencies) {
        // Both have the same bounds, so adding cannot fail; if it did, the
        // figures would only miss that shard.
        let _ = self.connect.add(&other.connect);
        let _ = self.first_byte.add(&other.first_byte);
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Percentiles of one histogram, in microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p99_9: f64,
    /// Largest.
    pub max: f64,
}

impl Percentiles {
    /// Summarises `h` (nanoseconds) in microseconds; `None` without samples
    /// (zeros would read as a latency of 0).
    pub fn of(h: &Histogram<u64>) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        let us = |v: u64| v as f64 / 1000.0;
        Some(Percentiles {
            count: h.len(),
            p50: us(h.value_at_quantile(0.5)),
            p90: us(h.value_at_quantile(0.9)),
            p99: us(h.value_at_quantile(0.99)),
            p99_9: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        })
    }
}

/// CPU cost over the measured window, per successful connection (`None`
/// where not measured, and all `None` when no connection succeeded).
#[derive(Debug, Clone, Serialize, Default)]
pub struct Cpu {
    /// flood's own CPU time (all threads, user + system, from getrusage) per connection, µs.
    pub flood_us_per_conn: Option<f64>,
    /// The server's (`--server-pid`) CPU time per connection, µs.
    pub server_us_per_conn: Option<f64>,
    /// The server's voluntary context switches per connection.
    pub server_voluntary_switches_per_conn: Option<f64>,
    /// The core flood was pinned to (`--pin`).
    pub core: Option<usize>,
    /// That core's busy time (softirq included) per connection, µs.
    pub core_busy_us_per_conn: Option<f64>,
}

impl Cpu {
    /// The figures per successful connection between two samples; with no
    /// successful connection there are none (dividing by one instead would
    /// pass the window's whole CPU time off as the cost of a connection).
    pub fn per_conn(before: &CpuSample, after: &CpuSample, ok: u64) -> Cpu {
        let all = Cpu::from(before.per_conn(after, ok));
        if ok > 0 {
            return all;
        }
        Cpu {
            core: all.core,
            ..Cpu::default()
        }
    }
}

impl From<CpuPerConn> for Cpu {
    fn from(c: CpuPerConn) -> Self {
        Cpu {
            flood_us_per_conn: c.own_us,
            server_us_per_conn: c.server_us,
            server_voluntary_switches_per_conn: c.server_voluntary_switches,
            core: c.core,
            core_busy_us_per_conn: c.core_busy_us,
        }
    }
}

/// The whole report of `flood run` (and the client half of `flood demo`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The target address.
    pub target: String,
    /// Shards (threads) that ran the load.
    pub threads: usize,
    /// `closed` or `open`.
    pub mode: &'static str,
    /// Closed loop: sequences in flight.
    pub concurrency: Option<usize>,
    /// Open loop: intended connections per second.
    pub rate: Option<f64>,
    /// The measured window, seconds (warm-up excluded).
    pub elapsed_s: f64,
    /// Sequences started in the window.
    pub started: u64,
    /// Sequences that did everything asked (connect, send, receive, close).
    pub ok: u64,
    /// All the others.
    pub errors: u64,
    /// Every outcome other than ok, by name (zeros included).
    pub errors_by_kind: BTreeMap<&'static str, u64>,
    /// `ok / elapsed_s`.
    pub conn_per_s: f64,
    /// Intended start to connect completion, µs (ok sequences); `None`
    /// (null) when no sequence succeeded.
    pub connect_us: Option<Percentiles>,
    /// Intended start to first response byte, µs (ok sequences); `None`
    /// (null) when none succeeded or nothing was expected back.
    pub first_byte_us: Option<Percentiles>,
    /// CPU figures.
    pub cpu: Cpu,
    /// Sockets flood created in the window: about the concurrency when
    /// sockets are reused (direct sockets, RST close), else one per
    /// connection.
    pub sockets_created: u64,
    /// Whether every thread can keep its sockets in the ring's direct table
    /// (it does for runs without `--sources`).
    pub direct_sockets: bool,
}

impl Report {
    /// Builds the counts part of a report from a run's outcomes.
    pub fn counts(outcomes: &OutcomeCounts) -> (u64, u64, BTreeMap<&'static str, u64>) {
        let by_kind = SequenceOutcome::ALL
            .iter()
            .filter(|o| **o != SequenceOutcome::Ok)
            .map(|o| (o.name(), outcomes.get(*o)))
            .collect();
        (
            outcomes.get(SequenceOutcome::Ok),
            outcomes.errors(),
            by_kind,
        )
    }

    /// The report as text lines (the table).
    pub fn table(&self) -> Vec<String> {
        let mut out = Vec::new();
        let load = match (self.concurrency, self.rate) {
            (Some(c), _) => format!("closed loop, {c} in flight"),
            (None, Some(r)) => format!("open loop, {r:.0} conn/s intended"),
            _ => String::new(),
        };
        out.push(format!(
            "target {}  threads {}  {}  window {:.2} s",
            self.target, self.threads, load, self.elapsed_s
        ));
        out.push(format!(
            "connections  started {}  ok {}  errors {}",
            self.started, self.ok, self.errors
        ));
        let nonzero: Vec<String> = self
            .errors_by_kind
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        out.push(format!(
            "errors by kind  {}",
            if nonzero.is_empty() {
                "none".to_string()
            } else {
                nonzero.join("  ")
            }
        ));
        out.push(format!("rate  {:.0} conn/s", self.conn_per_s));
        out.push(format!(
            "client sockets  {} created for {} connections  ({})",
            self.sockets_created,
            self.started,
            if self.sockets_created < self.ok {
                "each reused after an RST disconnect"
            } else {
                "one per connection"
            }
        ));
        out.push(format!(
            "{:<16}{:>10}{:>10}{:>10}{:>10}{:>10}",
            "latency (µs)", "p50", "p90", "p99", "p99.9", "max"
        ));
        for (name, p) in [
            ("connect", &self.connect_us),
            ("first byte", &self.first_byte_us),
        ] {
            out.push(match p {
                Some(p) => format!(
                    "{:<16}{:>10.1}{:>10.1}{:>10.1}{:>10.1}{:>10.1}",
                    name, p.p50, p.p90, p.p99, p.p99_9, p.max
                ),
                // No samples: no figures, rather than zeros.
                None => format!(
                    "{name:<16}{:>10}{:>10}{:>10}{:>10}{:>10}",
                    "-", "-", "-", "-", "-"
                ),
            });
        }
        let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        let mut cpu = format!("cpu µs/conn  flood {}", f(self.cpu.flood_us_per_conn));
        if self.cpu.server_us_per_conn.is_some() {
            cpu += &format!(
                "  server {}  (server voluntary switches/conn {})",
                f(self.cpu.server_us_per_conn),
                f(self.cpu.server_voluntary_switches_per_conn)
            );
        }
        if let Some(core) = self.cpu.core {
            cpu += &format!("  core {core} busy {}", f(self.cpu.core_busy_us_per_conn));
        }
        if self.cpu.flood_us_per_conn.is_some() || self.cpu.server_us_per_conn.is_some() {
            out.push(cpu);
        }
        out
    }
}
