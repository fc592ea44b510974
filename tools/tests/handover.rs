//! Restart under load: successive hand-overs between `flood serve`
//! processes while `flood run` floods them at C=64. No connection may fail,
//! and the processes' counts must add up to what `flood` completed.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};

const FLOOD: &str = env!("CARGO_BIN_EXE_flood");

struct Server {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

/// Starts `flood serve ARGS`, returns once it printed LISTENING.
fn serve(args: &[&str]) -> (Server, String) {
    let mut child = Command::new(FLOOD)
        .arg("serve")
        .args(["--stats-interval", "0", "--max-seconds", "120"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn flood serve");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("LISTENING line");
    let addr = line
        .trim()
        .strip_prefix("LISTENING ")
        .unwrap_or_else(|| panic!("flood serve said {line:?}"))
        .to_string();
    (Server { child, out }, addr)
}

/// Waits for a server to exit by itself; its final JSON.
fn finish(mut s: Server) -> serde_json::Value {
    let mut text = String::new();
    s.out.read_to_string(&mut text).expect("final JSON");
    let status = s.child.wait().expect("wait");
    assert!(status.success(), "flood serve failed: {status} {text}");
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text:?}"))
}

fn handovers(count: usize, shard_counts: &[usize]) {
    let dir = std::env::temp_dir().join(format!("floodgate-handover-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sock");
    let path_s = path.to_str().unwrap().to_string();
    let shards = |i: usize| shard_counts[i % shard_counts.len()].to_string();
    let s0 = shards(0);
    let (first, addr) = serve(&[
        "--listen",
        "127.0.0.1:0",
        "--shards",
        &s0,
        "--handover",
        &path_s,
    ]);
    // Bounded: flood stops after this many connections; the hand-overs
    // happen while it runs (each waits for the previous one's release).
    let mut flood = Command::new(FLOOD)
        .args(["run", "--target", &addr, "--concurrency", "64"])
        .args(["--connections", "400000", "--duration", "60s", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn flood run");
    let mut servers = vec![first];
    for i in 1..=count {
        // The current server offers once it is serving (and, after a
        // takeover, once its predecessor let go): wait for its socket.
        wait_for_socket(&path, false);
        let last = i == count;
        let si = shards(i);
        let mut args = vec!["--takeover", path_s.as_str(), "--shards", si.as_str()];
        if !last {
            args.extend(["--handover", path_s.as_str()]);
        }
        // Take over: returns once the successor is accepting. The
        // predecessor then drains and exits by itself.
        let (s, a) = serve(&args);
        assert_eq!(a, addr, "the successor serves the same address");
        servers.push(s);
    }
    let mut run = String::new();
    flood
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut run)
        .unwrap();
    assert!(flood.wait().unwrap().success());
    let run: serde_json::Value = serde_json::from_str(run.trim()).unwrap();
    // The last one serves until told: close it with SIGTERM.
    let last = servers.pop().unwrap();
    let _ = Command::new("kill")
        .args(["-TERM", &last.child.id().to_string()])
        .status();
    let mut total = 0;
    for s in servers.into_iter().chain([last]) {
        let j = finish(s);
        assert_eq!(j["conserved"], true, "{j}");
        assert_eq!(j["closed_at_shutdown"], 0, "{j}");
        total += j["served"].as_u64().unwrap();
    }
    assert_eq!(run["errors"], 0, "flood saw failures: {run}");
    assert_eq!(
        run["ok"].as_u64().unwrap(),
        total,
        "the servers' counts add up to what flood completed"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Before the next successor connects, the current one must be offering:
/// it binds the path once its predecessor let go. Waits on the file.
fn wait_for_socket(path: &Path, last: bool) {
    if last {
        return;
    }
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        // The predecessor removed it when the successor connected; the
        // successor binds it again once the predecessor has let go (and
        // the predecessor's own offer socket is long closed by then).
        if let Ok(m) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if m.file_type().is_socket() && offering(path) {
                return;
            }
        }
        assert!(std::time::Instant::now() < give_up, "no successor offered");
        std::thread::park_timeout(std::time::Duration::from_millis(2));
    }
}

/// Whether someone listens on the Unix seqpacket socket at `path`, without
/// connecting (a connection would be taken for a successor): from
/// /proc/net/unix, state 01 (listening) with that path.
fn offering(path: &Path) -> bool {
    let p = path.to_string_lossy();
    std::fs::read_to_string("/proc/net/unix")
        .map(|t| {
            t.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() >= 8 && f[7] == p && f[3] == "00010000"
            })
        })
        .unwrap_or(false)
}

#[test]
fn successive_handovers_under_load_lose_nothing_also_with_changed_shard_counts() {
    let cores = core_affinity::get_core_ids().map_or(1, |c| c.len()).max(1);
    let counts: Vec<usize> = if cores >= 2 { vec![2, 1] } else { vec![1] };
    handovers(10, &counts);
}
