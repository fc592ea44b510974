//! Measurement helpers: `/proc` counters and a cgroup CPU cap.
//!
//! - [`proc_cpu_time`]: user + system CPU time of a whole process (`/proc/PID/stat`).
//! - [`own_cpu_time`]: the same for the calling process, from `getrusage` (µs resolution).
//! - [`proc_voluntary_switches`]: voluntary context switches summed over a process's live
//!   threads (`/proc/PID/task/*/status`).
//! - [`core_busy`]: one core's busy and total time (`/proc/stat`, softirq included).
//! - [`CpuSample`]: all of the above at the edges of a measured window, turned into figures
//!   per connection ([`CpuPerConn`]) the way `flood` and `client_epoll` report them.
//! - [`CpuQuota`]: a CPU-capped cgroup (v1 `cpu` controller, or v2 `cpu.max`) for saturated
//!   runs, removed again on drop.
//!
//! The `parse_*` functions take the text of the `/proc` files so they can be tested on samples.

use std::fs;
use std::io::{self, ErrorKind};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, msg.into())
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), the unit of `/proc` CPU times.
pub fn clock_ticks_per_second() -> io::Result<u64> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        return Err(io::Error::other("sysconf(_SC_CLK_TCK) failed"));
    }
    Ok(hz as u64)
}

/// Converts clock ticks to a [`Duration`] at `hz` ticks per second.
pub fn ticks_to_duration(ticks: u64, hz: u64) -> Duration {
    let nanos = u128::from(ticks) * 1_000_000_000 / u128::from(hz.max(1));
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// Parses `(utime, stime)` in clock ticks from the text of `/proc/PID/stat`.
///
/// The second field (`comm`, in parentheses) may itself contain spaces and parentheses, so the
/// line is split at its last `)`; utime and stime are fields 14 and 15 of the whole line.
pub fn parse_stat_cpu_ticks(stat: &str) -> io::Result<(u64, u64)> {
    let close = stat
        .rfind(')')
        .ok_or_else(|| invalid("/proc stat: no ')' after comm"))?;
    // Fields after comm start with field 3 (state); utime is field 14, stime field 15.
    let mut rest = stat[close + 1..].split_ascii_whitespace().skip(11);
    let mut next = |name: &str| -> io::Result<u64> {
        rest.next()
            .ok_or_else(|| invalid(format!("/proc stat: missing {name}")))?
            .parse::<u64>()
            .map_err(|e| invalid(format!("/proc stat: bad {name}: {e}")))
    };
    let utime = next("utime")?;
    let stime = next("stime")?;
    Ok((utime, stime))
}

/// CPU time (user + system) consumed so far by all threads of process `pid`, living and exited.
pub fn proc_cpu_time(pid: u32) -> io::Result<Duration> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let (utime, stime) = parse_stat_cpu_ticks(&text)?;
    Ok(ticks_to_duration(utime + stime, clock_ticks_per_second()?))
}

/// CPU time (user + system) consumed so far by the calling process, all its threads, from
/// `getrusage(RUSAGE_SELF)`: microsecond resolution, where `/proc` counts 10 ms ticks.
pub fn own_cpu_time() -> io::Result<Duration> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one `struct rusage` through the pointer, which points at
    // zeroed memory of exactly that type, owned by this frame.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: getrusage returned 0, so it filled the struct (and it was zeroed before).
    let usage = unsafe { usage.assume_init() };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    Ok(tv(usage.ru_utime) + tv(usage.ru_stime))
}

/// Parses the `voluntary_ctxt_switches` count from the text of a `/proc/.../status` file.
pub fn parse_status_voluntary_switches(status: &str) -> io::Result<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))
        .ok_or_else(|| invalid("status: no voluntary_ctxt_switches line"))?
        .trim()
        .parse::<u64>()
        .map_err(|e| invalid(format!("status: bad voluntary_ctxt_switches: {e}")))
}

/// Voluntary context switches of process `pid`, summed over its threads
/// (`/proc/PID/task/*/status`).
///
/// Threads that exit between the listing and the read are skipped (their switches are not
/// counted), which suits the long-lived, fixed thread sets of the peers and servers measured.
pub fn proc_voluntary_switches(pid: u32) -> io::Result<u64> {
    let mut total = 0u64;
    for entry in fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = entry?.path().join("status");
        match fs::read_to_string(&path) {
            Ok(text) => total += parse_status_voluntary_switches(&text)?,
            // A thread that exited meanwhile.
            Err(e) if e.kind() == ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(total)
}

/// Cumulative time counters of one CPU core from `/proc/stat`, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoreTimes {
    /// user + nice + system + irq + softirq + steal.
    pub busy_ticks: u64,
    /// busy + idle + iowait.
    pub total_ticks: u64,
    /// Clock ticks per second of the counters.
    pub hz: u64,
}

impl CoreTimes {
    /// Busy time since an `earlier` sample of the same core (zero if the counters went back).
    pub fn busy_since(&self, earlier: &CoreTimes) -> Duration {
        ticks_to_duration(self.busy_ticks.saturating_sub(earlier.busy_ticks), self.hz)
    }

    /// Elapsed (busy + idle) time since an `earlier` sample of the same core.
    pub fn total_since(&self, earlier: &CoreTimes) -> Duration {
        ticks_to_duration(
            self.total_ticks.saturating_sub(earlier.total_ticks),
            self.hz,
        )
    }

    /// Busy fraction (0..=1) of the core since an `earlier` sample; 0 if no time elapsed.
    pub fn utilization_since(&self, earlier: &CoreTimes) -> f64 {
        let total = self.total_ticks.saturating_sub(earlier.total_ticks);
        if total == 0 {
            return 0.0;
        }
        self.busy_ticks.saturating_sub(earlier.busy_ticks) as f64 / total as f64
    }
}

/// Parses the `cpuN` line of `/proc/stat` text into `(busy, total)` ticks.
///
/// Guest time is already included in user (and guest_nice in nice), so it is not added again.
pub fn parse_proc_stat_core(stat: &str, core: usize) -> io::Result<(u64, u64)> {
    let label = format!("cpu{core}");
    let line = stat
        .lines()
        .find(|l| l.split_ascii_whitespace().next() == Some(label.as_str()))
        .ok_or_else(|| invalid(format!("/proc/stat: no {label} line")))?;
    let values = line
        .split_ascii_whitespace()
        .skip(1)
        .map(|v| {
            v.parse::<u64>()
                .map_err(|e| invalid(format!("/proc/stat {label}: bad value {v:?}: {e}")))
        })
        .collect::<io::Result<Vec<u64>>>()?;
    if values.len() < 8 {
        return Err(invalid(format!("/proc/stat {label}: fewer than 8 fields")));
    }
    let (user, nice, system, idle, iowait, irq, softirq, steal) = (
        values[0], values[1], values[2], values[3], values[4], values[5], values[6], values[7],
    );
    let busy = user + nice + system + irq + softirq + steal;
    Ok((busy, busy + idle + iowait))
}

/// Samples the busy and total time of CPU `core` from `/proc/stat`.
pub fn core_busy(core: usize) -> io::Result<CoreTimes> {
    let text = fs::read_to_string("/proc/stat")?;
    let (busy_ticks, total_ticks) = parse_proc_stat_core(&text, core)?;
    Ok(CoreTimes {
        busy_ticks,
        total_ticks,
        hz: clock_ticks_per_second()?,
    })
}

/// CPU counters sampled at one edge of a measured window: the calling process (getrusage),
/// optionally a server process (`/proc/PID`) and a core (`/proc/stat`). Counters that cannot
/// be read are left out of the figures.
#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    own: Option<Duration>,
    server: Option<Duration>,
    switches: Option<u64>,
    core: Option<(usize, CoreTimes)>,
}

/// CPU figures per connection over a window (see [`CpuSample::per_conn`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuPerConn {
    /// The calling process's CPU time (all threads, user + system) per connection, µs.
    pub own_us: Option<f64>,
    /// The server process's CPU time per connection, µs.
    pub server_us: Option<f64>,
    /// The server's voluntary context switches per connection.
    pub server_voluntary_switches: Option<f64>,
    /// The core sampled.
    pub core: Option<usize>,
    /// That core's busy time (softirq included) per connection, µs.
    pub core_busy_us: Option<f64>,
}

impl CpuSample {
    /// Samples this process, the `server` process and `core`.
    pub fn take(server: Option<u32>, core: Option<usize>) -> Self {
        CpuSample {
            own: own_cpu_time().ok(),
            server: server.and_then(|p| proc_cpu_time(p).ok()),
            switches: server.and_then(|p| proc_voluntary_switches(p).ok()),
            core: core.and_then(|c| core_busy(c).ok().map(|t| (c, t))),
        }
    }

    /// Whether the core asked for could be read.
    pub fn has_core(&self) -> bool {
        self.core.is_some()
    }

    /// Figures per connection between `self` (before) and `after`, over `conns` connections.
    pub fn per_conn(&self, after: &CpuSample, conns: u64) -> CpuPerConn {
        let n = conns.max(1) as f64;
        let us = |a: Option<Duration>, b: Option<Duration>| {
            Some(b?.saturating_sub(a?).as_secs_f64() * 1e6 / n)
        };
        CpuPerConn {
            own_us: us(self.own, after.own),
            server_us: us(self.server, after.server),
            server_voluntary_switches: match (self.switches, after.switches) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / n),
                _ => None,
            },
            core: self.core.map(|(c, _)| c),
            core_busy_us: match (&self.core, &after.core) {
                (Some((_, a)), Some((_, b))) => Some(b.busy_since(a).as_secs_f64() * 1e6 / n),
                _ => None,
            },
        }
    }
}

/// Which cgroup hierarchy a [`CpuQuota`] lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// cgroup v1 `cpu` controller (`cpu.cfs_period_us`, `cpu.cfs_quota_us`, `tasks`).
    V1,
    /// cgroup v2 unified hierarchy (`cpu.max`, `cgroup.procs`).
    V2,
}

/// Finds the cgroup root to create CPU-capped groups under: the v1 `cpu` controller mount if
/// there is one, else a v2 hierarchy whose root offers the `cpu` controller.
pub fn find_cpu_cgroup_root() -> io::Result<(PathBuf, CgroupVersion)> {
    for dir in ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"] {
        let root = Path::new(dir);
        if root.join("cpu.cfs_quota_us").exists() && root.join("tasks").exists() {
            return Ok((root.to_path_buf(), CgroupVersion::V1));
        }
    }
    let v2 = Path::new("/sys/fs/cgroup");
    if let Ok(controllers) = fs::read_to_string(v2.join("cgroup.controllers")) {
        if controllers.split_ascii_whitespace().any(|c| c == "cpu") {
            return Ok((v2.to_path_buf(), CgroupVersion::V2));
        }
    }
    Err(io::Error::new(
        ErrorKind::NotFound,
        "no cgroup cpu controller: neither /sys/fs/cgroup/cpu (v1) nor cpu in \
         /sys/fs/cgroup/cgroup.controllers (v2)",
    ))
}

fn write_file(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// A cgroup with a CPU bandwidth cap (`quota_us` of CPU time per `period_us`).
///
/// Created under the root of the cgroup v1 `cpu` controller (`/sys/fs/cgroup/cpu/<name>` or
/// `/sys/fs/cgroup/cpu,cpuacct/<name>`), or, where only cgroup v2 is available, as a child
/// `/sys/fs/cgroup/<name>` with `cpu.max`. Needs root. Dropping it moves every task left in it
/// back to the root group and removes the directory.
#[derive(Debug)]
pub struct CpuQuota {
    root: PathBuf,
    dir: PathBuf,
    version: CgroupVersion,
}

impl CpuQuota {
    /// Creates (or reuses, if left over) the group `name` with the given period and quota.
    ///
    /// `name` must be a single path component. v1 limits: period 1 ms ..= 1 s, quota >= 1 ms.
    pub fn create(name: &str, period_us: u64, quota_us: u64) -> io::Result<CpuQuota> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(io::Error::new(
                ErrorKind::InvalidInput,
                format!("cgroup name {name:?} must be one path component"),
            ));
        }
        let (root, version) = find_cpu_cgroup_root()?;
        if version == CgroupVersion::V2 {
            // Enable the cpu controller for the root's children (allowed at the root).
            let control = root.join("cgroup.subtree_control");
            let enabled = fs::read_to_string(&control)?;
            if !enabled.split_ascii_whitespace().any(|c| c == "cpu") {
                write_file(&control, "+cpu")?;
            }
        }
        let dir = root.join(name);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("mkdir {}: {e}", dir.display()),
                ))
            }
        }
        let quota = CpuQuota { root, dir, version };
        match version {
            CgroupVersion::V1 => {
                // Lift any old quota first so that no intermediate state is rejected.
                write_file(&quota.dir.join("cpu.cfs_quota_us"), "-1")?;
                write_file(&quota.dir.join("cpu.cfs_period_us"), &period_us.to_string())?;
                write_file(&quota.dir.join("cpu.cfs_quota_us"), &quota_us.to_string())?;
            }
            CgroupVersion::V2 => {
                write_file(
                    &quota.dir.join("cpu.max"),
                    &format!("{quota_us} {period_us}"),
                )?;
            }
        }
        Ok(quota)
    }

    /// The group's directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The cgroup version in use.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The group's path relative to its hierarchy's root, as `/proc/PID/cgroup` names it.
    pub fn cgroup_path(&self) -> String {
        match self.dir.strip_prefix(&self.root) {
            Ok(rel) => format!("/{}", rel.display()),
            Err(_) => self.dir.display().to_string(),
        }
    }

    /// Moves every thread of process `pid` into the group (v1: each tid of `/proc/PID/task` to
    /// `tasks`; v2: `pid` to `cgroup.procs`). Returns the number of threads moved (1 on v2).
    ///
    /// Threads the process creates later inherit the group from their creator.
    pub fn add_process_threads(&self, pid: u32) -> io::Result<usize> {
        match self.version {
            CgroupVersion::V2 => {
                write_file(&self.dir.join("cgroup.procs"), &pid.to_string())?;
                Ok(1)
            }
            CgroupVersion::V1 => {
                let tasks = self.dir.join("tasks");
                let mut moved = 0;
                for entry in fs::read_dir(format!("/proc/{pid}/task"))? {
                    let entry = entry?;
                    let tid = entry.file_name();
                    let Some(tid) = tid.to_str() else { continue };
                    match write_file(&tasks, tid) {
                        Ok(()) => moved += 1,
                        // The thread exited meanwhile.
                        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                        Err(e) => return Err(e),
                    }
                }
                if moved == 0 {
                    return Err(io::Error::new(
                        ErrorKind::NotFound,
                        format!("process {pid} has no threads left to move"),
                    ));
                }
                Ok(moved)
            }
        }
    }

    /// Moves every task in the group back to the root group; returns how many were moved.
    fn evacuate(&self) -> io::Result<usize> {
        let (list, target) = match self.version {
            CgroupVersion::V1 => ("tasks", "tasks"),
            CgroupVersion::V2 => ("cgroup.procs", "cgroup.procs"),
        };
        let ids = fs::read_to_string(self.dir.join(list))?;
        let target = self.root.join(target);
        let mut moved = 0;
        for id in ids.split_ascii_whitespace() {
            match write_file(&target, id) {
                Ok(()) => moved += 1,
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(moved)
    }

    /// Moves all tasks back to the root group and removes the directory.
    fn remove(&self) -> io::Result<()> {
        let mut last = None;
        // A thread created meanwhile inherits the group: retry a few rounds.
        for _ in 0..10 {
            self.evacuate()?;
            match fs::remove_dir(&self.dir) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("cgroup still busy")))
    }
}

impl Drop for CpuQuota {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("CpuQuota: cannot remove {}: {e}", self.dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn cpu_sample_gives_figures_only_for_what_it_sampled() {
        let before = CpuSample::take(None, Some(0));
        assert!(before.has_core());
        let after = CpuSample::take(None, Some(0));
        let f = before.per_conn(&after, 10);
        assert!(f.own_us.is_some_and(|us| us >= 0.0));
        assert_eq!(f.core, Some(0));
        assert!(f.core_busy_us.is_some());
        assert_eq!((f.server_us, f.server_voluntary_switches), (None, None));
        let none = CpuSample::take(None, None).per_conn(&CpuSample::take(None, None), 10);
        assert_eq!((none.core, none.core_busy_us), (None, None));
    }

    #[test]
    fn own_cpu_time_advances_with_work_and_agrees_with_proc() {
        let start = own_cpu_time().unwrap();
        // Spin until getrusage sees more CPU time (bounded by a count, not a clock).
        let mut x = 0u64;
        let mut advanced = false;
        for _ in 0..10_000 {
            for i in 0..100_000u64 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
            }
            if own_cpu_time().unwrap() > start {
                advanced = true;
                break;
            }
        }
        assert!(advanced, "no CPU time counted ({x})");
        // /proc counts in ticks and lags: it never exceeds getrusage's total.
        let from_proc = proc_cpu_time(std::process::id()).unwrap();
        let tick = ticks_to_duration(1, clock_ticks_per_second().unwrap());
        assert!(from_proc <= own_cpu_time().unwrap() + tick);
    }

    #[test]
    fn stat_plain() {
        let s = "1234 (peer_std) S 1 1234 1234 0 -1 4194560 120 0 0 0 \
                 37 15 0 0 20 0 1 0 8123 10000000 300 18446744073709551615 1 1 0 0 0 0 0 \
                 0 0 0 0 0 0 17 0 0 0 0 0 0\n";
        assert_eq!(parse_stat_cpu_ticks(s).unwrap(), (37, 15));
    }

    #[test]
    fn stat_comm_with_parens_and_spaces() {
        let s = "42 (a) (b) c) R 1 42 42 0 -1 0 0 0 0 0 1000 2000 0 0 20 0 3 0 5 0 0\n";
        assert_eq!(parse_stat_cpu_ticks(s).unwrap(), (1000, 2000));
        let s = "7 (x ) ( y) S 1 7 7 0 -1 0 0 0 0 0 5 6 0 0\n";
        assert_eq!(parse_stat_cpu_ticks(s).unwrap(), (5, 6));
    }

    #[test]
    fn stat_malformed() {
        assert!(parse_stat_cpu_ticks("no parens at all").is_err());
        assert!(parse_stat_cpu_ticks("1 (short) S 1 2 3").is_err());
        assert!(parse_stat_cpu_ticks("1 (x) S 1 1 1 0 -1 0 0 0 0 0 zz 1 0").is_err());
    }

    #[test]
    fn ticks_convert() {
        assert_eq!(ticks_to_duration(250, 100), Duration::from_millis(2500));
        assert_eq!(ticks_to_duration(0, 100), Duration::ZERO);
    }

    #[test]
    fn status_switches() {
        let s = "Name:\tpeer_uring\nState:\tS (sleeping)\nThreads:\t1\n\
                 voluntary_ctxt_switches:\t150\nnonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(parse_status_voluntary_switches(s).unwrap(), 150);
        let s = "Name:\tx\nnonvoluntary_ctxt_switches:\t7\n";
        assert!(parse_status_voluntary_switches(s).is_err());
    }

    #[test]
    fn proc_stat_core() {
        let s = "cpu  100 2 30 1000 5 1 4 0 0 0\n\
                 cpu0 60 1 20 500 3 1 3 2 7 0\n\
                 cpu1 40 1 10 500 2 0 1 0 0 0\n\
                 cpu10 9 9 9 9 9 9 9 9 9 9\n\
                 intr 12345\n";
        assert_eq!(
            parse_proc_stat_core(s, 0).unwrap(),
            (60 + 1 + 20 + 1 + 3 + 2, 87 + 503)
        );
        assert_eq!(parse_proc_stat_core(s, 1).unwrap(), (52, 554));
        assert_eq!(parse_proc_stat_core(s, 10).unwrap(), (54, 72));
        assert!(parse_proc_stat_core(s, 2).is_err());
        assert!(parse_proc_stat_core("cpu0 1 2 3\n", 0).is_err());
    }

    #[test]
    fn core_times_deltas() {
        let a = CoreTimes {
            busy_ticks: 100,
            total_ticks: 1000,
            hz: 100,
        };
        let b = CoreTimes {
            busy_ticks: 150,
            total_ticks: 1100,
            hz: 100,
        };
        assert_eq!(b.busy_since(&a), Duration::from_millis(500));
        assert_eq!(b.total_since(&a), Duration::from_secs(1));
        assert!((b.utilization_since(&a) - 0.5).abs() < 1e-9);
        assert_eq!(a.busy_since(&b), Duration::ZERO);
    }

    #[test]
    fn live_self_counters() {
        let pid = std::process::id();
        // Burn a little CPU so the counter is nonzero at tick granularity.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(30) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        assert_ne!(x, 1);
        assert!(proc_cpu_time(pid).unwrap() > Duration::ZERO);
        proc_voluntary_switches(pid).unwrap();
        let t = core_busy(0).unwrap();
        assert!(t.total_ticks >= t.busy_ticks);
        assert!(proc_cpu_time(u32::MAX).is_err());
    }

    fn cgroup_line_for(pid: u32, version: CgroupVersion) -> String {
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        text.lines()
            .find_map(|line| {
                let mut parts = line.splitn(3, ':');
                let (_, ctrl, path) = (parts.next()?, parts.next()?, parts.next()?);
                let hit = match version {
                    CgroupVersion::V1 => ctrl.split(',').any(|c| c == "cpu"),
                    CgroupVersion::V2 => ctrl.is_empty(),
                };
                hit.then(|| path.to_string())
            })
            .unwrap()
    }

    #[test]
    fn cpu_quota_lifecycle() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || find_cpu_cgroup_root().is_err() {
            eprintln!("skipping cpu_quota_lifecycle: needs root and a cgroup cpu controller");
            return;
        }
        let mut child = Command::new("sleep")
            .arg("60")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        let name = format!("floodgate-bench-test-{}", std::process::id());
        let result = std::panic::catch_unwind(|| {
            let quota = CpuQuota::create(&name, 10_000, 2_000).unwrap();
            let dir = quota.path().to_path_buf();
            assert!(dir.is_dir());
            let version = quota.version();
            if version == CgroupVersion::V1 {
                let q = fs::read_to_string(dir.join("cpu.cfs_quota_us")).unwrap();
                let p = fs::read_to_string(dir.join("cpu.cfs_period_us")).unwrap();
                assert_eq!((q.trim(), p.trim()), ("2000", "10000"));
            }
            assert_eq!(quota.add_process_threads(pid).unwrap(), 1);
            assert_eq!(cgroup_line_for(pid, version), quota.cgroup_path());
            assert_eq!(quota.cgroup_path(), format!("/{name}"));
            drop(quota);
            assert!(!dir.exists(), "{} still exists", dir.display());
            // Drop moves the tasks back to the hierarchy's root group.
            assert_eq!(cgroup_line_for(pid, version), "/");
        });
        let _ = child.kill();
        let _ = child.wait();
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }

    #[test]
    fn cpu_quota_rejects_bad_names() {
        for bad in ["", "a/b", "..", "."] {
            assert_eq!(
                CpuQuota::create(bad, 10_000, 2_000).unwrap_err().kind(),
                ErrorKind::InvalidInput
            );
        }
    }
}
