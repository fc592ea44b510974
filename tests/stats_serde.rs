//! Stats serialisation (feature `serde`): every field of every stats and
//! summary type is in its JSON under its own name, with its value, and
//! reads back equal.

use std::net::IpAddr;

use floodgate::{
    Backend, BackendChoice, ConnectErrorKind, ConnectRequest, Connector, ConnectorStats, Listener,
    ListenerStats, RunSummary, SequenceOutcome, SequencePlan, Verdict,
};
use floodgate_tests::{banner_listener, ended_by_server_from, serial, wait_for, FdTable};
use serde_json::{json, Value};

/// The keys of a JSON object, sorted.
fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect();
    k.sort();
    k
}

fn sorted(names: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

#[test]
fn listener_stats_serialise_every_field_and_read_back_equal() {
    let _g = serial();
    let baseline = FdTable::now();
    {
        let listener = Listener::builder("127.0.0.1:0".parse().unwrap())
            .shards(1)
            .pin(false)
            .condition(|req: &ConnectRequest<'_>| match req.peer.ip() {
                IpAddr::V4(ip) if ip.octets()[3] == 3 => Verdict::reset(),
                _ => Verdict::accept(),
            })
            .handler(|conn, ctx| {
                let _ = ctx.reply_and_close(conn, b"x");
            })
            .build()
            .expect("listener");
        let addr = listener.local_addr();
        for last in [2, 2, 2, 3] {
            let ended = ended_by_server_from([127, 0, 0, last].into(), addr).expect("connect");
            assert!(ended);
        }
        wait_for("four decided", || {
            let t = listener.stats().total();
            t.delivered == 3 && t.rejected.reset == 1
        });
        let stats = listener.stats();
        let v = serde_json::to_value(&stats).expect("serialise");
        assert_eq!(keys(&v), sorted(&["open", "shards"]));
        let s = &v["shards"][0];
        let shard = &stats.shards[0];
        assert_eq!(
            keys(s),
            sorted(&[
                "shard",
                "accepted",
                "limit_pauses",
                "rate_pauses",
                "budget_stops",
                "max_accepted_per_turn",
                "delivered",
                "closed_at_shutdown",
                "ring_full_pauses",
                "resumes",
                "rearms",
                "backoff",
                "aborted",
                "accept_errors",
                "last_errno",
                "coalesced_pauses",
                "handler_panics",
                "rejected",
                "withdrawn",
                "deferred",
                "condition_panics",
                "peek_timeouts",
                "admitting",
                "registered",
                "register_events",
                "register_rearms",
                "pending",
                "ring_depth",
                "ring_high_water",
                "ring_capacity",
                "multishot",
                "kernel",
                "relays",
                "moderation",
            ])
        );
        assert_eq!(s["accepted"], json!(4));
        assert_eq!(s["delivered"], json!(3));
        assert_eq!(s["rejected"], json!({"close": 0, "reset": 1}));
        assert_eq!(s["withdrawn"], json!({"peer_gone": 0, "timeout": 0}));
        assert_eq!(
            s["backoff"],
            json!({"emfile": 0, "enfile": 0, "enobufs": 0, "enomem": 0})
        );
        assert_eq!(s["ring_capacity"], json!(shard.ring_capacity));
        assert_eq!(s["multishot"], json!(shard.multishot));
        let k = shard.kernel.expect("listening: the kernel queue is known");
        assert_eq!(
            s["kernel"],
            json!({"accept_queue": k.accept_queue, "backlog": k.backlog})
        );
        assert_eq!(
            keys(&s["relays"]),
            sorted(&[
                "started",
                "active",
                "completed",
                "failed",
                "closed_at_shutdown",
                "reset_at_shutdown",
                "idle_timeout",
                "client_reset",
                "upstream_reset",
                "upstream_refused",
                "upstream_timeout",
                "errors",
                "refused_cap",
                "start_failed",
                "callback_panics",
                "bytes_to_upstream",
                "bytes_to_client",
            ])
        );
        let back: ListenerStats = serde_json::from_value(v).expect("deserialise");
        assert_eq!(back, stats);

        // The listener's other descriptions.
        let b = listener.backlog();
        let v = serde_json::to_value(b).expect("backlog");
        assert_eq!(
            v,
            json!({"requested": b.requested, "ceiling": b.ceiling,
                   "effective": b.effective, "kernel": b.kernel})
        );
        assert_eq!(
            serde_json::from_value::<floodgate::BacklogLength>(v).ok(),
            Some(b)
        );
        let r = listener.ring_setup();
        let v = serde_json::to_value(r).expect("ring setup");
        assert_eq!(
            keys(&v),
            sorted(&["single_issuer", "defer_taskrun", "coop_taskrun"])
        );
        assert_eq!(
            serde_json::from_value::<floodgate::RingSetup>(v).ok(),
            Some(r)
        );
        let choice = listener.backend();
        let v = serde_json::to_value(&choice).expect("backend");
        assert_eq!(
            v,
            json!({"backend": choice.backend.to_string(), "reason": choice.reason})
        );
        assert_eq!(
            serde_json::from_value::<BackendChoice>(v).ok(),
            Some(choice)
        );
        listener.shutdown();
        // Once closed, the kernel queue is gone: null, and back as None.
        let stats = listener.stats();
        let v = serde_json::to_value(&stats).expect("serialise");
        assert_eq!(v["shards"][0]["kernel"], Value::Null);
        assert_eq!(serde_json::from_value::<ListenerStats>(v).ok(), Some(stats));
    }
    baseline.assert_back("descriptors leaked");
}

#[test]
fn backends_and_error_kinds_are_their_display_names() {
    for b in [Backend::Auto, Backend::IoUring, Backend::Epoll] {
        assert_eq!(serde_json::to_value(b).ok(), Some(json!(b.to_string())));
        assert_eq!(
            serde_json::from_value::<Backend>(json!(b.to_string())).ok(),
            Some(b)
        );
    }
    for o in SequenceOutcome::ALL {
        assert_eq!(serde_json::to_value(o).ok(), Some(json!(o.name())));
        assert_eq!(
            serde_json::from_value::<SequenceOutcome>(json!(o.name())).ok(),
            Some(o)
        );
        if let SequenceOutcome::Connect(k) = o {
            assert_eq!(serde_json::to_value(k).ok(), Some(json!(k.name())));
            assert_eq!(
                serde_json::from_value::<ConnectErrorKind>(json!(k.name())).ok(),
                Some(k)
            );
        }
    }
    let err = serde_json::from_value::<SequenceOutcome>(json!("lost")).expect_err("unknown");
    assert!(err.to_string().contains("`lost`"), "{err}");
}

#[test]
fn run_summary_and_connector_stats_serialise_and_read_back_equal() {
    let _g = serial();
    let baseline = FdTable::now();
    {
        let server = banner_listener();
        let connector = Connector::builder()
            .shards(1)
            .pin(false)
            .build()
            .expect("connector");
        let plan = SequencePlan::new(server.local_addr())
            .concurrency(2)
            .count(20);
        let summary = connector
            .run(&plan, |_| |_: &floodgate::SequenceRecord| {})
            .expect("run");
        let v = serde_json::to_value(summary).expect("summary");
        assert_eq!(keys(&v), sorted(&["started", "outcomes", "elapsed"]));
        assert_eq!(v["started"], json!(20));
        let outcomes = &v["outcomes"];
        let names: Vec<&str> = SequenceOutcome::ALL.iter().map(|o| o.name()).collect();
        assert_eq!(keys(outcomes), sorted(&names));
        for o in SequenceOutcome::ALL {
            assert_eq!(
                outcomes[o.name()],
                json!(summary.outcomes.get(o)),
                "{}",
                o.name()
            );
        }
        assert_eq!(outcomes["ok"], json!(20));
        assert_eq!(serde_json::from_value::<RunSummary>(v).ok(), Some(summary));
        // A missing outcome reads as 0; an unknown one is refused.
        let partial: floodgate::OutcomeCounts =
            serde_json::from_value(json!({"ok": 3})).expect("partial");
        assert_eq!((partial.total(), partial.get(SequenceOutcome::Ok)), (3, 3));
        assert!(serde_json::from_value::<floodgate::OutcomeCounts>(json!({"won": 1})).is_err());

        let stats = connector.stats();
        let v = serde_json::to_value(&stats).expect("stats");
        let s = &v["shards"][0];
        assert_eq!(
            keys(s),
            sorted(&[
                "shard",
                "submitted",
                "connected",
                "refused",
                "timed_out",
                "addr_unavailable",
                "unreachable",
                "exhausted",
                "other",
                "backoffs",
                "cancelled",
                "in_flight",
                "open_sockets",
                "sockets_created",
                "sequences",
                "sequences_started",
                "bytes_sent",
                "bytes_received",
                "handler_panics",
                "uring_socket",
                "direct_sockets",
                "moderation",
            ])
        );
        assert_eq!(s["sequences"]["ok"], json!(20));
        assert_eq!(s["connected"], json!(stats.shards[0].connected));
        assert_eq!(
            serde_json::from_value::<ConnectorStats>(v).ok(),
            Some(stats)
        );
        connector.shutdown();
        server.shutdown();
    }
    baseline.assert_back("descriptors leaked");
}
