//! `flood demo`: the engine and the flood in one process, on loopback.
//!
//! A listener (one shard per core, inline handler: banner `x` and close)
//! that refuses one source address, 127.0.0.9, by closing without the
//! banner; a connector spreading its connections over the sources
//! 127.0.0.2–127.0.0.17 (so one in sixteen is refused and shows as a
//! short read on the client side); a closed-loop flood for `--duration`;
//! then the client's table beside the engine's stats, and the check that
//! every accepted connection is accounted for.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use floodgate::cidr::{Cidr, CidrList};
use floodgate::{Connector, SequenceOutcome, SequencePlan};

use crate::args;
use crate::report::Cpu;
use crate::run;
use crate::serve;
use floodgate_bench::measure::CpuSample;

/// The source address the demo's server refuses.
pub const REFUSED_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 9);

/// `flood demo` options.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// How long to flood.
    #[arg(long, short = 'd', value_name = "D", default_value = "3s", allow_hyphen_values = true,
          value_parser = args::duration)]
    pub duration: Duration,

    /// Connections in flight.
    #[arg(long, short = 'c', value_name = "C", default_value_t = 64, allow_hyphen_values = true,
          value_parser = args::int_in(1u64, 100_000))]
    pub concurrency: u64,

    /// Print the client report as JSON (the engine's stats stay a table).
    #[arg(long)]
    pub json: bool,
}

fn side_by_side(left: &[String], right: &[String]) {
    let width = left.iter().map(|l| l.chars().count()).max().unwrap_or(0) + 4;
    for i in 0..left.len().max(right.len()) {
        let l = left.get(i).map_or("", String::as_str);
        let r = right.get(i).map_or("", String::as_str);
        let pad = width.saturating_sub(l.chars().count());
        crate::emit(&format!("{l}{}{r}", " ".repeat(pad)));
    }
}

/// `flood demo`.
pub fn main(a: DemoArgs) -> Result<ExitCode, String> {
    let cores = run::cores();
    let mut reject = CidrList::new();
    reject.push(
        Cidr::new(IpAddr::V4(REFUSED_SOURCE), 32)
            .map_err(|e| format!("the demo's reject block: {e}"))?,
    );
    let (listener, counts) = serve::start(
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        Some(cores),
        4096,
        reject,
        0,
        b"x".to_vec(),
        None,
    )?;
    let target = listener.local_addr();
    let sources: Vec<IpAddr> = (2..=17u8)
        .map(|last| IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
        .collect();
    let connector = Connector::builder()
        .shards(cores)
        .pin(false)
        .sources(sources)
        .build()
        .map_err(|e| format!("cannot start the connector: {e}"))?;
    crate::emit(&format!(
        "flood demo: engine on {target} ({} shards, backlog {}), flooding it for {:.1} s \
         from 127.0.0.2-127.0.0.17, {} in flight; {REFUSED_SOURCE} is refused\n\
         flood demo: backend: engine {}, client {}",
        listener.shards(),
        listener.backlog().effective,
        a.duration.as_secs_f64(),
        a.concurrency,
        listener.backend(),
        connector.backend()
    ));
    let plan = SequencePlan::new(target)
        .concurrency(a.concurrency as usize)
        .duration(a.duration)
        .expect(1);
    let before = CpuSample::take(None, None);
    let executed = run::execute(&connector, &plan, "demo")?;
    let summary = &executed.summary;
    let after = CpuSample::take(None, None);
    connector.shutdown();
    listener.shutdown();
    let ok = summary.outcomes.get(SequenceOutcome::Ok);
    // One process runs both sides: its CPU is printed apart, not as flood's.
    let cpu = Cpu::per_conn(&before, &after, ok);
    let rep = run::report(
        target,
        connector.shards(),
        &plan,
        &executed,
        Default::default(),
    );
    let (serve_stats, stats) = serve::final_stats(&listener, &counts, summary.elapsed);
    let t = stats.total();
    let mut engine = vec![
        format!("engine  {} shard(s)", listener.shards()),
        format!("accepted            {}", t.accepted),
        format!("delivered           {}", t.delivered),
        format!("  banner sent       {}", serve_stats.served),
        format!("rejected (condition) {}", t.rejected.total()),
        format!("withdrawn           {}", t.withdrawn.total()),
        format!("closed at shutdown  {}", t.closed_at_shutdown),
        format!("pending             {}", t.pending),
        format!("ring high water     {}", t.ring_high_water),
        format!("ring-full pauses    {}", t.ring_full_pauses),
        format!("multishot re-arms   {}", t.rearms),
    ];
    for s in &stats.shards {
        engine.push(format!(
            "  shard {}: accepted {} delivered {}",
            s.shard, s.accepted, s.delivered
        ));
    }
    if a.json {
        let text = serde_json::to_string(&rep).map_err(|e| format!("JSON: {e}"))?;
        crate::emit(&text);
        for l in &engine {
            crate::emit(l);
        }
    } else {
        let mut client = vec!["client (flood)".to_string()];
        client.extend(rep.table());
        side_by_side(&client, &engine);
    }
    if let Some(us) = cpu.flood_us_per_conn {
        crate::emit(&format!(
            "process CPU (engine and flood together): {us:.2} µs per connection"
        ));
    }
    let conserved = stats.conserved();
    crate::emit(&format!(
        "conservation: accepted == delivered + rejected + withdrawn + closed_at_shutdown + pending: \
         {} == {} + {} + {} + {} + {} -> {}",
        t.accepted,
        t.delivered,
        t.rejected.total(),
        t.withdrawn.total(),
        t.closed_at_shutdown,
        t.pending,
        if conserved { "holds" } else { "BROKEN" }
    ));
    let short = summary.outcomes.get(SequenceOutcome::ShortRead);
    // Closed without the banner: rejected by the condition, or withdrawn.
    let refused = serve_stats.rejected + serve_stats.withdrawn;
    crate::emit(&format!(
        "cross-check: client ok {} == banners sent {} -> {}; client short reads {} == refused {} -> {}",
        ok,
        serve_stats.served,
        if ok == serve_stats.served { "yes" } else { "no" },
        short,
        refused,
        if short == refused { "yes" } else { "no" },
    ));
    let client = connector.stats();
    if !client.conserved() || client.total().open_sockets != 0 {
        crate::emit(&format!("client accounting BROKEN: {:?}", client.total()));
        return Ok(ExitCode::FAILURE);
    }
    Ok(if conserved {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
