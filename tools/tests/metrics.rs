//! `flood serve --metrics ADDR`: `GET /metrics` answers with Prometheus
//! text whose counters equal the stats in serve's final JSON; a bad or
//! taken address is refused naming the flag.

mod support;

use std::io::{BufRead, Read};

use serde_json::Value;
use support::{flood, flood_code, serial, u, Server};

/// `GET path` from `addr` over HTTP/1.1: the status code, the headers
/// (lower-case names) and the body (`Content-Length` long).
fn http_get(addr: &str, path: &str) -> (u16, Vec<(String, String)>, String) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).expect("connect to --metrics");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the response");
    let text = String::from_utf8(raw).expect("a UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("headers, then the body");
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    assert!(header("transfer-encoding").is_none(), "{head}");
    let len: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no content-length: {head}"));
    assert_eq!(body.len(), len, "a short body");
    (status, headers, body.to_string())
}

/// The value the final JSON's stats of one shard hold for the metric
/// `name` with `labels` (written out from the JSON's own field names).
fn json_value(shard: &Value, name: &str, labels: &prometheus_parse::Labels) -> Option<u64> {
    let label = |k: &str| {
        labels
            .get(k)
            .unwrap_or_else(|| panic!("{name} without {k}"))
    };
    let relays = &shard["relays"];
    let v = match name {
        "floodgate_rejected_total" => &shard["rejected"][label("how")],
        "floodgate_withdrawn_total" => &shard["withdrawn"][label("cause")],
        "floodgate_accept_backoffs_total" => {
            &shard["backoff"][label("errno").to_ascii_lowercase().as_str()]
        }
        "floodgate_accept_aborted_total" => &shard["aborted"],
        "floodgate_accept_errors_total" => &shard["accept_errors"],
        "floodgate_accept_rearms_total" => &shard["rearms"],
        "floodgate_ring_resumes_total" => &shard["resumes"],
        "floodgate_relays_started_total" => &relays["started"],
        "floodgate_relays_ended_total" => match label("end") {
            "error" => &relays["errors"],
            end => &relays[end],
        },
        "floodgate_relays_not_started_total" => match label("why") {
            "cap" => &relays["refused_cap"],
            why => &relays[why],
        },
        "floodgate_relay_callback_panics_total" => &relays["callback_panics"],
        "floodgate_relays_reset_at_shutdown_total" => &relays["reset_at_shutdown"],
        "floodgate_relay_bytes_total" => &relays[format!("bytes_{}", label("direction")).as_str()],
        // The rest are named as in the JSON.
        other => {
            let field = other
                .strip_prefix("floodgate_")
                .map(|n| n.strip_suffix("_total").unwrap_or(n))?;
            &shard[field]
        }
    };
    v.as_u64()
}

#[test]
fn serve_metrics_endpoint_parses_and_its_counters_equal_the_final_json() {
    let _g = serial();
    let mut server = Server::start(&["--metrics", "127.0.0.1:0", "--reject-cidr", "127.0.0.3/32"]);
    let mut line = String::new();
    server.out.read_line(&mut line).expect("METRICS line");
    let metrics = line
        .trim()
        .strip_prefix("METRICS ")
        .unwrap_or_else(|| panic!("unexpected second line {line:?}"))
        .to_string();
    let (ok, stdout, stderr) = flood(&[
        "run",
        "--target",
        &server.addr,
        "--connections",
        "400",
        "--concurrency",
        "8",
        "--sources",
        "127.0.0.2-127.0.0.5",
        "--threads",
        "1",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("ok 300"), "{stdout}");
    // Every connection has ended on the client's side, so the server's
    // counters are final: the scrape and the JSON at exit see the same.
    let (status, headers, body) = http_get(&metrics, "/metrics");
    let (missing, _, _) = http_get(&metrics, "/nothing");
    let json = server.stop();
    assert_eq!(status, 200, "{body}");
    assert_eq!(missing, 404);
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "content-type" && v.starts_with("text/plain; version=0.0.4")),
        "{headers:?}"
    );

    // Prometheus text: every line a HELP, a TYPE or a sample, each sample
    // after its family's TYPE, none skipped by the parser.
    let mut samples_seen = 0;
    let mut family = String::new();
    for l in body.lines() {
        if let Some(rest) = l.strip_prefix("# HELP ") {
            assert!(
                rest.split_once(' ').is_some_and(|(_, h)| !h.is_empty()),
                "{l}"
            );
        } else if let Some(rest) = l.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').expect("TYPE name type");
            assert!(ty == "counter" || ty == "gauge", "{l}");
            assert_eq!(ty == "counter", name.ends_with("_total"), "{l}");
            family = name.to_string();
        } else {
            assert!(
                l.starts_with(&format!("{family}{{")),
                "not a sample of {family}: {l}"
            );
            samples_seen += 1;
        }
    }
    let scrape =
        prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("parses");
    assert_eq!(
        scrape.samples.len(),
        samples_seen,
        "the parser skipped lines"
    );

    let shards = json["stats"]["shards"]
        .as_array()
        .expect("stats.shards in the JSON");
    let mut counters = 0;
    for s in &scrape.samples {
        let prometheus_parse::Value::Counter(v) = s.value else {
            continue;
        };
        let k: usize = s
            .labels
            .get("shard")
            .and_then(|k| k.parse().ok())
            .unwrap_or_else(|| panic!("{} without a shard", s.metric));
        let want = json_value(&shards[k], &s.metric, &s.labels)
            .unwrap_or_else(|| panic!("{} {:?} is not in the JSON", s.metric, s.labels));
        assert_eq!(v, want as f64, "{} {}", s.metric, s.labels);
        counters += 1;
    }
    assert!(counters >= 30, "only {counters} counters");
    let get = |metric: &str, key: &str, val: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == metric && (key.is_empty() || s.labels.get(key) == Some(val)))
            .map(|s| s.value.clone())
    };
    use prometheus_parse::Value::{Counter, Gauge};
    assert_eq!(
        get("floodgate_accepted_total", "", ""),
        Some(Counter(400.0))
    );
    assert_eq!(
        get("floodgate_rejected_total", "how", "close"),
        Some(Counter(100.0))
    );
    assert_eq!(u(&json, "served"), 300);
    let capacity = shards[0]["ring_capacity"].as_u64().expect("ring_capacity");
    assert_eq!(
        get("floodgate_ring_capacity", "", ""),
        Some(Gauge(capacity as f64))
    );
    let backend = json["backend"].as_str().expect("backend");
    let info = body
        .lines()
        .find(|l| l.starts_with("floodgate_backend_info{"))
        .unwrap_or_else(|| panic!("no backend info: {body}"));
    let (name, _) = backend.split_once(' ').expect("backend (reason)");
    assert!(
        info.contains(&format!("backend=\"{name}\"")),
        "{info} vs {backend}"
    );
}

#[test]
fn a_metrics_address_in_use_is_refused_naming_the_flag() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let (code, _, stderr) = flood_code(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--shards",
        "1",
        "--metrics",
        &addr,
    ]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("--metrics") && stderr.contains(&addr),
        "{stderr}"
    );
}
